"""Hostile run parameters (issue 36): what a user of a shared Kubeflow could name to reach what it should not.

Each test is one attack, and each would have succeeded before its fix. Tests that could
delete something make deleting impossible first (every storage deletion patched to
raise), so a regression fails the test, never the machine.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from imgpipe import commit, contract, storage
from imgpipe.writer import OutputWriter

pytestmark = pytest.mark.quick


@pytest.fixture
def forbid_deletes(monkeypatch):
    """Call it once the scene is set: from then on every storage deletion raises."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"storage deleted something: {args}")

    def arm() -> None:
        for name in ("delete", "delete_prefix", "delete_many"):
            monkeypatch.setattr(storage, name, forbidden)
            for backend in storage._BACKENDS.values():
                monkeypatch.setattr(type(backend), name, forbidden)

    return arm


def _committed(dest: str, step: str = "clean") -> None:
    out = OutputWriter(dest, step)
    out.begin()
    out.write_table("part-00000.parquet", pa.table({"x": [1]}))
    out.commit(inputs=1, rejects=[], config={})


def test_a_destination_that_is_a_link_to_another_output_is_refused_before_anything_is_deleted(tmp_path, forbid_deletes):
    victim = str(tmp_path / "runs" / "victim")
    _committed(victim)
    link = tmp_path / "runs" / "mine"
    os.symlink(storage.local_path(victim), link)
    forbid_deletes()
    with pytest.raises(ValueError, match="symbolic link.*resolves to .*victim"):
        commit.claim(str(link), "clean")
    with pytest.raises(ValueError, match="symbolic link"):
        commit.claim(str(link), "clean", keep=["checkpoint.pt"])  # train's resume path
    assert contract.is_committed(victim), "the other output keeps its _SUCCESS"


def test_a_destination_below_a_linked_directory_or_holding_a_link_is_refused(tmp_path, forbid_deletes):
    forbid_deletes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "parent-link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        commit.claim(str(tmp_path / "parent-link" / "out"), "resize")
    dest = tmp_path / "out" / "resize"
    dest.mkdir(parents=True)
    (elsewhere / "precious.txt").write_text("not imgpipe's")
    (dest / "part-00000.parquet").symlink_to(elsewhere / "precious.txt")
    with pytest.raises(ValueError, match="symbolic link.*part-00000.parquet"):
        commit.claim(str(dest), "resize")
    assert (elsewhere / "precious.txt").read_text() == "not imgpipe's"


def test_a_copied_output_is_not_proof_of_ownership(tmp_path, forbid_deletes):
    import shutil

    original = str(tmp_path / "a" / "clean")
    _committed(original)
    copy = tmp_path / "b" / "clean"
    shutil.copytree(storage.local_path(original), copy)
    forbid_deletes()
    with pytest.raises(ValueError, match="an output written at .*/a/clean, not here"):
        commit.claim(str(copy), "clean")


def test_an_output_claimed_again_at_its_own_path_is_still_taken_over(tmp_path):
    dest = str(tmp_path / "out" / "clean")
    _committed(dest)
    commit.claim(dest, "clean")  # a re-run of the same step at the same resolved path
    assert not contract.is_committed(dest)


def test_the_audits_review_file_runs_no_formulas_and_clean_reads_it_back():
    import csv
    import io

    from imgpipe.data.labels import read_label_csv
    from imgpipe.steps.audit import _overrides_csv

    hostile = "=cmd|' -C calc'!A0"
    suspects = [
        {"path": f"{hostile}/1.jpg", "suggested_label": hostile, "given_label": "@SUM(1+1)", "label_quality": 0.01, "suggested_prob": 0.9},
        {"path": "+x/2.jpg", "suggested_label": "-1", "given_label": "\tcat", "label_quality": 0.2, "suggested_prob": 0.5},
        {"path": "plain/3.jpg", "suggested_label": "'quoted", "given_label": "dog", "label_quality": 0.3, "suggested_prob": 0.4},
    ]
    text = _overrides_csv(suspects)
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))], cells
    # The round trip the README describes: audit -> a person reviews -> clean reads the overrides.
    assert read_label_csv(text.encode()) == {f"{hostile}/1.jpg": hostile, "+x/2.jpg": "-1", "plain/3.jpg": "'quoted"}


