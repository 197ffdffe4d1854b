"""Hugging Face datasets as the real tools write them: the Hub's folder, Parquet shards in a bucket, save_to_disk, path-only images.

Every dataset here is written by the ``datasets`` library itself (``to_parquet``,
``save_to_disk``, and the README card ``push_to_hub`` writes, made by the same
``DatasetInfosDict``/``MetadataConfigs`` calls), and goes through the download step; each
test asserts the classes, names and splits the output records, or the one-line refusal.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.data.readers.base import ReaderSettings
from imgpipe.data.readers.factory import open_source
from imgpipe.steps.download import DownloadConfig, download
from tests.data.conftest import FAST, reconciles, rejects, rows
from tests.imagefactory import jpeg

BEANS = ["angular_leaf_spot", "bean_rust", "healthy"]


def _dataset(hf, n: int, *, image: str = "image", label: str = "label", names=BEANS, offset: int = 0, images=None):
    features = hf.Features({image: hf.Image(), label: hf.ClassLabel(names=names)})
    data = {image: images or [jpeg(32, 24, seed=offset + i) for i in range(n)], label: [(offset + i) % len(names) for i in range(n)]}
    return hf.Dataset.from_dict(data, features=features)


def _card(hf, features, splits: list[str]) -> str:
    """The README.md ``push_to_hub`` writes: dataset_info and configs in the YAML front matter."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData()
    DatasetInfosDict({"default": DatasetInfo(features=features)}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}}).to_dataset_card_data(data)
    return str(DatasetCard(f"---\n{data}\n---\n"))


def _source(uri: str) -> dict:
    (entry,) = contract.read_manifest(uri)["extra"]["sources"]
    return entry


# --------------------------------------------------------------------------- the Hub's folder layout


def test_the_hubs_folder_layout_is_read_with_names_from_its_card_and_splits_from_its_file_names(hf_datasets, tmp_path):
    repo = tmp_path / "beans"
    (repo / "data").mkdir(parents=True)
    train, test = _dataset(hf_datasets, 4, label="labels"), _dataset(hf_datasets, 2, label="labels", offset=4)
    for name, ds in (("train", train), ("validation", _dataset(hf_datasets, 1, label="labels", offset=6)), ("test", test)):
        ds.to_parquet(str(repo / "data" / f"{name}-00000-of-00001.parquet"))
    # The card names the classes: the files' own metadata is stripped to show it is the card's names that count.
    for f in (repo / "data").iterdir():
        pq.write_table(pq.read_table(f).replace_schema_metadata(None), f)
    (repo / "README.md").write_text(_card(hf_datasets, train.features, ["train", "validation", "test"]))
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    report = download(str(repo), str(tmp_path / "out"), FAST)
    got = rows("file://" + str(tmp_path / "out"))
    assert {p: (r["label"], r["split"]) for p, r in got.items()} == {
        **{f"data/train-00000-of-00001/{i:08d}": (BEANS[i % 3], "train") for i in range(4)},
        "data/validation-00000-of-00001/00000000": (BEANS[0], "val"),
        **{f"data/test-00000-of-00001/{i:08d}": (BEANS[(4 + i) % 3], "test") for i in range(2)},
    }
    entry = _source("file://" + str(tmp_path / "out"))
    assert entry["format"] == "hf-parquet" and entry["files"] == 3 and entry["classes"] == BEANS
    assert entry["splits"] == {"test": 2, "train": 4, "val": 1} and entry["ignored"] == 0
    reconciles(report, "file://" + str(tmp_path / "out"))


