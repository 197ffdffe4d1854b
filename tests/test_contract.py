"""The commit protocol of a step output prefix."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from imgpipe import contract, storage
from imgpipe.contract import OutputWriter, Reject, UncommittedOutputError


def test_commit_writes_everything_in_order(any_root):
    dest = storage.join(any_root, "step")
    out = OutputWriter(dest, "demo")
    out.begin()
    out.write_table("part-00000.parquet", pa.table({"x": [1, 2, 3]}))
    assert not contract.is_committed(dest), "nothing is readable before commit"
    with pytest.raises(UncommittedOutputError):
        contract.read_manifest(dest)
    report = out.commit(inputs=4, rejects=[Reject("d.jpg", "corrupt", "bad")], config={"k": 1})
    assert report.outputs == 3 and report.rejected == 1
    manifest = contract.read_manifest(dest, expect_step="demo")
    assert manifest["files"] == [{"name": "part-00000.parquet", "rows": 3, "bytes": manifest["files"][0]["bytes"]}]
    assert manifest["inputs"] == 4 and manifest["rejects_by_reason"] == {"corrupt": 1}
    assert contract.read_rejects(dest).to_pylist() == [{"path": "d.jpg", "reason": "corrupt", "detail": "bad"}]
    assert contract.data_files(dest) == [storage.join(dest, "part-00000.parquet")]
    assert b"k: 1" in storage.read_bytes(storage.join(dest, "config.yaml"))
    with pytest.raises(ValueError, match="expected 'other'"):
        contract.read_manifest(dest, expect_step="other")


def test_counts_must_reconcile(tmp_path):
    out = OutputWriter(str(tmp_path / "s"), "demo")
    out.begin()
    out.write_table("part-00000.parquet", pa.table({"x": [1]}))
    with pytest.raises(RuntimeError, match="do not reconcile"):
        out.commit(inputs=5, rejects=[], config={})
    assert not contract.is_committed(str(tmp_path / "s"))


def test_begin_invalidates_previous_output_first(any_root):
    dest = storage.join(any_root, "step")
    first = OutputWriter(dest, "demo")
    first.begin()
    first.write_table("part-00000.parquet", pa.table({"x": [1]}))
    first.write_table("part-00001.parquet", pa.table({"x": [2]}))
    first.commit(inputs=2, rejects=[], config={})
    second = OutputWriter(dest, "demo")
    second.begin()
    assert not contract.is_committed(dest)
    assert storage.list_objects(dest) == [], "stale shards from the previous run are removed"
    second.write_table("part-00000.parquet", pa.table({"x": [9]}))
    second.commit(inputs=1, rejects=[], config={})
    assert json.loads(storage.read_bytes(storage.join(dest, "manifest.json")))["outputs"] == 1


def test_reserved_and_unsafe_names_refused(tmp_path):
    out = OutputWriter(str(tmp_path / "s"), "demo")
    with pytest.raises(RuntimeError, match="begin"):
        out.write_table("a.parquet", pa.table({"x": [1]}))
    out.begin()
    for name in ("manifest.json", "_SUCCESS", "../escape.parquet", "/abs.parquet"):
        with pytest.raises(ValueError):
            out.write_table(name, pa.table({"x": [1]}))


def test_manifest_without_success_is_refused_even_if_present(tmp_path):
    dest = str(tmp_path / "s")
    storage.write_bytes(storage.join(dest, "manifest.json"), b"{}")
    with pytest.raises(UncommittedOutputError, match="re-run"):
        contract.data_files(dest)


def test_binary_columns_stored_without_recompression(tmp_path):
    out = OutputWriter(str(tmp_path / "s"), "demo")
    out.begin()
    image = pa.StructArray.from_arrays([pa.array([b"\xff\xd8" * 500] * 3, pa.binary()), pa.array(["a", "b", "c"])], names=["bytes", "path"])
    out.write_table("part-00000.parquet", pa.table({"image": image, "label": [1, 2, 3]}))
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(str(tmp_path / "s" / "part-00000.parquet")).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"image.bytes": "UNCOMPRESSED", "image.path": "ZSTD", "label": "ZSTD"}
    assert not meta.column(0).is_stats_set and meta.column(2).is_stats_set


def test_check_disjoint(tmp_path):
    base = str(tmp_path)
    contract.check_disjoint(f"{base}/out", [f"{base}/in", f"{base}/output"], "demo")
    for src in (f"{base}/out", f"{base}/out/sub", base):
        with pytest.raises(ValueError, match="overlap"):
            contract.check_disjoint(f"{base}/out", [src], "demo")