def test_a_config_with_a_python_tag_is_one_line_and_builds_nothing(tmp_path):
    from imgpipe.config import read_config_file
    from imgpipe.sweep import load_grid_file

    marker = tmp_path / "ran"
    evil = f"train:\n  model: !!python/object/apply:os.system ['touch {marker}']\n"
    for reader, name in ((read_config_file, "cfg.yaml"), (load_grid_file, "grid.yaml")):
        path = tmp_path / name
        path.write_text(evil)
        with pytest.raises(ValueError, match=r"line 2\): not plain YAML data") as info:
            reader(path)
        assert "\n" not in str(info.value) and "touch" not in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_that_is_not_weights_only_is_refused_in_one_line(tmp_path):
    import pickle

    from imgpipe.train.checkpoint import load_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(ValueError, match="cannot be resumed from") as info:
        load_checkpoint(str(path))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_the_early_grid_check_refuses_what_the_plan_refuses():
    from imgpipe.sweep import grid_parameters, plan

    for grid in ([{"model": "../../x"}], [{"lr": -1}]):
        with pytest.raises(ValueError) as early:
            grid_parameters(grid, None)
        with pytest.raises(ValueError) as planned:
            plan("file:///nowhere/resized", grid, None, None)
        assert str(early.value) == str(planned.value)


