"""A file opened for pyarrow's random-access reads, whose pages a long-lived reader hands back.

    source = ArrowInput.mapped("/data/train/part-0.parquet")
    pf = pyarrow.parquet.ParquetFile(source.file)
    table = pf.read_row_group(0); source.release()   # the pages read leave the process's memory
    source.close()

A local file is memory-mapped: a read comes from the page cache without a copy into a fresh
buffer. The pages a mapping has touched count in the process's resident memory for as long as
the mapping is open, and the loader keeps every file of a split open (their footers parsed
once), so without :meth:`ArrowInput.release` its resident memory grew by the whole split in an
epoch (600 MB at 32,000 images of 64 px, docs/benchmarks.md, "Scale"). ``release`` drops the
mapping's pages from the process (``MADV_DONTNEED``); they stay in the page cache, and a later
read maps them again. The mapping is read-only and shared, so nothing read from it changes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

from imgpipe.storage.regular import regular_fd

__all__ = ["ArrowInput"]


class ArrowInput:
    """A pyarrow random-access input (``file``) and, for a mapped local file, its mapping."""

    def __init__(self, file: Any, mapping: mmap.mmap | None = None) -> None:
        self.file = file
        self._mapping = mapping

    @classmethod
    def mapped(cls, path: str | os.PathLike[str]) -> ArrowInput:
        """``path`` mapped read-only (an empty file reads as no bytes: pyarrow's readers refuse it).

        Raises:
            NotRegularFile: For anything but a regular file (a directory, a FIFO, a device): a ``ValueError``.
        """
        import pyarrow as pa

        # A FIFO planted where a data file should be is refused, not waited on.
        fd = regular_fd(path)
        try:
            if os.fstat(fd).st_size == 0:  # mmap refuses an empty file
                return cls(pa.BufferReader(b""))
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls(pa.BufferReader(pa.py_buffer(mapping)), mapping)

    def release(self) -> None:
        """Hands the pages read so far back to the page cache (no-op for a streamed input)."""
        if self._mapping is not None and not self._mapping.closed:
            self._mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Closes the input; the mapping goes with the last buffer that still views it."""
        self.file.close()
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a table read from it still holds a view
                self._mapping.close()
