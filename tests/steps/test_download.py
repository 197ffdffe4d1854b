"""The download step on tiny generated archives: formats, transports, safety, the contract."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from imgpipe import contract, storage
from imgpipe.cli import main
from imgpipe.config import config_from_dict, config_to_yaml
from imgpipe.data import archive
from imgpipe.data.sources import SOURCE_LOCAL_ENV, SOURCE_NETWORKS_ENV, SourcePolicy, SourceRefused
from imgpipe.steps.download import SHARD_SCHEMA, DownloadConfig, download
from tests import serving
from tests.helpers import forbid_metadata_connections

IMAGES = {
    "cats/a.jpg": b"\xff\xd8cat-a" * 50,
    "cats/b.jpg": b"\xff\xd8cat-b" * 70,
    "dogs/c.png": b"\x89PNGdog-c" * 30,
    "dogs/d.jpg": b"\xff\xd8dog-d" * 90,
    "e.jpg": b"\xff\xd8e" * 10,
}
# Small shards and row groups so a handful of members exercise sharding and parallel writes.
FAST = DownloadConfig(shard_bytes=1500, row_group_rows=2, write_workers=2, backoff_s=0.01, timeout_s=5.0)


# --------------------------------------------------------------------------- helpers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _add_special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", prefix: str = "./") -> Path:
    """A tar archive with a directory entry and the files under ``prefix`` (tar's own ``./``)."""
    with tarfile.open(path, mode) as tf:
        _add_special(tf, prefix + "cats", tarfile.DIRTYPE)
        for name, data in files.items():
            _add_file(tf, prefix + name, data)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cats/", b"")  # a directory entry: not an input
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_rows(dest: str) -> dict[str, dict]:
    """Every output row by path, read through the manifest; asserts paths are unique."""
    rows: dict[str, dict] = {}
    for uri in contract.data_files(dest):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        assert table.schema.equals(SHARD_SCHEMA)
        for row in table.to_pylist():
            assert row["path"] not in rows, f"duplicate row {row['path']}"
            rows[row["path"]] = row
    return rows


def rejects_by_path(dest: str) -> dict[str, tuple[str, str]]:
    table = contract.read_rejects(dest)
    return {r["path"]: (r["reason"], r["detail"]) for r in table.to_pylist()}


def assert_rows_match(dest: str, expected: dict[str, bytes]) -> None:
    rows = read_rows(dest)
    assert sorted(rows) == sorted(expected)
    for path, data in expected.items():
        assert rows[path]["bytes"] == data
        assert rows[path]["size"] == len(data)
        assert rows[path]["sha256"] == _sha(data)


def object_names(dest: str) -> list[str]:
    base = storage.normalize_uri(dest).rstrip("/") + "/"
    return [o.uri[len(base) :] for o in storage.list_objects(dest)]


# --------------------------------------------------------------------------- local HTTP server


@dataclass
class Route:
    """How the test server answers one path."""

    body: bytes
    fail_first: int = 0  # answer 503 to this many requests first
    drop_first: int = 0  # then cut this many responses off halfway through the body
    ranges: bool = True  # honour Range with 206 (False: always send the whole body)
    length: bool = True  # send Content-Length (False: the body ends when the connection closes)
    redirect: str = ""  # answer 302 to this Location instead
    seen_ranges: list[str | None] = field(default_factory=list)


@dataclass
class HttpServer:
    base: str
    routes: dict[str, Route]
    log: list[str]


def _handler(routes: dict[str, Route], log: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: the server closes the connection after each response, so writing less
        # than Content-Length is seen by the client as a connection dropped mid-body.
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            log.append(self.path)
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route.seen_ranges.append(self.headers.get("Range"))
            hit = len(route.seen_ranges)
            if route.redirect:
                self.send_response(302)
                self.send_header("Location", route.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if hit <= route.fail_first:
                self.send_error(503)
                return
            start = 0
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if match and route.ranges:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
            else:
                self.send_response(200)
            body = route.body[start:]
            if route.length:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            if hit <= route.fail_first + route.drop_first:
                body = body[: len(body) // 2]
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpServer]:
    """A real HTTP server on 127.0.0.1 in a thread; tests register routes on it."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    routes: dict[str, Route] = {}
    log: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(routes, log))
    thread = serving.start(server)
    try:
        yield HttpServer(f"http://127.0.0.1:{server.server_address[1]}", routes, log)
    finally:
        serving.stop(server, thread)


# --------------------------------------------------------------------------- formats and backends


def test_tar_gz_to_any_backend_keeps_bytes_counts_and_row_groups(tmp_path: Path, any_root: str) -> None:
    src = make_tar(tmp_path / "images.tar.gz", IMAGES)
    dest = storage.join(any_root, "download")

    report = download(str(src), dest, FAST)

    manifest = contract.read_manifest(dest, expect_step="download")
    assert manifest["inputs"] == len(IMAGES) == report.inputs  # the directory entry is no input
    assert manifest["outputs"] == len(IMAGES) and manifest["rejected"] == 0
    assert_rows_match(dest, IMAGES)
    names = [f["name"] for f in manifest["files"]]
    assert len(names) > 1, "1500-byte shards must split these members"
    assert names == [f"part-{i:05d}.parquet" for i in range(len(names))]
    for uri in contract.data_files(dest, manifest):
        meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).metadata
        assert all(meta.row_group(i).num_rows <= 2 for i in range(meta.num_row_groups))
    source = manifest["extra"]["sources"][0]
    assert source["format"] == "tar.gz"
    assert source["sha256"] == _sha(src.read_bytes()) and source["bytes"] == src.stat().st_size
    assert manifest["config"]["row_group_rows"] == 2
    assert set(object_names(dest)) == {
        *names,
        contract.OWNER,
        contract.MANIFEST,
        contract.REJECTS,
        contract.CONFIG,
        contract.SUCCESS,
    }


@pytest.mark.parametrize("kind", ["tar", "zip", "directory"])
def test_other_formats_by_content_and_file_uri(tmp_path: Path, kind: str) -> None:
    # Misleading names: the format must come from the content, not the extension.
    if kind == "tar":
        src = make_tar(tmp_path / "data.bin", IMAGES, mode="w", prefix="")
    elif kind == "zip":
        src = make_zip(tmp_path / "data.tar.gz", IMAGES)
    else:
        src = make_dir(tmp_path / "tree", IMAGES)
    dest = str(tmp_path / "out")

    download("file://" + str(src), dest, FAST)

    manifest = contract.read_manifest(dest)
    entry = manifest["extra"]["sources"][0]
    assert entry["format"] == kind
    if kind == "directory":
        assert entry["sha256"] is None and entry["bytes"] is None  # no single file to hash
    else:
        assert entry["sha256"] == _sha(src.read_bytes()) and entry["bytes"] == src.stat().st_size
    assert manifest["inputs"] == manifest["outputs"] == len(IMAGES)
    assert_rows_match(dest, IMAGES)


def test_unknown_format_names_supported_ones(tmp_path: Path) -> None:
    src = tmp_path / "notes.tar.gz"
    src.write_bytes(b"just some text, not an archive\n" * 40)
    with pytest.raises(ValueError, match=r"not a supported archive.*tar\.gz.*zip"):
        download(str(src), str(tmp_path / "out"), FAST)
    assert not (tmp_path / "out").exists()


def test_gzip_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "photo.jpg.gz"
    src.write_bytes(gzip.compress(b"\xff\xd8" + b"x" * 2000))
    with pytest.raises(ValueError, match="holds no tar archive"):
        download(str(src), str(tmp_path / "out"), FAST)


@pytest.mark.parametrize(
    ("mode", "cut"),
    [("w", 1800), ("w", 1536), ("w", 2100), ("w:gz", -30)],
    ids=["mid-header", "at-header", "mid-data", "gzip-tail"],
)
def test_truncated_archive_fails_without_commit(tmp_path: Path, mode: str, cut: int) -> None:
    # Uncompressed layout: dir header 0, a.jpg header 512 + data 1024, b.jpg header 1536.
    whole = make_tar(tmp_path / "whole", IMAGES, mode=mode, prefix="").read_bytes()
    src = tmp_path / "cut.tar"
    src.write_bytes(whole[:cut])
    dest = str(tmp_path / "out")
    with pytest.raises(archive.ArchiveError, match="cut.tar.*truncated"):
        download(str(src), dest, FAST)
    assert not contract.is_committed(dest)


def test_missing_sources_are_named(tmp_path: Path, s3_bucket: str) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        download(str(missing), str(tmp_path / "out"), FAST)
    with pytest.raises(FileNotFoundError, match="absent.tar"):
        download(f"{s3_bucket}/absent.tar", str(tmp_path / "out"), FAST)
    with pytest.raises(ValueError, match="unsupported source"):
        download("ftp://example.invalid/x.tar", str(tmp_path / "out"), FAST)


# --------------------------------------------------------------------------- remote sources


def test_s3_source_with_matching_sha256(tmp_path: Path, s3_bucket: str) -> None:
    data = make_tar(tmp_path / "images.tgz", IMAGES).read_bytes()
    uri = f"{s3_bucket}/raw/images.tgz"
    storage.write_bytes(uri, data)
    dest = f"{s3_bucket}/out/download"

    download(uri, dest, DownloadConfig(sha256=(_sha(data).upper(),), write_workers=2))

    manifest = contract.read_manifest(dest)
    assert manifest["extra"]["sources"] == [{"uri": uri, "format": "tar.gz", "sha256": _sha(data), "bytes": len(data)}]
    assert manifest["upstream"] == {"sources": [uri]}
    assert_rows_match(dest, IMAGES)


def test_http_retries_503_then_succeeds(tmp_path: Path, http_server: HttpServer) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    route = http_server.routes["/pets/images.tar.gz"] = Route(data, fail_first=2)
    dest = str(tmp_path / "out")

    download(http_server.base + "/pets/images.tar.gz", dest, FAST)

    assert len(route.seen_ranges) == 3
    assert contract.read_manifest(dest)["extra"]["sources"][0]["sha256"] == _sha(data)
    assert_rows_match(dest, IMAGES)


def test_http_resumes_with_range_after_dropped_connection(tmp_path: Path, http_server: HttpServer) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    route = http_server.routes["/a.tar.gz"] = Route(data, drop_first=1)
    dest = str(tmp_path / "out")

    download(http_server.base + "/a.tar.gz", dest, DownloadConfig(sha256=(_sha(data),), backoff_s=0.01))

    # The second request asks only for the tail the first one did not deliver.
    assert route.seen_ranges == [None, f"bytes={len(data) // 2}-"]
    assert_rows_match(dest, IMAGES)


def test_http_restarts_when_server_ignores_range(tmp_path: Path, http_server: HttpServer) -> None:
    data = make_zip(tmp_path / "a.zip", IMAGES).read_bytes()
    route = http_server.routes["/a.zip"] = Route(data, drop_first=2, ranges=False)
    dest = str(tmp_path / "out")

    download(http_server.base + "/a.zip", dest, DownloadConfig(sha256=(_sha(data),), backoff_s=0.01))

    assert len(route.seen_ranges) == 3 and route.seen_ranges[1] is not None
    manifest = contract.read_manifest(dest)
    assert manifest["extra"]["sources"][0]["bytes"] == len(data)  # not half + whole
    assert_rows_match(dest, IMAGES)


def test_http_404_fails_fast(tmp_path: Path, http_server: HttpServer) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.tar\.gz.*HTTP 404"):
        download(http_server.base + "/missing.tar.gz", str(tmp_path / "out"), FAST)
    assert http_server.log == ["/missing.tar.gz"]  # no retries


def test_http_gives_up_after_retries(tmp_path: Path, http_server: HttpServer) -> None:
    route = http_server.routes["/down.tar"] = Route(b"", fail_first=100)
    with pytest.raises(ConnectionError, match=r"down\.tar.*HTTP 503"):
        download(
            http_server.base + "/down.tar",
            str(tmp_path / "out"),
            DownloadConfig(retries=2, backoff_s=0),
        )
    assert len(route.seen_ranges) == 3


# --------------------------------------------------------------------------- checksums


def test_sha256_mismatch_leaves_committed_output_untouched(tmp_path: Path, any_root: str) -> None:
    src = make_tar(tmp_path / "a.tar.gz", IMAGES)
    dest = storage.join(any_root, "d")
    download(str(src), dest, FAST)
    before = {o.uri: storage.read_bytes(o.uri) for o in storage.list_objects(dest)}
    wrong = "ab" * 32

    with pytest.raises(ValueError) as info:
        download(str(src), dest, DownloadConfig(sha256=(wrong,)))

    message = str(info.value)
    assert str(src) in message and wrong in message and _sha(src.read_bytes()) in message
    assert {o.uri: storage.read_bytes(o.uri) for o in storage.list_objects(dest)} == before
    assert contract.is_committed(dest)


def test_sha256_count_must_match_sources(tmp_path: Path) -> None:
    src = make_tar(tmp_path / "a.tar.gz", IMAGES)
    with pytest.raises(ValueError, match=r"1 sha256 digest\(s\) for 2 source"):
        download([str(src), str(src)], str(tmp_path / "out"), DownloadConfig(sha256=("0" * 64,)))


# --------------------------------------------------------------------------- unsafe members


def test_unsafe_tar_members_become_rejects(tmp_path: Path) -> None:
    src = tmp_path / "evil.tar"
    with tarfile.open(src, "w") as tf:
        _add_file(tf, "ok.jpg", b"fine")
        _add_file(tf, "../evil.jpg", b"slip")
        _add_file(tf, "cats/../../evil2.jpg", b"slip")
        _add_file(tf, "/etc/x", b"abs")
        _add_special(tf, "link.jpg", tarfile.SYMTYPE, "../../etc/passwd")
        _add_special(tf, "hard.jpg", tarfile.LNKTYPE, "ok.jpg")
        _add_special(tf, "tty", tarfile.CHRTYPE)
        _add_special(tf, "disk", tarfile.BLKTYPE)
        _add_special(tf, "pipe", tarfile.FIFOTYPE)
    dest = str(tmp_path / "out")

    report = download(str(src), dest, FAST)

    rejects = rejects_by_path(dest)
    assert {reason for reason, _ in rejects.values()} == {"unsafe_member"}
    assert rejects["../evil.jpg"][1] == "parent directory '..' in path '../evil.jpg'"
    assert "'..'" in rejects["cats/../../evil2.jpg"][1]
    assert rejects["/etc/x"][1] == "absolute path '/etc/x'"
    assert rejects["link.jpg"][1] == "symlink -> ../../etc/passwd"
    assert rejects["hard.jpg"][1] == "hardlink -> ok.jpg"
    assert rejects["tty"][1].startswith("character device")
    assert rejects["disk"][1].startswith("block device")
    assert rejects["pipe"][1].startswith("FIFO")
    assert report.inputs == 9 and report.outputs == 1 and report.rejected == 8
    assert report.rejects_by_reason == {"unsafe_member": 8}
    assert list(read_rows(dest)) == ["ok.jpg"]
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "evil2.jpg").exists()


def test_unsafe_zip_members_become_rejects(tmp_path: Path) -> None:
    src = tmp_path / "evil.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("ok.jpg", b"fine")
        zf.writestr("../slip.jpg", b"slip")
        zf.writestr("/abs.jpg", b"abs")
        zf.writestr("a\\..\\..\\win.jpg", b"windows slip")
        link = zipfile.ZipInfo("link.jpg")
        link.create_system = 3  # Unix, so external_attr carries st_mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../../etc/passwd")
        fifo = zipfile.ZipInfo("pipe")
        fifo.create_system = 3
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, b"")
    dest = str(tmp_path / "out")

    report = download(str(src), dest, FAST)

    rejects = rejects_by_path(dest)
    assert rejects == {
        "../slip.jpg": ("unsafe_member", "parent directory '..' in path '../slip.jpg'"),
        "/abs.jpg": ("unsafe_member", "absolute path '/abs.jpg'"),
        "a\\..\\..\\win.jpg": (
            "unsafe_member",
            "parent directory '..' in path 'a\\\\..\\\\..\\\\win.jpg'",
        ),
        "link.jpg": ("unsafe_member", "symlink -> ../../etc/passwd"),
        "pipe": ("unsafe_member", "FIFO (named pipe)"),
    }
    assert (report.inputs, report.outputs, report.rejected) == (6, 1, 5)
    assert_rows_match(dest, {"ok.jpg": b"fine"})


def test_directory_source_rejects_symlinks_and_fifos(tmp_path: Path) -> None:
    root = make_dir(tmp_path / "tree", {"a.jpg": b"aaaa", "sub/b.jpg": b"bbbb"})
    secret = make_dir(tmp_path / "secret", {"key.pem": b"private"})
    os.symlink(secret / "key.pem", root / "key.jpg")
    os.symlink(secret, root / "sub" / "linked_dir")
    os.mkfifo(root / "pipe")
    dest = str(tmp_path / "out")

    report = download(str(root), dest, FAST)

    rejects = rejects_by_path(dest)
    assert rejects == {
        "key.jpg": ("unsafe_member", f"symlink -> {secret / 'key.pem'}"),
        "sub/linked_dir": ("unsafe_member", f"symlink -> {secret}"),
        "pipe": ("unsafe_member", "FIFO (named pipe)"),
    }
    assert (report.inputs, report.outputs, report.rejected) == (5, 2, 3)
    assert_rows_match(dest, {"a.jpg": b"aaaa", "sub/b.jpg": b"bbbb"})


def test_too_large_and_duplicates_across_sources(tmp_path: Path) -> None:
    first = tmp_path / "first.tar.gz"
    with tarfile.open(first, "w:gz") as tf:
        _add_file(tf, "./a.jpg", b"a" * 100)
        _add_file(tf, "big.jpg", b"B" * 5000)
        _add_file(tf, "a.jpg", b"again")  # same path once './' is stripped
    second = make_zip(tmp_path / "second.zip", {"b.jpg": b"b" * 100, "big.jpg": b"small now"})
    dest = str(tmp_path / "out")
    cfg = DownloadConfig(max_member_bytes=1000, shard_bytes=150, write_workers=3)

    report = download([str(first), "file://" + str(second)], dest, cfg)

    table = contract.read_rejects(dest)
    assert sorted(zip(table["path"].to_pylist(), table["reason"].to_pylist(), strict=True)) == [
        ("a.jpg", "duplicate_member"),
        ("big.jpg", "duplicate_member"),  # the path was seen (and rejected) in the first source
        ("big.jpg", "member_too_large"),
    ]
    details = {(p, r): d for p, r, d in zip(*table.to_pydict().values(), strict=True)}
    assert details[("big.jpg", "member_too_large")] == "5000 bytes > max_member_bytes=1000"
    assert (report.inputs, report.outputs, report.rejected) == (5, 2, 3)
    assert_rows_match(dest, {"a.jpg": b"a" * 100, "b.jpg": b"b" * 100})
    sources = contract.read_manifest(dest)["extra"]["sources"]
    assert [s["format"] for s in sources] == ["tar.gz", "zip"]


def test_member_read_enforces_limit_whatever_the_header_says(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "bomb.zip", {"bomb.jpg": b"\0" * 50_000})
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("bomb.jpg")
        # A header that under-reports the size (size=10) must not get past the limit: the
        # reader counts what it actually inflates.
        liar = archive.Member("bomb.jpg", 10, opener=lambda: zf.open(info))
        with pytest.raises(archive.MemberTooLarge, match="more than 1000 bytes"):
            liar.read(1000)
        assert liar.read(50_000) == b"\0" * 50_000


def test_total_cap_raises_and_commits_nothing(tmp_path: Path) -> None:
    src = make_tar(tmp_path / "bomb.tar.gz", {f"x{i}.jpg": b"\0" * 4000 for i in range(5)})
    dest = str(tmp_path / "out")
    download(str(make_tar(tmp_path / "ok.tar", IMAGES, mode="w")), dest, FAST)
    assert contract.is_committed(dest)
    before = contract.read_manifest(dest)

    with pytest.raises(ValueError, match=r"max_total_bytes=10000.*archive bomb"):
        download(str(src), dest, DownloadConfig(max_total_bytes=10_000, shard_bytes=3000))

    # The bomb is found by the dry run before dest is touched: nothing new is committed,
    # and the previous output is still there, whole.
    assert contract.read_manifest(dest) == before
    assert_rows_match(dest, IMAGES)


# --------------------------------------------------------------------------- determinism


def test_rerun_is_idempotent(tmp_path: Path, any_root: str) -> None:
    src = make_tar(tmp_path / "a.tar.gz", IMAGES)
    dest = storage.join(any_root, "again")

    download(str(src), dest, FAST)
    first_names, first_rows = object_names(dest), read_rows(dest)
    first_files = contract.read_manifest(dest)["files"]
    download(str(src), dest, FAST)

    assert object_names(dest) == first_names
    assert read_rows(dest) == first_rows
    assert contract.read_manifest(dest)["files"] == first_files


def test_dest_overlapping_a_source_is_refused(tmp_path: Path) -> None:
    root = make_dir(tmp_path / "tree", {"a.jpg": b"a"})
    with pytest.raises(ValueError, match="overlap"):
        download(str(root), str(root / "out"), FAST)
    with pytest.raises(ValueError, match="overlap"):
        download(str(root / "a.jpg"), str(root), FAST)
    assert (root / "a.jpg").read_bytes() == b"a"


# --------------------------------------------------------------------------- config


def test_config_from_yaml_style_values() -> None:
    cfg = config_from_dict(DownloadConfig, {"sha256": f"{'AB' * 32},{'cd' * 32}", "shard_bytes": "64_000"})
    assert cfg.sha256 == ("ab" * 32, "cd" * 32) and cfg.shard_bytes == 64_000
    assert yaml.safe_load(config_to_yaml(cfg))["sha256"] == ["ab" * 32, "cd" * 32]
    with pytest.raises(ValueError, match="unknown DownloadConfig option"):
        config_from_dict(DownloadConfig, {"md5": "x"})


def test_config_normalizes_and_validates() -> None:
    digest = "AB" * 32
    assert DownloadConfig(sha256=[digest]).sha256 == ("ab" * 32,)
    with pytest.raises(ValueError, match="64 hex"):
        DownloadConfig(sha256=("5c4f3ee8e5d25df40f4fd59a7f44e54c",))  # an md5
    with pytest.raises(ValueError, match="shard_bytes must be an integer in \\[1, "):
        DownloadConfig(shard_bytes=0)
    with pytest.raises(ValueError, match="write_workers"):
        DownloadConfig(write_workers=0)
    with pytest.raises(TypeError, match="retries must be an integer"):
        DownloadConfig(retries=True)
    with pytest.raises(ValueError, match="timeout_s"):
        DownloadConfig(timeout_s=0)


# Presigned URLs carry a signature and an access key in the query, user:pass@ a password.
SECRETS = ("hunter2", "s3cr3tsignature", "AKIAEXAMPLEKEY")
PRESIGNED = "?X-Amz-Credential=AKIAEXAMPLEKEY%2F20260101&X-Amz-Signature=s3cr3tsignature"


def test_credentials_in_a_source_url_are_never_persisted_or_logged(
    tmp_path: Path, http_server: HttpServer, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/pets/images.tar.gz" + PRESIGNED] = Route(data)
    url = http_server.base.replace("http://", "http://alice:hunter2@") + "/pets/images.tar.gz" + PRESIGNED
    dest = str(tmp_path / "out")
    download(url, dest, FAST)
    with pytest.raises(FileNotFoundError) as missing:
        download(url.replace("images.tar.gz", "gone.tar.gz"), str(tmp_path / "out2"), FAST)
    written = b"".join(storage.read_bytes(o.uri) for o in storage.list_objects(dest))
    captured = capfd.readouterr()
    seen = written.decode("latin-1") + captured.out + captured.err + caplog.text + str(missing.value)
    assert not [s for s in SECRETS if s in seen], "a credential from the URL was persisted or logged"
    source = contract.read_manifest(dest)["extra"]["sources"][0]["uri"]
    assert source == http_server.base + "/pets/images.tar.gz (credentials and query removed)"
    assert_rows_match(dest, IMAGES)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://u:p@h.example:8443/a/b.tar?sig=x#frag", "https://h.example:8443/a/b.tar (credentials and query removed)"),
        ("https://h.example/a.tar", "https://h.example/a.tar"),
        ("s3://bucket/key.tar", "s3://bucket/key.tar"),
        ("/data/images.tar", "/data/images.tar"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert storage.redact_uri(uri) == shown


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_corrupt_archive_never_costs_the_committed_output(tmp_path: Path, backend: str, request) -> None:
    """Validation before begin(): a truncated re-download leaves yesterday's output committed and whole."""
    root = str(tmp_path / "store") if backend == "file" else request.getfixturevalue("s3_bucket") + "/root"
    dest = storage.join(storage.normalize_uri(root), "pets", "download")
    good = make_tar(tmp_path / "good.tar.gz", IMAGES)
    download(str(good), dest, FAST)
    before = {o.uri: storage.read_bytes(o.uri) for o in storage.list_objects(dest)}
    data = make_tar(tmp_path / "big.tar.gz", {f"images/x_{i}.jpg": bytes([i % 256]) * 5000 for i in range(40)}).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(archive.ArchiveError):
        download(str(cut), dest, FAST)
    assert contract.is_committed(dest)
    assert {o.uri: storage.read_bytes(o.uri) for o in storage.list_objects(dest)} == before


def test_a_prefix_holding_foreign_objects_is_never_a_download_destination(tmp_path: Path) -> None:
    dest = storage.normalize_uri(str(tmp_path / "team" / "shared"))
    storage.write_bytes(storage.join(dest, "report.csv"), b"not ours")
    with pytest.raises(ValueError, match="objects imgpipe did not write"):
        download(str(make_tar(tmp_path / "a.tar.gz", IMAGES)), dest, FAST)
    assert storage.read_bytes(storage.join(dest, "report.csv")) == b"not ours"


# --------------------------------------------------------------------------- archive limits

_MiB = 1 << 20


def _write_oversized_header(gz: gzip.GzipFile, kind: str, size: int) -> None:
    """A GNU longname or pax header whose data is ``size`` bytes, written in 1 MiB pieces."""
    info = tarfile.TarInfo("././@LongLink" if kind == "longname" else "PaxHeader")
    info.type = tarfile.GNUTYPE_LONGNAME if kind == "longname" else tarfile.XHDTYPE
    info.size = size
    gz.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    prefix = b"" if kind == "longname" else b"%d path=" % size  # one pax record of `size` bytes
    gz.write(prefix)
    left = size - len(prefix) - (kind == "pax")
    while left:
        gz.write(b"a" * min(left, _MiB))
        left -= min(left, _MiB)
    gz.write(b"\n" if kind == "pax" else b"")


def make_header_bomb(path: Path, kind: str, size: int = 64 * _MiB) -> Path:
    """A tar.gz of about 65 KB: an extended header of ``size`` bytes, then two members."""
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=io.BytesIO(), mode="w") as scratch:
        _write_oversized_header(gz, kind, size)
        for name, data in (("victim.jpg", b"v" * 100), ("ok.jpg", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            gz.write(info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512))
        gz.write(b"\0" * 1024)
        del scratch
    return path


# Downloads a small archive (warming up imports, thread pools, pyarrow), then the bomb,
# and reports how much the peak RSS grew over the second download (ru_maxrss is in KiB).
_RSS_SCRIPT = """
import json, os, resource, sys
from imgpipe import contract
from imgpipe.steps.download import DownloadConfig, download
warm, bomb, out = sys.argv[1:4]
download(warm, out + "/warm", DownloadConfig())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = download(bomb, out + "/bomb", DownloadConfig())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "outputs": report.outputs,
                  "rejects": contract.read_rejects(out + "/bomb").to_pylist()}), flush=True)
os._exit(0)  # pyarrow's C++ threads can abort a normal interpreter exit; the result is out
"""


@pytest.mark.parametrize("kind", ["longname", "pax"])
def test_a_64_mib_extended_header_costs_no_memory_and_rejects_its_member(tmp_path: Path, kind: str) -> None:
    bomb = make_header_bomb(tmp_path / "bomb.tar.gz", kind)
    assert bomb.stat().st_size < 100_000, "the attack is a small download"
    warm = make_tar(tmp_path / "warm.tar.gz", IMAGES)

    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(warm), str(bomb), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["growth_kib"] < 50 * 1024, f"peak RSS grew {result['growth_kib']} KiB"
    header = "GNU longname header" if kind == "longname" else "pax header"
    assert result["rejects"] == [{"path": "victim.jpg", "reason": "unsafe_member", "detail": f"{header} of {64 * _MiB} bytes exceeds 65536"}]
    assert result["outputs"] == 1  # ok.jpg, after the victim: the stream stayed in step


def test_a_name_over_4_kib_is_rejected_unsafe(tmp_path: Path) -> None:
    long = "deep/" * 820 + "x.jpg"  # 4105 bytes
    src = tmp_path / "long.tar"
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        _add_file(tf, long, b"data")
        _add_file(tf, "ok.jpg", b"fine")
    dest = str(tmp_path / "out")

    report = download(str(src), dest, FAST)

    ((path, (reason, detail)),) = rejects_by_path(dest).items()
    assert reason == "unsafe_member" and detail == "path of 4105 bytes exceeds MAX_NAME_BYTES=4096"
    assert path.startswith("deep/deep/") and len(path) < 300
    assert (report.inputs, report.outputs) == (2, 1)


def test_zero_byte_members_still_cut_shards_and_count_toward_the_total(tmp_path: Path) -> None:
    # Each member costs 512 header bytes plus its 13-byte path: four fill a 2000-byte shard.
    files = {f"empty/{i:03d}.jpg": b"" for i in range(30)}
    src = make_tar(tmp_path / "empty.tar", files, mode="w", prefix="")
    dest = str(tmp_path / "out")

    download(str(src), dest, DownloadConfig(shard_bytes=2000, write_workers=2))

    assert len(contract.read_manifest(dest)["files"]) == 8  # ceil(30 / 4)
    assert_rows_match(dest, files)
    with pytest.raises(ValueError, match="max_total_bytes=10000"):
        download(str(src), str(tmp_path / "out2"), DownloadConfig(max_total_bytes=10_000))


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_max_members_fails_in_the_dry_run(tmp_path: Path, kind: str) -> None:
    files = {f"{i}.jpg": b"x" for i in range(5)}
    src = make_tar(tmp_path / "many.tar", files, mode="w") if kind == "tar" else make_zip(tmp_path / "many.zip", files)
    dest = str(tmp_path / "out")
    download(str(make_tar(tmp_path / "ok.tar", IMAGES, mode="w")), dest, FAST)
    before = contract.read_manifest(dest)

    with pytest.raises(ValueError, match=r"max_members=4.*archive bomb"):
        download(str(src), dest, DownloadConfig(max_members=4))

    assert contract.read_manifest(dest) == before  # dest was never touched
    # A zip's index is checked before it is parsed, and it counts the "cats/" directory entry too.
    download(str(src), str(tmp_path / "out2"), DownloadConfig(max_members=5 if kind == "tar" else 6))


def test_expansion_ratio_refuses_bombs_but_not_directories(tmp_path: Path) -> None:
    zeros = {"zeros.bin": b"\0" * (3 * _MiB)}
    bomb = make_tar(tmp_path / "bomb.tar.gz", zeros)  # about 3 KB
    with pytest.raises(ValueError, match=r"max_expansion_ratio=100\.0 times its \d+ bytes.*archive bomb"):
        download(str(bomb), str(tmp_path / "out"), DownloadConfig())

    # A member too large to read still counts: the tar stream inflates it to skip it.
    with pytest.raises(ValueError, match=r"max_expansion_ratio=100\.0.*zeros\.bin"):
        download(str(bomb), str(tmp_path / "out"), DownloadConfig(max_member_bytes=_MiB))

    plain = make_tar(tmp_path / "plain.tar", zeros, mode="w")
    tree = make_dir(tmp_path / "tree", zeros)
    for src in (plain, tree):
        download(str(src), str(tmp_path / f"out-{src.name}"), DownloadConfig(max_expansion_ratio=1.0))


def test_new_limits_are_validated() -> None:
    with pytest.raises(ValueError, match=r"max_members must be an integer in \[1, "):
        DownloadConfig(max_members=0)
    with pytest.raises(ValueError, match=r"max_expansion_ratio must be a number in \(0, "):
        DownloadConfig(max_expansion_ratio=0)
    with pytest.raises(TypeError, match="max_download_bytes must be an integer"):
        DownloadConfig(max_download_bytes="1GB")


# --------------------------------------------------------------------------- source policy


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (host, port) urllib3 opens a socket to: proves a refusal came before connecting."""
    import urllib3.util.connection

    seen: list[tuple[str, int]] = []
    real = urllib3.util.connection.create_connection

    def spy(address, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(tuple(address[:2]))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    return seen


@pytest.fixture
def pipeline_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A pod's environment: no local sources, no extra networks (tests add what they need)."""
    monkeypatch.delenv(SOURCE_LOCAL_ENV, raising=False)
    monkeypatch.delenv(SOURCE_NETWORKS_ENV, raising=False)
    return monkeypatch


def _pinned(data: bytes) -> DownloadConfig:
    return dataclasses.replace(FAST, sha256=(_sha(data),))


def test_from_env_reaches_loopback_only_when_its_network_is_listed(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, connections: list
) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    url = http_server.base + "/a.tar.gz"

    with pytest.raises(SourceRefused, match=r"reaches 127\.0\.0\.1, which is not a globally routable.*IMGPIPE_SOURCE_NETWORKS"):
        download(url, str(tmp_path / "no"), _pinned(data), policy=SourcePolicy.from_env())
    assert connections == [] and http_server.log == []

    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "10.0.0.0/8, 127.0.0.1/32")
    download(url, str(tmp_path / "out"), _pinned(data), policy=SourcePolicy.from_env())
    assert_rows_match(str(tmp_path / "out"), IMAGES)


def test_from_env_refuses_plain_http_without_a_pin(tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch) -> None:
    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    http_server.routes["/a.tar.gz"] = Route(make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes())
    with pytest.raises(SourceRefused, match="plain http needs a sha256 pin"):
        download(http_server.base + "/a.tar.gz", str(tmp_path / "out"), FAST, policy=SourcePolicy.from_env())
    assert http_server.log == []


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data", "http://[::1]:{port}/a.tar.gz", "file:///etc/passwd"],
    ids=["metadata", "ipv6-loopback", "file"],
)
def test_a_redirect_outside_the_policy_is_refused_before_connecting(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, connections: list, target: str
) -> None:
    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    port = int(http_server.base.rsplit(":", 1)[1])
    target = target.format(port=port)
    http_server.routes["/start"] = Route(b"", redirect=target)

    shown = re.escape(storage.redact_uri(target))
    with pytest.raises(SourceRefused, match=f"redirect 1 from .*/start to {shown} refused"):
        download(http_server.base + "/start", str(tmp_path / "out"), _pinned(data), policy=SourcePolicy.from_env())

    assert connections == [("127.0.0.1", port)], "only the server that redirected was contacted"
    assert http_server.log == ["/start"]
    assert not (tmp_path / "out").exists()


def test_a_redirect_to_a_file_is_refused_even_for_the_operator(tmp_path: Path, http_server: HttpServer) -> None:
    http_server.routes["/start"] = Route(b"", redirect="file:///etc/passwd")
    with pytest.raises(SourceRefused, match="may only lead to http"):
        download(http_server.base + "/start", str(tmp_path / "out"), FAST)


@pytest.mark.parametrize("policy", ["trusted", "from_env"])
def test_redirects_are_followed_and_the_final_url_recorded(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, policy: str
) -> None:
    pipeline_env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/old"] = Route(b"", redirect="/mid")
    http_server.routes["/mid"] = Route(b"", redirect=http_server.base + "/new" + PRESIGNED)
    http_server.routes["/new" + PRESIGNED] = Route(data)
    dest = str(tmp_path / "out")

    download(http_server.base + "/old", dest, _pinned(data), policy=getattr(SourcePolicy, policy)())

    (source,) = contract.read_manifest(dest)["extra"]["sources"]
    assert source["uri"] == http_server.base + "/old"
    assert source["final_uri"] == http_server.base + "/new (credentials and query removed)"
    assert_rows_match(dest, IMAGES)


def test_dns_rebinding_is_caught_at_the_connected_socket(tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch) -> None:
    # The name resolves to a public address for the policy check, then to loopback for
    # the connection: the socket's peer is checked before the request is sent.
    real = socket.getaddrinfo
    answers = iter(["8.8.8.8"])

    def rebinding(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return real(next(answers, "127.0.0.1") if host == "rebind.example" else host, port, *args, **kwargs)

    pipeline_env.setattr(socket, "getaddrinfo", rebinding)
    pipeline_env.setenv("NO_PROXY", "*")
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    url = http_server.base.replace("127.0.0.1", "rebind.example") + "/a.tar.gz"

    with pytest.raises(SourceRefused, match=r"the connection to rebind\.example reaches 127\.0\.0\.1"):
        download(url, str(tmp_path / "out"), _pinned(data), policy=SourcePolicy.from_env())
    assert http_server.log == []


def test_local_sources_need_the_operators_consent(tmp_path: Path, pipeline_env: pytest.MonkeyPatch) -> None:
    archive_file = make_tar(tmp_path / "a.tar.gz", IMAGES)
    tree = make_dir(tmp_path / "tree", IMAGES)
    for src in ("file://" + str(archive_file), str(tree)):
        with pytest.raises(SourceRefused, match=f"local path.*{SOURCE_LOCAL_ENV}=1"):
            download(src, str(tmp_path / "out"), FAST, policy=SourcePolicy.from_env())
    assert not (tmp_path / "out").exists()

    pipeline_env.setenv(SOURCE_LOCAL_ENV, "1")
    download("file://" + str(archive_file), str(tmp_path / "out"), FAST, policy=SourcePolicy.from_env())
    assert_rows_match(str(tmp_path / "out"), IMAGES)


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "streamed"])
def test_max_download_bytes_over_http(tmp_path: Path, http_server: HttpServer, length: bool) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    route = http_server.routes["/a.tar.gz"] = Route(data, length=length)
    cfg = dataclasses.replace(FAST, max_download_bytes=len(data) - 1)
    with pytest.raises(ValueError, match=f"max_download_bytes={len(data) - 1}"):
        download(http_server.base + "/a.tar.gz", str(tmp_path / "out"), cfg)
    assert len(route.seen_ranges) == 1, "a size refusal is not retried"
    download(http_server.base + "/a.tar.gz", str(tmp_path / "ok"), dataclasses.replace(cfg, max_download_bytes=len(data)))


