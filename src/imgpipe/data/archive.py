"""Safe, streaming iteration over the members of an archive or a directory tree.

Nothing here ever extracts to disk: tar archives are read in stream mode
(``tarfile.open(mode="r|...")``) and zip archives member by member, so a member
named ``../../etc/passwd`` or a symlink pointing there can do no harm. Such members
are still yielded, flagged with a reject reason and a detail naming the problem,
so the caller can count and report them.

Formats are recognised by content (magic bytes), not by file name: ``tar``,
``tar.gz``/``tgz``, ``tar.bz2``, ``tar.xz`` and ``zip``.

Memory stays bounded whatever the archive holds: names over :data:`MAX_NAME_BYTES`
are flagged, and a tar is read through :mod:`imgpipe.data.archivetar`, whose bounded
stream skips oversized extended headers (the member they describe is flagged here),
caps chains of them and skips declared data in bounded reads.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

from imgpipe.data.archivetar import COMPRESSED_TAR, TAR_FORMATS, combine_problems, next_tar, tar_stream, utf8_len
from imgpipe.storage.regular import open_regular

__all__ = [
    "SUPPORTED_FORMATS",
    "UNSAFE_MEMBER",
    "UNREADABLE_MEMBER",
    "MAX_NAME_BYTES",
    "HEADER_BYTES",
    "CORRUPT_ERRORS",
    "ArchiveError",
    "MemberTooLarge",
    "Member",
    "detect_format",
    "declared_members",
    "normalize_member_path",
    "iter_archive",
    "iter_directory",
]

SUPPORTED_FORMATS = ("tar", "tar.gz", "tar.bz2", "tar.xz", "zip")
UNSAFE_MEMBER = "unsafe_member"
UNREADABLE_MEMBER = "unreadable_member"
# Linux's PATH_MAX: no file system stores a longer path, so a longer name is an attack.
MAX_NAME_BYTES = 4096
# What one member costs besides its data and name: a tar header block (and about a
# zip's local plus central directory entry), so zero-byte members still add up.
HEADER_BYTES = tarfile.BLOCKSIZE

_CHUNK = 1 << 20
_SUPPORTED_TEXT = "supported formats: .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip (detected by content), or a directory"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # first local header, or the end record of an empty zip
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_ZIP_ENCRYPTED = 0x1  # general purpose bit 0, APPNOTE.TXT section 4.4.4
# Errors that mean the archive bytes themselves are bad (truncated download, bit rot).
CORRUPT_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
    UnicodeDecodeError,  # a zip name whose UTF-8 flag lies
    NotImplementedError,  # a zip version or feature zipfile does not read
)
_DRIVE = re.compile(r"^[A-Za-z]:")
_SHOWN_NAME_CHARS = 200  # how much of an overlong name a reject keeps


class ArchiveError(ValueError):
    """An archive that is corrupt or truncated (as opposed to one with bad members)."""


class MemberTooLarge(Exception):
    """A member holds more bytes than the caller's limit (whatever its header claims)."""


