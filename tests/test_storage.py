"""Storage round trips on both backends; S3 through a real S3 API server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import storage
from tests.helpers import resident_mapped_kib


def test_normalize_uri(tmp_path):
    assert storage.normalize_uri(str(tmp_path)) == f"file://{tmp_path}"
    assert storage.normalize_uri(f"file://{tmp_path}") == f"file://{tmp_path}"
    assert storage.normalize_uri("s3://bucket//a/b") == "s3://bucket/a/b"
    assert storage.join("s3://b/x/", "/y/", "z.parquet") == "s3://b/x/y/z.parquet"
    for bad, match in (("gs://b/x", "unsupported"), ("s3:///x", "no bucket"), ("", "empty"), ("file://host/x", "host")):
        with pytest.raises(ValueError, match=match):
            storage.normalize_uri(bad)


def test_round_trip_and_listing(any_root):
    a, b, c = (storage.join(any_root, p) for p in ("d/a.bin", "d/sub/b.bin", "dx/c.bin"))
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"beta" * 1000)
    storage.write_bytes(c, b"c")
    assert storage.read_bytes(a) == b"alpha"
    assert storage.exists(b) and not storage.exists(storage.join(any_root, "d/missing"))
    listed = storage.list_objects(storage.join(any_root, "d"))
    assert [o.uri for o in listed] == [a, b], "a prefix lists only below itself, not siblings like dx/"
    assert [o.size for o in listed] == [5, 4000]
    with storage.open_read(b) as fh:
        assert fh.read(4) == b"beta"
    assert storage.delete_prefix(storage.join(any_root, "d")) == 2
    assert storage.list_objects(storage.join(any_root, "d")) == []
    assert storage.exists(c)
    storage.delete(c)
    storage.delete(c)  # absent is fine
    assert not storage.exists(c)


def test_missing_object_is_file_not_found(any_root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(any_root, "nope.bin"))


def test_failed_write_leaves_nothing(any_root):
    uri = storage.join(any_root, "half.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as fh:
        fh.write(b"x" * 1024)
        raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)
    assert storage.list_objects(any_root) == []


def test_overwrite_is_atomic_replacement(any_root):
    uri = storage.join(any_root, "obj.bin")
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError), storage.open_write(uri) as fh:
        fh.write(b"new-but-unfinished")
        raise RuntimeError("killed")
    assert storage.read_bytes(uri) == b"old"


def test_large_object_multipart(any_root):
    # Larger than boto3's 8 MiB multipart threshold, so S3 takes the multipart path.
    payload = os.urandom(1 << 20) * 10
    uri = storage.join(any_root, "big.bin")
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload


def test_upload_download_file(any_root, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"0123456789" * 100)
    uri = storage.join(any_root, "copy/src.bin")
    storage.upload_file(src, uri)
    dst = tmp_path / "dst.bin"
    storage.download_file(uri, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert not [p for p in tmp_path.iterdir() if storage.TMP_MARKER in p.name]


def test_arrow_filesystem_reads_parquet_with_ranges(any_root):
    table = pa.table({"x": list(range(1000)), "y": [str(i) for i in range(1000)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=100)
    uri = storage.join(any_root, "t.parquet")
    storage.write_bytes(uri, buf.getvalue())
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        assert pf.metadata.num_row_groups == 10
        assert pf.read_row_group(3).column("x").to_pylist() == list(range(300, 400))


def test_many_objects_listing_paginates(s3_bucket):
    # More than one page of list_objects_v2 (1000 keys).
    client = storage.s3_client()
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(1005):
        client.put_object(Bucket=bucket, Key=f"many/{i:05d}", Body=b"")
    assert len(storage.list_objects(f"{s3_bucket}/many")) == 1005
    assert storage.delete_prefix(f"{s3_bucket}/many") == 1005


def test_s3_endpoint_from_configure(s3_endpoint, s3_bucket):
    saved = os.environ.pop("AWS_ENDPOINT_URL")
    try:
        storage.configure_s3(endpoint_url=s3_endpoint)
        storage.write_bytes(f"{s3_bucket}/cfg.bin", b"ok")
        assert storage.read_bytes(f"{s3_bucket}/cfg.bin") == b"ok"
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        storage.configure_s3(endpoint_url=None)


def test_with_retries_backs_off_then_succeeds_or_raises():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert storage.with_retries(flaky, attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3
    with pytest.raises(OSError, match="after 2 attempts"):
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("t")), attempts=2, base_delay=0.001, describe="x")


def test_missing_download_is_file_not_found(any_root, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.download_file(storage.join(any_root, "absent.bin"), tmp_path / "x")


def test_file_uri_is_percent_decoded(tmp_path):
    assert storage.normalize_uri(f"file://{tmp_path}/a%20b") == f"file://{tmp_path}/a b"


def test_size_of_one_object_needs_no_listing(any_root):
    uri = storage.join(any_root, "a", "b.bin")
    assert storage.size(uri) is None and not storage.exists(uri)
    storage.write_bytes(uri, b"12345")
    assert storage.size(uri) == 5 and storage.exists(uri)
    assert storage.size(storage.join(any_root, "a")) is None, "a prefix is not an object"


def test_redact_keeps_ipv6_brackets():
    assert storage.redact_uri("http://u:p@[::1]:8080/x?sig=1").startswith("http://[::1]:8080/x ")


def test_one_arrow_file_system_per_process_and_a_pure_path(any_root, monkeypatch):
    """The loader asks for a path per file: that must not build a file system (and an S3 client) each time."""
    a, b = storage.join(any_root, "x", "a.parquet"), storage.join(any_root, "y", "b.parquet")
    fs_a, path_a = storage.arrow_filesystem(a)
    fs_b, path_b = storage.arrow_filesystem(b)
    assert fs_a is fs_b
    assert (path_a, path_b) == (storage.arrow_path(a), storage.arrow_path(b))
    assert path_a.endswith("x/a.parquet")
    if any_root.startswith("s3://"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-identity")
        assert storage.arrow_filesystem(a)[0] is not fs_a, "other credentials, another file system"


def test_settings_cross_a_process_boundary_without_credentials(s3_endpoint, monkeypatch):
    """The one object a pool worker or a Ray task takes: each backend's settings, no secret."""
    import multiprocessing
    import pickle

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-secret-4711")
    saved = storage.s3._s3_options
    try:
        storage.configure_endpoint("http://127.0.0.1:1")
        shipped = storage.settings()
        assert b"the-secret-4711" not in pickle.dumps(shipped)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.apply(_adopt_and_report, (shipped,)) == shipped
    finally:
        storage.configure_s3(**saved.__dict__)
    with pytest.raises(TypeError, match="storage.Settings"):
        storage.use_settings({"endpoint_url": "x"})  # type: ignore[arg-type]


