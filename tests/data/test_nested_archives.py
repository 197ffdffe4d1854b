"""A nested archive passes the top level's pre-checks, against its own size, before any of it is expanded.

The outer archives are small tars written by ``tarfile``; the nested ones bombs written by
``tarfile`` and ``zipfile``. Each test reads the source as the download step does
(:func:`imgpipe.data.extraction.dry_run` over :func:`imgpipe.data.readers.factory.open_source`)
and checks the refusal is the top level's message, and that the bomb was not expanded (the
bytes the nested archive's decompressor handed out are counted).
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from imgpipe.data import archive
from imgpipe.data.archivecaps import Caps
from imgpipe.data.extraction import dry_run
from imgpipe.data.readers.base import ReaderSettings
from imgpipe.data.readers.factory import open_source

CAPS = Caps(max_member_bytes=64 << 20, max_total_bytes=1 << 30, max_members=10_000, max_expansion_ratio=100.0)
ZEROS = 50 << 20


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zeros_tar_gz() -> bytes:
    """A tar.gz of one member of 50 MB of zeros (about 50 KB), written without holding the 50 MB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("zeros.jpg")
        info.size = ZEROS
        tf.addfile(info, _Zeros(ZEROS))
    return buf.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, b) -> int:  # noqa: ANN001 - io's buffer protocol
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def _open(path: Path, tmp: Path):
    return open_source(str(path), sha256=None, spool=tmp / "spool", settings=ReaderSettings(max_member_bytes=CAPS.max_member_bytes, caps=CAPS))


@pytest.fixture
def inflated(monkeypatch):
    """Bytes that gzip decompression handed out while the test ran."""
    total = [0]
    real = gzip.GzipFile.read

    def counting(self, size=-1):
        data = real(self, size)
        total[0] += len(data)
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counting)
    return total


def test_a_nested_tar_gz_bomb_is_refused_by_the_expansion_rule_without_being_expanded(tmp_path, inflated):
    bomb = _zeros_tar_gz()
    assert len(bomb) < 100_000
    outer = tmp_path / "outer.tar"
    outer.write_bytes(_tar({"ok.jpg": b"\xff\xd8\xff", "cls/bomb.tar.gz": bomb}))
    with pytest.raises(
        ValueError, match=r"nested archive 'cls/bomb.tar.gz'.*expands to more than max_expansion_ratio=100.0 times its \d+ bytes"
    ) as info:
        dry_run([_open(outer, tmp_path)], CAPS)
    assert "this looks like an archive bomb" in str(info.value) and str(outer) in str(info.value)
    assert inflated[0] < 1 << 20, f"{inflated[0]} bytes of the bomb were expanded"


def test_a_nested_tar_gz_of_many_tiny_members_is_refused_by_the_member_count_rule(tmp_path, inflated):
    caps = Caps(CAPS.max_member_bytes, CAPS.max_total_bytes, max_members=1_000, max_expansion_ratio=CAPS.max_expansion_ratio)
    inner = _tar({f"{i}.jpg": b"" for i in range(5_000)}, mode="w:gz")
    outer = tmp_path / "outer.tar"
    outer.write_bytes(_tar({"many.tar.gz": inner}))
    reader = open_source(str(outer), sha256=None, spool=tmp_path / "spool", settings=ReaderSettings(caps=caps))
    with pytest.raises(ValueError, match=r"nested archive 'many.tar.gz'.*brings the member count over max_members=1000 \(at '1000.jpg'\)"):
        list(reader.members())
    assert inflated[0] < len(_tar({f"{i}.jpg": b"" for i in range(1_100)})), "the nested archive was read past the cap"


def _lying_zip(claimed: int) -> bytes:
    """A zip whose central directory claims ``claimed`` bytes for its one small member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.jpg", b"\xff\xd8\xff" * 10)
    data = bytearray(buf.getvalue())
    at = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, at + 24, claimed)  # uncompressed size in the central directory
    return bytes(data)


def test_a_nested_zip_whose_index_declares_a_bomb_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    outer = tmp_path / "outer.tar"
    outer.write_bytes(_tar({"liar.zip": _lying_zip(3_000_000_000)}))
    opened = []
    monkeypatch.setattr(archive, "_iter_zip", lambda path: opened.append(path) or iter(()))
    with pytest.raises(
        ValueError, match=r"nested archive 'liar.zip'.*expands to more than max_expansion_ratio=100.0 times .*its index declares 3000000\d\d\d bytes"
    ):
        dry_run([_open(outer, tmp_path)], CAPS)
    assert opened == []


def test_a_nested_zip_whose_declared_size_understates_its_data_is_refused_as_corrupt(tmp_path):
    outer = tmp_path / "outer.tar"
    outer.write_bytes(_tar({"liar.zip": _lying_zip(3)}))
    with pytest.raises(archive.ArchiveError, match=r"outer.tar.*liar"):
        dry_run([_open(outer, tmp_path)], CAPS)


def test_a_top_level_zip_whose_index_declares_a_bomb_gets_the_same_refusal(tmp_path):
    top = tmp_path / "liar.zip"
    top.write_bytes(_lying_zip(3_000_000_000))
    with pytest.raises(ValueError, match=r"liar.zip expands to more than max_expansion_ratio=100.0 times .*its index declares 3000000\d\d\d bytes"):
        dry_run([_open(top, tmp_path)], CAPS)


def test_an_archive_two_levels_down_is_a_nested_archive_reject_and_a_fine_nested_archive_is_read(tmp_path):
    inner = _tar({"1.jpg": b"\xff\xd8\xff", "deeper.tar": _tar({"x.jpg": b"x"})})
    outer = tmp_path / "outer.tar"
    outer.write_bytes(_tar({"n01/cls.tar": inner}))
    members = list(_open(outer, tmp_path).members())
    assert [(m.path, m.reason) for m in members] == [("n01/cls/1.jpg", None), ("n01/cls/deeper.tar", "nested_archive")]
    assert dry_run([_open(outer, tmp_path)], CAPS) == 2
