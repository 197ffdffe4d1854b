"""Sources that are files: WebDataset shards, Hugging Face Parquet, nested archives.

Each kind goes through the download step itself, against real parts: tar files written by
``tarfile`` (in a bucket of the SeaweedFS S3 server of ``conftest.py``, or on disk), and Parquet
written by the Hugging Face ``datasets`` library. Every test checks that each input ends in the
output or in the rejects with a reason, and that the counts reconcile.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.data.readers.webdataset import expand_braces, sample_key
from imgpipe.steps.download import DownloadConfig, download
from tests.data.conftest import FAST, reconciles, rejects, rows
from tests.helpers import tar_bytes
from tests.imagefactory import jpeg, png_in_jpg

# --------------------------------------------------------------------------- WebDataset


def _shard(samples: dict[str, dict[str, bytes]]) -> bytes:
    return tar_bytes({f"{key}.{ext}": data for key, parts in samples.items() for ext, data in parts.items()})


def test_webdataset_shards_from_a_brace_pattern_keep_their_classes(s3_bucket):
    storage.write_bytes(
        f"{s3_bucket}/wds/train-000.tar",
        _shard(
            {
                "s/000": {"jpg": jpeg(seed=1), "cls": b"3"},
                "s/001": {"png": png_in_jpg(seed=2)[:0] or jpeg(seed=2), "json": b'{"label": "tabby"}'},
                "s/002": {"cls": b"1"},  # no image
            }
        ),
    )
    storage.write_bytes(
        f"{s3_bucket}/wds/train-001.tar",
        _shard(
            {
                "s/003": {"jpg": jpeg(seed=3), "txt": b"siamese", "json": b"{}"},  # a caption is no class
                "s/004": {"jpg": jpeg(seed=4)},  # no class
            }
        ),
    )
    report = download(f"{s3_bucket}/wds/train-{{000..001}}.tar", f"{s3_bucket}/out/download", FAST)
    assert {p: r["label"] for p, r in rows(report.dest).items()} == {"s/000.jpg": "3", "s/001.png": "tabby"}
    assert rejects(report.dest) == {"s/002": "sample_without_image", "s/003.jpg": "no_label", "s/004.jpg": "no_label"}
    formats = [s["format"] for s in contract.read_manifest(report.dest)["extra"]["sources"]]
    assert formats == ["webdataset/tar", "webdataset/tar"]
    reconciles(report, report.dest)


def test_a_plain_tar_in_webdataset_layout_is_recognised_by_its_content(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(_shard({"a": {"jpg": jpeg(seed=1), "cls": b"0"}, "b": {"jpg": jpeg(seed=2), "cls": b"1"}}))
    report = download(str(path), str(tmp_path / "out"), FAST)
    assert {p: r["label"] for p, r in rows("file://" + str(tmp_path / "out")).items()} == {"a.jpg": "0", "b.jpg": "1"}
    assert report.rejected == 0


def test_brace_patterns_expand_in_order_with_their_padding_and_are_bounded():
    assert expand_braces("s3://b/x-{008..011}.tar") == [f"s3://b/x-{n:03d}.tar" for n in range(8, 12)]
    assert expand_braces("a{1..2}-{0..1}") == ["a1-0", "a1-1", "a2-0", "a2-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("x-{5..1}.tar")
    with pytest.raises(ValueError, match="more than"):
        expand_braces("x-{0..999999}-{0..9}.tar")
    assert sample_key("n0144/10026.seg.png") == ("n0144/10026", "seg.png")


def test_a_sha256_pin_cannot_name_a_pattern(tmp_path):
    with pytest.raises(ValueError, match="a sha256 pin names one file"):
        download("s3://b/x-{0..3}.tar", str(tmp_path / "out"), DownloadConfig(sha256=("0" * 64,)))


# --------------------------------------------------------------------------- Hugging Face Parquet


def test_a_hugging_face_parquet_dataset_keeps_its_labels_and_class_names(hf_datasets, tmp_path):
    images = [jpeg(48, 40, seed=i) for i in range(6)]
    features = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.ClassLabel(names=["cat", "dog", "fox"])})
    data = {"image": [{"bytes": b, "path": f"/home/someone/pics/{i}.jpg"} for i, b in enumerate(images)], "label": [0, 1, 2, 0, 1, 2]}
    path = tmp_path / "train-00000-of-00001.parquet"
    hf_datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    table = pq.read_table(path)
    broken = table.set_column(1, "label", pa.array([0, 1, 2, 0, 7, None], pa.int64()))
    pq.write_table(broken, tmp_path / "broken.parquet")  # an out-of-range and a null label, same metadata
    report = download([str(path), str(tmp_path / "broken.parquet")], str(tmp_path / "out"), FAST)
    got = rows("file://" + str(tmp_path / "out"))
    assert {p: r["label"] for p, r in got.items() if p.startswith("train")} == {
        f"train-00000-of-00001/{i:08d}-{i}.jpg": ["cat", "dog", "fox"][i % 3] for i in range(6)
    }
    assert got["train-00000-of-00001/00000000-0.jpg"]["bytes"] == images[0]
    # An index past the three names is that row's bad_label; a null is no label at all.
    assert rejects("file://" + str(tmp_path / "out")) == {"broken/00000004-4.jpg": "bad_label", "broken/00000005-5.jpg": "no_label"}
    (first, _) = contract.read_manifest("file://" + str(tmp_path / "out"))["extra"]["sources"]
    assert first["format"] == "hf-parquet" and first["classes"] == ["cat", "dog", "fox"]
    reconciles(report, "file://" + str(tmp_path / "out"))


def test_a_parquet_file_of_another_schema_is_refused_naming_what_it_lacks(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"needs an 'image' column .* its columns are \['pixels', 'y'\]"):
        download(str(tmp_path / "other.parquet"), str(tmp_path / "out"), FAST)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- nested archives


def test_a_tar_of_per_class_tars_is_opened_one_level_with_classes_from_the_inner_names(tmp_path):
    inner = {f"n0{c}": tar_bytes({f"n0{c}_{i}.JPEG": jpeg(seed=10 * c + i) for i in range(3)}) for c in range(2)}
    deeper = tar_bytes({"x.tar": tar_bytes({"y.jpg": jpeg(seed=77)}), "ok.jpg": jpeg(seed=78)})
    path = tmp_path / "ILSVRC2012_img_train.tar"
    path.write_bytes(tar_bytes({"n00.tar": inner["n00"], "n01.tar": inner["n01"], "n02.tar": deeper, "README": b"not an image"}))
    report = download(str(path), str(tmp_path / "out"), FAST)
    got = rows("file://" + str(tmp_path / "out"))
    assert {p: r["label"] for p, r in got.items()} == {
        **{f"n0{c}/n0{c}_{i}.JPEG": f"n0{c}" for c in range(2) for i in range(3)},
        "n02/ok.jpg": "n02",
        "README": None,
    }
    assert rejects("file://" + str(tmp_path / "out")) == {"n02/x.tar": "nested_archive"}
    reconciles(report, "file://" + str(tmp_path / "out"))


def test_the_member_cap_counts_across_both_levels(tmp_path):
    inner = tar_bytes({f"{i}.jpg": b"\xff\xd8" + bytes(10) for i in range(8)})
    path = tmp_path / "outer.tar"
    path.write_bytes(tar_bytes({"a.tar": inner, "b.tar": inner}))
    with pytest.raises(ValueError, match=r"max_members=10"):
        download(str(path), str(tmp_path / "out"), DownloadConfig(max_members=10))
    assert not (tmp_path / "out").exists(), "refused in the dry run, before dest was touched"


@pytest.mark.timeout(60)
def test_a_fifo_named_as_the_source_is_refused_by_its_kind_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "images.tar")  # opened for reading the usual way, it waits for a writer for ever
    with pytest.raises(ValueError, match=r"images\.tar is a FIFO \(named pipe\), not a regular file"):
        download(str(tmp_path / "images.tar"), str(tmp_path / "out"), FAST)
