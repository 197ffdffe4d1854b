"""The commit protocol of a step output prefix."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import commit, contract, parquet, storage
from imgpipe.contract import Reject, UncommittedOutputError
from imgpipe.data.previous import PreviousDownload
from imgpipe.writer import OutputWriter
from tests.helpers import as_legacy_layout, write_download_output


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
    data = storage.read_bytes(storage.join(dest, "part-00000.parquet"))
    assert manifest["files"] == [{"name": "part-00000.parquet", "rows": 3, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}], (
        "the manifest describes each file by size and digest, computed as it was written"
    )
    assert manifest["attempt"] == json.loads(storage.read_bytes(storage.join(dest, contract.OWNER)))["attempt"]
    assert manifest["inputs"] == 4 and manifest["rejects_by_reason"] == {"corrupt": 1}
    assert contract.read_rejects(dest).to_pylist() == [{"path": "d.jpg", "reason": "corrupt", "detail": "bad"}]
    assert contract.data_files(dest) == [storage.join(dest, "part-00000.parquet")]
    assert b"k: 1" in storage.read_bytes(storage.join(dest, contract.CONFIG))
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
    left = [o.uri[len(storage.normalize_uri(dest).rstrip("/")) + 1 :] for o in storage.list_objects(dest)]
    assert left == [contract.OWNER], "stale shards from the previous run are removed; only the owner marker is there"
    second.write_table("part-00000.parquet", pa.table({"x": [9]}))
    second.commit(inputs=1, rejects=[], config={})
    assert json.loads(storage.read_bytes(storage.join(dest, contract.MANIFEST)))["outputs"] == 1


def test_reserved_and_unsafe_names_refused(tmp_path):
    out = OutputWriter(str(tmp_path / "s"), "demo")
    with pytest.raises(RuntimeError, match="begin"):
        out.write_table("a.parquet", pa.table({"x": [1]}))
    out.begin()
    names = (contract.MANIFEST, contract.REJECTS, contract.SUCCESS, "_SUCCESS", "../escape.parquet", "/abs.parquet")
    # Names directory readers skip (the rows would be lost), and an empty folder.
    names += ("_part.parquet", ".part.parquet", "train/_x.parquet", "a//b.parquet")
    for name in names:
        with pytest.raises(ValueError):
            out.write_table(name, pa.table({"x": [1]}))


def test_manifest_without_success_is_refused_even_if_present(tmp_path):
    dest = str(tmp_path / "s")
    storage.write_bytes(storage.join(dest, contract.MANIFEST), b"{}")
    with pytest.raises(UncommittedOutputError, match="re-run"):
        contract.data_files(dest)


def test_side_files_are_out_of_the_directory_readers_way(tmp_path):
    """Every name but the data starts with "_": pyarrow reads the prefix as its data rows alone."""
    import pyarrow.dataset as ds

    dest = str(tmp_path / "s")
    out = OutputWriter(dest, "demo")
    out.begin()
    out.write_table("part-00000.parquet", pa.table({"x": [1, 2]}))
    storage.write_bytes(out.uri(contract.LABELS), b"{}")
    out.commit(inputs=3, rejects=[Reject("d.jpg", "corrupt")], config={"k": 1})
    names = {o.uri[len(storage.normalize_uri(dest)) + 1 :] for o in storage.list_objects(dest)}
    assert names == {"part-00000.parquet", contract.OWNER, contract.SUCCESS, contract.MANIFEST, contract.REJECTS, contract.CONFIG, contract.LABELS}
    assert all(n.startswith(contract.META_DIR + "/") for n in names - {"part-00000.parquet"}), "one folder readers skip"
    assert [f.rsplit("/", 1)[1] for f in ds.dataset(dest, format="parquet").files] == ["part-00000.parquet"]
    assert pq.read_table(dest).column("x").to_pylist() == [1, 2]


def test_outputs_of_earlier_versions_read_with_their_side_files_beside_the_data(any_root):
    """manifest.json, rejects.parquet, config.yaml and labels.json where earlier versions wrote them."""
    dest = storage.join(any_root, "old")
    out = OutputWriter(dest, "demo")
    out.begin()
    out.write_table("part-00000.parquet", pa.table({"x": [1, 2]}))
    storage.write_bytes(out.uri(contract.LABELS), b'{"0": "cat"}')
    out.commit(inputs=3, rejects=[Reject("d.jpg", "corrupt", "bad")], config={"k": 1})
    as_legacy_layout(dest)
    assert storage.exists(storage.join(dest, "manifest.json")) and not storage.exists(storage.join(dest, contract.MANIFEST))
    assert contract.is_committed(dest)
    manifest = contract.read_manifest(dest, expect_step="demo")
    assert manifest["outputs"] == 2
    assert contract.verify_output(dest) == manifest
    assert contract.data_files(dest) == [storage.join(dest, "part-00000.parquet")]
    assert contract.read_rejects(dest).to_pylist() == [{"path": "d.jpg", "reason": "corrupt", "detail": "bad"}]
    assert contract.side_file(dest, contract.LABELS) == storage.join(dest, "labels.json")
    assert contract.read_side_file(dest, contract.CONFIG) == storage.read_bytes(storage.join(dest, "config.yaml"))
    assert contract.side_file(dest, "nothing.json") is None
    # Its owner is read from the old manifest: another step refuses it, the same step takes it over.
    with pytest.raises(ValueError, match="a demo output"):
        OutputWriter(dest, "other").begin()
    again = OutputWriter(dest, "demo")
    again.begin()
    again.write_table("part-00000.parquet", pa.table({"x": [7]}))
    again.commit(inputs=1, rejects=[], config={})
    assert contract.read_manifest(dest)["outputs"] == 1 and not storage.exists(storage.join(dest, "manifest.json"))


def test_a_download_output_of_an_earlier_version_is_a_previous_run(tmp_path):
    """Incremental downloads carry the rows of an output written before the side files moved."""
    dest = as_legacy_layout(write_download_output(str(tmp_path / "dl"), {"a.jpg": b"aaa", "b.jpg": b"bbbb"}))
    previous = PreviousDownload(dest)
    assert previous.files == contract.data_files(dest) and len(previous) == 2
    assert previous.known("b.jpg") == (4, None)


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
    commit.check_disjoint(f"{base}/out", [f"{base}/in", f"{base}/output"], "demo")
    for src in (f"{base}/out", f"{base}/out/sub", base):
        with pytest.raises(ValueError, match="overlap"):
            commit.check_disjoint(f"{base}/out", [src], "demo")


# ----------------------------------------------------------------------------------------
# A destination is emptied before writing: only ever one this step owns.


@pytest.mark.parametrize("dest", ["s3://some-bucket", "s3://some-bucket/", "/", "file:///tmp", "/data"])
def test_bucket_roots_and_shallow_prefixes_are_refused(dest, monkeypatch):
    # Safe by construction: nothing may be listed, deleted or written here, whatever the code
    # under test does (a begin() that empties "/" must fail this test, not the machine).
    def forbidden(*args, **kwargs):
        raise AssertionError(f"storage was touched for {dest}: {args}")

    for name in ("delete", "delete_prefix", "list_objects", "write_bytes", "exists"):
        monkeypatch.setattr(storage, name, forbidden)
    with pytest.raises(ValueError, match="at least 2 segments"):
        OutputWriter(dest, "demo").begin()


def test_a_prefix_with_foreign_objects_is_refused_and_left_alone(any_root):
    dest = storage.join(any_root, "shared")
    storage.write_bytes(storage.join(dest, "notes/keep-me.txt"), b"someone else's")
    with pytest.raises(ValueError, match="objects imgpipe did not write.*notes/keep-me.txt"):
        OutputWriter(dest, "demo").begin()
    assert storage.read_bytes(storage.join(dest, "notes/keep-me.txt")) == b"someone else's"


def test_another_steps_output_is_refused(any_root):
    dest = storage.join(any_root, "out")
    first = OutputWriter(dest, "download")
    first.begin()
    first.write_table("part-00000.parquet", pa.table({"x": [1]}))
    first.commit(inputs=1, rejects=[], config={})
    with pytest.raises(ValueError, match="holds a download output"):
        OutputWriter(dest, "clean").begin()
    assert contract.is_committed(dest), "the download output is untouched"


def test_a_killed_attempt_of_the_same_step_is_taken_over(any_root):
    dest = storage.join(any_root, "out")
    killed = OutputWriter(dest, "demo")
    killed.begin()
    killed.write_table("part-00007.parquet", pa.table({"x": [1]}))  # then the pod died: no manifest
    again = OutputWriter(dest, "demo")
    again.begin()
    again.write_table("part-00000.parquet", pa.table({"x": [2]}))
    again.commit(inputs=1, rejects=[], config={})
    assert [f["name"] for f in contract.read_manifest(dest)["files"]] == ["part-00000.parquet"]
    assert not storage.exists(storage.join(dest, "part-00007.parquet"))


def _one_file_output(dest: str, value: int) -> OutputWriter:
    out = OutputWriter(dest, "demo")
    out.begin()
    out.write_table("part-00000.parquet", pa.table({"x": [value] * 3}))
    return out


def test_an_attempt_overtaken_by_a_newer_claim_does_not_commit(any_root):
    """Two writers of one prefix (a retry while the first attempt runs): the newest claim owns it."""
    dest = storage.join(any_root, "step")
    first = _one_file_output(dest, 1)
    second = _one_file_output(dest, 2)  # claims while the first still writes, deleting its file
    with pytest.raises(commit.ConcurrentWriterError, match="another attempt"):
        first.commit(inputs=3, rejects=[], config={})
    assert not contract.is_committed(dest)
    second.commit(inputs=3, rejects=[], config={})
    manifest = contract.verify_output(dest)
    assert manifest["attempt"] == second._attempt
    assert contract.read_rejects(dest).num_rows == 0


def test_a_stale_attempt_writing_after_the_newer_one_is_stopped(any_root):
    """The older attempt's late write lands on the newer one's file name; it cannot commit, and the swap is found."""
    dest = storage.join(any_root, "step")
    first = OutputWriter(dest, "demo")
    first.begin()
    second = _one_file_output(dest, 2)
    second.commit(inputs=3, rejects=[], config={})
    first.write_table("part-00000.parquet", pa.table({"x": [1] * 3}))  # same size, other bytes
    with pytest.raises(commit.ConcurrentWriterError):
        first.commit(inputs=3, rejects=[], config={})
    assert contract.is_committed(dest), "the newer attempt's commit stands"
    with pytest.raises(ValueError, match="does not match the sha256"):
        contract.verify_output(dest)


def test_commit_refuses_files_changed_under_it(tmp_path):
    dest = str(tmp_path / "step")
    out = _one_file_output(dest, 1)
    storage.write_bytes(storage.join(dest, "part-00000.parquet"), b"short")
    with pytest.raises(ValueError, match="has 5 bytes"):
        out.commit(inputs=3, rejects=[], config={})
    assert not contract.is_committed(dest)


def test_readers_refuse_a_data_file_missing_after_the_commit(any_root):
    dest = storage.join(any_root, "step")
    _one_file_output(dest, 1).commit(inputs=3, rejects=[], config={})
    storage.delete(storage.join(dest, "part-00000.parquet"))
    with pytest.raises(ValueError, match="part-00000.parquet is missing"):
        contract.data_files(dest)


def test_a_claim_between_manifest_and_success_takes_the_marker_back(tmp_path, monkeypatch):
    """The narrowest race: another attempt claims after this one's last check but before _SUCCESS."""
    dest = str(tmp_path / "step")
    out = _one_file_output(dest, 1)
    real_write = storage.write_bytes

    def claim_before_success(uri, data):
        if uri.endswith(contract.SUCCESS):
            commit.claim(dest, "demo")  # deletes the manifest and files, takes the owner marker
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", claim_before_success)
    with pytest.raises(commit.ConcurrentWriterError):
        out.commit(inputs=3, rejects=[], config={})
    assert not contract.is_committed(dest), "a _SUCCESS over another attempt's claim is removed again"


