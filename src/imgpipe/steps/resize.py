"""The resize step: clean's images to training inputs of a model's size, on Ray Data.

Reads a committed clean output and runs :func:`imgpipe.resize.ops.resize_batch` over
it with ``Dataset.map_batches``: one work item per Parquet row group of the files the
manifest lists, runs of neighbouring items per task (:func:`task_count`), read inside
Ray tasks (``concurrency`` at a time) through the
``pyarrow.fs`` file system :mod:`imgpipe.storage` builds, so ``file://`` and ``s3://``
sources work alike. Results stream back to the driver with ``iter_batches`` and are
written through :class:`~imgpipe.contract.OutputWriter`, so the output keeps the same
contract as every other step (data files, ``rejects.parquet``, ``config.yaml``,
``manifest.json``, ``_SUCCESS``; ``inputs == outputs + rejected``). A row that cannot
be resized becomes a reject, never a failed run.

Output layout, one folder per split, each file sorted by ``order``::

    DEST/train/part-00000.parquet   path, label, label_name, split, order, sha256,
    DEST/train/part-00001.parquet   height, width, channels, pixels | image
    DEST/val/part-00000.parquet
    DEST/labels.json                (copied from clean)

Each row carries its own ``height``, ``width`` and ``channels``: every mode but
``whole`` makes them ``size x size``; ``whole`` keeps each picture's aspect, so its rows
vary. ``train_mode`` gives the ``train`` split its own mode (``whole`` for training
crops over the whole picture, while ``val``/``test`` keep ``mode``), chosen per row in
the same pass; the manifest's ``extra.split_modes`` says which mode each split holds.

``format='raw'`` stores ``pixels``: the ``height x width x channels`` uint8 array as
bytes, readable with plain pyarrow and ``np.frombuffer(...).reshape(h, w, c)``;
``format='jpeg'`` stores ``image`` as clean does, a ``{bytes, path}`` struct. Either way the
schema carries clean's class names as Hugging Face ``datasets`` features
(:func:`output_schema`): ``datasets`` reads ``label`` as a ``ClassLabel``, ``image`` as an
``Image``, ``pixels`` as plain bytes, and names the ``val`` folder's split ``validation``.
Folders are plain names, not ``split=train`` (hive style): the files also hold a
``split`` column, and pyarrow refuses a dataset whose partition key repeats a column.

Ray Data runs with ``preserve_order`` on, so rows come back in the manifest's order.
clean writes its shuffled ``order`` in ascending runs, so each split's rows arrive
ascending and stream into row groups as they come, with the driver holding at most
one row group per split. Should an input ever arrive out of order, the writer starts
a new file instead of breaking the sort. A re-run writes byte-identical data files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgpipe import contract, resources, storage
from imgpipe.contract import OutputWriter, Reject, StepReport
from imgpipe.phases import PhaseLog
from imgpipe.remote.targets import check_allowed
from imgpipe.resize.ops import resize_batch

# The settings are OpenCV-free (imgpipe.resize.spec) so the pipeline compiles without OpenCV.
from imgpipe.resize.spec import ResizeConfig, ResizeSpec

__all__ = [
    "OUTPUT_COLUMNS",
    "LABELS_FILE",
    "output_schema",
    "read_pixels",
    "list_row_groups",
    "task_count",
    "read_row_group",
    "table_to_batch",
    "resize_row_groups",
    "task_arguments",
    "resize",
]

log = logging.getLogger(__name__)

LABELS_FILE = contract.LABELS
_META_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    contract.LABEL_FIELD,
    pa.field("label_name", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("order", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("channels", pa.int32(), nullable=False),
]
OUTPUT_COLUMNS = {
    "raw": tuple(f.name for f in _META_FIELDS) + ("pixels",),
    "jpeg": tuple(f.name for f in _META_FIELDS) + ("image",),
}
# bbox is optional (no step writes it yet); it feeds roi_crop when present.
_READ_COLUMNS = ("path", "image", "label", "label_name", "split", "order", "sha256", "bbox")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def output_schema(fmt: Literal["raw", "jpeg"], classes: Sequence[str] | None = None) -> pa.Schema:
    """The Parquet schema of the data files for output format ``fmt``.

    Args:
        fmt: ``raw`` (``pixels``) or ``jpeg`` (``image``).
        classes: Class names in label order; when given, the schema carries them as
            ``datasets`` features (:func:`imgpipe.contract.with_hf_features`): ``label`` a
            ``ClassLabel``, ``image`` an ``Image``, raw ``pixels`` plain bytes.
    """
    if fmt == "raw":
        schema = pa.schema([*_META_FIELDS, pa.field("pixels", pa.binary(), nullable=False)])
    else:
        schema = pa.schema([*_META_FIELDS, contract.IMAGE_FIELD])
    return schema if classes is None else contract.with_hf_features(schema, classes)


def read_pixels(row: dict[str, Any]) -> np.ndarray:
    """The ``height x width x channels`` uint8 array of one raw output row (a dict)."""
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], row["channels"])


# ----------------------------------------------------------------------------------------
# Ray session and Data context.


@contextlib.contextmanager
def _ray_session(cfg: ResizeConfig) -> Iterator[Any]:
    """Uses a running Ray, or starts/joins one and shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    with contextlib.ExitStack() as stack:
        if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
            # A cluster's address, or inside a Ray job (RAY_ADDRESS set): join the cluster;
            # shutting down then only disconnects.
            ray.init(address=cfg.ray_address or None)
            stack.callback(ray.shutdown)
        else:
            # Ray ties its daemons to this driver, but their children (agents, busy
            # workers) outlive a kill -9 of the step by minutes: a reaper ends them.
            stack.enter_context(resources.reaped_with_me())
            cpus = resources.available_cpus()
            ray.init(num_cpus=cpus, include_dashboard=False)
            stack.callback(_shut_down_local_ray, ray)  # runs before the reaper is dismissed
            _warm_workers(ray, cpus)
        yield ray


