"""download, clean and resize outputs open in the tools users already have (docs/steps.md, "Use the outputs").

The outputs come from the real steps (download of a tar.gz written with ``tarfile``, clean,
resize) on tiny generated images under ``tmp_path`` (``file://``), with rejects at download
and at clean; each reader is the real library, called as the guide's one-liners call it:
Hugging Face ``datasets`` (offline, caches under ``tmp_path``), pandas, pyarrow and Ray
Data, on the data files or on the committed prefix as a directory (docs/architecture.md,
"Reading an output as a directory"). resize runs on Ray, so its tests and the Ray Data ones
are marked ``ray`` (run them under scripts/in-loopback-netns).
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import contract, parquet, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.resize import read_pixels, resize
from tests import imagefactory as f

CLASSES = ["cat", "dog"]
SIZE = 24
# datasets names the split of a `val/` folder `validation` (datasets 5.2.0
# src/datasets/data_files.py SPLIT_KEYWORDS); resize keeps `val` in its folders and column.
HF_SPLIT = {"train": "train", "val": "validation", "test": "test"}


def members() -> dict[str, bytes]:
    return {f"images/{name}_{i}.jpg": f.jpeg(60 + 3 * i, 48 + 4 * c, seed=10 * c + i) for c, name in enumerate(CLASSES) for i in range(1, 6)}


# Members download keeps and clean rejects, and one download rejects (a path leaving the archive).
CLEAN_REJECTS = {"images/cat_9.jpg": f.truncated_jpeg(9), "images/dog_9.jpg": f.html_as_jpg()}
DOWNLOAD_REJECTS = {"../outside.jpg": f.jpeg(50, 40, seed=99)}


@pytest.fixture(scope="module")
def download_dest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A committed download output of a tar.gz written with ``tarfile``: 12 members kept, 1 rejected."""
    archive = tmp_path_factory.mktemp("source") / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in {**members(), **CLEAN_REJECTS, **DOWNLOAD_REJECTS}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    dest = storage.join("file://" + str(tmp_path_factory.mktemp("outputs")), "download")
    report = download(str(archive), dest, DownloadConfig())
    assert report.outputs == len(members()) + len(CLEAN_REJECTS) and report.rejects_by_reason == {"unsafe_member": 1}
    return dest


@pytest.fixture(scope="module")
def clean_dest(download_dest: str) -> str:
    """A committed clean output of 10 images over train/val/test, in three files, and 2 rejected."""
    dest = storage.join(download_dest.rsplit("/", 1)[0], "clean")
    cfg = CleanConfig(workers=1, seed=1, split=(0.6, 0.2, 0.2), rows_per_shard=4, row_group_rows=2)
    report = clean(download_dest, dest, cfg)
    assert report.outputs == len(members()) and report.rejected == len(CLEAN_REJECTS) and all(report.extra["splits"].values())
    return dest


@pytest.fixture(scope="module", params=["raw", "jpeg"])
def resize_dest(request: pytest.FixtureRequest, ray_session, clean_dest: str) -> str:
    """A committed resize output of ``clean_dest``, in each format."""
    dest = storage.join(clean_dest.rsplit("/", 1)[0], f"resize-{request.param}")
    resize(clean_dest, dest, ResizeConfig(size=SIZE, format=request.param, batch_size=4, concurrency=1))
    return dest


def local(uri: str) -> str:
    """The local path of a ``file://`` URI (what a user types for a local output)."""
    return storage.arrow_path(uri)


def stored_rows(dest: str) -> dict[str, dict]:
    """Every data row of a committed output by ``path``, read with plain pyarrow."""
    table = pa.concat_tables([pq.read_table(u) for u in contract.data_files(dest)])
    return {row["path"]: row for row in table.to_pylist()}


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# ------------------------------------------------------------------ clean