def test_delete_prefix_raises_on_per_key_errors(s3_bucket, monkeypatch):
    """S3 DeleteObjects answers 200 with an Errors list: a key it could not delete must not pass silently."""
    dest = f"{s3_bucket}/step"
    storage.write_bytes(f"{dest}/a", b"1")
    client = storage.s3_client()
    real = client.delete_objects

    def refuse(**kwargs):
        real(**kwargs)
        key = kwargs["Delete"]["Objects"][0]["Key"]
        return {"Errors": [{"Key": key, "Code": "AccessDenied", "Message": "Access Denied"}]}

    monkeypatch.setattr(client, "delete_objects", refuse)
    with pytest.raises(OSError, match="AccessDenied"):
        storage.delete_prefix(dest)


def test_a_report_rebuilt_from_its_manifest_is_the_report(tmp_path):
    dest = str(tmp_path / "step")
    out = _one_file_output(dest, 1)
    report = out.commit(inputs=4, rejects=[Reject("x.jpg", "corrupt")], config={}, extra={"k": [1]})
    assert contract.StepReport.from_manifest(contract.read_manifest(dest)) == report


def test_parquet_file_streams_row_groups_and_commits_only_on_success(tmp_path):
    out = OutputWriter("file://" + str(tmp_path / "out"), "clean")
    out.begin()
    table = pa.table({"order": pa.array(range(10), pa.int64())})
    with out.parquet_file("part-00000.parquet", table.schema) as sink:
        sink.write(table.slice(0, 4))
        sink.write(table.slice(4), row_group_size=3)
    (entry,) = out.files
    written = pq.ParquetFile(tmp_path / "out" / "part-00000.parquet")
    assert entry.rows == 10 and written.metadata.num_row_groups == 3
    assert entry.sha256 == hashlib.sha256((tmp_path / "out" / "part-00000.parquet").read_bytes()).hexdigest()
    with pytest.raises(RuntimeError, match="boom"), out.parquet_file("part-00001.parquet", table.schema) as sink:
        sink.write(table)
        raise RuntimeError("boom")
    assert not (tmp_path / "out" / "part-00001.parquet").exists() and len(out.files) == 1


