"""The clean step end to end on generated inputs, on both storage backends."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, features

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.clean.decode import OUTPUT_SCHEMA
from imgpipe.clean.splits import stratified_split
from imgpipe.config import config_from_dict
from imgpipe.contract import UncommittedOutputError
from imgpipe.steps import clean as clean_mod
from imgpipe.steps.clean import clean
from tests import imagefactory as f
from tests.helpers import write_download_output
from tests.steps.conftest import CLASSES, good_members, read_output

BAD = {
    "images/Bengal_900.jpg": ("truncated", f.truncated_jpeg(1)),
    "images/Bengal_901.jpg": ("not_an_image", b""),
    "images/Siamese_902.jpg": ("not_an_image", f.html_as_jpg()),
    "images/Siamese_903.mat": ("not_an_image", b"MATLAB 5.0 MAT-file" + bytes(64)),
    "images/beagle_904.jpg": ("too_small", f.tiny_jpeg()),
    "images/beagle_905.png": ("too_large", f.png_bomb(12000)),
    "images/README.jpg": ("no_label", f.jpeg(seed=7)),
    "images/Siamese_906.jpg": ("corrupt", b"\xff\xd8\xff\xe0" + bytes(40)),
}
NORMALIZE = {
    "images/Bengal_800.jpg": f.cmyk_jpeg(2),
    "images/Bengal_801.jpg": f.grayscale_jpeg(3),
    "images/Siamese_802.jpg": f.png16(4),
    "images/Siamese_803.jpg": f.palette_png_with_transparency(5),
    "images/beagle_804.jpg": f.exif_rotated_jpeg(6, seed=6),
    "images/beagle_805.jpg": f.png_in_jpg(7),
}


def all_members() -> dict[str, bytes]:
    members = good_members()
    members.update({p: data for p, (_, data) in BAD.items()})
    members.update(NORMALIZE)
    # An exact copy: the later path in sorted order is the one rejected.
    members["images/beagle_99.jpg"] = members["images/beagle_1.jpg"]
    return members


@pytest.fixture
def source(tmp_path) -> str:
    return write_download_output(str(tmp_path / "download"), all_members())


def test_every_input_accounted_for_with_reason(source, tmp_path):
    dest = str(tmp_path / "clean")
    report = clean(source, dest, CleanConfig(workers=1, min_side=32))
    members = all_members()
    rejects = contract.read_rejects(dest).to_pylist()
    got = {r["path"]: r["reason"] for r in rejects}
    expected = {p: reason for p, (reason, _) in BAD.items()}
    expected["images/beagle_99.jpg"] = "duplicate"
    assert got == expected
    assert all(r["detail"] for r in rejects)
    table = read_output(dest)
    assert report.inputs == len(members) == report.outputs + report.rejected
    assert table.num_rows == report.outputs
    assert set(table.column("path").to_pylist()) | set(got) == set(members)
    assert not set(table.column("path").to_pylist()) & set(got)


def test_output_schema_order_and_images(source, tmp_path):
    dest = str(tmp_path / "clean")
    clean(source, dest, CleanConfig(workers=1))
    table = read_output(dest)
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    order = table.column("order").to_pylist()
    assert order == sorted(order), "rows are written in the shuffled order"
    assert sorted(order) == list(range(table.num_rows))
    paths = table.column("path").to_pylist()
    assert paths != sorted(paths), "the order is shuffled, not the input order"
    for row in table.to_pylist():
        assert row["image"]["path"] == row["path"]
        img = Image.open(io.BytesIO(row["image"]["bytes"]))
        img.load()
        assert img.mode == "RGB" == row["mode"]
        assert img.size == (row["width"], row["height"])
        assert img.format.lower() == row["format"]
    rotated = next(r for r in table.to_pylist() if r["path"] == "images/beagle_804.jpg")
    assert (rotated["width"], rotated["height"]) == (64, 96)


def test_labels_encoded_deterministically(source, tmp_path):
    dest = str(tmp_path / "clean")
    clean(source, dest, CleanConfig(workers=1))
    labels = json.loads(storage.read_bytes(storage.join(dest, contract.LABELS)))
    assert labels == {"0": "beagle", "1": "Bengal", "2": "Siamese"}
    table = read_output(dest)
    for row in table.to_pylist():
        assert labels[str(row["label"])] == row["label_name"]
        assert row["path"].split("/")[-1].startswith(row["label_name"] + "_")


def test_manifest_config_and_reconciliation(source, tmp_path):
    dest = str(tmp_path / "clean")
    report = clean(source, dest, CleanConfig(workers=1, seed=3))
    manifest = contract.read_manifest(dest, expect_step="clean")
    for key in ("step", "inputs", "outputs", "rejected", "files"):
        assert key in manifest
    assert manifest["inputs"] == manifest["outputs"] + manifest["rejected"]
    assert manifest["rejects_by_reason"]["not_an_image"] == 3
    assert sum(f_["rows"] for f_ in manifest["files"]) == report.outputs
    assert manifest["extra"]["splits"]["train"] > manifest["extra"]["splits"]["val"] > 0
    cfg_text = storage.read_bytes(storage.join(dest, contract.CONFIG)).decode()
    assert "seed: 3" in cfg_text and "split:" in cfg_text


def test_grayscale_option(source, tmp_path):
    dest = str(tmp_path / "gray")
    clean(source, dest, CleanConfig(workers=1, grayscale=True))
    table = read_output(dest)
    assert set(table.column("mode").to_pylist()) == {"L"}
    for row in table.to_pylist()[:5]:
        assert Image.open(io.BytesIO(row["image"]["bytes"])).mode == "L"


def test_stratified_split_per_class(tmp_path):
    members = good_members(per_class=20)
    src = write_download_output(str(tmp_path / "dl"), members)
    dest = str(tmp_path / "clean")
    clean(src, dest, CleanConfig(workers=1, split=(0.7, 0.2, 0.1)))
    table = read_output(dest)
    counts = Counter(zip(table.column("label_name").to_pylist(), table.column("split").to_pylist()))
    for name in CLASSES:
        assert (counts[(name, "train")], counts[(name, "val")], counts[(name, "test")]) == (14, 4, 2)


def test_stratified_split_unit():
    labels = [0] * 7 + [1] * 3 + [2]
    splits = stratified_split(labels, (0.8, 0.1, 0.1), seed=0)
    assert len(splits) == 11
    assert splits[10] == "train", "a class of one goes to train"
    per0 = Counter(s for s, lab in zip(splits, labels) if lab == 0)
    assert sum(per0.values()) == 7 and per0["train"] >= 5
    assert stratified_split(labels, (0.8, 0.1, 0.1), seed=0) == splits
    assert stratified_split(labels * 10, (0.8, 0.1, 0.1), seed=1) != stratified_split(labels * 10, (0.8, 0.1, 0.1), seed=2)


def test_seed_changes_order_and_is_reproducible(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), good_members(6))
    paths = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        clean(src, str(tmp_path / name), CleanConfig(workers=1, seed=seed))
        paths[name] = read_output(str(tmp_path / name)).column("path").to_pylist()
    assert paths["a"] == paths["b"]
    assert paths["a"] != paths["c"]


def test_rerun_is_idempotent(source, tmp_path):
    dest = str(tmp_path / "clean")
    clean(source, dest, CleanConfig(workers=1, rows_per_shard=7))
    first = sorted(o.uri for o in storage.list_objects(dest))
    t1 = read_output(dest)
    clean(source, dest, CleanConfig(workers=1, rows_per_shard=7))
    assert sorted(o.uri for o in storage.list_objects(dest)) == first
    assert read_output(dest).equals(t1)
    # Fewer shards on the second run: the stale shard files must be gone, not merely unlisted.
    clean(source, dest, CleanConfig(workers=1, rows_per_shard=1000))
    names = [o.uri.rsplit("/", 1)[1] for o in storage.list_objects(dest)]
    assert sorted(n for n in names if n.startswith("part-")) == ["part-00000.parquet"]
    assert read_output(dest).num_rows == t1.num_rows


def test_data_files_depend_only_on_their_rows(tmp_path):
    """Spill files chunk rows by task, and tasks by worker count: the bytes must not change."""
    source = write_download_output(str(tmp_path / "download"), all_members(), row_group_rows=4)
    digests = []
    for workers in (1, 2):
        dest = str(tmp_path / f"clean-{workers}")
        clean(source, dest, CleanConfig(workers=workers, rows_per_shard=9, row_group_rows=4))
        digests.append([(e["name"], e["sha256"]) for e in contract.read_manifest(dest)["files"]])
    assert len(digests[0]) > 1
    assert digests[0] == digests[1]


def test_folder_and_csv_labels(tmp_path):
    members = {f"train/{cls}/{i}.jpg": f.jpeg(seed=10 * c + i) for c, cls in enumerate(["cat", "dog"]) for i in range(4)}
    members["loose.jpg"] = f.jpeg(seed=99)
    src = write_download_output(str(tmp_path / "dl"), members)
    clean(src, str(tmp_path / "auto"), CleanConfig(workers=1))
    table = read_output(str(tmp_path / "auto"))
    assert set(table.column("label_name").to_pylist()) == {"cat", "dog"}
    rejects = contract.read_rejects(str(tmp_path / "auto")).to_pylist()
    # "loose.jpg" sits in the root, outside any class folder.
    assert [(r["path"], r["reason"]) for r in rejects] == [("loose.jpg", "no_label")]

    csv_uri = str(tmp_path / "labels.csv")
    storage.write_bytes(csv_uri, b"path,label\ntrain/cat/0.jpg,tabby\n1.jpg,tabby\nloose.jpg,other\n")
    # Four images: too few for a val and a test split.
    clean(src, str(tmp_path / "csv"), CleanConfig(workers=1, label_source="csv", labels_csv=csv_uri, min_images_per_split=0))
    table = read_output(str(tmp_path / "csv"))
    got = dict(zip(table.column("path").to_pylist(), table.column("label_name").to_pylist()))
    assert got["train/cat/0.jpg"] == "tabby" and got["loose.jpg"] == "other"
    assert got["train/cat/1.jpg"] == "tabby"  # matched by file name
    assert contract.read_manifest(str(tmp_path / "csv"))["rejects_by_reason"] == {"no_label": 5}


def test_refuses_uncommitted_source(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), good_members(2))
    storage.delete(storage.join(src, contract.SUCCESS))
    with pytest.raises(UncommittedOutputError, match="_SUCCESS"):
        clean(src, str(tmp_path / "clean"), CleanConfig(workers=1))


def test_failure_midway_leaves_no_committed_output(source, tmp_path, monkeypatch):
    dest = str(tmp_path / "clean")
    clean(source, dest, CleanConfig(workers=1))
    assert contract.is_committed(dest)

    def boom(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(clean_mod, "_write_shards", boom)
    with pytest.raises(RuntimeError, match="killed"):
        clean(source, dest, CleanConfig(workers=1))
    assert not contract.is_committed(dest)
    with pytest.raises(UncommittedOutputError):
        contract.read_manifest(dest)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"split": (0.0, 0.5, 0.5)}, "train fraction"),
        ({"label_source": "csv"}, "labels_csv"),
        ({"workers": -1}, "workers"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"formats": ("jpeg", "jp2")}, "unknown format 'jp2'; valid formats are jpeg, png, gif, bmp, tiff, webp, jpeg2000"),
        ({"formats": ("jpeg", "eps")}, "cannot accept 'eps'.*Ghostscript"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CleanConfig(**kwargs)


def test_clean_on_s3_with_process_pool(s3_bucket):
    members = good_members(4)
    members["images/beagle_77.jpg"] = f.truncated_jpeg(3)
    src = write_download_output(f"{s3_bucket}/runs/r1/download", members, row_group_rows=3)
    dest = f"{s3_bucket}/runs/r1/clean"
    report = clean(src, dest, CleanConfig(workers=2))
    assert report.outputs == 12 and report.rejects_by_reason == {"truncated": 1}
    table = read_output(dest)
    assert table.num_rows == 12
    assert np.array_equal(np.sort(table.column("order").to_numpy()), np.arange(12))
    assert storage.exists(storage.join(dest, contract.SUCCESS)) and storage.exists(storage.join(dest, contract.LABELS))


def voc_xml(name: str, width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    xmin, ymin, xmax, ymax = box
    return (
        f"<annotation><filename>{name}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size><object><name>cat</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>"
    ).encode()


def test_forkserver_preload_does_the_pre_fork_imports():
    """S3 inputs fork workers from a server: its preload must leave them what fork workers inherit."""
    import importlib.util
    import subprocess
    import sys

    code = "import sys, imgpipe.clean._forkserver; print('PIL.JpegImagePlugin' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["True", str(importlib.util.find_spec("pandas") is not None)]


def test_head_boxes_from_annotations(tmp_path):
    members = good_members(2)  # Bengal_1 is 84x64
    src = write_download_output(str(tmp_path / "dl"), members)
    ann = write_download_output(
        str(tmp_path / "ann"),
        {
            "annotations/xmls/Bengal_1.xml": voc_xml("Bengal_1.jpg", 84, 64, (1, 1, 42, 32)),
            "annotations/xmls/Bengal_2.xml": voc_xml("Bengal_2.jpg", 999, 64, (1, 1, 42, 32)),  # size mismatch
            "annotations/xmls/Siamese_1.xml": b"<annotation><size>",  # malformed
            "annotations/list.txt": b"#Image CLASS-ID SPECIES BREED ID\n",
        },
    )
    dest = str(tmp_path / "clean")
    clean(src, dest, CleanConfig(workers=1, annotations=ann))
    rows = {r["path"]: r["bbox"] for r in read_output(dest).to_pylist()}
    assert rows["images/Bengal_1.jpg"] == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert rows["images/Bengal_2.jpg"] is None and rows["images/beagle_1.jpg"] is None
    info = contract.read_manifest(dest)["extra"]["annotations"]
    assert info["boxes_read"] == 2 and info["rows_with_bbox"] == 1
    assert list(info["unusable_xml"]) == ["annotations/xmls/Siamese_1.xml"]


def test_row_groups_shrink_for_large_images(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), good_members(6))
    dest = str(tmp_path / "clean")
    clean(src, dest, CleanConfig(workers=1, row_group_rows=16, row_group_bytes=10_000))
    (uri,) = contract.data_files(dest)
    meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).metadata
    # ~2-3 kB images and a 10 kB target: the floor of 8 rows wins over 16.
    assert meta.row_group(0).num_rows == 8


# Real images in formats clean does not decode by default, under names that do not say so.
OTHER_FORMATS = {
    "images/Bengal_700.jp2": ("JPEG2000", f.jpeg2000(96, 64, seed=70)),
    "images/Siamese_701.jpg": ("EPS", f.EPS),
    "images/beagle_702.icns": ("ICNS", f.icns(72)),
}


@pytest.fixture
def other_formats(tmp_path) -> tuple[str, dict[str, bytes]]:
    members = {**good_members(4), **{p: data for p, (_, data) in OTHER_FORMATS.items()}}
    return write_download_output(str(tmp_path / "download"), members), members


def _rejects(dest: str) -> dict[str, dict]:
    return {r["path"]: r for r in contract.read_rejects(dest).to_pylist()}


def _reconciles(dest: str, report, members: dict[str, bytes]) -> None:
    kept = set(read_output(dest).column("path").to_pylist())
    rejected = set(_rejects(dest))
    assert report.inputs == len(members) == report.outputs + report.rejected
    assert kept | rejected == set(members) and not kept & rejected


def test_formats_outside_the_accepted_set_are_unsupported_format(other_formats, tmp_path):
    src, members = other_formats
    dest = str(tmp_path / "clean")
    report = clean(src, dest, CleanConfig(workers=1))

    rejects = _rejects(dest)
    assert {p: r["reason"] for p, r in rejects.items()} == dict.fromkeys(OTHER_FORMATS, "unsupported_format")
    for path, (shown, _) in OTHER_FORMATS.items():
        assert rejects[path]["detail"].startswith(f"{shown} is not an accepted format (accepted: jpeg, png, gif, bmp, tiff, webp); ")
    assert "--set formats=jpeg,png,gif,bmp,tiff,webp,jpeg2000" in rejects["images/Bengal_700.jp2"]["detail"]
    assert report.rejects_by_reason == {"unsupported_format": 3}
    _reconciles(dest, report, members)
    assert contract.read_manifest(dest)["config"]["formats"] == ["jpeg", "png", "gif", "bmp", "tiff", "webp"]


@pytest.mark.skipif(not features.check("jpg_2000"), reason="this Pillow has no OpenJPEG codec")
def test_formats_added_by_config_are_cleaned(other_formats, tmp_path):
    src, members = other_formats
    dest = str(tmp_path / "clean")
    # As `--set formats=...` delivers it: one comma-separated string.
    cfg = config_from_dict(CleanConfig, {"workers": 1, "formats": "jpeg,png,gif,bmp,tiff,webp,jpeg2000,icns"})
    report = clean(src, dest, cfg)

    rows = {r["path"]: r for r in read_output(dest).to_pylist()}
    for path in ("images/Bengal_700.jp2", "images/beagle_702.icns"):
        assert rows[path]["format"] == "png" and Image.open(io.BytesIO(rows[path]["image"]["bytes"])).format == "PNG"
    assert (rows["images/Bengal_700.jp2"]["width"], rows["images/Bengal_700.jp2"]["height"]) == (96, 64)
    eps = _rejects(dest)["images/Siamese_701.jpg"]
    assert eps["reason"] == "unsupported_format" and "Ghostscript" in eps["detail"]
    _reconciles(dest, report, members)
    with pytest.raises(ValueError, match="cleaned with other formats"):
        clean(src, str(tmp_path / "again"), CleanConfig(workers=1, skip_hashes_from=dest))


def test_label_overrides_replace_labels_and_are_counted(tmp_path):
    src = write_download_output(str(tmp_path / "dl"), good_members(per_class=4))
    overrides = tmp_path / "overrides.csv"
    overrides.write_text(
        "path,label,given_label,label_quality\n"
        "images/Bengal_1.jpg,Siamese,Bengal,0.01\n"  # a full member path
        "beagle_1.jpg,Bengal,beagle,0.02\n"  # a bare file name
        "images/not_there.jpg,beagle,beagle,0.5\n"
    )
    dest = str(tmp_path / "clean")
    report = clean(src, dest, CleanConfig(workers=1, label_overrides=str(overrides)))
    table = read_output(dest)
    labels = dict(zip(table.column("path").to_pylist(), table.column("label_name").to_pylist()))
    assert labels["images/Bengal_1.jpg"] == "Siamese" and labels["images/beagle_1.jpg"] == "Bengal"
    assert labels["images/Bengal_2.jpg"] == "Bengal", "the rest keep their source's label"
    given = report.extra["label_overrides"]
    assert (given["given"], given["applied"], given["unmatched"]) == (3, 2, 1)
    assert given["unmatched_sample"] == ["images/not_there.jpg"]


def test_the_releases_own_split_when_asked(tmp_path):
    members = good_members(per_class=10)
    src = write_download_output(str(tmp_path / "dl"), members)
    stems = sorted(p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in members)
    test_stems = {s for s in stems if s.endswith(("_1", "_2", "_3"))}
    listed = [s for s in stems if not s.endswith("_10")]  # the _10 images are in neither list
    ann = write_download_output(
        str(tmp_path / "ann"),
        {
            "annotations/test.txt": "".join(f"{s} 1 1 1\n" for s in listed if s in test_stems).encode(),
            "annotations/trainval.txt": (
                "#Image CLASS-ID SPECIES BREED ID\n" + "".join(f"{s} 1 1 1\n" for s in listed if s not in test_stems)
            ).encode(),
        },
    )
    dest = str(tmp_path / "clean")
    report = clean(src, dest, CleanConfig(workers=1, annotations=ann, split_from="annotations", split=(0.6, 0.2, 0.2)))
    table = read_output(dest)
    split_of = {p.rsplit("/", 1)[1].rsplit(".", 1)[0]: s for p, s in zip(table.column("path").to_pylist(), table.column("split").to_pylist())}
    assert {s for s, sp in split_of.items() if sp == "test" and not s.endswith("_10")} == test_stems, "test.txt is the test split"
    trainval = [s for s in listed if s not in test_stems]
    counts = Counter(split_of[s] for s in trainval)
    assert set(counts) == {"train", "val"} and counts["val"] == 3 * 2, "val carved from trainval, 1:3, per class"
    assert report.extra["split_from"] == "annotations"
    with pytest.raises(ValueError, match="needs annotations"):
        CleanConfig(split_from="annotations")
    with pytest.raises(ValueError, match="trainval.txt or test.txt"):
        clean(src, str(tmp_path / "c2"), CleanConfig(workers=1, annotations=src, split_from="annotations"))