def _warm_worker() -> None:
    """A task that imports what the resize tasks need (Ray Data, OpenCV), for its worker."""
    import ray.data  # noqa: F401

    from imgpipe.resize import ops as resize_ops  # noqa: F401


def _warm_workers(ray: Any, cpus: int) -> None:
    """Starts one :func:`_warm_worker` task per CPU (``cpus``) of the local Ray just started, unwaited.

    Ray Data's first execution gives the workers Ray pre-starts (one per CPU) to its two
    bookkeeping actors (``_StatsActor``, ``_AutoscalingCoordinatorActor``), so the resize
    tasks wait for new workers, which then import Ray Data and OpenCV: about 1.6 s to the
    first batch on 2 cores, even on a Ray that has been up for seconds (ray 2.60.0; the
    raylet's log shows the task workers started only when the execution began). Started
    here, that start-up overlaps the driver's own imports and planning, and Ray reuses
    these workers for the job's tasks. Cold ``imgpipe resize`` of 300 images, 10
    alternating runs each: median 8.10 s without, 7.70 s with (docs/benchmarks.md).
    """
    task = ray.remote(num_cpus=TASK_CPUS)(_warm_worker)
    for _ in range(cpus):
        task.remote()


def _shut_down_local_ray(ray: Any) -> None:
    """Shuts down the local Ray this step started, without waiting out its autoscaler monitor.

    ``ray.shutdown()`` stops the local processes one after another, each with a SIGTERM and
    up to 1 s before a SIGKILL (ray 2.60.0, ``python/ray/_private/node.py``,
    ``Node.kill_all_processes`` and ``_kill_process_impl``). The autoscaler's monitor does
    not exit on SIGTERM, so it takes that whole second: 1.02 s of a 1.46 s shutdown here.
    A local Ray has nothing to autoscale, and the step's work is done, so the monitor is
    killed first. Should Ray's internals move, this is a plain ``ray.shutdown()``.
    """
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    for info in getattr(node, "all_processes", {}).get("monitor", ()):  # ray_constants.PROCESS_TYPE_MONITOR
        with contextlib.suppress(OSError):
            info.process.kill()
    ray.shutdown()


