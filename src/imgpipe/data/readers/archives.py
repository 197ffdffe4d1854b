"""Archive and directory sources: a local tar/zip file (nested archives one level deep) or a directory tree.

    reader = ArchiveReader(uri, local_path, "tar.gz", sha256=..., size=...)
    reader = DirectoryReader(uri, local_dir)

A member of an archive that is itself an archive (ImageNet's train archive is a tar of one tar
per class) is opened in its turn, once: its members become members of the source, named
``<inner archive path without its extension>/<member path>`` (``n01440764.tar`` ->
``n01440764/1.JPEG``; ``B/x.tar`` -> ``B/x/1.png``, the folder kept) and labelled with the inner
archive's name (without its extension). The manifest entry lists those member prefixes
(``nested``), so clean's ``label_source: auto`` can give the members of an archive that sits in
a class folder that folder's class instead. A third level is a ``nested_archive`` reject. Every member of either level counts
against the step's caps (members, bytes, expansion of the outer archive), since the step sees
them as members of this source. Before a nested archive is expanded it passes the checks a
top-level one does (:mod:`imgpipe.data.archivecaps`), against its own compressed size: a zip's
index (entries, declared sizes), then each member's count and declared size before its data is
read; a crossing refuses the source with the top level's message, naming the nested archive.
"""

from __future__ import annotations

import io
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from imgpipe.data import archive
from imgpipe.data.archive import Member
from imgpipe.data.archivecaps import ArchiveBudget, Caps, precheck
from imgpipe.data.readers.base import Carry, Reader

__all__ = ["NESTED_ARCHIVE", "ARCHIVE_SUFFIXES", "ArchiveReader", "DirectoryReader", "archive_stem"]

NESTED_ARCHIVE = "nested_archive"
# Member names taken for archives to open (their content must agree: detect_format decides).
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


def archive_stem(name: str) -> str | None:
    """The name of an archive member without its archive extension, or ``None`` if it is not named like one."""
    base = posixpath.basename(name)
    lower = base.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return None


class ArchiveReader(Reader):
    """A local archive file, its format judged by content."""

    streams_skipped = True

    def __init__(
        self,
        uri: str,
        local: Path,
        fmt: str,
        *,
        sha256: str | None,
        size: int | None,
        final_uri: str | None = None,
        max_member_bytes: int = 256 << 20,
        caps: Caps | None = None,
    ) -> None:
        self.uri, self.local, self.kind = uri, local, fmt
        self.sha256, self.bytes, self.final_uri = sha256, size, final_uri
        self.max_member_bytes, self.caps = max_member_bytes, caps
        self.streams_skipped = fmt.startswith("tar")
        self.nested: set[str] = set()  # member prefixes of the nested archives opened

    def declared_members(self) -> int | None:
        return archive.declared_members(self.local, self.kind)

    def manifest_entry(self) -> dict[str, Any]:
        entry = {"uri": self.uri, "format": self.kind, "sha256": self.sha256, "bytes": self.bytes}
        if self.final_uri is not None:
            entry["final_uri"] = self.final_uri
        if self.nested:
            entry["nested"] = sorted(self.nested)
        return entry

    def precheck(self, caps: Caps) -> None:
        if self.bytes is not None:
            precheck(self.uri, self.local, self.kind, self.bytes, caps)

    def members(self) -> Iterator[Member]:
        try:
            for member in archive.iter_archive(self.local, self.kind):
                stem = archive_stem(member.path) if member.reason is None else None
                if stem is None:
                    yield member
                else:
                    yield from self._nested(member, stem)
        except archive.ArchiveError as exc:
            if str(exc).startswith(self.uri):
                raise
            raise archive.ArchiveError(f"{self.uri}: {exc}") from None

    def _nested(self, member: Member, stem: str) -> Iterator[Member]:
        """The members of an archive inside this one (spooled to a local file), or the member itself if it is none."""
        with tempfile.TemporaryDirectory(prefix="imgpipe-nested-") as tmp:
            spool = Path(tmp) / "inner"
            try:
                with member.opener() as src, open(spool, "wb") as dst:  # type: ignore[misc]  # at rest: a spool of an archive member (data)
                    copied = _copy_at_most(src, dst, self.max_member_bytes)
            except archive.MemberTooLarge:
                yield Member(member.path, member.size, archive.UNREADABLE_MEMBER, f"nested archive over max_member_bytes={self.max_member_bytes}")
                return
            except archive.CORRUPT_ERRORS as exc:
                raise archive.ArchiveError(f"corrupt or truncated archive at member {member.path!r}: {exc}") from None
            try:
                fmt = archive.detect_format(spool, name=member.path)
            except ValueError:  # named like an archive, but is not one: an ordinary member
                yield Member(member.path, copied, opener=partial(open, spool, "rb"))
                return
            prefix = posixpath.join(posixpath.dirname(member.path), stem) + "/"
            self.nested.add(prefix)
            shown = f"{self.uri} (nested archive {member.path!r})"
            budget = None
            if self.caps is not None:
                precheck(shown, spool, fmt, copied, self.caps)
                budget = ArchiveBudget(shown, copied, self.caps)
            for inner in _named(archive.iter_archive(spool, fmt), shown):
                if budget is not None:
                    budget.admit(inner)  # before its data is read: a bomb is never expanded
                path = f"{prefix}{inner.path}"
                if inner.reason is not None:
                    yield Member(path, inner.size, inner.reason, inner.detail)
                elif archive_stem(inner.path) is not None:
                    yield Member(path, inner.size, NESTED_ARCHIVE, "an archive inside a nested archive (one level is opened)")
                else:
                    yield Member(path, inner.size, opener=inner.opener, label=stem)


def _named(members: Iterator[Member], shown: str) -> Iterator[Member]:
    """``members``, a corrupt archive's error naming ``shown`` (the nested archive)."""
    try:
        yield from members
    except archive.ArchiveError as exc:
        raise archive.ArchiveError(f"{shown}: {exc}") from None


def _copy_at_most(src: Any, dst: Any, limit: int) -> int:
    copied = 0
    while chunk := src.read(min(1 << 20, limit + 1 - copied)):
        dst.write(chunk)
        copied += len(chunk)
        if copied > limit:
            raise archive.MemberTooLarge(f"more than {limit} bytes")
    return copied


class DirectoryReader(Reader):
    """A local directory tree: every file below it, symbolic links refused (:func:`imgpipe.data.archive.iter_directory`).

    With ``carry`` (an incremental run) every file is still read: a local file's change token
    (modification time and inode) proves nothing about the bytes a previous output recorded,
    and a local read costs what checking them would; the incremental counts still come from it.
    """

    kind = "directory"

    def __init__(self, uri: str, local: Path, carry: Carry | None = None, keeps: Callable[[str], bool] | None = None) -> None:
        self.uri, self.local, self.carry, self.keeps = uri, local, carry, keeps

    @property
    def checked_in_advance(self) -> bool:
        return self.carry is None  # read twice, a carried file would count twice

    def manifest_entry(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": self.kind, "sha256": None, "bytes": None}

    def members(self) -> Iterator[Member]:
        for member in archive.iter_directory(self.local):
            if self.keeps is not None and not self.keeps(member.path):
                continue  # another shard's
            data = self.carry.take(member.path, member.size, member.etag, store_md5=True) if self.carry and member.reason is None else None
            yield member if data is None else Member(member.path, len(data), opener=partial(io.BytesIO, data), etag=member.etag)