@dataclass(frozen=True)
class Member:
    """One non-directory entry of an archive or directory tree.

    A tar member's data can only be read while the iteration that produced it is
    positioned on it (stream mode cannot seek back): read it before asking the
    iterator for the next member.

    Attributes:
        path: The member path with ``/`` separators, a leading ``./`` stripped and
            empty or ``.`` components collapsed (left as found for unsafe paths).
        size: The size its header or file system entry declares; :meth:`read`
            enforces the real size independently.
        reason: ``None`` for a regular file that is safe to read, otherwise the
            reject reason (:data:`UNSAFE_MEMBER` or :data:`UNREADABLE_MEMBER`).
        detail: What is wrong with it, e.g. ``symlink -> ../../etc/passwd``.
        opener: Opens the member's data for reading; ``None`` for flagged members.
        label: The class its source gave it (a URI list's, a WebDataset sample's, a nested
            archive's name), or ``None`` where the class comes from the path.
        split: The split its source put it in (``train``, ``val`` or ``test``: a Hugging Face
            dataset's split file or ``split`` column), or ``None`` where the source has none.
        etag: The object's change token where the source is a listing, else ``None``.
    """

    path: str
    size: int
    reason: str | None = None
    detail: str = ""
    opener: Callable[[], IO[bytes]] | None = field(default=None, repr=False, compare=False)
    label: str | None = None
    split: str | None = None
    etag: str | None = None

    @property
    def header_bytes(self) -> int:
        """What the member costs besides its data: a header block and its UTF-8 path."""
        return HEADER_BYTES + utf8_len(self.path)

    def read(self, limit: int) -> bytes:
        """Reads the whole member, refusing to hold more than ``limit`` bytes.

        Raises:
            MemberTooLarge: If the member holds more than ``limit`` bytes.
            ArchiveError: If the archive is corrupt or truncated inside this member.
            ValueError: If the member was flagged and must not be read.
        """
        if self.reason is not None or self.opener is None:
            raise ValueError(f"member {self.path!r} must not be read: {self.reason} ({self.detail})")
        chunks: list[bytes] = []
        size = 0
        try:
            with self.opener() as fh:
                # Never ask for more than one byte past the limit: a header may lie about
                # the size (zip bombs), so the limit is enforced on what actually arrives.
                while chunk := fh.read(min(_CHUNK, limit + 1 - size)):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise MemberTooLarge(f"{self.path!r} holds more than {limit} bytes")
        except CORRUPT_ERRORS as exc:
            raise ArchiveError(f"corrupt or truncated archive at member {self.path!r}: {exc}") from exc
        return b"".join(chunks)


def _flagged(path: str, size: int, reason: str, detail: str) -> Member:
    return Member(path=path, size=size, reason=reason, detail=detail)


def _long_name_problem(what: str, name: str) -> str | None:
    size = utf8_len(name)
    if size > MAX_NAME_BYTES:
        return f"{what} of {size} bytes exceeds MAX_NAME_BYTES={MAX_NAME_BYTES}"
    return None


def _shown(name: str) -> str:
    """An overlong name cut to what a reject may hold (rejects are kept in memory)."""
    if utf8_len(name) <= MAX_NAME_BYTES:
        return name
    return f"{name[:_SHOWN_NAME_CHARS]}...[{utf8_len(name)} bytes]"


def normalize_member_path(name: str) -> tuple[str, str | None]:
    """Returns a member's canonical path and, if it is unsafe, why.

    Absolute paths (``/x``, ``\\x``, ``C:x``), ``..`` components (with either
    separator), NUL bytes and empty names are unsafe: written anywhere naively they
    escape the destination. For those the name comes back with only ``./`` stripped.
    Names over :data:`MAX_NAME_BYTES` are unsafe too and come back cut short.
    """
    too_long = _long_name_problem("path", name)
    if too_long:
        return _shown(name), too_long
    path = name
    while path.startswith("./"):
        path = path[2:]
    if "\x00" in path:
        return path, f"NUL byte in path {name!r}"
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return path, f"absolute path {name!r}"
    if ".." in re.split(r"[/\\]", path):
        return path, f"parent directory '..' in path {name!r}"
    clean = "/".join(part for part in path.split("/") if part not in ("", "."))
    if not clean:
        return path, f"empty path {name!r}"
    return clean, None


