"""imgpipe.data.archive and its tar stream (imgpipe.data.archivetar) on hand-made hostile archives: oversized headers, endless chains, long names."""

from __future__ import annotations

import bz2
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from imgpipe.data import archive, archivetar

BLOCK = tarfile.BLOCKSIZE
END = b"\0" * (2 * BLOCK)


def header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0) -> bytes:
    """One raw tar header block (any type, any declared size)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def with_checksum(block: bytearray) -> bytes:
    """A hand-edited header block with its checksum recomputed."""
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: str, data: bytes) -> bytes:
    """A regular member: header, then the data padded to whole blocks."""
    return header(name, size=len(data)) + data + b"\0" * (-len(data) % BLOCK)


def pax_record(keyword: str, value: bytes) -> bytes:
    """``"%d %s=%s\\n"``, where the length counts its own digits."""
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def iterate(path: Path, fmt: str = "tar") -> list[tuple[archive.Member, bytes | None]]:
    """Every member with its data (read while positioned on it), ``None`` for flagged ones."""
    return [(m, None if m.reason else m.read(1 << 20)) for m in archive.iter_archive(path, fmt)]


def test_an_oversized_gnu_longname_is_skipped_and_the_member_flagged(tmp_path: Path) -> None:
    size = archivetar.MAX_EXTENDED_HEADER_BYTES + 1
    src = tmp_path / "long.tar"
    src.write_bytes(
        header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size)
        + b"a" * size
        + b"\0" * (-size % BLOCK)
        + member("victim.jpg", b"x" * 10)
        + member("after.jpg", b"fine")
        + END
    )

    (victim, _), (after, data) = iterate(src)

    assert (victim.path, victim.reason) == ("victim.jpg", archive.UNSAFE_MEMBER)
    assert victim.detail == f"GNU longname header of {size} bytes exceeds {archivetar.MAX_EXTENDED_HEADER_BYTES}"
    assert (after.path, after.reason, data) == ("after.jpg", None, b"fine")  # the stream stayed in step


def test_extended_headers_within_the_cap_still_work(tmp_path: Path) -> None:
    # A pax path of 3000 bytes, as GNU tar and Python write for deep trees.
    name = "d/" * 1499 + "x.jpg"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    src = tmp_path / "deep.tar"
    src.write_bytes(buf.getvalue())

    ((only, data),) = iterate(src)

    assert (only.path, only.reason, data) == (name, None, b"abc")


def test_a_chain_of_extended_headers_fails_the_archive_not_the_stack(tmp_path: Path) -> None:
    # 2000 longname headers in a row: tarfile alone recurses into RecursionError.
    link = header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 6) + b"a.jpg\0".ljust(BLOCK, b"\0")
    src = tmp_path / "chain.tar"
    src.write_bytes(link * 2000 + member("a.jpg", b"x") + END)
    with pytest.raises(archive.ArchiveError, match=f"MAX_HEADER_CHAIN={archivetar.MAX_HEADER_CHAIN}"):
        iterate(src)

    # Up to MAX_HEADER_CHAIN in a row is fine (real archivers write at most three).
    ok = tmp_path / "ok.tar"
    ok.write_bytes(link * (archivetar.MAX_HEADER_CHAIN - 1) + member("b.jpg", b"y") + END)
    assert [(m.path, data) for m, data in iterate(ok)] == [("a.jpg", b"y")]


def test_global_pax_headers_cannot_pile_up(tmp_path: Path) -> None:
    # Each global header is small, but they accumulate for the rest of the archive.
    parts = []
    for i in range(3):
        record = pax_record(f"comment{i}", b"z" * 30_000)
        padded = record + b"\0" * (-len(record) % BLOCK)
        parts.append(header("pax_global", tarfile.XGLTYPE, len(record)) + padded)
        parts.append(member(f"m{i}.jpg", b"x"))
    src = tmp_path / "globals.tar"
    src.write_bytes(b"".join(parts) + END)
    with pytest.raises(archive.ArchiveError, match="pax global headers hold"):
        iterate(src)


def test_names_over_max_name_bytes_are_flagged_and_cut_short(tmp_path: Path) -> None:
    long = "n" * (archive.MAX_NAME_BYTES + 1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, target in ((long, tarfile.REGTYPE, ""), ("ln", tarfile.SYMTYPE, long)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info, io.BytesIO(b""))
    tar = tmp_path / "long.tar"
    tar.write_bytes(buf.getvalue())
    zip_ = tmp_path / "long.zip"
    with zipfile.ZipFile(zip_, "w") as zf:
        zf.writestr(long, b"data")
        zf.writestr("ok.jpg", b"data")

    (name_tar, _), (link, _) = iterate(tar)
    (name_zip, _), (ok, _) = iterate(zip_, "zip")

    for flagged in (name_tar, name_zip):
        assert flagged.reason == archive.UNSAFE_MEMBER
        assert flagged.detail == f"path of {len(long)} bytes exceeds MAX_NAME_BYTES={archive.MAX_NAME_BYTES}"
        assert len(flagged.path) < 300 and flagged.path.endswith(f"[{len(long)} bytes]")
    assert "link target of 4097 bytes exceeds MAX_NAME_BYTES" in link.detail and len(link.detail) < 600
    assert ok.reason is None


def test_sparse_members_are_unreadable_and_their_maps_never_held(tmp_path: Path) -> None:
    # An old GNU sparse header whose map goes on for 300 extension blocks of 21 entries
    # (tarfile would keep every entry; a long enough chain exhausts memory).
    head = bytearray(header("holes.bin", tarfile.GNUTYPE_SPARSE, size=0))
    head[482] = 1  # isextended: the map continues after the header
    head[483:495] = b"%011o\0" % 5000  # the file's real size
    entries = (b"%011o\0" % 1) * 42  # 21 (offset, numbytes) pairs
    extension = entries + b"\0" * (504 - len(entries)) + b"\1" + b"\0" * 7
    last = extension[:504] + b"\0" * 8
    src = tmp_path / "sparse.tar"
    src.write_bytes(with_checksum(head) + extension * 299 + last + member("after.jpg", b"fine") + END)

    (holes, _), (after, data) = iterate(src)

    assert (holes.path, holes.size, holes.reason) == ("holes.bin", 5000, archive.UNREADABLE_MEMBER)
    assert holes.detail == "GNU sparse file (holes are not supported)"
    assert (after.path, data) == ("after.jpg", b"fine")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write real sparse archives")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_files_from_gnu_tar_are_unreadable_members(tmp_path: Path, fmt: str) -> None:
    with open(tmp_path / "hole.bin", "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(0, 2)
        fh.write(b"x")
    (tmp_path / "a.txt").write_bytes(b"hi")
    subprocess.run(["tar", f"--format={fmt}", "-S", "-cf", "s.tar", "hole.bin", "a.txt"], cwd=tmp_path, check=True)

    (hole, _), (text, data) = iterate(tmp_path / "s.tar")

    assert (hole.path, hole.size, hole.reason) == ("hole.bin", (1 << 20) + 1, archive.UNREADABLE_MEMBER)
    assert (text.path, data) == ("a.txt", b"hi")


def test_every_member_costs_a_header_and_its_path() -> None:
    assert archive.Member("a/b.jpg", 0).header_bytes == archive.HEADER_BYTES + 7
    assert archive.Member("é", 0).header_bytes == archive.HEADER_BYTES + 2  # UTF-8 bytes


def test_a_zip_declares_its_member_count_before_it_is_parsed(tmp_path: Path) -> None:
    src = tmp_path / "n.zip"
    with zipfile.ZipFile(src, "w") as zf:
        for i in range(7):
            zf.writestr(f"{i}.jpg", b"")
    assert archive.declared_members(src, "zip") == 7
    assert archive.declared_members(src, "tar") is None


# Iterates a tar whose first member's header declares 2**80 bytes; tarfile's own skip
# (_Stream.seek) loops over that whole distance, past the end of the data.
_HUGE_MEMBER = """
import sys, tarfile
from imgpipe.data import archive
try:
    for m in archive.iter_archive(sys.argv[1], "tar"):
        pass