def test_max_download_bytes_for_s3_and_local_files(tmp_path: Path, s3_bucket: str) -> None:
    src = make_tar(tmp_path / "a.tar.gz", IMAGES)
    uri = f"{s3_bucket}/raw/a.tar.gz"
    storage.write_bytes(uri, src.read_bytes())
    cfg = DownloadConfig(max_download_bytes=src.stat().st_size - 1)
    for source in (uri, str(src)):
        with pytest.raises(ValueError, match=f"is {src.stat().st_size} bytes, more than max_download_bytes"):
            download(source, str(tmp_path / "out"), cfg)


# --------------------------------------------------------------------------- link-local (cloud metadata)

METADATA_TARGETS = ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x", "http://[fd00:ec2::254]/latest/meta-data/"]


@pytest.fixture
def no_metadata(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fails the test on any connection to a metadata address, so no bug sends traffic there."""
    return forbid_metadata_connections(monkeypatch)


def _policy(name: str, env: pytest.MonkeyPatch) -> SourcePolicy:
    """The operator's policy, or the pipeline's with the test server's loopback address listed."""
    if name == "operator":
        return SourcePolicy.trusted()
    env.setenv(SOURCE_NETWORKS_ENV, "127.0.0.1/32")
    return SourcePolicy.from_env()


def _written(dest: Path) -> list[Path]:
    return sorted(dest.rglob("*")) if dest.exists() else []


@pytest.mark.parametrize("target", METADATA_TARGETS, ids=["ipv4", "fe80", "aws-ipv6"])
@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_redirect_to_the_metadata_service_is_refused_at_once_under_every_policy(
    tmp_path: Path,
    http_server: HttpServer,
    pipeline_env: pytest.MonkeyPatch,
    connections: list,
    no_metadata: list,
    policy: str,
    target: str,
) -> None:
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/start"] = Route(b"", redirect=target)
    port = int(http_server.base.rsplit(":", 1)[1])
    dest = tmp_path / "out"

    with pytest.raises(SourceRefused, match=rf"^redirect 1 from .*/start to {re.escape(target)} refused: .*a link-local address"):
        download(http_server.base + "/start", str(dest), _pinned(data), policy=_policy(policy, pipeline_env))

    assert http_server.log == ["/start"], "exactly one request: a refusal is not retried"
    assert connections == [("127.0.0.1", port)] and no_metadata == []
    assert _written(dest) == []


def test_the_command_line_refuses_a_redirect_to_the_metadata_service_in_one_line(
    tmp_path: Path, http_server: HttpServer, connections: list, no_metadata: list, capsys: pytest.CaptureFixture
) -> None:
    # `imgpipe download https://evil/x` whose server answers 302 to the metadata service.
    target = METADATA_TARGETS[0]
    http_server.routes["/x"] = Route(b"", redirect=target)
    dest = tmp_path / "out"

    assert main(["download", http_server.base + "/x", str(dest)]) == 2

    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("imgpipe download: error: redirect 1 from ")
    assert f"to {target} refused: source {target} reaches 169.254.169.254, a link-local address" in errors[0]
    assert http_server.log == ["/x"] and no_metadata == []
    assert _written(dest) == []


@pytest.mark.parametrize("source", [*METADATA_TARGETS, "http://[fe80::1%25eth0]:8080/a.tar.gz"])
@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_link_local_source_is_refused_before_any_request(
    tmp_path: Path,
    http_server: HttpServer,
    pipeline_env: pytest.MonkeyPatch,
    connections: list,
    no_metadata: list,
    policy: str,
    source: str,
) -> None:
    # The first source is fine: the refusal of the second must come before the first is fetched.
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    cfg = dataclasses.replace(FAST, sha256=(_sha(data), "0" * 64))  # pinned: the pipeline's http needs it
    dest = tmp_path / "out"
    with pytest.raises(SourceRefused, match=rf"^source {re.escape(source)} reaches .*, a link-local address"):
        download([http_server.base + "/a.tar.gz", source], str(dest), cfg, policy=_policy(policy, pipeline_env))
    assert connections == [] and http_server.log == [] and no_metadata == []
    assert _written(dest) == []


@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_name_that_resolves_to_the_metadata_service_is_refused_before_connecting(
    tmp_path: Path, pipeline_env: pytest.MonkeyPatch, connections: list, no_metadata: list, policy: str
) -> None:
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return real("169.254.169.254" if host == "metadata.example" else host, port, *args, **kwargs)

    pipeline_env.setattr(socket, "getaddrinfo", resolver)
    pipeline_env.setenv("NO_PROXY", "*")
    dest = tmp_path / "out"
    with pytest.raises(SourceRefused, match=r"^http://metadata\.example/latest/meta-data/ reaches 169\.254\.169\.254, a link-local"):
        download("http://metadata.example/latest/meta-data/", str(dest), _pinned(b"x"), policy=_policy(policy, pipeline_env))
    assert connections == [] and no_metadata == []
    assert _written(dest) == []


@pytest.mark.parametrize("policy", ["operator", "pipeline"])
def test_a_connection_that_lands_on_a_link_local_peer_sends_no_request(
    tmp_path: Path, http_server: HttpServer, pipeline_env: pytest.MonkeyPatch, policy: str
) -> None:
    # The name passed the lookup, the socket's peer is a metadata address (DNS rebinding, or a
    # route that sends 127.0.0.1 elsewhere): the peer check refuses before the request is written.
    data = make_tar(tmp_path / "a.tar.gz", IMAGES).read_bytes()
    http_server.routes["/a.tar.gz"] = Route(data)
    port = int(http_server.base.rsplit(":", 1)[1])
    real = socket.socket.getpeername

    def landed_on_metadata(sock: socket.socket):  # noqa: ANN202
        peer = real(sock)
        return ("169.254.169.254", 80) if tuple(peer[:2]) == ("127.0.0.1", port) else peer

    pipeline_env.setattr(socket.socket, "getpeername", landed_on_metadata)
    dest = tmp_path / "out"
    with pytest.raises(SourceRefused, match=r"the connection to 127\.0\.0\.1 reaches 169\.254\.169\.254, a link-local"):
        download(http_server.base + "/a.tar.gz", str(dest), _pinned(data), policy=_policy(policy, pipeline_env))
    assert http_server.log == []
    assert _written(dest) == []
