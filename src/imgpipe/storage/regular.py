"""Local files opened only when they are regular files: a FIFO, device or socket where a data file should be is refused, not waited on.

    with open_regular("/data/ds/data-00000-of-00001.arrow") as fh: ...
    fd = regular_fd(path)            # for a mapping; the caller closes it
    check_regular(path)              # before a library opens the path itself (pyarrow's ParquetFile)

Opening a FIFO for reading in the usual way waits for a writer for ever, and opening a device
may act on it; so the path is looked at first (``stat``, or ``lstat`` where links are not
followed), then opened without blocking and looked at again through the descriptor, which
closes the race where a file is swapped for something else between the two.
"""

from __future__ import annotations

import os
import stat
from typing import IO

__all__ = ["NotRegularFile", "file_kind", "regular_fd", "open_regular", "check_regular"]


class NotRegularFile(ValueError):
    """A path that names a directory, FIFO, device, socket or link (where links are not followed) instead of a regular file.

    Attributes:
        kind: What it names instead (``"FIFO (named pipe)"``).
    """

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)  # one argument, so the error pickles (a pool's worker may raise it)
        self.kind = kind


_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symbolic link"),
)


def file_kind(mode: int) -> str | None:
    """What a file mode names when it is no regular file (``"FIFO (named pipe)"``), ``None`` for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), f"unsupported file type {oct(stat.S_IFMT(mode))}")


def _refuse(path: str | os.PathLike[str], mode: int) -> None:
    kind = file_kind(mode)
    if kind is not None:
        raise NotRegularFile(f"{os.fspath(path)} is a {kind}, not a regular file", kind)


def regular_fd(path: str | os.PathLike[str], *, follow_links: bool = True) -> int:
    """A blocking read-only descriptor of ``path``, which must be a regular file.

    Raises:
        NotRegularFile: For anything but a regular file (with ``follow_links=False``, a link too).
        FileNotFoundError: If nothing is there.
    """
    _refuse(path, (os.stat if follow_links else os.lstat)(path).st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError:
        if not follow_links and os.path.islink(path):  # O_NOFOLLOW's ELOOP: swapped for a link since lstat
            raise NotRegularFile(f"{os.fspath(path)} is a symbolic link, not a regular file", "symbolic link") from None
        raise
    try:
        _refuse(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike[str], *, follow_links: bool = True) -> IO[bytes]:
    """``path`` opened for binary reads when it is a regular file (:func:`regular_fd`)."""
    return os.fdopen(regular_fd(path, follow_links=follow_links), "rb")


def check_regular(path: str | os.PathLike[str]) -> None:
    """Refuses ``path`` unless it is a regular file, opening it only without blocking (:func:`regular_fd`)."""
    os.close(regular_fd(path))
