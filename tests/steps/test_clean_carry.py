"""Incremental clean (``skip_hashes_from``): rows of a previous output carried, re-checked, and measured where they must be."""

from __future__ import annotations

import pytest

from imgpipe.clean import decode as clean_decode
from imgpipe.clean.config import CleanConfig
from imgpipe.steps.clean import clean
from tests import imagefactory as f
from tests.helpers import write_download_output
from tests.steps.conftest import good_members, read_output


def test_incremental_clean_carries_known_images(tmp_path):
    first = good_members(6)
    src1 = write_download_output(str(tmp_path / "dl1"), first)
    prev = str(tmp_path / "clean1")
    clean(src1, prev, CleanConfig(workers=1))
    prev_rows = {r["path"]: r for r in read_output(prev).to_pylist()}

    second = {**first, **{f"images/Siamese_{i}.jpg": f.jpeg(90, 70, seed=500 + i) for i in range(50, 56)}}
    second["images/Bengal_999.jpg"] = f.truncated_jpeg(9)
    src2 = write_download_output(str(tmp_path / "dl2"), second)
    dest = str(tmp_path / "clean2")
    report = clean(src2, dest, CleanConfig(workers=1, skip_hashes_from=prev))

    assert report.inputs == len(second) == report.outputs + report.rejected
    assert report.extra["carried"] == len(first)
    rows = {r["path"]: r for r in read_output(dest).to_pylist()}
    assert set(rows) == set(second) - {"images/Bengal_999.jpg"}
    for path, old in prev_rows.items():
        assert rows[path]["split"] == old["split"], "a known image never changes split"
        assert rows[path]["image"]["bytes"] == old["image"]["bytes"]
    assert sorted(r["order"] for r in rows.values()) == list(range(len(rows)))
    with pytest.raises(ValueError, match="grayscale"):
        clean(src2, str(tmp_path / "clean3"), CleanConfig(workers=1, grayscale=True, skip_hashes_from=prev))


@pytest.mark.parametrize("same_version", [True, False])
def test_carried_rows_keep_their_measures_only_from_an_output_of_this_version(tmp_path, monkeypatch, same_version):
    """An output of another measures version (an older imgpipe's) has its carried rows measured anew, as new rows are."""
    from dataclasses import replace

    import imgpipe.steps.clean as step

    first = good_members(6)
    prev = str(tmp_path / "clean1")
    real = clean_decode.measure_row
    # The previous output's hashes are marked: every bit inverted (the distances between rows stay).
    flip = (1 << 64) - 1
    monkeypatch.setattr(clean_decode, "measure_row", lambda img: replace(m := real(img), phash=m.phash ^ flip, phash_mirror=m.phash_mirror ^ flip))
    clean(write_download_output(str(tmp_path / "dl1"), first), prev, CleanConfig(workers=1))
    monkeypatch.setattr(clean_decode, "measure_row", real)
    if not same_version:  # as an output an older imgpipe wrote reads (review.measures_current)
        monkeypatch.setattr(step, "measures_current", lambda extra: False)
    second = {**first, "images/Siamese_50.jpg": f.jpeg(90, 70, seed=550)}
    dest = str(tmp_path / "clean2")
    report = clean(write_download_output(str(tmp_path / "dl2"), second), dest, CleanConfig(workers=1, skip_hashes_from=prev))
    assert report.extra["carried"] == len(first) and report.extra["quality"]["version"] == 2
    fresh = str(tmp_path / "fresh")
    clean(write_download_output(str(tmp_path / "dl3"), second), fresh, CleanConfig(workers=1))
    want = {r["path"]: r["phash"] for r in read_output(fresh).to_pylist()}
    for row in read_output(dest).to_pylist():
        if row["path"] in first and same_version:
            assert row["phash"] == want[row["path"]] ^ flip, "the previous output's own measures are carried"
        else:
            assert row["phash"] == want[row["path"]], "measured as a fresh clean measures it"


def test_measures_are_current_only_with_this_versions_mark():
    from imgpipe.clean.quality import MEASURES_VERSION
    from imgpipe.clean.review import measures_current

    assert measures_current({"quality": {"version": MEASURES_VERSION}})
    for extra in (None, {}, {"quality": None}, {"quality": {}}, {"quality": {"version": MEASURES_VERSION - 1}}):
        assert not measures_current(extra), extra


def test_a_carried_row_whose_stored_image_does_not_decode_is_decoded_anew(tmp_path, monkeypatch):
    """Measuring a carried row anew that fails (its stored bytes refused) sends it to the decode pass, not the step down."""
    import imgpipe.steps.clean as step
    from imgpipe.data.images import ImageRejected

    first = good_members(6)
    prev = str(tmp_path / "clean1")
    clean(write_download_output(str(tmp_path / "dl1"), first), prev, CleanConfig(workers=1))
    monkeypatch.setattr(step, "measures_current", lambda extra: False)
    real, refused = step.decode_row, "images/Bengal_1.jpg"
    stored = {r["path"]: r["image"]["bytes"] for r in read_output(prev).to_pylist()}[refused]

    def decode_row(data, cfg, max_decode_bytes=None):
        if data == stored:
            raise ImageRejected("corrupt", "refused for the test")
        return real(data, cfg, max_decode_bytes)

    monkeypatch.setattr(step, "decode_row", decode_row)  # the carried path only: the pool calls clean.decode's own
    report = clean(write_download_output(str(tmp_path / "dl2"), first), str(tmp_path / "clean2"), CleanConfig(workers=1, skip_hashes_from=prev))
    assert report.inputs == report.outputs + report.rejected
    assert report.extra["carried"] == len(first) - 1
    assert report.extra["carried_refused"] == {"stored image does not decode (corrupt)": 1}
    assert refused in {r["path"] for r in read_output(str(tmp_path / "clean2")).to_pylist()}
