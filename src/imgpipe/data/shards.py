"""The download step's output: members as rows of ordered Parquet shards, written by a pool of threads.

    with ShardWriter(out, shard_bytes=256 << 20, row_group_rows=128, write_workers=4) as shards:
        shards.add(member, data)      # in order; shards part-00000.parquet, ... appear as they fill

Every shard has :data:`SHARD_SCHEMA`. ``label`` is the class a source gave the member (a
URI list's label, a WebDataset sample's class, a Hugging Face ``ClassLabel``), null where
the class comes from the path; ``split`` the split a source put it in (a Hugging Face
dataset's ``train``/``val``/``test`` files or ``split`` column), null where it has none
(outputs of older runs lack the column: read it as null); ``etag`` is the object's change token where the source
was a listing (a bucket prefix, a URI list), null otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import pyarrow as pa

from imgpipe import writer
from imgpipe.data.archive import Member
from imgpipe.writer import OutputWriter

__all__ = ["SHARD_SCHEMA", "Row", "shard_table", "ShardWriter"]

_MiB = 1 << 20

SHARD_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("split", pa.string(), nullable=True),
        pa.field("etag", pa.string(), nullable=True),
    ]
)


class Row(NamedTuple):
    """One member as the writer queues it."""

    path: str
    data: bytes
    label: str | None
    split: str | None
    etag: str | None


def shard_table(rows: Sequence[Row]) -> pa.Table:
    """One row group's table; the bytes are hashed here, in the writer threads (hashlib releases the GIL)."""
    return pa.table(
        {
            "path": [r.path for r in rows],
            "bytes": [r.data for r in rows],
            "size": [len(r.data) for r in rows],
            "sha256": [hashlib.sha256(r.data).hexdigest() for r in rows],
            "label": [r.label for r in rows],
            "split": [r.split for r in rows],
            "etag": [r.etag for r in rows],
        },
        schema=SHARD_SCHEMA,
    )


# A row group is cut at row_group_rows rows or at this many bytes, whichever comes first, so
# that large images never make a row group (the unit of memory here and of work in clean) huge.
_ROW_GROUP_BYTES = 32 * _MiB


class ShardWriter:
    """Streams rows into ~``shard_bytes`` shards, one row group at a time.

    Rows are cut into row groups (``row_group_rows`` rows or ``_ROW_GROUP_BYTES``); each
    row group is hashed and made a table in a pool thread (hashlib and Arrow release the
    GIL), at most ``write_workers`` at once, and appended to the open shard in order. A
    shard is committed when its members (header and path counted, as for
    ``max_total_bytes``) reach ``shard_bytes``. Memory holds at most ``write_workers + 2``
    row groups, whatever ``shard_bytes`` and the number of members.
    """

    def __init__(self, out: OutputWriter, *, shard_bytes: int, row_group_rows: int, write_workers: int) -> None:
        self._out = out
        self._limits = (shard_bytes, row_group_rows, write_workers)
        self._pool = ThreadPoolExecutor(write_workers, thread_name_prefix="imgpipe-shard")
        self._pending: deque[Future[pa.Table]] = deque()
        self._rows: list[Row] = []
        self._group_bytes = 0
        self._shard_bytes = 0
        self._shard: tuple[contextlib.ExitStack, writer.ParquetSink] | None = None
        self.shards = 0

    def add(self, member: Member, data: bytes) -> None:
        """Queues one member's row (its path, label, split and change token with ``data``)."""
        self._rows.append(Row(member.path, data, member.label, member.split, member.etag))
        self._group_bytes += len(data)
        # Header and path count too: a million empty members must still cut shards.
        self._shard_bytes += member.header_bytes + len(data)
        shard_bytes, row_group_rows, _ = self._limits
        shard_full = self._shard_bytes >= shard_bytes
        if shard_full or len(self._rows) >= row_group_rows or self._group_bytes >= _ROW_GROUP_BYTES:
            self._submit(end_of_shard=shard_full)

    def _submit(self, end_of_shard: bool) -> None:
        if self._rows:
            self._pending.append(self._pool.submit(shard_table, self._rows))
            self._rows, self._group_bytes = [], 0
        if end_of_shard:
            self._pending.append(_END_OF_SHARD)
            self._shard_bytes = 0
        while len(self._pending) > self._limits[2]:
            self._write_next()

    def _write_next(self) -> None:
        head = self._pending.popleft()
        if head is _END_OF_SHARD:
            self._close_shard()
            return
        table = head.result()
        if self._shard is None:
            stack = contextlib.ExitStack()
            name = f"part-{self.shards:05d}.parquet"
            self.shards += 1
            # The contract's Parquet defaults leave the bytes column uncompressed, without
            # dictionary pages or statistics.
            self._shard = (stack, stack.enter_context(self._out.parquet_file(name, SHARD_SCHEMA)))
        self._shard[1].write(table)

    def _close_shard(self) -> None:
        if self._shard is not None:
            stack, self._shard = self._shard[0], None
            stack.close()  # commits the object and records it on the OutputWriter

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        """Writes the last rows and shard and waits for every write; re-raises the first failure."""
        self._submit(end_of_shard=True)
        while self._pending:
            self._write_next()
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drops queued work and the open shard (uncommitted)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._shard is not None:
            stack, self._shard = self._shard[0], None
            try:
                raise RuntimeError("download aborted")
            except RuntimeError as exc:
                # Handing an exception to storage.open_write drops the unfinished object.
                stack.__exit__(type(exc), exc, exc.__traceback__)


# Marks where a shard ends in _ShardWriter's queue of row groups.
_END_OF_SHARD: Any = object()
