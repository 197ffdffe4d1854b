"""Clean's near-duplicate groups and quality outliers, end to end on generated images."""

from __future__ import annotations

import io
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.clean.quality import METRICS
from imgpipe.data.synth_images import image_rng, render_image, sample_size
from imgpipe.steps.clean import clean
from tests.helpers import write_download_output

CLASSES = ("Bengal", "Siamese", "beagle")
# The planted group: an original and three copies of it that are not the same bytes.
ORIGINAL = "images/Bengal_1.jpg"
PLANTED = ("images/Bengal_50.jpg", "images/Siamese_51.jpg", "images/beagle_52.jpg")


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _photo(c: int, i: int) -> Image.Image:
    rng = image_rng(11, c, i)
    return render_image(c, rng, sample_size(rng, 160, 320))[0]


def distinct_members(per_class: int = 12) -> dict[str, bytes]:
    """Distinct synthetic photos (the kind `make run` cleans), ``per_class`` per class."""
    return {f"images/{name}_{i}.jpg": _jpeg(_photo(c, i)) for c, name in enumerate(CLASSES) for i in range(1, per_class + 1)}


def members_with_near_duplicates() -> dict[str, bytes]:
    """Distinct photos plus three near-copies of ORIGINAL, one in each class folder name."""
    members = distinct_members()
    img = _photo(0, 1)
    members[ORIGINAL] = _jpeg(img)
    members[PLANTED[0]] = _jpeg(img, quality=60)  # re-encoded at another quality
    members[PLANTED[1]] = _jpeg(img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.Resampling.LANCZOS))
    members[PLANTED[2]] = _jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # mirrored
    return members


def read_output(prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in contract.data_files(prefix)])


@pytest.fixture
def planted(tmp_path) -> str:
    return write_download_output(str(tmp_path / "download"), members_with_near_duplicates())


def test_near_duplicates_rejected_naming_the_kept_image(planted, tmp_path):
    dest = str(tmp_path / "clean")
    report = clean(planted, dest, CleanConfig(workers=2, split=(0.5, 0.25, 0.25)))
    group = {ORIGINAL, *PLANTED}
    rejects = {r["path"]: r for r in contract.read_rejects(dest).to_pylist()}
    out = read_output(dest)
    kept = group & set(out.column("path").to_pylist())
    assert len(kept) == 1, kept
    (first,) = kept
    assert set(rejects) == group - kept
    for reject in rejects.values():
        assert reject["reason"] == "near_duplicate"
        assert first in reject["detail"]
    assert report.inputs == len(members_with_near_duplicates()) == report.outputs + report.rejected
    assert report.rejects_by_reason == {"near_duplicate": 3}
    near = report.extra["near_duplicates"]
    assert (near["mode"], near["groups"], near["images_in_groups"]) == ("reject", 1, 4)
    assert {tuple(p[:2]) for p in near["pairs"]} == {(first, p) for p in group - kept}
    # The measures are columns of the output, one value per row.
    assert out.schema.field("phash").type == pa.uint64()
    for name in METRICS:
        assert out.schema.field(name).type == pa.float32()
        assert out.column(name).null_count == 0


def test_group_mode_keeps_each_group_in_one_split(planted, tmp_path):
    dest = str(tmp_path / "clean")
    # Splits spread thin, so without the review the four would very likely land in several.
    report = clean(planted, dest, CleanConfig(workers=1, split=(0.4, 0.3, 0.3), near_duplicates="group"))
    out = read_output(dest).to_pylist()
    assert report.rejected == 0 and report.outputs == report.inputs == len(out)
    split_of = {r["path"]: r["split"] for r in out}
    assert len({split_of[p] for p in (ORIGINAL, *PLANTED)}) == 1
    assert report.extra["near_duplicates"]["groups"] == 1
    counts = defaultdict(int)
    for r in out:
        counts[r["split"]] += 1
    assert dict(counts) == {s: n for s, n in report.extra["splits"].items() if n}
    assert sorted(r["order"] for r in out) == list(range(len(out)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_group_spans_splits_whatever_the_seed(planted, tmp_path, seed):
    dest = str(tmp_path / f"clean-{seed}")
    clean(planted, dest, CleanConfig(workers=1, seed=seed, split=(0.34, 0.33, 0.33), near_duplicates="group"))
    split_of = {r["path"]: r["split"] for r in read_output(dest).select(["path", "split"]).to_pylist()}
    assert len({split_of[p] for p in (ORIGINAL, *PLANTED)}) == 1


def test_distinct_images_are_not_merged_at_the_default_distance(tmp_path):
    members = distinct_members(per_class=30)
    source = write_download_output(str(tmp_path / "download"), members)
    report = clean(source, str(tmp_path / "clean"), CleanConfig(workers=2))
    assert report.rejected == 0 and report.outputs == len(members)
    assert report.extra["near_duplicates"]["groups"] == 0


def test_off_mode_keeps_near_duplicates(planted, tmp_path):
    report = clean(planted, str(tmp_path / "clean"), CleanConfig(workers=1, near_duplicates="off"))
    assert report.rejected == 0 and report.extra["near_duplicates"]["groups"] == 0


def _with_blank_and_dark() -> dict[str, bytes]:
    members = distinct_members()
    members["images/Bengal_90.jpg"] = _jpeg(Image.new("RGB", (200, 160), (90, 140, 60)))
    dark = _photo(1, 91).point(lambda v: v // 25)  # the same kind of photo, at a tenth of the light
    members["images/Siamese_91.jpg"] = _jpeg(dark)
    return members


def test_blank_rejected_and_dark_flagged_by_default(tmp_path):
    source = write_download_output(str(tmp_path / "download"), _with_blank_and_dark())
    dest = str(tmp_path / "clean")
    report = clean(source, dest, CleanConfig(workers=1))
    rejects = contract.read_rejects(dest).to_pylist()
    assert [(r["path"], r["reason"]) for r in rejects] == [("images/Bengal_90.jpg", "blank")]
    assert "blank_std" in rejects[0]["detail"]
    dark = report.extra["quality"]["flagged"]["dark"]
    assert dark["count"] >= 1 and dark["paths"][0] == "images/Siamese_91.jpg"
    assert "images/Siamese_91.jpg" in read_output(dest).column("path").to_pylist()
    assert report.inputs == report.outputs + report.rejected
    hist = report.extra["quality"]["metrics"]["brightness"]["histogram"]
    assert sum(hist["counts"]) == report.inputs  # the blank one is measured too


def test_dark_rejected_past_its_threshold(tmp_path):
    source = write_download_output(str(tmp_path / "download"), _with_blank_and_dark())
    dest = str(tmp_path / "clean")
    report = clean(source, dest, CleanConfig(workers=1, reject_dark=3.5, blank_std=0))
    reasons = {r["path"]: r["reason"] for r in contract.read_rejects(dest).to_pylist()}
    assert reasons["images/Siamese_91.jpg"] == "dark"
    # blank_std=0: the blank image is judged as an outlier only, and is darker than most.
    assert reasons.get("images/Bengal_90.jpg") in (None, "dark")
    assert report.inputs == report.outputs + report.rejected
