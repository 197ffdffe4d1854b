"""Splits: the stratified draw, the split a source gives (``split_from: source``), and degenerate outcomes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.clean.splits import given_codes, source_codes, split_codes, split_of
from imgpipe.outcome import DegenerateOutput
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from tests import imagefactory as f
from tests.helpers import write_download_output

TRAIN, VAL, TEST = range(3)


def read_output(prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in contract.data_files(prefix)])


@pytest.mark.parametrize(
    ("path", "given", "want"),
    [
        ("train/cat/1.jpg", None, "train"),
        ("data/Validation/cat/1.jpg", None, "val"),
        ("valid/dog/2.png", None, "val"),
        ("Testing/dog/2.png", None, "test"),
        ("cat/1.jpg", None, None),
        ("trainer/cat/1.jpg", None, None),  # a folder named otherwise
        ("test.jpg", None, None),  # a file name is no split
        ("test/cat/1.jpg", "train", "train"),  # a split column wins over the path
        ("cat/1.jpg", "dev", "val"),
        ("cat/1.jpg", "holdout", None),
    ],
)
def test_the_split_a_source_gives(path, given, want):
    assert split_of(path, given) == want


def test_a_tiny_set_still_gets_each_split_it_asks_for():
    labels = np.repeat(np.arange(3), 6)  # 18 images: per class, 10% rounds to nothing
    codes = split_codes(labels, (0.8, 0.1, 0.1), seed=0)
    assert np.bincount(codes, minlength=3).tolist() == [15, 2, 1] or np.bincount(codes, minlength=3).min() >= 1
    assert all((codes[labels == c] == TRAIN).any() for c in range(3)), "every class keeps a training image"
    assert (split_codes(np.zeros(3, int), (0.8, 0.1, 0.1), 0) == TRAIN).sum() >= 1


def test_a_larger_set_draws_as_before_and_is_seeded():
    labels = np.repeat(np.arange(4), 50)
    a, b = split_codes(labels, (0.8, 0.1, 0.1), 3), split_codes(labels, (0.8, 0.1, 0.1), 3)
    assert (a == b).all()
    for c in range(4):
        assert np.bincount(a[labels == c], minlength=3).tolist() == [40, 5, 5]


def test_source_splits_are_kept_and_a_missing_one_is_carved_from_train():
    labels = np.repeat(np.arange(2), 20)
    given = np.where(np.arange(40) % 10 == 0, TEST, TRAIN).astype(np.int8)  # train and test only
    codes, facts = source_codes(given, labels, ["a", "b"], (0.8, 0.1, 0.1), 0)
    assert (codes[given == TEST] == TEST).all()
    assert set(codes[given == TRAIN].tolist()) == {TRAIN, VAL}, "val comes out of the source's train images"
    assert facts["used"] and facts["carved"] == ["val"] and facts["given"] == {"train": 36, "test": 4}


def test_a_source_without_val_or_test_is_split_at_random_and_a_lacking_class_is_reported():
    labels = np.repeat(np.arange(2), 20)
    codes, facts = source_codes(np.zeros(40, np.int8), labels, ["a", "b"], (0.8, 0.1, 0.1), 0)
    assert not facts["used"] and (codes == split_codes(labels, (0.8, 0.1, 0.1), 0)).all()
    given = np.where((labels == 0) & (np.arange(40) % 5 == 0), TEST, TRAIN).astype(np.int8)
    _, facts = source_codes(given, labels, ["a", "b"], (0.8, 0.1, 0.1), 0)
    assert facts["missing_classes"] == {"test": ["b"]}


def test_given_codes_reads_a_column_before_the_path():
    codes = given_codes(["train/a/1.jpg", "x/1.jpg", "x/2.jpg"], [None, "test", None])
    assert codes.tolist() == [TRAIN, TEST, -1]


def _folders(per_split: dict[str, int]) -> dict[str, bytes]:
    return {
        f"{split}/{cls}/{i}.jpg": f.jpeg(seed=1000 * k + 100 * c + i)
        for k, (split, n) in enumerate(per_split.items())
        for c, cls in enumerate(("cat", "dog"))
        for i in range(n)
    }


def test_clean_keeps_a_folder_layouts_splits_unless_asked_to_draw(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), _folders({"train": 6, "val": 2, "test": 3}))
    clean(src, str(tmp_path / "kept"), CleanConfig(workers=1))
    table = read_output(str(tmp_path / "kept"))
    got = {p: s for p, s in zip(table.column("path").to_pylist(), table.column("split").to_pylist())}
    assert all(s == p.split("/")[0] for p, s in got.items()), "every image in its folder's split"
    extra = contract.read_manifest(str(tmp_path / "kept"))["extra"]
    assert extra["splits"] == {"train": 12, "val": 4, "test": 6}
    assert extra["source_split"]["used"] and extra["classes"] == ["cat", "dog"]

    clean(src, str(tmp_path / "drawn"), CleanConfig(workers=1, split_from="random"))
    drawn = read_output(str(tmp_path / "drawn"))
    moved = sum(p.split("/")[0] != s for p, s in zip(drawn.column("path").to_pylist(), drawn.column("split").to_pylist()))
    assert moved > 0


def test_clean_keeping_nothing_fails_after_committing_its_rejects(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), {"a/1.jpg": b"not an image", "b/2.jpg": f.truncated_jpeg()})
    dest = str(tmp_path / "clean")
    with pytest.raises(DegenerateOutput, match=r"kept no image from 2 input\(s\).*rejects"):
        clean(src, dest, CleanConfig(workers=1))
    assert contract.read_rejects(dest).num_rows == 2, "the reasons stay readable"


def test_a_class_below_its_minimum_fails_naming_it(tmp_path):
    members = _folders({"x": 8})
    members["x/bird/0.jpg"] = f.jpeg(seed=7777)
    src = write_download_output(str(tmp_path / "dl"), members)
    with pytest.raises(DegenerateOutput, match=r"min_images_per_class=3 image\(s\): 'bird' 1"):
        clean(src, str(tmp_path / "clean"), CleanConfig(workers=1, min_images_per_class=3))
    clean(src, str(tmp_path / "ok"), CleanConfig(workers=1, min_images_per_class=0, min_images_per_split=0))


def test_a_set_of_one_class_fails_naming_it_unless_min_classes_accepts_it(tmp_path):
    members = {f"x/cat/{i}.jpg": f.jpeg(seed=i) for i in range(6)}
    src = write_download_output(str(tmp_path / "dl"), members)
    with pytest.raises(DegenerateOutput, match=r"kept images of 1 class\(es\) \('cat' 6\), fewer than min_classes=2.*min_classes=1"):
        clean(src, str(tmp_path / "clean"), CleanConfig(workers=1, label_source="folder", min_images_per_split=0))
    report = clean(src, str(tmp_path / "one"), CleanConfig(workers=1, label_source="folder", min_images_per_split=0, min_classes=1))
    assert report.extra["classes"] == ["cat"]
    with pytest.raises(ValueError, match="min_classes"):
        CleanConfig(min_classes=0)


def test_an_empty_split_fails_with_the_fix(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), _folders({"x": 2}))
    with pytest.raises(DegenerateOutput, match="min_images_per_split=0"):
        clean(src, str(tmp_path / "clean"), CleanConfig(workers=1, split=(0.5, 0.0, 0.5), min_images_per_split=3))


def test_a_source_with_no_image_fails_at_download_or_at_clean(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    with pytest.raises((DegenerateOutput, FileNotFoundError), match="no image"):
        download(str(folder), str(tmp_path / "dl0"), DownloadConfig())
    (folder / "notes.txt").write_text("hello")  # a file, but no image: download keeps bytes, clean decodes them
    download(str(folder), str(tmp_path / "dl"), DownloadConfig())
    with pytest.raises(DegenerateOutput, match="kept no image"):
        clean(str(tmp_path / "dl"), str(tmp_path / "clean"), CleanConfig(workers=1))


def test_splits_constant_is_the_order_codes_use():
    assert SPLITS == ("train", "val", "test")


def test_the_hubs_split_files_keep_their_splits_through_clean(hf_datasets, tmp_path):
    """A Hub repository written by `datasets` (train and test files, no validation): test stays test, val comes out of train."""
    from tests.data.test_hf_sources import BEANS, _card, _dataset

    repo = tmp_path / "beans"
    (repo / "data").mkdir(parents=True)
    train, test = _dataset(hf_datasets, 30), _dataset(hf_datasets, 6, offset=30)
    train.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    (repo / "README.md").write_text(_card(hf_datasets, train.features, ["train", "test"]))
    download(str(repo), str(tmp_path / "dl"), DownloadConfig())
    clean(str(tmp_path / "dl"), str(tmp_path / "clean"), CleanConfig(workers=1, min_side=16))
    table = read_output(str(tmp_path / "clean"))
    by_file = {}
    for path, split in zip(table.column("path").to_pylist(), table.column("split").to_pylist()):
        by_file.setdefault(path.split("/")[1].split("-")[0], []).append(split)
    assert by_file["test"] == ["test"] * 6, "the source's test set, whole and alone"
    assert set(by_file["train"]) == {"train", "val"} and by_file["train"].count("val") >= 3
    extra = contract.read_manifest(str(tmp_path / "clean"))["extra"]
    assert extra["classes"] == BEANS and extra["source_split"]["carved"] == ["val"]