@contextlib.contextmanager
def _data_context(cfg: ResizeConfig) -> Iterator[Any]:
    """Sets the Ray Data options this step needs, and restores them afterwards.

    A Dataset copies the current DataContext when it is created, so the options are
    set before the dataset is built; restoring keeps a long-lived driver (a notebook,
    the test session) from inheriting them.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    options = {
        "enable_progress_bars": cfg.progress_bars,
        "enable_operator_progress_bars": cfg.progress_bars,
        "execution_no_progress_timeout_s": cfg.no_progress_timeout_s,
        # Errors are per row (error rows); a failed block is a bug and must fail the run.
        "max_errored_blocks": 0,
    }
    saved = {name: getattr(ctx, name) for name in options}
    saved_order = ctx.execution_options.preserve_order
    for name, value in options.items():
        setattr(ctx, name, value)
    # Keeps clean's file order, so split files stream out sorted and re-runs are identical.
    ctx.execution_options.preserve_order = True
    try:
        yield ctx
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.preserve_order = saved_order


# Fractional, so that one task per CPU still leaves a sliver for any other task Ray Data
# schedules; on 2 cores, CPUs - 1 ran a single resize task and left a core idle.
TASK_CPUS = 0.9


def _task_concurrency(ray: Any, cfg: ResizeConfig) -> int:
    if cfg.concurrency:
        return cfg.concurrency
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def list_row_groups(files: Sequence[str]) -> list[dict[str, Any]]:
    """One work item per Parquet row group of ``files``, in file order.

    Items are ``{"file": URI, "row_group", "rows", "bytes"}`` (``bytes``: the group's
    uncompressed size, the measure of its work): plain data. A task builds its own
    file system from the URI (:func:`resize_row_groups`), so no credential travels in
    a task's arguments: workers read with the credentials of their own environment.
    """
    items: list[dict[str, Any]] = []
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
        items.extend(
            {"file": uri, "row_group": rg, "rows": meta.row_group(rg).num_rows, "bytes": meta.row_group(rg).total_byte_size}
            for rg in range(meta.num_row_groups)
        )
    return items


# Ray Data's executor sees that a task has finished only at its next ray.wait() round, up to
# 0.1 s later (ray 2.60.0, python/ray/data/_internal/execution/streaming_executor_state.py,
# WAIT_FOR_TASK_COMPLETION_TIMEOUT_S), and every task opens its file first. With one task per
# row group of clean's default 128 rows, the CPUs sat idle for about a third of the run on
# 2 cores (docs/benchmarks.md). So a task takes a run of neighbouring row groups: still
# TASKS_PER_SLOT tasks per concurrent slot, which keeps the last round short, and about
# MAX_TASK_BYTES of input at most, so that a retried task redoes little.
TASKS_PER_SLOT = 4
MAX_TASK_BYTES = 256 * 1024 * 1024


def task_count(items: Sequence[Mapping[str, Any]], slots: int) -> int:
    """How many Ray tasks share ``items`` (:func:`list_row_groups`) among ``slots`` at once.

    Returns:
        At least one task, at most one per row group: ``TASKS_PER_SLOT`` per slot, or
        more where the input exceeds ``MAX_TASK_BYTES`` per task.

    Raises:
        ValueError: If ``slots`` is below 1.
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    total = sum(int(item["bytes"]) for item in items)
    wanted = max(slots * TASKS_PER_SLOT, math.ceil(total / MAX_TASK_BYTES))
    return max(1, min(len(items), wanted))


def read_row_group(filesystem: Any, path: str, row_group: int) -> pa.Table:
    """Reads the resize inputs (clean's columns, ``bbox`` if present) of one row group."""

    def read() -> pa.Table:
        with filesystem.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in _READ_COLUMNS if c in pf.schema_arrow.names]
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


