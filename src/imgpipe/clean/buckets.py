"""The files a clean decode task leaves on local disk: a bucket of rows per output shard, and a marker naming the row it is decoding.

    marker = Marker(bucket_dir, task)
    with marker.naming(row, member):
        ...                                  # decode; the pool reads the marker if the worker dies
    rows = read_bucket(bucket_path(bucket_dir, shard, task))

:mod:`imgpipe.clean.pool` reads markers to kill overdue decodes and to find the image a dead worker was on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

__all__ = ["BUCKET_SUFFIX", "bucket_path", "read_bucket", "drop_buckets", "marker_path", "Marker", "read_marker", "take_suspect"]

BUCKET_SUFFIX = ".arrow"


def bucket_path(bucket_dir: str | Path, shard: int, task: int) -> Path:
    """Local file holding one task's rows for one output shard.

    Buckets are Arrow IPC files, not Parquet: the step maps them into memory and reads
    them without decoding or copying, and the workers spend no time encoding them.
    """
    return Path(bucket_dir) / f"shard-{shard:05d}" / f"task-{task:05d}{BUCKET_SUFFIX}"


def read_bucket(path: Path) -> pa.Table:
    """A bucket file's rows, memory-mapped (no copy until they are reordered)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def drop_buckets(bucket_dir: str | Path, task: int) -> None:
    """Removes a task's bucket files: a killed task leaves unfinished ones."""
    for path in Path(bucket_dir).glob(f"shard-*/{bucket_path(bucket_dir, 0, task).name}"):
        path.unlink()


def marker_path(bucket_dir: str | Path, task: int) -> Path:
    return Path(bucket_dir) / "decoding" / f"task-{task:05d}"


class Marker:
    """A file naming the row a task is decoding right now (position and path); empty between decodes.

    Two system calls per image and no sync: the page cache outlives a killed process, so
    the step reads what the worker last wrote.
    """

    def __init__(self, bucket_dir: str | Path, task: int) -> None:
        path = marker_path(bucket_dir, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # at rest: a spill of decoded rows (data), 0600

    @contextlib.contextmanager
    def naming(self, row: int, member: str) -> Iterator[None]:
        # The pid first: the step kills the process whose decode overran (the watchdog).
        os.pwrite(self._fd, f"{os.getpid()} {row} {member}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        os.close(self._fd)


def read_marker(text: str) -> tuple[int, int, str] | None:
    """``(pid, row, path)`` of a marker's text, ``None`` when it is empty or cut short."""
    pid, row, member = (text.split(" ", 2) + ["", ""])[:3]
    if not member or not pid.isdigit() or not row.isdigit():
        return None
    return int(pid), int(row), member


def take_suspect(bucket_dir: str | Path, task: int) -> tuple[int, str] | None:
    """The row and path a task's marker names (being decoded when its worker died), once.

    The marker is removed: should the task not start again before the next pool breaks,
    it must not name a member that is settled already.
    """
    path = marker_path(bucket_dir, task)
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:  # the task never started
        return None
    path.unlink()
    named = read_marker(text)
    return None if named is None else named[1:]
