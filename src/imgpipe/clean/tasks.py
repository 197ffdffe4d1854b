"""A clean decode task: some row groups of the input (Task, make_tasks) and what it settled (TaskResult, built by ResultBuilder).

    tasks = make_tasks(units, workers)
    builder = ResultBuilder()       # in the worker: builder.settled(row, shard) or .failed(row, reason, detail)
    result = builder.build()        # arrays, sent back to the step

:mod:`imgpipe.clean.pool` runs tasks; :func:`imgpipe.clean.decode.validate_task` is what each one does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgpipe.clean.plan import Unit
from imgpipe.clean.quality import METRICS, Measures

__all__ = ["TaskResult", "ResultBuilder", "Task", "make_tasks"]


@dataclass(frozen=True)
class TaskResult:
    """What tasks settled: arrays with an entry per row, and the failures alone as objects.

    Attributes:
        rows: Index positions of the rows settled.
        shard: The output shard each row was written to; -1 when it was not written
            (a failure, or a row the plan does not place).
        boxed: Whether the row was written with a head box.
        failures: ``(reason code, detail)`` of each row that did not decode, by row.
        phash: The row's 64-bit perceptual hash (:mod:`imgpipe.clean.quality`); 0 where
            it was not written.
        phash_mirror: The perceptual hash of the row's image mirrored.
        metrics: ``rows x len(METRICS)`` quality measures (float32); NaN where not written.
    """

    rows: np.ndarray
    shard: np.ndarray
    boxed: np.ndarray
    failures: dict[int, tuple[str, str]]
    phash: np.ndarray
    phash_mirror: np.ndarray
    metrics: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def failed(cls, row: int, reason: str, detail: str) -> TaskResult:
        """The result of one row that failed."""
        builder = ResultBuilder()
        builder.failed(row, reason, detail)
        return builder.build()

    @classmethod
    def concat(cls, parts: Sequence[TaskResult]) -> TaskResult:
        """All of ``parts``, in their order."""
        failures: dict[int, tuple[str, str]] = {}
        for part in parts:
            failures.update(part.failures)
        return cls(
            np.concatenate([p.rows for p in parts] or [np.zeros(0, np.int64)]),
            np.concatenate([p.shard for p in parts] or [np.zeros(0, np.int32)]),
            np.concatenate([p.boxed for p in parts] or [np.zeros(0, bool)]),
            failures,
            np.concatenate([p.phash for p in parts] or [np.zeros(0, np.uint64)]),
            np.concatenate([p.phash_mirror for p in parts] or [np.zeros(0, np.uint64)]),
            np.concatenate([p.metrics for p in parts] or [np.zeros((0, len(METRICS)), np.float32)]),
        )


class ResultBuilder:
    """Collects a task's outcomes row by row (a task's rows: bounded by its row groups)."""

    def __init__(self) -> None:
        self._rows: list[int] = []
        self._shard: list[int] = []
        self._boxed: list[bool] = []
        self._failures: dict[int, tuple[str, str]] = {}
        self._hashes: list[tuple[int, int]] = []
        self._metrics: list[np.ndarray] = []

    def settled(self, row: int, shard: int = -1, boxed: bool = False, measures: Measures | None = None) -> None:
        """A row that decoded: written to ``shard`` with its ``measures``, or -1 when the plan does not place it."""
        self._rows.append(row)
        self._shard.append(shard)
        self._boxed.append(boxed)
        if measures is None:
            self._hashes.append((0, 0))
            self._metrics.append(_NO_METRICS)
        else:
            self._hashes.append((measures.phash, measures.phash_mirror))
            self._metrics.append(measures.metrics)

    def failed(self, row: int, reason: str, detail: str) -> None:
        self.settled(row)
        self._failures[row] = (reason, detail)

    def build(self) -> TaskResult:
        hashes = np.array(self._hashes, np.uint64).reshape(-1, 2)
        return TaskResult(
            np.array(self._rows, np.int64),
            np.array(self._shard, np.int32),
            np.array(self._boxed, bool),
            self._failures,
            hashes[:, 0].copy(),
            hashes[:, 1].copy(),
            np.array(self._metrics, np.float32).reshape(-1, len(METRICS)),
        )


_NO_METRICS = np.full(len(METRICS), np.nan, np.float32)


@dataclass(frozen=True)
class Task:
    """One unit of pool work: some row groups of the download output.

    Attributes:
        index: Names the task's bucket and marker files.
        units: The row groups to read.
        rows: Rows it will decode (for progress).
        only: Decode just this row (a suspect re-run alone).
        skip: Rows already settled by a re-run alone.
    """

    index: int
    units: tuple[Unit, ...]
    rows: int
    only: int | None = None
    skip: frozenset[int] = frozenset()

    def wants(self, row: int) -> bool:
        return (self.only is None or row == self.only) and row not in self.skip


def make_tasks(units: Sequence[Unit], workers: int) -> list[Task]:
    """Groups row groups into tasks: enough for load balance, few enough to bound bucket files.

    Bucket files number tasks x output shards, so tasks are capped at 8 per worker; at
    least 2 per worker keep both busy until the end.
    """
    total = sum(unit.rows for unit in units)
    count = max(1, min(len(units), max(2 * workers, min(8 * workers, math.ceil(total / 256)))))
    target = math.ceil(total / count) if total else 1
    tasks: list[Task] = []
    current: list[Unit] = []
    rows = 0
    for unit in units:
        current.append(unit)
        rows += unit.rows
        if rows >= target:
            tasks.append(Task(len(tasks), tuple(current), rows))
            current, rows = [], 0
    if current:
        tasks.append(Task(len(tasks), tuple(current), rows))
    return tasks