def test_clean_output_loads_in_datasets_as_images_with_class_labels(hf_datasets, clean_dest, tmp_path):
    manifest = contract.read_manifest(clean_dest)
    ds = hf_datasets.load_dataset("parquet", data_files=contract.data_files(clean_dest), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], hf_datasets.Image)
    assert ds.features["label"] == hf_datasets.ClassLabel(names=manifest["extra"]["classes"])
    assert sorted(ds.features["label"].names) == sorted(CLASSES)
    # One datasets split holding every row; imgpipe's split is the `split` column.
    assert ds.num_rows == manifest["outputs"]
    assert Counter(ds["split"]) == {k: v for k, v in manifest["extra"]["splits"].items() if v}
    val = ds.filter(lambda s: s == "val", input_columns="split")
    assert val.num_rows == manifest["extra"]["splits"]["val"]
    stored = stored_rows(clean_dest)
    for row in ds:
        assert isinstance(row["image"], Image.Image)
        assert np.array_equal(np.asarray(row["image"]), decoded(stored[row["path"]]["image"]["bytes"]))
        assert ds.features["label"].int2str(row["label"]) == row["label_name"]
    # A glob of the data files works as well as the prefix itself (data_dir: below).
    glob = hf_datasets.load_dataset("parquet", data_files=f"{local(clean_dest)}/part-*.parquet", split="train", cache_dir=str(tmp_path / "cache"))
    assert glob.num_rows == ds.num_rows and glob.features == ds.features


def test_clean_output_in_pandas_and_pyarrow(clean_dest):
    files = contract.data_files(clean_dest)
    stored = stored_rows(clean_dest)
    df = pd.concat([pd.read_parquet(u) for u in files], ignore_index=True)
    assert len(df) == len(stored) and df["label"].dtype == np.int64
    first = df.iloc[0]
    assert Image.open(io.BytesIO(first["image"]["bytes"])).size == (first["width"], first["height"])
    table = pa.concat_tables([pq.read_table(u) for u in files])
    assert table.num_rows == len(stored)
    assert table.schema.metadata[parquet.HF_METADATA_KEY], "pyarrow keeps the datasets features"
    contract.verify_output(clean_dest)  # the digests the manifest records are those of the files


# ------------------------------------------------------------------ a committed prefix as a directory


def assert_data_rows(columns: dict[str, list], dest: str, payload: str) -> None:
    """``columns`` (a reader's whole result) are exactly the data rows of ``dest``: no reject, no side file's rows."""
    manifest = contract.read_manifest(dest)
    paths = sorted(stored_rows(dest))
    assert len(paths) == manifest["outputs"]
    assert sorted(columns["path"]) == paths, "every data row once, and nothing else"
    for name in (payload, "label") if manifest["step"] != "download" else (payload,):
        assert len(columns[name]) == len(paths) and all(v is not None for v in columns[name]), f"a null {name}"
    rejected = {r["path"] for r in contract.read_rejects(dest).to_pylist()}
    assert not rejected & set(columns["path"])
    assert bool(rejected) == (manifest["step"] != "resize"), "download and clean have rejects (the fixtures)"


def read_directory_everywhere(folder: str) -> dict[str, dict[str, list]]:
    """The prefix as pyarrow, pyarrow.dataset and pandas read a directory."""
    return {
        "pyarrow.parquet": pq.read_table(folder).to_pydict(),
        "pyarrow.dataset": pads.dataset(folder, format="parquet").to_table().to_pydict(),
        "pandas": pd.read_parquet(folder).to_dict("list"),
    }