def _looks_like_tar(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return True  # an all-zero first block: an empty tar archive
    except tarfile.HeaderError:
        return False
    return True


def detect_format(path: str | os.PathLike[str], name: str | None = None) -> str:
    """Returns the archive format of a local file, judged by its content.

    Args:
        path: The local file.
        name: How to call the file in errors (its source URI); defaults to ``path``.

    Returns:
        One of :data:`SUPPORTED_FORMATS`.

    Raises:
        ValueError: If the content is not a supported archive.
    """
    name = name or os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(tarfile.BLOCKSIZE)
    for magic, fmt, codec, opener in COMPRESSED_TAR:
        if head.startswith(magic):
            try:
                with opener(path, "rb") as inner:
                    block = inner.read(tarfile.BLOCKSIZE)
            except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
                raise ArchiveError(f"{name}: corrupt {codec} data: {exc}") from exc
            if not _looks_like_tar(block):
                raise ValueError(f"{name} is {codec}-compressed but holds no tar archive; {_SUPPORTED_TEXT}")
            return fmt
    if head[:4] in _ZIP_MAGIC:
        return "zip"
    if _looks_like_tar(head):
        return "tar"
    if zipfile.is_zipfile(path):  # a zip with a prefix, e.g. a self-extracting stub
        return "zip"
    raise ValueError(f"{name} is not a supported archive (starts with {head[:8]!r}); {_SUPPORTED_TEXT}")


def declared_members(path: str | os.PathLike[str], fmt: str) -> int | None:
    """How many entries a zip's central directory declares, read without parsing it.

    ``zipfile.ZipFile`` builds an object per entry before the first one is yielded,
    so a member limit must be checked on this count first. Tar archives have no index
    (``None``); their members are counted as they stream.
    """
    if fmt != "zip":
        return None
    with open(path, "rb") as fh:
        # The end-of-central-directory reader zipfile itself uses (zip64 aware); private,
        # hence the fallback to counting while iterating if it ever goes away.
        read_end = getattr(zipfile, "_EndRecData", None)
        end = read_end(fh) if read_end is not None else None
    return None if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])


def iter_archive(path: str | os.PathLike[str], fmt: str) -> Iterator[Member]:
    """Yields every non-directory member of a local archive, in archive order.

    Args:
        path: The local archive file.
        fmt: Its format, from :func:`detect_format`.

    Raises:
        ArchiveError: If the archive is corrupt or truncated.
        ValueError: For an unknown ``fmt``.
    """
    if fmt == "zip":
        members = _iter_zip(path)
    elif fmt in TAR_FORMATS:
        members = _iter_tar(path, fmt)
    else:
        raise ValueError(f"unknown archive format {fmt!r}; expected one of {SUPPORTED_FORMATS}")
    try:
        yield from members
    except CORRUPT_ERRORS as exc:
        raise ArchiveError(f"corrupt or truncated {fmt} archive: {exc}") from exc