# ------------------------------------------------------------------ Hugging Face features

_IMAGE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        parquet.IMAGE_FIELD,
        parquet.LABEL_FIELD,
        pa.field("pixels", pa.binary(), nullable=False),
        pa.field("bbox", pa.list_(pa.float32())),
    ]
)


def test_hf_features_are_what_the_datasets_library_writes(hf_datasets):
    from datasets import ClassLabel, Features, Image, List, Value

    schema = parquet.with_hf_features(_IMAGE_SCHEMA, ["cat", "dog"])
    ours = json.loads(schema.metadata[parquet.HF_METADATA_KEY])
    theirs = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog"]), "pixels": Value("binary")})
    assert ours == json.loads(theirs.arrow_schema.metadata[parquet.HF_METADATA_KEY])
    assert ours == {"info": {"features": theirs.to_dict()}}
    # What datasets makes of the schema: our features, and the Arrow types for the rest.
    assert Features.from_arrow_schema(schema) == Features(
        {
            "path": Value("string"),
            "image": Image(),
            "label": ClassLabel(names=["cat", "dog"]),
            "pixels": Value("binary"),
            "bbox": List(Value("float32")),
        }
    )
    # Without the metadata the same columns are a plain struct and an integer.
    assert Features.from_arrow_schema(_IMAGE_SCHEMA)["label"] == Value("int64")