def _adopt_and_report(shipped: storage.Settings) -> storage.Settings:
    storage.use_settings(shipped)
    return storage.settings()


def test_scheme_questions_are_answered_by_storage(tmp_path):
    assert storage.segments("s3://bucket/a/b") == ["bucket", "a", "b"]
    assert storage.segments(str(tmp_path)) == [p for p in str(tmp_path).split("/") if p]
    assert storage.is_local(str(tmp_path)) and not storage.is_local("s3://bucket/a")
    assert storage.local_path("file://" + str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="not on this machine's file system"):
        storage.local_path("s3://bucket/a")
    assert storage.fork_safe([str(tmp_path)]) and not storage.fork_safe([str(tmp_path), "s3://bucket/a"])
    assert storage.serves("s3://b/k") and storage.serves("/x") and not storage.serves("https://example.com/a")
    assert set(storage.schemes()) == {"file", "s3"}
    assert storage.settings_env({"AWS_ENDPOINT_URL": "http://m:9000", "AWS_SECRET_ACCESS_KEY": "s"}) == {"AWS_ENDPOINT_URL": "http://m:9000"}


def test_a_local_parquet_input_is_memory_mapped_and_reads_as_the_file(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"pixels": [b"\x01\x02", b"\x03"]}), path)
    source = storage.open_arrow_input(storage.normalize_uri(str(path)))
    assert resident_mapped_kib(tmp_path)[0] == 1  # a mapping of the file, not a copy
    assert pq.ParquetFile(source.file).read().column("pixels").to_pylist() == [b"\x01\x02", b"\x03"]
    source.close()


def test_released_pages_leave_the_process_and_the_file_reads_the_same_again(tmp_path):
    """What a long-lived reader's memory held: every page of every file it read (issue 50, "Scale")."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, 64 * 64 * 3, dtype=np.uint8).tobytes() for _ in range(512)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"pixels": pixels}), path, row_group_size=64, compression="none")
    source = storage.open_arrow_input(storage.normalize_uri(str(path)))
    pf = pq.ParquetFile(source.file)
    first = [pf.read_row_group(i).column("pixels").to_pylist() for i in range(pf.num_row_groups)]
    assert resident_mapped_kib(tmp_path)[1] > 5 * 1024  # read through the mapping: 6 MB of pages resident
    source.release()
    assert resident_mapped_kib(tmp_path) == (1, 0)  # still mapped, nothing resident
    again = [pf.read_row_group(i).column("pixels").to_pylist() for i in range(pf.num_row_groups)]
    assert sum(first, []) == sum(again, []) == pixels
    source.close()


def test_an_empty_local_file_is_refused_by_parquet_not_by_the_mapping(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    source = storage.open_arrow_input(storage.normalize_uri(str(path)))
    source.release()
    with pytest.raises(pa.ArrowInvalid, match="size is 0 bytes"):
        pq.ParquetFile(source.file)
    source.close()


def test_a_fifo_or_directory_where_a_data_file_should_be_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "part-0.parquet"
    os.mkfifo(fifo)  # opening it for reading in the usual way would wait for a writer for ever
    for path in (fifo, tmp_path):
        with pytest.raises(ValueError, match="not a regular file"):
            storage.open_arrow_input(storage.normalize_uri(str(path)))


def test_a_local_path_is_opened_only_when_it_is_a_regular_file_and_never_waited_on(tmp_path):
    from imgpipe.storage import NotRegularFile, check_regular, open_regular

    (tmp_path / "ok.bin").write_bytes(b"data")
    os.mkfifo(tmp_path / "pipe")  # opened for reading the usual way, it waits for a writer for ever
    os.symlink(tmp_path / "ok.bin", tmp_path / "link")
    with open_regular(tmp_path / "ok.bin") as fh:
        assert fh.read() == b"data"
    with open_regular(tmp_path / "link") as fh:  # a link is followed unless asked not to
        assert fh.read() == b"data"
    for path, kind, follow in [
        (tmp_path / "pipe", "FIFO (named pipe)", True),
        (tmp_path, "directory", True),
        ("/dev/null", "character device", True),
        (tmp_path / "link", "symbolic link", False),
    ]:
        with pytest.raises(NotRegularFile, match=re.escape(f"{path} is a {kind}, not a regular file")) as caught:
            open_regular(path, follow_links=follow)
        assert caught.value.kind == kind and isinstance(caught.value, ValueError)
    with pytest.raises(NotRegularFile):
        check_regular(tmp_path / "pipe")
    with pytest.raises(FileNotFoundError):
        check_regular(tmp_path / "missing")
