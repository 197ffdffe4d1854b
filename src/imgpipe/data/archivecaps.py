"""The caps that stop an archive bomb, and the checks every archive passes before it is opened, at any depth.

    caps = Caps(max_member_bytes, max_total_bytes, max_members, max_expansion_ratio)
    precheck(shown, local, fmt, size, caps)        # a zip's index: entries and declared sizes
    budget = ArchiveBudget(shown, size, caps)
    for member in archive.iter_archive(local, fmt):
        budget.admit(member)                         # count, then declared size, before its data

The download step's accounting (:mod:`imgpipe.data.extraction`) applies the caps to each
source; a nested archive (:class:`imgpipe.data.readers.archives.ArchiveReader`) passes the same
checks against its own compressed size before a byte of it is expanded. A crossing is a
``ValueError`` whose message (:func:`too_many`, :func:`too_expanded`) is the same at any depth.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

from imgpipe.data import archive
from imgpipe.data.archive import Member

__all__ = ["EXPANSION_SLACK", "Caps", "too_many", "too_expanded", "precheck", "ArchiveBudget"]

# Headroom under max_expansion_ratio for tiny archives, whose per-member header and
# path costs alone can exceed 100x the few hundred bytes they compress to.
EXPANSION_SLACK = 1 << 20


@dataclass(frozen=True)
class Caps:
    """The step's limits on what all sources together may bring (``DownloadConfig`` carries them)."""

    max_member_bytes: int
    max_total_bytes: int
    max_members: int
    max_expansion_ratio: float

    def expansion_limit(self, size: int) -> float:
        """The most an archive of ``size`` bytes may expand to."""
        return self.max_expansion_ratio * size + EXPANSION_SLACK


def too_many(uri: str, max_members: int, where: str) -> str:
    """The refusal of an archive that brings more than ``max_members`` members."""
    return (
        f"{uri} brings the member count over max_members={max_members} "
        f"({where}); this looks like an archive bomb. Raise max_members if the data set "
        "really has that many files. Nothing was committed."
    )


def too_expanded(uri: str, caps: Caps, size: int, where: str) -> str:
    """The refusal of an archive that expands past ``max_expansion_ratio`` times its ``size``."""
    return (
        f"{uri} expands to more than max_expansion_ratio={caps.max_expansion_ratio} "
        f"times its {size} bytes ({where}); this looks like an archive bomb. Raise "
        "max_expansion_ratio if it is genuine. Nothing was committed."
    )


def precheck(uri: str, local: str | os.PathLike[str], fmt: str, size: int, caps: Caps) -> None:
    """Refuses a zip whose index declares too many entries, or more bytes than its size may expand to.

    The entry count is read from the end record before the index is parsed (parsing builds
    an object per entry); the sizes are the central directory's. A tar has no index: its
    members are checked as they stream (:class:`ArchiveBudget`).

    Raises:
        ValueError: Naming ``uri``, the cap and what the index declares.
    """
    declared = archive.declared_members(local, fmt)
    if declared is None:
        return
    if declared > caps.max_members:
        raise ValueError(too_many(uri, caps.max_members, f"its index declares {declared} entries, directories included"))
    try:
        with zipfile.ZipFile(local) as zf:
            total = sum(info.file_size + archive.HEADER_BYTES + len(info.filename) for info in zf.infolist())
    except (*archive.CORRUPT_ERRORS, OSError) as exc:
        raise archive.ArchiveError(f"{uri}: corrupt zip index: {exc}") from None
    if total > caps.expansion_limit(size):
        raise ValueError(too_expanded(uri, caps, size, f"its index declares {total} bytes"))


class ArchiveBudget:
    """One archive's members counted against the caps as they stream, each before its data is read.

    Args:
        uri: How messages name the archive.
        size: Its own (compressed) size: the base of ``max_expansion_ratio``.
        caps: The limits.
    """

    def __init__(self, uri: str, size: int, caps: Caps) -> None:
        self.uri, self.size, self.caps = uri, size, caps
        self.members = 0
        self.expanded = 0

    def admit(self, member: Member) -> None:
        """Counts ``member`` with the size its header declares (data, header and path).

        Raises:
            ValueError: When the count or the declared expansion crosses a cap.
        """
        self.members += 1
        if self.members > self.caps.max_members:
            raise ValueError(too_many(self.uri, self.caps.max_members, f"at {member.path!r}"))
        self.expanded += member.header_bytes + max(member.size, 0)
        if self.expanded > self.caps.expansion_limit(self.size):
            raise ValueError(too_expanded(self.uri, self.caps, self.size, f"reached at {member.path!r}, by the sizes its headers declare"))