def resize_row_groups(
    items: dict[str, np.ndarray],
    spec: ResizeSpec,
    batch_size: int,
    settings: storage.Settings,
    split_specs: Mapping[str, ResizeSpec] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray task body: reads the listed row groups and resizes them ``batch_size`` rows at a time.

    A generator, so Ray Data stores each resized batch as it comes and a task never
    holds more than one row group of inputs plus one batch of outputs. The file system
    is made here, with the driver's endpoint settings (``s3``) and the worker's own
    credentials. ``split_specs`` gives some splits other settings (see :func:`resize_batch`).
    """
    storage.use_settings(settings)
    node = _node_id()
    for uri, row_group in zip(items["file"], items["row_group"]):
        filesystem, path = storage.arrow_filesystem(str(uri))
        table = read_row_group(filesystem, path, int(row_group))
        for start in range(0, table.num_rows, batch_size):
            out = resize_batch(table_to_batch(table.slice(start, batch_size)), spec, split_specs)
            out[NODE_COLUMN] = np.full(len(out["path"]), node, dtype=object)
            yield out


# The Ray node that resized a row: driver-side bookkeeping (manifest extra.ray_nodes), never written.
NODE_COLUMN = "_ray_node"


def _node_id() -> str:
    """The Ray node this task runs on ("" outside Ray), shortened as Ray's CLI shows node ids."""
    import ray

    return ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else ""


def task_arguments(cfg: ResizeConfig) -> dict[str, Any]:
    """What every resize task gets besides its items: settings only, never credentials."""
    return {"spec": cfg.spec, "split_specs": cfg.split_specs, "batch_size": cfg.batch_size, "settings": storage.settings()}


def _build_dataset(ray: Any, files: Sequence[str], cfg: ResizeConfig) -> tuple[Any, int]:
    items = list_row_groups(files)
    # Row groups are read by our own tasks rather than ray.data.read_parquet: Ray Data
    # 2.60 resolves read_parquet's paths in 8 threads that each import
    # fsspec.implementations.http; without aiohttp (ray[data] does not install it) two
    # threads failing that import at once can raise "ImportError: cannot import name
    # 'HTTPFileSystem'", which Ray's `except ModuleNotFoundError` misses (see
    # ray/data/datasource/path_util.py::_is_http_filesystem). It failed one S3 run in
    # three here. Reading row groups ourselves also fixes the order by the manifest.
    slots = _task_concurrency(ray, cfg)
    # from_items cuts the list into contiguous blocks, and batch_size=None hands each task
    # its whole block: one task per run of neighbouring row groups, in order.
    ds = ray.data.from_items(items, override_num_blocks=task_count(items, slots))
    ds = ds.map_batches(
        resize_row_groups,
        fn_kwargs=task_arguments(cfg),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=slots),
        num_cpus=TASK_CPUS,
    )
    return ds, sum(item["rows"] for item in items)


# ----------------------------------------------------------------------------------------
# Writing: one stream of sorted shards per split.


@dataclass
class _Shard:
    stack: contextlib.ExitStack
    sink: contract.ParquetSink
    last_order: int = -1


@dataclass
class _SplitStream:
    split: str
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    shard: _Shard | None = None
    shards: int = 0