def test_download_and_clean_prefixes_read_as_directories_of_their_data_rows(hf_datasets, download_dest, clean_dest, tmp_path):
    for dest, payload in ((download_dest, "bytes"), (clean_dest, "image")):
        for reader, columns in read_directory_everywhere(local(dest)).items():
            try:
                assert_data_rows(columns, dest, payload)
            except AssertionError as exc:
                raise AssertionError(f"{reader} on {dest}: {exc}") from exc
    manifest = contract.read_manifest(clean_dest)
    ds = hf_datasets.load_dataset("parquet", data_dir=local(clean_dest), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"] == hf_datasets.ClassLabel(names=manifest["extra"]["classes"])
    assert_data_rows(ds.to_dict(), clean_dest, "image")


@pytest.mark.ray
def test_resize_prefix_reads_as_a_directory_of_its_data_rows(hf_datasets, resize_dest, tmp_path):
    payload = "pixels" if contract.read_manifest(resize_dest)["extra"]["format"] == "raw" else "image"
    for reader, columns in read_directory_everywhere(local(resize_dest)).items():
        try:
            assert_data_rows(columns, resize_dest, payload)
        except AssertionError as exc:
            raise AssertionError(f"{reader}: {exc}") from exc
    dd = hf_datasets.load_dataset("parquet", data_dir=local(resize_dest), cache_dir=str(tmp_path / "cache"))
    merged = {name: [v for split in dd.values() for v in split[name]] for name in ("path", payload, "label")}
    assert_data_rows(merged, resize_dest, payload)


@pytest.mark.ray
def test_ray_data_reads_each_committed_prefix_as_a_directory(ray_session, download_dest, clean_dest, resize_dest):
    payload = "pixels" if contract.read_manifest(resize_dest)["extra"]["format"] == "raw" else "image"
    for dest, column in ((download_dest, "bytes"), (clean_dest, "image"), (resize_dest, payload)):
        names = ["path", column] if dest == download_dest else ["path", column, "label"]
        rows = ray_session.data.read_parquet(local(dest)).select_columns(names).take_all()
        assert_data_rows({name: [r[name] for r in rows] for name in names}, dest, column)


# ------------------------------------------------------------------ resize (Ray)


@pytest.mark.ray
def test_resize_output_loads_in_datasets_with_its_splits(hf_datasets, resize_dest, tmp_path):
    manifest = contract.read_manifest(resize_dest, expect_step="resize")
    dd = hf_datasets.load_dataset("parquet", data_dir=local(resize_dest), cache_dir=str(tmp_path / "cache"))
    assert {s: dd[s].num_rows for s in dd} == {HF_SPLIT[s]: n for s, n in manifest["extra"]["splits"].items()}
    stored = stored_rows(resize_dest)
    for name, ds in dd.items():
        assert ds.features["label"] == hf_datasets.ClassLabel(names=manifest["extra"]["classes"])
        for row in ds:
            assert HF_SPLIT[row["split"]] == name
            if manifest["extra"]["format"] == "jpeg":
                assert isinstance(ds.features["image"], hf_datasets.Image)
                assert np.array_equal(np.asarray(row["image"]), decoded(stored[row["path"]]["image"]["bytes"]))
            else:
                # Raw pixels are bytes, not an Image; read_pixels is their HxWxC numpy view.
                assert ds.features["pixels"] == hf_datasets.Value("binary")
                pixels = read_pixels(row)
                assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
                assert np.array_equal(pixels, read_pixels(stored[row["path"]]))


@pytest.mark.ray
def test_resize_split_folders_in_pandas_and_pyarrow(resize_dest):
    manifest = contract.read_manifest(resize_dest, expect_step="resize")
    for split, rows in manifest["extra"]["splits"].items():
        folder = f"{local(resize_dest)}/{split}"
        df = pd.read_parquet(folder)
        table = pq.read_table(folder)
        assert len(df) == table.num_rows == rows
        assert set(df["split"]) == {split}
        if manifest["extra"]["format"] == "raw":
            assert read_pixels(df.iloc[0]).shape == (SIZE, SIZE, 3)
        else:
            assert decoded(df.iloc[0]["image"]["bytes"]).shape == (SIZE, SIZE, 3)


@pytest.mark.ray
def test_ray_data_reads_clean_and_resize_outputs(ray_session, clean_dest, resize_dest):
    clean_ds = ray_session.data.read_parquet(contract.data_files(clean_dest))
    stored = stored_rows(clean_dest)
    assert clean_ds.count() == len(stored)
    row = clean_ds.take(1)[0]
    assert row["image"]["bytes"] == stored[row["path"]]["image"]["bytes"]
    manifest = contract.read_manifest(resize_dest, expect_step="resize")
    train = ray_session.data.read_parquet(f"{local(resize_dest)}/train")
    assert train.count() == manifest["extra"]["splits"]["train"]
    if manifest["extra"]["format"] == "raw":
        batch = train.take_batch(2, batch_format="numpy")
        first = {k: batch[k][0] for k in ("pixels", "height", "width", "channels")}
        assert read_pixels(first).shape == (SIZE, SIZE, 3)