def test_hf_features_survive_a_committed_parquet_file_byte_for_byte(tmp_path):
    schema = parquet.with_hf_features(_IMAGE_SCHEMA, ["cat", "dog"])
    row = {"path": "a.jpg", "image": {"bytes": b"x", "path": "a.jpg"}, "label": 1, "pixels": b"\0", "bbox": None}
    written = []
    for name in ("one", "two"):
        out = OutputWriter("file://" + str(tmp_path / name), "clean")
        out.begin()
        with out.parquet_file("part-00000.parquet", schema) as sink:
            sink.write(pa.Table.from_pylist([row], schema=schema))
        out.commit(inputs=1, rejects=[], config={})
        contract.verify_output(out.dest)
        written.append((tmp_path / name / "part-00000.parquet").read_bytes())
    assert written[0] == written[1], "the metadata is deterministic: a re-run writes identical files"
    stored = pq.read_schema(tmp_path / "one" / "part-00000.parquet")
    assert stored.metadata[parquet.HF_METADATA_KEY] == schema.metadata[parquet.HF_METADATA_KEY]
    assert stored.equals(schema, check_metadata=False)


@pytest.mark.parametrize(
    ("schema", "classes", "error", "message"),
    [
        (_IMAGE_SCHEMA, ["cat", "cat"], ValueError, "unique"),
        (_IMAGE_SCHEMA, ["cat", 1], TypeError, "strings"),
        (_IMAGE_SCHEMA, "cat", TypeError, "list of class names"),
        (pa.schema([pa.field("label", pa.int32(), nullable=False)]), ["cat"], ValueError, "parquet.LABEL_FIELD"),
        (pa.schema([parquet.LABEL_FIELD, parquet.IMAGE_FIELD.with_nullable(False)]), ["cat"], ValueError, "IMAGE_FIELD"),
        (pa.schema([pa.field("x", pa.int64())]), ["cat"], ValueError, "no 'label' column"),
    ],
)
def test_hf_features_refuse_what_datasets_would_ignore_or_reject(schema, classes, error, message):
    with pytest.raises(error, match=message):
        parquet.with_hf_features(schema, classes)