def test_a_bucket_prefix_of_parquet_shards_is_read_shard_by_shard_in_key_order_cifar_style(hf_datasets, s3_bucket, tmp_path):
    cifar = ["airplane", "automobile", "bird"]
    for shard in range(2):
        path = tmp_path / f"train-{shard:05d}-of-00002.parquet"
        _dataset(hf_datasets, 3, image="img", names=cifar, offset=3 * shard).to_parquet(str(path))
        storage.write_bytes(f"{s3_bucket}/cifar/plain_text/{path.name}", path.read_bytes())
    report = download(f"{s3_bucket}/cifar/", f"{s3_bucket}/out", FAST)
    got = rows(report.dest)
    assert [(p, r["label"], r["split"]) for p, r in sorted(got.items())] == [
        (f"plain_text/train-{s:05d}-of-00002/{i:08d}", cifar[(3 * s + i) % 3], "train") for s in range(2) for i in range(3)
    ]
    assert got["plain_text/train-00001-of-00002/00000000"]["bytes"] == jpeg(32, 24, seed=3)
    assert _source(report.dest)["classes"] == cifar
    reconciles(report, report.dest)


def test_a_split_column_gives_each_rows_split(hf_datasets, tmp_path):
    ds = _dataset(hf_datasets, 4).add_column("split", ["train", "validation", "dev", "holdout"])
    (tmp_path / "set").mkdir()
    ds.to_parquet(str(tmp_path / "set" / "all.parquet"))
    download(str(tmp_path / "set"), str(tmp_path / "out"), FAST)
    assert [r["split"] for _, r in sorted(rows("file://" + str(tmp_path / "out")).items())] == ["train", "val", "val", None]


# --------------------------------------------------------------------------- save_to_disk


def test_a_save_to_disk_folder_and_a_dataset_dict_are_read_from_their_arrow_files(hf_datasets, tmp_path):
    _dataset(hf_datasets, 3).save_to_disk(str(tmp_path / "one"))
    hf_datasets.DatasetDict({"train": _dataset(hf_datasets, 3), "test": _dataset(hf_datasets, 2, offset=3)}).save_to_disk(str(tmp_path / "dict"))
    download(str(tmp_path / "one"), str(tmp_path / "out1"), FAST)
    assert {p: (r["label"], r["split"]) for p, r in rows("file://" + str(tmp_path / "out1")).items()} == {
        f"data-00000-of-00001/{i:08d}": (BEANS[i], None) for i in range(3)
    }
    report = download(str(tmp_path / "dict"), str(tmp_path / "out2"), FAST)
    got = rows("file://" + str(tmp_path / "out2"))
    assert {p: (r["label"], r["split"]) for p, r in got.items()} == {
        **{f"test/data-00000-of-00001/{i:08d}": (BEANS[(3 + i) % 3], "test") for i in range(2)},
        **{f"train/data-00000-of-00001/{i:08d}": (BEANS[i], "train") for i in range(3)},
    }
    entry = _source("file://" + str(tmp_path / "out2"))
    assert entry["format"] == "hf-arrow" and entry["classes"] == BEANS
    reconciles(report, "file://" + str(tmp_path / "out2"))


# --------------------------------------------------------------------------- path-only images


def test_path_only_images_are_read_beside_the_file_and_never_outside_its_folder(hf_datasets, tmp_path, monkeypatch):
    root = tmp_path / "set"
    (root / "pics").mkdir(parents=True)
    for i in range(2):
        (root / "pics" / f"{i}.jpg").write_bytes(jpeg(32, 24, seed=i))
    (tmp_path / "secret.jpg").write_bytes(jpeg(32, 24, seed=9))
    monkeypatch.chdir(root)  # datasets stores the paths as given: relative to the Parquet file here
    ds = _dataset(hf_datasets, 4, images=["pics/0.jpg", "pics/1.jpg", "../secret.jpg", "pics/missing.jpg"])
    (root / "pics" / "missing.jpg").write_bytes(b"")  # datasets sizes every file it writes the path of
    ds.to_parquet(str(root / "train.parquet"))
    (root / "pics" / "missing.jpg").unlink()  # gone since
    assert pq.read_table(root / "train.parquet").column("image")[0].as_py() == {"bytes": None, "path": "pics/0.jpg"}
    report = download(str(root / "train.parquet"), str(tmp_path / "out"), FAST)
    got = rows("file://" + str(tmp_path / "out"))
    assert {p: (r["label"], r["bytes"] == jpeg(32, 24, seed=i)) for i, (p, r) in enumerate(sorted(got.items()))} == {
        "train/00000000-0.jpg": (BEANS[0], True),
        "train/00000001-1.jpg": (BEANS[1], True),
    }
    assert rejects("file://" + str(tmp_path / "out")) == {
        "train/00000002-secret.jpg": "unsafe_member",
        "train/00000003-missing.jpg": "sample_without_image",
    }
    reconciles(report, "file://" + str(tmp_path / "out"))


