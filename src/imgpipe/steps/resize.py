"""The resize step: clean's images to training inputs of a model's size, on Ray Data or a local pool.

    report = resize("s3://b/run/clean", "s3://b/run/resize", ResizeConfig(preset="resnet"))

How it works in detail: docs/internals/resize.md, "imgpipe.steps.resize".
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import commit, contract, parquet, resources, storage
from imgpipe.contract import Reject, StepReport
from imgpipe.phases import PhaseLog
from imgpipe.raysession import ray_session, shut_down_local_ray
from imgpipe.remote.targets import check_allowed
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.executor import choose_executor, pool_results

# The settings are OpenCV-free (imgpipe.resize.spec) so the pipeline compiles without OpenCV.
from imgpipe.resize.spec import color_space
from imgpipe.resize.statistics import DatasetStatistics
from imgpipe.resize.task import TaskOutput, TaskResult, run_task
from imgpipe.writer import OutputWriter

__all__ = [
    "OUTPUT_COLUMNS",
    "LABELS_FILE",
    "output_schema",
    "read_pixels",
    "list_row_groups",
    "plan_tasks",
    "task_arguments",
    "ray_task",
    "Results",
    "collect_results",
    "resize",
]

log = logging.getLogger(__name__)

LABELS_FILE = contract.LABELS
_META_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    parquet.LABEL_FIELD,
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


def output_schema(fmt: Literal["raw", "jpeg"], classes: Sequence[str] | None = None) -> pa.Schema:
    """The Parquet schema of the data files for output format ``fmt``.

    Args:
        fmt: ``raw`` (``pixels``) or ``jpeg`` (``image``).
        classes: Class names in label order; when given, the schema carries them as
            ``datasets`` features (:func:`imgpipe.parquet.with_hf_features`): ``label`` a
            ``ClassLabel``, ``image`` an ``Image``, raw ``pixels`` plain bytes.
    """
    if fmt == "raw":
        schema = pa.schema([*_META_FIELDS, pa.field("pixels", pa.binary(), nullable=False)])
    else:
        schema = pa.schema([*_META_FIELDS, parquet.IMAGE_FIELD])
    return schema if classes is None else parquet.with_hf_features(schema, classes)


def read_pixels(row: dict[str, Any]) -> np.ndarray:
    """The ``height x width x channels`` uint8 array of one raw output row (a dict)."""
    return np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], row["channels"])


# ----------------------------------------------------------------------------------------
# Ray session and Data context.


@contextlib.contextmanager
def _ray_session(cfg: ResizeConfig) -> Iterator[Any]:
    """The step's Ray (:func:`imgpipe.raysession.ray_session`), its workers warmed by :func:`_warm_worker`.

    Warming: Ray Data's first execution gives the workers Ray pre-starts (one per CPU) to
    its two bookkeeping actors (``_StatsActor``, ``_AutoscalingCoordinatorActor``), so the
    resize tasks wait for new workers, which then import Ray Data and OpenCV: about 1.6 s
    to the first batch on 2 cores (ray 2.60.0). Started with the local Ray, that start-up
    overlaps the driver's own imports and planning, and Ray reuses these workers for the
    job's tasks. Cold ``imgpipe resize`` of 300 images, 10 alternating runs each: median
    8.10 s without, 7.70 s with (docs/benchmarks.md).
    """
    with ray_session(cfg.ray_address, warm=_warm_worker, warm_cpus=TASK_CPUS) as ray:
        yield ray


def _warm_worker() -> None:
    """A task that imports what the resize tasks need (Ray Data, OpenCV), for its worker."""
    import ray.data  # noqa: F401

    from imgpipe.resize import ops as resize_ops  # noqa: F401
    from imgpipe.resize import task as resize_task  # noqa: F401


# The test suite and older callers know it by this name.
_shut_down_local_ray = shut_down_local_ray


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
    for name, value in options.items():
        setattr(ctx, name, value)
    # No preserve_order: each task names its own files, so the order results come back in
    # changes nothing, and a slow task does not hold back the others' results.
    try:
        yield ctx
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


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
# WAIT_FOR_TASK_COMPLETION_TIMEOUT_S), and every task opens its files first. With one task per
# row group of clean's default 128 rows, the CPUs sat idle for about a third of the run on
# 2 cores (docs/benchmarks.md). So a task takes a run of neighbouring row groups. The plan
# depends on the input alone, never on the cluster, because each task writes its own files:
# the same input gives the same files on a laptop and on a hundred nodes. MIN_TASKS keeps
# a small input spread over several CPUs; TASK_ROWS and MAX_TASK_BYTES bound one task's work
# and output (a retried task redoes little, and a file holds at most a task's rows).
MIN_TASKS = 16
TASK_ROWS = 2048
MAX_TASK_BYTES = 256 * 1024 * 1024


def plan_tasks(items: Sequence[Mapping[str, Any]]) -> list[list[tuple[str, int]]]:
    """Groups the row groups ``items`` (:func:`list_row_groups`) into runs of neighbours, one per task.

    Returns:
        At least one task (an empty one for no input), at most one per row group:
        ``MIN_TASKS``, or more where the input exceeds ``TASK_ROWS`` rows or
        ``MAX_TASK_BYTES`` bytes per task. Each task is a list of ``(file, row_group)``;
        consecutive tasks take consecutive row groups, sizes differing by one group at most.
    """
    if not items:
        return [[]]
    rows = sum(int(item["rows"]) for item in items)
    total = sum(int(item["bytes"]) for item in items)
    wanted = max(MIN_TASKS, math.ceil(rows / TASK_ROWS), math.ceil(total / MAX_TASK_BYTES))
    bounds = np.linspace(0, len(items), min(len(items), wanted) + 1).round().astype(int)
    units = [(str(item["file"]), int(item["row_group"])) for item in items]
    return [units[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def task_arguments(cfg: ResizeConfig, out: TaskOutput) -> dict[str, Any]:
    """What every resize task gets besides its row groups: settings only, never credentials."""
    return {
        "spec": cfg.spec,
        "split_specs": cfg.split_specs,
        "batch_size": cfg.batch_size,
        "out": out,
        "settings": storage.settings(),
    }


def ray_task(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """The Ray batch function: runs each task of ``batch`` (:func:`run_task`) and returns their results as JSON."""
    results = [run_task(int(task), json.loads(units), node=_node_id(), **kwargs).to_dict() for task, units in zip(batch["task"], batch["units"])]
    return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


def _node_id() -> str:
    """The Ray node this task runs on ("" outside Ray), shortened as Ray's CLI shows node ids."""
    import ray

    return ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else ""