def test_a_claim_killed_while_it_deletes_leaves_the_prefix_to_the_same_step(any_root, monkeypatch):
    """``make test-faults`` once killed a rerun mid-delete: the owner marker was gone, the old files
    were not, and the next attempt refused the prefix as foreign. The marker is now never deleted."""
    dest = storage.join(any_root, "out")
    done = _one_file_output(dest, 1)
    done.commit(inputs=3, rejects=[], config={})
    real_many, real_one = storage.delete_many, storage.delete

    class Killed(BaseException):
        pass

    def cut_off(uris):  # the first object goes, then the process is killed
        if uris:
            real_one(sorted(uris)[0])
        raise Killed

    def prefix_cut_off(prefix):
        cut_off([o.uri for o in storage.list_objects(prefix)])

    monkeypatch.setattr(storage, "delete_many", cut_off)
    monkeypatch.setattr(storage, "delete_prefix", prefix_cut_off)
    with pytest.raises(Killed):
        OutputWriter(dest, "demo").begin()
    monkeypatch.setattr(storage, "delete_many", real_many)
    assert storage.list_objects(dest), "the kill left files behind"
    again = _one_file_output(dest, 2)  # taken over, not refused
    again.commit(inputs=3, rejects=[], config={})
    assert pq.read_table(io.BytesIO(storage.read_bytes(storage.join(dest, "part-00000.parquet")))).column("x").to_pylist() == [2, 2, 2]