class _SplitWriter:
    """Streams each split's rows into ``SPLIT/part-NNNNN.parquet`` files sorted by ``order``.

    Holds at most about one row group per split in memory. Files are committed through
    :mod:`imgpipe.storage` (temporary name, then rename/complete) and recorded on the
    :class:`OutputWriter`; if the run fails, open files are abandoned uncommitted.
    """

    def __init__(self, out: OutputWriter, schema: pa.Schema, rows_per_shard: int, row_group_rows: int) -> None:
        self.out = out
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.streams: dict[str, _SplitStream] = {}
        self.written: dict[str, int] = {}

    def __enter__(self) -> _SplitWriter:
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
            if stream.shard is not None:
                # Handing the exception to storage.open_write drops the unfinished object.
                stream.shard.stack.__exit__(exc_type, exc, tb)
                stream.shard = None

    def add(self, table: pa.Table) -> None:
        """Queues rows (of any splits) and writes every full row group."""
        splits = table.column("split")
        names = pc.unique(splits).to_pylist()
        for split in names:
            if not isinstance(split, str) or not _SAFE_NAME.fullmatch(split) or split in (".", ".."):
                raise ValueError(f"split value {split!r} cannot name an output folder")
            # Clean writes one split per file, so a batch is normally one split: no copy.
            part = table if len(names) == 1 else table.filter(pc.equal(splits, split))
            stream = self.streams.setdefault(split, _SplitStream(split))
            stream.pending.append(part)
            stream.pending_rows += part.num_rows
            if stream.pending_rows >= self.row_group_rows:
                self._drain(stream, final=False)

    def _open(self, stream: _SplitStream) -> _Shard:
        name = f"{stream.split}/part-{stream.shards:05d}.parquet"
        stream.shards += 1
        stack = contextlib.ExitStack()
        # The house Parquet settings, plus the sort order, for readers.
        order = [pq.SortingColumn(self.schema.get_field_index("order"))]
        sink = stack.enter_context(self.out.parquet_file(name, self.schema, sorting_columns=order))
        return _Shard(stack, sink)

    def _close(self, stream: _SplitStream) -> None:
        shard = stream.shard
        if shard is None:
            return
        stream.shard = None
        shard.stack.close()  # commits the object and records it on the OutputWriter
        self.written[stream.split] = self.written.get(stream.split, 0) + shard.sink.rows

    def _drain(self, stream: _SplitStream, final: bool) -> None:
        if not stream.pending:
            return
        table = pa.concat_tables(stream.pending)
        order = table.column("order").to_numpy()
        if len(order) > 1 and (order[1:] < order[:-1]).any():
            # Rows normally arrive ascending (preserve_order); sorting copies every pixel.
            table = table.sort_by("order")
        stream.pending, stream.pending_rows = [], 0
        while table.num_rows >= self.row_group_rows or (final and table.num_rows):
            first = table.column("order")[0].as_py()
            if stream.shard is not None and first <= stream.shard.last_order:
                self._close(stream)  # out-of-order input: a new file keeps every file sorted
            if stream.shard is None:
                stream.shard = self._open(stream)
            shard = stream.shard
            n = min(self.row_group_rows, self.rows_per_shard - shard.sink.rows, table.num_rows)
            chunk = table.slice(0, n)
            shard.sink.write(chunk, row_group_size=n)
            shard.last_order = chunk.column("order")[n - 1].as_py()
            table = table.slice(n)
            if shard.sink.rows >= self.rows_per_shard:
                self._close(stream)
        if table.num_rows:
            stream.pending, stream.pending_rows = [table], table.num_rows


def _split_results(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, list[Reject]]:
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
class _Results:
    """What came back from the tasks, besides the rows written."""

    rejects: list[Reject] = field(default_factory=list)
    seen: int = 0
    nodes: Counter[str] = field(default_factory=Counter)


