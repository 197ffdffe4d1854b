"""clean and resize outputs open in the tools users already have (docs/steps.md, "Use the outputs").

The outputs come from the real steps on tiny generated images under ``tmp_path``
(``file://``); each reader is the real library, called as the guide's one-liners call
it: Hugging Face ``datasets`` (offline, caches under ``tmp_path``), pandas, pyarrow and
Ray Data. resize runs on Ray, so its tests and the Ray Data ones are marked ``ray`` (run
them under scripts/in-loopback-netns).
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import contract, parquet, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.resize import read_pixels, resize
from tests import imagefactory as f
from tests.helpers import write_download_output

CLASSES = ["cat", "dog"]
SIZE = 24
# datasets names the split of a `val/` folder `validation` (datasets 5.2.0
# src/datasets/data_files.py SPLIT_KEYWORDS); resize keeps `val` in its folders and column.
HF_SPLIT = {"train": "train", "val": "validation", "test": "test"}


def members() -> dict[str, bytes]:
    return {f"images/{name}_{i}.jpg": f.jpeg(60 + 3 * i, 48 + 4 * c, seed=10 * c + i) for c, name in enumerate(CLASSES) for i in range(1, 6)}


@pytest.fixture(scope="module")
def clean_dest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A committed clean output of 10 images over train/val/test, in three files."""
    root = "file://" + str(tmp_path_factory.mktemp("outputs"))
    download = write_download_output(storage.join(root, "download"), members())
    dest = storage.join(root, "clean")
    cfg = CleanConfig(workers=1, seed=1, split=(0.6, 0.2, 0.2), rows_per_shard=4, row_group_rows=2)
    report = clean(download, dest, cfg)
    assert report.outputs == len(members()) and all(report.extra["splits"].values())
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
    # The local one-liner: a glob of the data files (the prefix also holds rejects.parquet).
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