def test_absolute_image_paths_refuse_the_source_with_the_embedding_fix_which_works(hf_datasets, tmp_path):
    pics = [tmp_path / f"{i}.jpg" for i in range(2)]
    for i, p in enumerate(pics):
        p.write_bytes(jpeg(32, 24, seed=i))
    ds = _dataset(hf_datasets, 2, images=[str(p) for p in pics])  # datasets' default: the path alone
    ds.to_parquet(str(tmp_path / "paths.parquet"))
    with pytest.raises(ValueError, match=r"the 'image' column holds paths, not bytes .*embed_table_storage") as caught:
        download(str(tmp_path / "paths.parquet"), str(tmp_path / "out"), FAST)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
    # The fix the message quotes, as written there.
    from datasets.table import embed_table_storage

    ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    ds.to_parquet(str(tmp_path / "embedded.parquet"))
    download(str(tmp_path / "embedded.parquet"), str(tmp_path / "out"), FAST)
    assert {r["label"] for r in rows("file://" + str(tmp_path / "out")).values()} == {BEANS[0], BEANS[1]}


# --------------------------------------------------------------------------- columns, refusals


def test_img2dataset_parquet_is_refused_naming_both_columns_and_their_settings_then_read_with_them(tmp_path):
    # img2dataset's Parquet output (its writer's schema: key, url, caption, status, ... and the image bytes as jpg).
    table = pa.table(
        {"key": ["000000000", "000000001"], "jpg": [jpeg(seed=1), jpeg(seed=2)], "caption": ["a cat", "a dog"], "url": ["https://x/1", "https://x/2"]}
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    with pytest.raises(ValueError) as caught:
        download(str(tmp_path / "00000.parquet"), str(tmp_path / "out"), FAST)
    message = str(caught.value)
    assert "'image' column (or 'img')" in message and "image_column" in message
    assert "('label', 'labels', 'fine_label')" in message and "label_column" in message
    assert "['key', 'jpg', 'caption', 'url']" in message and "\n" not in message
    download(str(tmp_path / "00000.parquet"), str(tmp_path / "out"), DownloadConfig(image_column="jpg", label_column="caption"))
    assert sorted(r["label"] for r in rows("file://" + str(tmp_path / "out")).values()) == ["a cat", "a dog"]


def test_a_label_column_named_in_the_settings_must_exist(hf_datasets, tmp_path):
    (tmp_path / "set").mkdir()
    _dataset(hf_datasets, 2).to_parquet(str(tmp_path / "set" / "train.parquet"))
    with pytest.raises(ValueError, match=r"needs a 'category' column .* label_column.* its columns are \['image', 'label'\]"):
        download(str(tmp_path / "set"), str(tmp_path / "out"), DownloadConfig(label_column="category"))


def test_an_empty_folder_or_prefix_is_refused_not_an_empty_dataset(tmp_path, s3_bucket):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images found at file://.*/empty/"):
        download(str(tmp_path / "empty"), str(tmp_path / "out"), FAST)
    with pytest.raises(FileNotFoundError, match=rf"no images found at {s3_bucket}/nothing/"):
        open_source(f"{s3_bucket}/nothing/", sha256=None, spool=tmp_path / "spool", settings=ReaderSettings())
