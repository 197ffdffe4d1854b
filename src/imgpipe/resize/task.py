"""One resize task: read a run of clean's row groups, resize them, write its own output files.

The task is the unit of work the resize step hands to Ray Data or to its local process
pool (:mod:`imgpipe.resize.executor`), which run this same function. It reads the row
groups it is given, resizes them ``batch_size`` rows at a time
(:func:`imgpipe.resize.ops.resize_batch`), and streams the good rows straight into the
step's output prefix, one file per split (more when a split's file reaches
``rows_per_shard`` rows or its ``order`` goes back), each hashed as it is written. It
returns only what the driver needs to commit: each file's manifest entry, the rows it
could not resize as rejects, how many rows it read, and the fixed-size statistics of the
rows it wrote (:mod:`imgpipe.resize.statistics`: counts, pixel sums, size histograms)
(:class:`TaskResult`). No pixel goes back to the driver.

Names: ``SPLIT/part-TTTTT-KKK.a<attempt>.parquet``, ``TTTTT`` the task's index in the
step's plan, ``KKK`` the file's index within the task and split, and the attempt id of the
step's claim (:func:`imgpipe.writer.attempt_name`). A retried task (a worker lost) writes
the same names with the same bytes; a task of an overtaken attempt writes names no
manifest of the new attempt lists. Every object is committed only when complete
(:func:`imgpipe.writer.stream_parquet`), so a killed task leaves nothing readable.

Memory of a task: one input row group, one batch of resized rows, and per split at most
one row group (``row_group_rows``) waiting to be written, plus the rejects of its own rows
and the statistics' sums (a few hundred bytes per split and class).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgpipe import storage, writer
from imgpipe.contract import FileEntry, Reject
from imgpipe.resize.ops import resize_batch
from imgpipe.resize.spec import ResizeSpec
from imgpipe.resize.statistics import DatasetStatistics

__all__ = [
    "READ_COLUMNS",
    "TaskOutput",
    "TaskResult",
    "read_row_group",
    "table_to_batch",
    "split_results",
    "SplitFiles",
    "resized_batches",
    "run_task",
]

# bbox is optional (no step writes it yet); it feeds roi_crop when present. width and height
# (the source's, clean's columns) feed the statistics' size histograms only.
READ_COLUMNS = ("path", "image", "label", "label_name", "split", "order", "sha256", "bbox", "width", "height")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TaskOutput:
    """Where and how every task of one attempt writes (the same for all its tasks).

    Attributes:
        dest: The step's output prefix.
        attempt: The id of the step's claim on ``dest``.
        schema: The data files' schema (with the class names as ``datasets`` features).
        rows_per_shard: Rows per file at most.
        row_group_rows: Rows per Parquet row group.
    """

    dest: str
    attempt: str
    schema: pa.Schema
    rows_per_shard: int
    row_group_rows: int


@dataclass
class TaskResult:
    """What a task returns to the driver: metadata only.

    Attributes:
        task: The task's index in the step's plan.
        rows: Input rows it read (each is in one of ``files`` or in ``rejects``).
        files: Manifest entries of the files it wrote.
        rejects: Rows it could not resize, with the reason.
        node: The Ray node it ran on; ``local-pool`` on the step's process pool
            (:data:`imgpipe.resize.executor.POOL_NODE`), ``""`` called directly.
        statistics: The statistics of the rows in ``files`` (:meth:`DatasetStatistics.to_dict`).
    """

    task: int
    rows: int = 0
    files: list[FileEntry] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    node: str = ""
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (how a Ray task hands it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> TaskResult:
        """The inverse of :meth:`to_dict`."""
        return cls(
            task=int(value["task"]),
            rows=int(value["rows"]),
            files=[FileEntry(**f) for f in value["files"]],
            rejects=[Reject(**r) for r in value["rejects"]],
            node=str(value.get("node", "")),
            statistics=dict(value.get("statistics") or {}),
        )


def read_row_group(filesystem: Any, path: str, row_group: int) -> pa.Table:
    """Reads the resize inputs (clean's columns, ``bbox`` if present) of one row group."""

    def read() -> pa.Table:
        with filesystem.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in READ_COLUMNS if c in pf.schema_arrow.names]
            return pf.read_row_group(row_group, columns=columns)

    return storage.with_retries(read, attempts=3, describe=f"reading row group {row_group} of {path}")


