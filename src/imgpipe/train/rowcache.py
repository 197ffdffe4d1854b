"""The loader's row cache: row groups kept in memory as they were read, up to a byte budget.

    cache = RowCache(limit_bytes=8 * 2**30)
    table = cache.get(key)                       # None: not kept
    table = cache.put(key, pf.read_row_group(i)) # kept while the budget allows

Parquet's reader copies every value out of its pages on every read, each epoch again (for
raw pixels, about a third of a loader thread's time). A row group the cache holds is read
once: in later epochs its rows are views of the table kept, as FFCV's rows are views of its
memory-mapped ``.beton``. Nothing is evicted: an epoch visits every row group in a random
order, so a cache smaller than the split keeps the first groups it was given (those it saves
a read of in every later epoch) rather than churning. The budget bounds what the cache adds
to the process's memory; a copy of it made in a worker process (``processes`` engine)
starts empty with the same budget. :func:`cache_budget` cuts a budget to half the memory
the process may use (a run's ``loader_cache_gb`` is untrusted).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import Any

from imgpipe import resources

__all__ = ["RowCache", "cache_budget"]

log = logging.getLogger(__name__)


class RowCache:
    """Row groups (Arrow tables) by key, up to ``limit_bytes`` of them (module docstring)."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
        self.limit_bytes = int(limit_bytes)
        self.used_bytes = 0
        self._tables: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:
        return (RowCache, (self.limit_bytes,))  # a worker process starts empty

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, key: Hashable) -> Any | None:
        """The table kept under ``key``, or ``None``."""
        return self._tables.get(key)

    def put(self, key: Hashable, table: Any) -> Any:
        """Keeps ``table`` (a ``pyarrow.Table``) under ``key`` if the budget allows; returns it either way."""
        size = table.nbytes
        with self._lock:
            if key not in self._tables and self.used_bytes + size <= self.limit_bytes:
                self._tables[key] = table
                self.used_bytes += size
        return table

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.used_bytes = 0


def cache_budget(asked: int) -> int:
    """``asked`` bytes of row cache, at most half the memory this process may use (a run's setting is untrusted)."""
    usable = resources.usable_memory()
    if asked and usable is not None and asked > usable // 2:
        log.warning(
            "loader: a row cache of %.1f GiB is more than half the %.1f GiB this process may use; keeping %.1f GiB"
            " (lower loader_cache_gb, or give the pod more memory)",
            asked / 2**30,
            usable / 2**30,
            usable // 2 / 2**30,
        )
        return usable // 2
    return asked