def _forged_output(prefix, step: str, names: list[str]) -> str:
    """A committed-looking output whose manifest lists ``names`` (as a forged previous run would)."""
    import json

    root = storage.local_path(storage.normalize_uri(str(prefix)))
    (root / contract.META_DIR).mkdir(parents=True, exist_ok=True)
    files = [{"name": n, "bytes": 1, "rows": 1, "sha256": "0" * 64} for n in names]
    (root / contract.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    (root / contract.SUCCESS).write_text("")
    return storage.normalize_uri(str(prefix))


@pytest.mark.parametrize("name", ["train/../../other/part-0.parquet", "/etc/passwd", "s3://other/x.parquet", "../x"])
def test_a_manifest_that_names_files_outside_its_prefix_is_refused(tmp_path, name):
    from imgpipe.train.partition import describe_split

    other = tmp_path / "other"
    other.mkdir()
    (other / "part-0.parquet").write_bytes(b"x")
    data = _forged_output(tmp_path / "runs" / "resize", "resize", [name])
    with pytest.raises(ValueError, match="not a plain name inside the prefix"):
        describe_split(data, "train")
    with pytest.raises(ValueError, match="not a plain name inside the prefix"):
        contract.data_files(data)


def test_a_card_that_names_another_models_file_is_refused_by_predict_and_register(tmp_path):
    import json

    from imgpipe.train.card import CARD_FORMAT, read_card

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.onnx").write_bytes(b"another model")
    mine = tmp_path / "mine"
    mine.mkdir()
    card = {"format": CARD_FORMAT, "classes": ["a", "b"], "input": {}, "files": {"onnx": "../victim/model.onnx"}}
    (mine / contract.MODEL_CARD).write_text(json.dumps(card))
    # predict and register both read the card through read_card before they open an artifact.
    with pytest.raises(ValueError, match="not a plain name inside the prefix"):
        read_card(str(mine))


# ----------------------------------------------------------------------------------------
# Carried rows and the one decode gate (issue 36, items 2 and 3).

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 96 72\nnewpath 0 0 moveto showpage\n"


def _clean_output(tmp_path, name: str, members: dict[str, bytes]) -> str:
    from imgpipe.clean.config import CleanConfig
    from imgpipe.steps.clean import clean
    from tests.helpers import write_download_output

    src = write_download_output(str(tmp_path / f"dl-{name}"), members)
    dest = str(tmp_path / name)
    clean(src, dest, CleanConfig(workers=1))
    return dest


def _forge_rows(prefix: str, change) -> None:
    """Rewrites a committed clean output's rows with ``change(row)`` and re-seals its manifest, as a forger would."""
    import hashlib
    import io
    import json

    import pyarrow.parquet as pq

    manifest = contract.read_manifest(prefix)
    for entry, uri in zip(manifest["files"], contract.data_files(prefix, manifest)):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        rows = [change(dict(r)) for r in table.to_pylist()]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), buf)
        storage.write_bytes(uri, buf.getvalue())
        entry["bytes"], entry["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    storage.write_bytes(storage.join(prefix, contract.MANIFEST), json.dumps(manifest).encode())


def test_forged_carried_rows_are_decoded_anew_from_this_runs_input(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from imgpipe.clean.config import CleanConfig
    from imgpipe.steps.clean import clean
    from tests import imagefactory as f
    from tests.helpers import write_download_output

    members = {f"images/{c}_{i}.jpg": f.jpeg(80 + 4 * i, 64 + 2 * k, seed=10 * k + i) for k, c in enumerate(("Bengal", "pug")) for i in range(1, 7)}
    prev = _clean_output(tmp_path, "previous", members)
    eps_path, bomb_path, claim_path = "images/Bengal_1.jpg", "images/Bengal_2.jpg", "images/pug_3.jpg"

    def change(row):
        if row["path"] == eps_path:
            row["image"] = {"bytes": EPS, "path": eps_path}
        elif row["path"] == bomb_path:  # 150 megapixels behind a header, claiming 96 x 72
            row["image"] = {"bytes": f.png_bomb(12_300), "path": bomb_path}
            row["width"], row["height"] = 96, 72
        elif row["path"] == claim_path:  # its own bytes, but columns that lie about them
            row["width"] += 1
        return row

    _forge_rows(prev, change)
    # Nothing may reach Ghostscript, whatever the code under test does.
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: (_ for _ in ()).throw(AssertionError("Ghostscript")))
    src = write_download_output(str(tmp_path / "dl-now"), members)
    dest = str(tmp_path / "now")
    report = clean(src, dest, CleanConfig(workers=1, skip_hashes_from=prev))

    assert report.inputs == len(members) == report.outputs + report.rejected
    assert report.extra["carried"] == len(members) - 3
    assert sum(report.extra["carried_refused"].values()) == 3
    assert report.extra["carried_from"] == prev
    import io

    import pyarrow.parquet as pq

    rows = {r["path"]: r for u in contract.data_files(dest) for r in pq.read_table(io.BytesIO(storage.read_bytes(u))).to_pylist()}
    for path in (eps_path, bomb_path, claim_path):  # decoded from this run's input: the genuine image
        assert rows[path]["image"]["bytes"] == members[path]
        assert (rows[path]["width"], rows[path]["height"]) != (96, 72) or path == claim_path


def test_resize_refuses_a_forged_row_from_its_header_before_decoding():
    import numpy as np

    from imgpipe.resize.ops import resize_batch
    from imgpipe.resize.spec import ResizeSpec
    from tests import imagefactory as f

    good = f.jpeg(96, 72, seed=1)
    batch = {
        "path": np.array(["a.png", "b.jpg", "c.jpg", "d.eps"], dtype=object),
        "image": np.array([{"bytes": f.png_bomb(12_300)}, {"bytes": good}, {"bytes": good}, {"bytes": EPS}], dtype=object),
        "width": np.array([96, 96, 97, 96], np.int32),
        "height": np.array([72, 72, 72, 72], np.int32),
    }
    out = resize_batch(batch, ResizeSpec(size=32))
    assert list(out["error_reason"]) == ["too_large", "", "not_as_recorded", "undecodable"]
    assert "pixels > max_pixels" in out["error_detail"][0]
    assert "unsupported_format" in out["error_detail"][3] or "eps" in out["error_detail"][3].lower()


def test_predicts_decode_goes_through_the_gate(monkeypatch):
    from PIL import EpsImagePlugin

    from imgpipe.data.images import ImageRejected
    from imgpipe.serving.prepare import decode as _decode
    from tests import imagefactory as f

    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: (_ for _ in ()).throw(AssertionError("Ghostscript")))
    with pytest.raises(ImageRejected, match="unsupported_format"):
        _decode(EPS, 3)
    with pytest.raises(ImageRejected, match="too_large"):
        _decode(f.png_bomb(12_300), 3)
    assert _decode(f.jpeg(40, 30), 3).shape == (30, 40, 3)


