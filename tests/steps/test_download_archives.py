"""The download step on hostile archives: unsafe members become rejects, limits stop archive bombs."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from imgpipe import contract
from imgpipe.data import archive
from imgpipe.steps.download import DownloadConfig, download
from tests.helpers import FAST, IMAGES, _add_file, _add_special, assert_rows_match, make_dir, make_tar, make_zip, read_rows, rejects_by_path

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