def table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands one to a batch function: nested cells as Python objects."""
    batch: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            batch[name] = column.to_numpy()
        else:
            cells = np.empty(len(column), dtype=object)
            for i, value in enumerate(column.to_pylist()):
                cells[i] = value
            batch[name] = cells
    return batch


def split_results(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, list[Reject]]:
    """Separates good rows (cast to the output schema) from error rows (as rejects)."""
    failed = pc.not_equal(table.column("error_reason"), "")
    good = table.select(schema.names)
    if not pc.any(failed).as_py():  # the usual batch: keep its pixels where they are, no copy
        return good.cast(schema), []
    rejects = [
        Reject(path=r["path"], reason=r["error_reason"], detail=r["error_detail"] or "")
        for r in table.select(["path", "error_reason", "error_detail"]).filter(failed).to_pylist()
    ]
    return good.filter(pc.invert(failed)).cast(schema), rejects


@dataclass
class _Stream:
    """One split's rows waiting for a row group, and its open file."""

    split: str
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    file: tuple[contextlib.ExitStack, writer.ParquetSink] | None = None
    last_order: int = -1
    files: int = 0


class SplitFiles:
    """Streams one task's rows into files per split, each sorted by ``order``.

    Holds at most about one row group per split. A file is committed when it reaches
    ``rows_per_shard`` rows, when a split's ``order`` goes back (a new file keeps every
    file sorted), or at the end; on an exception the open files are dropped uncommitted.
    ``entries`` lists what was committed.
    """

    def __init__(self, out: TaskOutput, task: int) -> None:
        self.out = out
        self.task = task
        self.row_group_rows = min(out.row_group_rows, out.rows_per_shard)
        self.streams: dict[str, _Stream] = {}
        self.entries: list[FileEntry] = []

    def __enter__(self) -> SplitFiles:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._abort(exc_type, exc, tb)
            return
        try:
            for stream in self.streams.values():
                self._drain(stream, final=True)
                self._close(stream)
        except BaseException as err:
            self._abort(type(err), err, err.__traceback__)
            raise

    def _abort(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for stream in self.streams.values():
            if stream.file is not None:
                # Handing the exception to storage.open_write drops the unfinished object.
                stream.file[0].__exit__(exc_type, exc, tb)
                stream.file = None

    def add(self, table: pa.Table) -> None:
        """Queues rows (of any splits) and writes every full row group."""
        splits = table.column("split")
        names = pc.unique(splits).to_pylist()
        for split in names:
            if not isinstance(split, str) or not _SAFE_NAME.fullmatch(split) or split in (".", ".."):
                raise ValueError(f"split value {split!r} cannot name an output folder")
            # Clean writes one split per file, so a batch is normally one split: no copy.
            part = table if len(names) == 1 else table.filter(pc.equal(splits, split))
            stream = self.streams.setdefault(split, _Stream(split))
            stream.pending.append(part)
            stream.pending_rows += part.num_rows
            if stream.pending_rows >= self.row_group_rows:
                self._drain(stream, final=False)

    def _open(self, stream: _Stream) -> tuple[contextlib.ExitStack, writer.ParquetSink]:
        name = writer.attempt_name(f"{stream.split}/part-{self.task:05d}-{stream.files:03d}.parquet", self.out.attempt)
        stream.files += 1
        stack = contextlib.ExitStack()
        order = [pq.SortingColumn(self.out.schema.get_field_index("order"))]  # for readers
        sink = stack.enter_context(writer.stream_parquet(self.out.dest, name, self.out.schema, sorting_columns=order))
        return stack, sink

    def _close(self, stream: _Stream) -> None:
        if stream.file is None:
            return
        stack, sink = stream.file
        stream.file = None
        stack.close()  # commits the object
        assert sink.entry is not None
        self.entries.append(sink.entry)

    def _drain(self, stream: _Stream, final: bool) -> None:
        if not stream.pending:
            return
        table = pa.concat_tables(stream.pending)
        order = table.column("order").to_numpy()
        if len(order) > 1 and (order[1:] < order[:-1]).any():
            # Clean's row groups are sorted; rows out of order only come from hand-made inputs.
            table = table.sort_by("order")
        stream.pending, stream.pending_rows = [], 0
        while table.num_rows >= self.row_group_rows or (final and table.num_rows):
            first = table.column("order")[0].as_py()
            if stream.file is not None and first <= stream.last_order:
                self._close(stream)  # out-of-order input: a new file keeps every file sorted
            if stream.file is None:
                stream.file = self._open(stream)
            sink = stream.file[1]
            n = min(self.row_group_rows, self.out.rows_per_shard - sink.rows, table.num_rows)
            chunk = table.slice(0, n)
            sink.write(chunk, row_group_size=n)
            stream.last_order = chunk.column("order")[n - 1].as_py()
            table = table.slice(n)
            if sink.rows >= self.out.rows_per_shard:
                self._close(stream)
        if table.num_rows:
            stream.pending, stream.pending_rows = [table], table.num_rows


def _observer(batch: Mapping[str, np.ndarray], statistics: DatasetStatistics) -> Callable[[int, np.ndarray], None]:
    """What :func:`resize_batch` calls for each good row of ``batch``: counts it in ``statistics``."""
    n = len(batch["path"])
    splits = batch.get("split", np.full(n, "", dtype=object))
    labels = batch.get("label", np.zeros(n, np.int64))
    widths, heights = batch.get("width"), batch.get("height")

    def side(values: np.ndarray | None, i: int) -> int | None:
        # A hand-made input may lack the column, or hold nulls (NaN once in a NumPy array).
        value = None if values is None else values[i]
        return int(value) if value is not None and np.isfinite(value) else None

    def observe(i: int, pixels: np.ndarray) -> None:
        statistics.add(str(splits[i]), int(labels[i]), side(widths, i), side(heights, i), pixels)

    return observe


def resized_batches(
    units: Sequence[tuple[str, int]],
    spec: ResizeSpec,
    batch_size: int,
    split_specs: Mapping[str, ResizeSpec] | None = None,
    statistics: DatasetStatistics | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Reads the row groups ``units`` (file URI, row group) in order and resizes them ``batch_size`` rows at a time.

    With ``statistics``, every row resized without error is counted in it (by its ``split``).
    """
    for uri, row_group in units:
        filesystem, path = storage.arrow_filesystem(str(uri))
        table = read_row_group(filesystem, path, int(row_group))
        for start in range(0, table.num_rows, batch_size):
            batch = table_to_batch(table.slice(start, batch_size))
            observe = None if statistics is None else _observer(batch, statistics)
            yield resize_batch(batch, spec, split_specs, observe)


def run_task(
    task: int,
    units: Sequence[tuple[str, int]],
    *,
    spec: ResizeSpec,
    split_specs: Mapping[str, ResizeSpec] | None,
    batch_size: int,
    out: TaskOutput,
    settings: storage.Settings,
    node: str = "",
) -> TaskResult:
    """Resizes the row groups ``units`` and writes the good rows into ``out.dest``; returns metadata.

    Args:
        task: The task's index in the step's plan (it names the files).
        units: ``(file URI, row group)`` pairs, neighbours in clean's order.
        spec: The per-image settings of every split without its own.
        split_specs: Splits with other settings (``train`` with ``train_mode``).
        batch_size: Rows resized at a time.
        out: Where and how the files are written.
        settings: The driver's storage settings (endpoints); credentials are the worker's own.
        node: Where it runs, for the manifest.

    Returns:
        The task's files, rejects, rows read and the statistics of the rows written.
    """
    storage.use_settings(settings)
    result = TaskResult(task=task, node=node)
    statistics = DatasetStatistics()
    with SplitFiles(out, task) as files:
        for batch in resized_batches(units, spec, batch_size, split_specs, statistics):
            good, bad = split_results(pa.table(batch), out.schema)
            files.add(good)
            result.rejects.extend(bad)
            result.rows += len(batch["path"])
    result.files = files.entries
    result.statistics = statistics.to_dict()
    return result