# ----------------------------------------------------------------------------------------
# One read policy for every URI a run names (issue 36, item 1).

SECRET = "imgpipe-test-secret-7f3a"  # stands for the profile's S3 key in the pod's environment
ROOT = "s3://team/imgpipe"


@pytest.fixture
def forbid_reads(monkeypatch):
    """Every storage read raises: a refused URI must be refused before the first byte is read."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"storage read something: {args}")

    for name in ("read_bytes", "open_read", "exists", "size", "list_objects", "download_file", "arrow_filesystem"):
        monkeypatch.setattr(storage, name, forbidden)
    for backend in storage._BACKENDS.values():
        for name in ("read_bytes", "open_read", "exists", "size", "list_objects", "download_file"):
            if hasattr(type(backend), name):
                monkeypatch.setattr(type(backend), name, forbidden)


OUTSIDE = [
    "file:///proc/self/environ",
    "/etc/passwd",
    "s3://other-team/imgpipe/labels.csv",
    "s3://team/imgpipe-other/labels.csv",  # a sibling whose name starts the same
    "s3://team/imgpipe/../secrets/labels.csv",
]


@pytest.mark.parametrize("uri", OUTSIDE)
@pytest.mark.parametrize("field", ["label_overrides", "labels_csv", "annotations", "skip_hashes_from"])
def test_a_clean_parameter_cannot_name_what_lies_outside_the_data_root(tmp_path, monkeypatch, forbid_reads, field, uri):
    from imgpipe.components.clean import clean
    from kfp import dsl

    from imgpipe.readpolicy import ReadRefused

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    section = {field: uri, **({"label_source": "csv"} if field == "labels_csv" else {})}
    arts = {}
    for name, cls in (("dataset", dsl.Artifact), ("cleaned", dsl.Artifact), ("metrics", dsl.Metrics), ("report", dsl.HTML)):
        arts[name] = cls(name=name, uri=str(tmp_path / name), metadata={"prefix": f"{ROOT}/runs/r1/download"} if name == "dataset" else {})
    with pytest.raises(ReadRefused) as info:
        clean.python_func(data_root=ROOT, run_id="r1", step_config={"clean": section}, **arts)
    message = str(info.value)
    assert message.startswith(f"clean.{field}: ") and storage.redact_uri(uri) in message
    assert SECRET not in message and "\n" not in message


def test_previous_run_prefix_and_the_prefixes_latest_json_names_are_checked_before_reading(monkeypatch, forbid_reads):
    from imgpipe.readpolicy import ReadPolicy, ReadRefused
    from imgpipe.stepio import artifacts as ka

    policy = ReadPolicy.for_run(ROOT, {})
    for uri in OUTSIDE:
        with pytest.raises(ReadRefused, match="previous_run_prefix"):
            ka.resolve_previous(ROOT, uri, policy)
    monkeypatch.setattr(ka, "read_latest", lambda root: {"prefixes": {"clean": "file:///etc", "train": "s3://other/m"}})
    with pytest.raises(ReadRefused, match="latest.json's clean prefix: file:///etc is a local path"):
        ka.resolve_previous(ROOT, "latest", policy)
    with pytest.raises(ReadRefused, match="latest.json's train prefix: s3://other/m is outside"):
        ka.current_model(ROOT, policy)


@pytest.mark.parametrize("field", ["weights", "weights_cache"])
def test_train_weights_and_their_cache_stay_below_the_data_root(forbid_reads, field):
    from imgpipe.config import step_config
    from imgpipe.readpolicy import ReadPolicy, ReadRefused
    from imgpipe.train.config import TrainConfig

    policy = ReadPolicy.for_run(ROOT, {})
    with pytest.raises(ReadRefused, match=f"train.{field}: s3://other/w.pt is outside"):
        step_config(TrainConfig, {"train": {field: "s3://other/w.pt"}}, "train", policy=policy)
    assert step_config(TrainConfig, {"train": {field: f"{ROOT}/weights/w.pt"}}, "train", policy=policy)


def test_local_files_need_the_operator_and_links_are_judged_where_they_lead(tmp_path):
    from imgpipe.readpolicy import ReadPolicy, ReadRefused

    root = tmp_path / "store"
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "ok.csv").write_text("path,label\n")
    (root / "labels" / "env.csv").symlink_to("/proc/self/environ")
    with pytest.raises(ReadRefused, match="a local path, which a run parameter may not name"):
        ReadPolicy.for_run(str(root), {}).check("clean.label_overrides", str(root / "labels" / "ok.csv"))
    allowed = ReadPolicy.for_run(str(root), {"IMGPIPE_SOURCE_LOCAL": "1"})
    assert allowed.check("clean.label_overrides", str(root / "labels" / "ok.csv")).endswith("ok.csv")
    with pytest.raises(ReadRefused, match="outside what this run may read"):
        allowed.check("clean.label_overrides", str(root / "labels" / "env.csv"))
    for wide in ("/", "/proc", "/tmp"):  # a data root that would reach the pod's own files counts for nothing
        with pytest.raises(ReadRefused, match="not counted"):
            ReadPolicy.for_run(wide, {"IMGPIPE_SOURCE_LOCAL": "1"}).check("clean.labels_csv", "/proc/self/environ")


def test_the_operator_lists_more_prefixes_and_nothing_else_widens_the_policy():
    from imgpipe.readpolicy import ReadPolicy, ReadRefused

    policy = ReadPolicy.for_run(ROOT, {"IMGPIPE_READ_PREFIXES": "s3://shared/labels, s3://models/current"})
    assert policy.allows("s3://shared/labels/pets.csv") and policy.allows("s3://models/current/model.json")
    assert not policy.allows("s3://shared/labels-private/x.csv") and not policy.allows("s3://shared/other/x")
    assert not policy.allows("file:///etc/passwd")
    for bad in ("/", "ftp://x/y"):
        with pytest.raises(ValueError, match="IMGPIPE_READ_PREFIXES"):
            ReadPolicy.for_run(ROOT, {"IMGPIPE_READ_PREFIXES": bad})
    with pytest.raises(ReadRefused):
        ReadPolicy.for_run(ROOT, {}).check("x", "s3://shared/labels/pets.csv")


def test_a_label_csv_error_names_the_field_and_uri_never_the_content():
    from imgpipe.data.labels import read_label_csv

    environ = f"AWS_SECRET_ACCESS_KEY={SECRET}\0HOME=/root\0".encode()
    for data in (environ, f"path,label\na.jpg,{SECRET}\na.jpg,other\n".encode(), b"\xff\xfe" + environ):
        with pytest.raises(ValueError) as info:
            read_label_csv(data, "clean.label_overrides s3://team/imgpipe/env.csv")
        assert SECRET not in str(info.value) and "clean.label_overrides s3://team/imgpipe/env.csv" in str(info.value)