except archive.ArchiveError as exc:
    print("ArchiveError:", exc)
"""


def test_a_member_declaring_an_absurd_size_ends_the_stream_promptly(tmp_path: Path) -> None:
    block = bytearray(header("big.jpg"))
    block[124:136] = b"\x80" + (1 << 80).to_bytes(11, "big")  # base-256 size field
    src = tmp_path / "huge.tar"
    src.write_bytes(with_checksum(block) + END)

    done = subprocess.run([sys.executable, "-c", _HUGE_MEMBER, str(src)], capture_output=True, text=True, timeout=20)

    assert "ArchiveError:" in done.stdout and "truncated" in done.stdout, done.stderr


# Iterates a tar.bz2 without reading its member and reports the peak RSS growth in KiB.
_SKIP_BZ2 = """
import json, os, resource, sys
from imgpipe.data import archive
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
names = [m.path for m in archive.iter_archive(sys.argv[1], "tar.bz2")]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"names": names, "growth_kib": after - before}))
"""


def test_a_bzip2_bomb_is_inflated_a_read_at_a_time(tmp_path: Path) -> None:
    # 64 MiB of zeros is about 100 bytes of bzip2. tarfile's own r|bz2 inflates a whole
    # 10 KiB input buffer per call, here all 64 MiB at once, then copies the remainder on
    # every read (quadratic: it never finishes).
    size = 64 << 20
    compressor = bz2.BZ2Compressor()
    parts = [compressor.compress(header("zeros.bin", size=size))]
    parts += [compressor.compress(bytes(1 << 20)) for _ in range(size >> 20)]
    parts += [compressor.compress(END), compressor.flush()]
    src = tmp_path / "zeros.tar.bz2"
    src.write_bytes(b"".join(parts))
    assert src.stat().st_size < 1000

    done = subprocess.run([sys.executable, "-c", _SKIP_BZ2, str(src)], capture_output=True, text=True, timeout=30)

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["names"] == ["zeros.bin"]
    assert result["growth_kib"] < 16 * 1024
