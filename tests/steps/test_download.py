"""The download step on tiny generated archives: formats, transports, checksums, determinism, config."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from imgpipe import contract, storage
from imgpipe.config import config_from_dict, config_to_yaml
from imgpipe.data import archive
from imgpipe.steps.download import DownloadConfig, download
from tests.helpers import FAST, IMAGES, _sha, assert_rows_match, make_dir, make_tar, make_zip, object_names, read_rows
from tests.steps.conftest import HttpServer, Route

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