def _build_dataset(ray: Any, tasks: Sequence[Sequence[tuple[str, int]]], cfg: ResizeConfig, out: TaskOutput) -> Any:
    # Row groups are read by our own tasks rather than ray.data.read_parquet: Ray Data
    # 2.60 resolves read_parquet's paths in 8 threads that each import
    # fsspec.implementations.http; without aiohttp (ray[data] does not install it) two
    # threads failing that import at once can raise "ImportError: cannot import name
    # 'HTTPFileSystem'", which Ray's `except ModuleNotFoundError` misses (see
    # ray/data/datasource/path_util.py::_is_http_filesystem). It failed one S3 run in
    # three here. Reading row groups ourselves also fixes which task writes which rows.
    rows = [{"task": i, "units": json.dumps(units)} for i, units in enumerate(tasks)]
    # One item per block and batch_size=None: one Ray task per planned task.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    return ds.map_batches(
        ray_task,
        fn_kwargs=task_arguments(cfg, out),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=_task_concurrency(ray, cfg)),
        num_cpus=TASK_CPUS,
    )


# ----------------------------------------------------------------------------------------
# The driver's side: metadata only.


@dataclass
class Results:
    """What the driver keeps of the tasks' results: no pixel, no per-row record of good rows.

    Its memory grows with the number of files (one entry each, on the ``OutputWriter``)
    and of rejected rows, never with the rows written: ``statistics`` are the tasks' sums
    merged (:mod:`imgpipe.resize.statistics`), a fixed size per split and class.
    """

    rejects: list[Reject] = field(default_factory=list)
    seen: int = 0
    tasks: int = 0
    node_rows: Counter[str] = field(default_factory=Counter)
    node_files: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    statistics: DatasetStatistics = field(default_factory=DatasetStatistics)