def _write_results(batches: Iterable[pa.Table], sink: _SplitWriter, schema: pa.Schema, inputs: int) -> _Results:
    """Writes the good rows of every result batch to ``sink`` and collects the rejects.

    The executor only supplies ``batches`` (Ray Data here; a process pool in
    ``bench/resize.py``'s baseline), so the rest of the step is the same for both.
    """
    results = _Results()
    next_log = 1000
    for batch in batches:
        results.nodes.update(batch.column(NODE_COLUMN).to_pylist())
        good, bad = _split_results(batch, schema)
        sink.add(good)
        results.rejects.extend(bad)
        results.seen += batch.num_rows
        if results.seen >= next_log:
            log.info("resize: %d/%d images", results.seen, inputs)
            next_log = results.seen + max(1000, inputs // 10)
    return results


# ----------------------------------------------------------------------------------------
# The step.


def resize(source: str, dest: str, cfg: ResizeConfig | None = None) -> StepReport:
    """Runs the resize step from a committed clean output to a committed resize output.

    It runs here, on a local Ray or the Ray cluster ``ray_address`` joins (``auto``,
    ``ray://``); a Jobs API or KubeRay target is for :func:`imgpipe.remote.dispatch.run_step`,
    which the CLI and the components call.

    Args:
        source: Prefix of a committed clean output.
        dest: Output prefix; any previous output there is replaced.
        cfg: Step settings; defaults when omitted.

    Returns:
        The step report (also written as ``manifest.json``).

    Raises:
        UncommittedOutputError: If ``source`` is not a committed output.
        ValueError: If ``source`` is not a clean output, ``dest`` equals or contains it, or
            ``ray_address`` names a remote target (or a cluster nobody configured).
        RuntimeError: If the rows that came back do not reconcile with the input.
    """
    cfg = cfg or ResizeConfig()
    # ray_address is a run's parameter: only "", KubeRay and configured clusters are accepted.
    target = check_allowed(cfg.ray_address)
    if target.mode != "local":
        raise ValueError(
            f"resize runs where it is called, and ray_address {cfg.ray_address!r} is a {target.mode} target: "
            "run it through imgpipe.remote.dispatch.run_step (as `imgpipe resize` and the pipeline do)"
        )
    phases = PhaseLog("resize")
    source, dest = storage.normalize_uri(source), storage.normalize_uri(dest)
    contract.check_disjoint(dest, [source], "resize")
    manifest = contract.read_manifest(source, expect_step="clean")
    files = contract.data_files(source, manifest)
    inputs = sum(int(f["rows"]) for f in manifest["files"])
    upstream_extra = manifest.get("extra", {})
    # No class names upstream (a hand-made clean output): no ClassLabel rather than a wrong one.
    schema = output_schema(cfg.format, upstream_extra.get("classes") or None)
    out = OutputWriter(dest, "resize")
    out.begin()
    results = _Results()
    with _SplitWriter(out, schema, cfg.rows_per_shard, cfg.row_group_rows) as sink:
        if files:
            with _ray_session(cfg) as ray, _data_context(cfg):
                ds, listed = _build_dataset(ray, files, cfg)
                if listed != inputs:
                    raise ValueError(f"{source}: the manifest lists {inputs} rows but its files hold {listed}")
                batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
                results = _write_results(batches, sink, schema, inputs)
    phases.done("ray", rows=results.seen, rejected=len(results.rejects), files=len(files), ray_nodes=len(results.nodes))
    labels_uri = storage.join(source, LABELS_FILE)
    if storage.exists(labels_uri):
        storage.write_bytes(out.uri(LABELS_FILE), storage.read_bytes(labels_uri))
    written = dict(sorted(sink.written.items()))
    report = out.commit(
        inputs=inputs,
        rejects=results.rejects,
        config=cfg,
        extra={
            "size": cfg.resolved_size,
            "mode": cfg.mode,
            # The mode each written split holds (train_mode for train): "whole" splits have
            # rows of varying height/width, every other mode size x size rows.
            "split_modes": {split: cfg.mode_for(split) for split in written},
            "train_mode": cfg.mode_for("train"),
            "max_aspect": cfg.max_aspect,
            "format": cfg.format,
            "layout": "HWC uint8" if cfg.format == "raw" else "JPEG",
            "ops": list(cfg.ops),
            "splits": written,
            "classes": upstream_extra.get("classes", []),
            "num_classes": upstream_extra.get("num_classes", 0),
            "rows_returned": results.seen,
            # Rows resized per Ray node: where the work ran (a multi-node cluster spreads it).
            "ray_nodes": dict(sorted(results.nodes.items())),
        },
        upstream={"source": source, "step": manifest.get("step"), "outputs": manifest.get("outputs")},
    )
    phases.done("commit", outputs=report.outputs, rejected=report.rejected, files=len(report.files))
    return report