def _tar_type_problem(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return f"symlink -> {_shown(info.linkname)}"
    if info.islnk():
        return f"hardlink -> {_shown(info.linkname)}"
    if info.ischr():
        return f"character device {info.devmajor},{info.devminor}"
    if info.isblk():
        return f"block device {info.devmajor},{info.devminor}"
    if info.isfifo():
        return "FIFO (named pipe)"
    if not info.isreg():
        return f"unsupported tar member type {info.type!r}"
    return None


def _iter_tar(path: str | os.PathLike[str], fmt: str) -> Iterator[Member]:
    with tar_stream(path, fmt) as tf:
        while (info := next_tar(tf)) is not None:
            # Stream mode still appends every header to tf.members; drop them so memory
            # stays flat on archives with millions of members (nothing here looks back).
            tf.members.clear()
            if info.isdir():
                continue
            path_, bad_path = normalize_member_path(info.name)
            problem = combine_problems(
                info.problem,
                _tar_type_problem(info),
                bad_path,
                _long_name_problem("link target", info.linkname),
            )
            if problem:
                yield _flagged(path_, info.size, UNSAFE_MEMBER, problem)
            elif info.sparse is not None:
                yield _flagged(path_, info.size, UNREADABLE_MEMBER, "GNU sparse file (holes are not supported)")
            else:
                yield Member(path_, info.size, opener=partial(tf.extractfile, info))
        # tarfile reads a header cut short (or missing) as the end of the archive, so a
        # download truncated at a member boundary would silently lose members. A complete
        # archive ends with zero blocks: the last header read must have been a full block.
        if tf.fileobj.tell() - tf.offset < tarfile.BLOCKSIZE:
            raise ArchiveError(
                f"archive ends at byte {tf.offset} of its tar stream without the end-of-archive blocks; it is truncated (an incomplete download?)"
            )


def _mode_problem(mode: int) -> str | None:
    """Why a Unix file mode is not a regular file (``None`` if it is one)."""
    kinds = (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    if not stat.S_ISREG(mode):
        return f"unsupported file type {oct(stat.S_IFMT(mode))}"
    return None


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    # A zip symlink stores its target as the member's data; read a bounded prefix
    # only to name it in the reject detail.
    try:
        with zf.open(info) as fh:
            return fh.read(4096).decode("utf-8", "replace")
    # CORRUPT_ERRORS holds zipfile's NotImplementedError (an unsupported method); RuntimeError is an
    # encrypted member: the link is flagged unsafe either way, only its detail is lost.
    except (*CORRUPT_ERRORS, RuntimeError):
        return "<unreadable target>"


def _zip_problem(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[str, str] | None:
    """The (reason, detail) that keeps a zip member out, or ``None`` if it is readable."""
    # Unix zippers keep st_mode in the high 16 bits of external_attr; 0 means "no mode".
    mode = info.external_attr >> 16
    type_problem = None
    if stat.S_ISLNK(mode):
        type_problem = f"symlink -> {_zip_link_target(zf, info)}"
    elif stat.S_IFMT(mode):
        type_problem = _mode_problem(mode)
    problem = combine_problems(type_problem, normalize_member_path(info.filename)[1])
    if problem:
        return UNSAFE_MEMBER, problem
    if info.flag_bits & _ZIP_ENCRYPTED:
        return UNREADABLE_MEMBER, "encrypted member"
    if info.compress_type not in _ZIP_METHODS:
        return UNREADABLE_MEMBER, f"unsupported zip compression method {info.compress_type}"
    return None


def _iter_zip(path: str | os.PathLike[str]) -> Iterator[Member]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir() or stat.S_ISDIR(info.external_attr >> 16):
                continue
            path_ = normalize_member_path(info.filename)[0]
            flagged = _zip_problem(zf, info)
            if flagged:
                yield _flagged(path_, info.file_size, *flagged)
            else:
                yield Member(path_, info.file_size, opener=partial(zf.open, info))


def _open_no_follow(path: str) -> IO[bytes]:
    # Closes the race where a file is swapped for a symlink or a FIFO after lstat(): refused, never followed or waited on.
    return open_regular(path, follow_links=False)


def _raise(exc: OSError) -> None:
    raise exc


def _directory_entry(full: str, rel: str) -> Member:
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        return _flagged(rel, 0, UNSAFE_MEMBER, f"symlink -> {os.readlink(full)}")
    problem = _mode_problem(st.st_mode)
    if problem:
        return _flagged(rel, 0, UNSAFE_MEMBER, problem)
    # The change token of a local file, as imgpipe.storage.local lists it (incremental runs).
    return Member(rel, st.st_size, opener=partial(_open_no_follow, full), etag=f"{st.st_mtime_ns:x}-{st.st_ino:x}")


def iter_directory(root: str | os.PathLike[str]) -> Iterator[Member]:
    """Yields every non-directory entry below a local directory, in sorted walk order.

    Paths are relative to ``root`` with ``/`` separators. Symlinks (to files or
    directories) are flagged unsafe and never followed; so are devices, FIFOs and
    sockets.

    Raises:
        OSError: If part of the tree cannot be listed (rather than silently skipping it).
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_raise):
        links = sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames + links):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield _directory_entry(os.path.join(dirpath, name), rel)