def collect_results(results: Iterable[TaskResult], out: OutputWriter, inputs: int, tasks: int) -> Results:
    """Records every task's files on ``out`` and gathers rejects, counts and nodes, logging progress.

    The executor only supplies ``results`` (Ray Data, or the local process pool of
    :mod:`imgpipe.resize.executor`), so the rest of the step is the same for both.

    Raises:
        RuntimeError: If a task's rows do not reconcile with what it wrote and rejected.
    """
    got = Results()
    next_log = 1000
    for result in results:
        written = sum(f.rows for f in result.files)
        if written + len(result.rejects) != result.rows:
            raise RuntimeError(f"resize task {result.task} read {result.rows} rows but wrote {written} and rejected {len(result.rejects)}")
        for entry in result.files:
            out.add_file(entry)
            got.splits[entry.name.split("/", 1)[0]] += entry.rows
        got.rejects.extend(result.rejects)
        got.statistics.merge(DatasetStatistics.from_dict(result.statistics))
        got.seen += result.rows
        got.tasks += 1
        got.node_rows[result.node] += result.rows
        got.node_files[result.node] += len(result.files)
        if got.seen >= next_log or got.tasks == tasks:
            log.info("resize: %d/%d images, %d/%d tasks", got.seen, inputs, got.tasks, tasks)
            next_log = got.seen + max(1000, inputs // 10)
    return got


def _ray_results(ds: Any) -> Iterator[TaskResult]:
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for value in batch["result"]:
            yield TaskResult.from_dict(json.loads(value))


def _statistics(statistics: DatasetStatistics, cfg: ResizeConfig, classes: list[str]) -> dict[str, Any]:
    """The manifest's ``extra.statistics``, in the colour space the ops store (grey for 1-channel sources)."""
    channels = {s.channels for s in statistics.splits.values() if s.channels}
    # One stored channel means grey, whatever the ops; three are RGB unless an op converted them.
    space = color_space(cfg.ops, "grey" if channels == {1} else "RGB")
    for split, stats in statistics.splits.items():
        if stats.other_channels:
            log.warning(
                "resize: %d %s image(s) have another channel count than the split's %d; its mean and std leave them out",
                stats.other_channels,
                split,
                stats.channels,
            )
    return statistics.manifest_block(classes, space)


# ----------------------------------------------------------------------------------------
# The step.


def resize(source: str, dest: str, cfg: ResizeConfig | None = None) -> StepReport:
    """Runs the resize step from a committed clean output to a committed resize output.

    It runs here: on a local process pool, a local Ray, or the Ray cluster ``ray_address``
    joins (``auto``, ``ray://``), as ``executor`` and the input's size decide
    (:func:`imgpipe.resize.executor.choose_executor`); a Jobs API or KubeRay target is for
    :func:`imgpipe.remote.dispatch.run_step`, which the CLI and the components call.

    Args:
        source: Prefix of a committed clean output.
        dest: Output prefix; any previous output there is replaced.
        cfg: Step settings; defaults when omitted.

    Returns:
        The step report (also written as ``manifest.json``).

    Raises:
        UncommittedOutputError: If ``source`` is not a committed output.
        ValueError: If ``source`` is not a clean output, ``dest`` equals or contains it,
            ``ray_address`` names a remote target (or a cluster nobody configured), or
            ``executor`` is ``pool`` inside a Ray job.
        RuntimeError: If the rows that came back do not reconcile with the input, or a
            pool worker died.
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
    commit.check_disjoint(dest, [source], "resize")
    manifest = contract.read_manifest(source, expect_step="clean")
    files = contract.data_files(source, manifest)
    inputs = sum(int(f["rows"]) for f in manifest["files"])
    upstream_extra = manifest.get("extra", {})
    # No class names upstream (a hand-made clean output): no ClassLabel rather than a wrong one.
    schema = output_schema(cfg.format, upstream_extra.get("classes") or None)
    items = list_row_groups(files)
    listed = sum(item["rows"] for item in items)
    if listed != inputs:
        raise ValueError(f"{source}: the manifest lists {inputs} rows but its files hold {listed}")
    tasks = plan_tasks(items)
    executor = choose_executor(cfg.executor, cfg.ray_address, inputs)
    out = OutputWriter(dest, "resize")
    out.begin()
    task_out = TaskOutput(dest=out.dest, attempt=out.attempt, schema=schema, rows_per_shard=cfg.rows_per_shard, row_group_rows=cfg.row_group_rows)
    results = Results()
    if items and executor == "ray":
        with _ray_session(cfg) as ray, _data_context(cfg):
            ds = _build_dataset(ray, tasks, cfg, task_out)
            results = collect_results(_ray_results(ds), out, inputs, len(tasks))
    elif items:
        workers = cfg.concurrency or resources.available_cpus()
        log.info("resize: %d tasks on a local process pool of %d (executor=%s)", len(tasks), min(workers, len(tasks)), cfg.executor)
        arguments = task_arguments(cfg, task_out)
        with pool_results(tasks, run_task, arguments, workers, files, cfg.no_progress_timeout_s) as finished:
            results = collect_results(finished, out, inputs, len(tasks))
    if results.tasks != len(tasks) and items:
        raise RuntimeError(f"resize: {results.tasks} of {len(tasks)} tasks reported back; refusing to commit {out.dest}")
    counts = {"rows": results.seen, "rejected": len(results.rejects), "tasks": results.tasks, "files": len(out.files)}
    phases.done(executor, **counts, ray_nodes=len(results.node_rows))
    labels_uri = contract.side_file(source, LABELS_FILE)
    if labels_uri is not None:
        storage.write_bytes(out.uri(LABELS_FILE), storage.read_bytes(labels_uri))
    written = dict(sorted(results.splits.items()))
    statistics = _statistics(results.statistics, cfg, upstream_extra.get("classes") or [])
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
            "tasks": len(tasks),
            # What ran the tasks: "ray" or "pool" (ResizeConfig.executor, "auto" resolved).
            "executor": executor,
            # Rows resized and files written per Ray node: where the work ran (a multi-node
            # cluster spreads both; the pool is one node, imgpipe.resize.executor.POOL_NODE).
            "ray_nodes": dict(sorted(results.node_rows.items())),
            "ray_node_files": dict(sorted(results.node_files.items())),
            "statistics": statistics,
        },
        upstream={"source": source, "step": manifest.get("step"), "outputs": manifest.get("outputs")},
    )
    phases.done("commit", outputs=report.outputs, rejected=report.rejected, files=len(report.files))
    return report
