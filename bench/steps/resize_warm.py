"""Resize warm, one set at a time: every method of bench/steps/resize.py on the same JPEG bytes, interleaved
in each repeat (round 0 untimed), as medians, whole runs and after the first batch.

    result = measure_set(ray, root, SetSpec("3MP", 60, 2000, 1500), photos, args, mp_pool)
    pool_step(source, dest, pool, clock)   # the step's own work on a multiprocessing pool

``bench/steps/resize.py`` runs it; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]
from photos import Photo  # noqa: E402
from PIL import Image
from resize_common import (
    BASE_BYTES,
    BASE_IMAGES,
    OURS,
    OURS_POOL,
    POOL_STEP,
    Clock,
    SetSpec,
    decode_floor,
    draft_scale,
    floor_name,
    ours_all_cpus,
    pool_name,
    resize_one,
    run_ours,
    time_pool,
    timed_results,
    write_clean_output,
    write_files,
)

import imgpipe.steps.resize as resize_step  # noqa: E402
from imgpipe import contract  # noqa: E402
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.task import TaskOutput, TaskResult, run_task
from imgpipe.writer import OutputWriter  # noqa: E402

__all__ = [
    "baseline_batch",
    "baseline_row",
    "run_baseline_bytes",
    "run_baseline_read_images",
    "pool_step",
    "steady_rate",
    "measure_set",
]

# ----------------------------------------------------------------------------------------
# Ray work.


def baseline_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The baseline recipe on encoded bytes: PIL decode, Resize(256), CenterCrop(224)."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    out = np.empty(len(batch["bytes"]), dtype=object)
    for i, data in enumerate(batch["bytes"]):
        with Image.open(io.BytesIO(data)) as img:
            out[i] = np.asarray(transform(img.convert("RGB")))
    return {"image": np.stack(out) if len(out) else np.zeros((0, 224, 224, 3), np.uint8)}


def baseline_row(row: dict[str, Any]) -> dict[str, Any]:
    """The baseline recipe on ``read_images`` rows (already decoded): Resize(256), CenterCrop(224)."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    return {"image": np.asarray(transform(Image.fromarray(row["image"])))}


def run_baseline_bytes(ray: Any, folder: str, blocks: int, batch: int, clock: Clock) -> int:
    ds = ray.data.read_binary_files(folder, override_num_blocks=blocks).map_batches(baseline_batch, batch_format="numpy", batch_size=batch)
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clock.append((time.perf_counter(), len(batch["image"])))
        rows += len(batch["image"])
    return rows


def run_baseline_read_images(ray: Any, folder: str, blocks: int, clock: Clock) -> int:
    ds = ray.data.read_images(folder, mode="RGB", override_num_blocks=blocks).map(baseline_row)
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clock.append((time.perf_counter(), len(batch["image"])))
        rows += len(batch["image"])
    return rows


# ----------------------------------------------------------------------------------------
# Process-pool work (module level, so spawned workers can import it).


def _pool_step_task(args: tuple[int, list[tuple[str, int]], TaskOutput]) -> TaskResult:
    """One planned task through the step's own task body, in a pool process (see pool_step)."""
    task, units, out = args
    return run_task(task, units, **resize_step.task_arguments(ResizeConfig(), out))


def pool_step(source: str, dest: str, pool: Any, clock: Clock) -> int:
    """The resize step's work on a ``multiprocessing`` pool instead of Ray: the baseline for Ray.

    The same plan of tasks, task body (read, decode, resize, write the task's own files,
    hashed as written), driver loop (files and rejects recorded) and commit as
    :func:`imgpipe.steps.resize.resize` with the default config; only the executor differs.
    """
    cfg = ResizeConfig()
    manifest = contract.read_manifest(source, expect_step="clean")
    items = resize_step.list_row_groups(contract.data_files(source, manifest))
    tasks = resize_step.plan_tasks(items)
    schema = resize_step.output_schema(cfg.format, manifest["extra"].get("classes"))
    out = OutputWriter(dest, "resize")
    out.begin()
    task_out = TaskOutput(out.dest, out.attempt, schema, cfg.rows_per_shard, cfg.row_group_rows)
    inputs = sum(i["rows"] for i in items)
    results = pool.imap(_pool_step_task, [(i, units, task_out) for i, units in enumerate(tasks)])
    got = resize_step.collect_results(timed_results(results, clock), out, inputs, len(tasks))
    return out.commit(inputs=inputs, rejects=got.rejects, config=cfg).outputs


# ----------------------------------------------------------------------------------------
# One set: every method, interleaved.


def steady_rate(t0: float, clock: Clock) -> tuple[float, float | None]:
    """Time to the first batch, and images/s from the first batch's arrival to the last's.

    The rate counts the rows that arrived after the first batch, so it leaves out Ray
    Data's per-execution start-up and the first task's latency; None with a single batch.
    """
    first_t, first_rows = clock[0]
    rows = sum(r for _, r in clock) - first_rows
    span = clock[-1][0] - first_t
    return first_t - t0, (rows / span if rows and span > 0 else None)


def measure_set(
    ray: Any,
    root: Path,
    s: SetSpec,
    photos: Sequence[Photo],
    args: argparse.Namespace,
    mp_pool: Any,
) -> dict[str, Any]:
    blobs = [p.data for p in photos]
    rg_rows = max(1, math.ceil(s.count / (args.workers * args.tasks_per_cpu)))
    # The baselines get as many read blocks (= tasks) as our input has row groups, and
    # map_batches batches of that size: Ray Data's own choice for a few dozen files can be
    # a single block, and a larger batch_size coalesces blocks, i.e. fewer parallel tasks.
    blocks = math.ceil(s.count / rg_rows)
    source = write_clean_output(root / f"{s.label}-clean", photos, rg_rows, rows_per_shard=2048)
    folder = write_files(root / f"{s.label}-files", photos)
    dest = str(root / f"{s.label}-resize")
    scales = sorted({draft_scale(b) for b in blobs})

    ray_methods: dict[str, Callable[[Clock], int]] = {
        OURS: lambda c: run_ours(source, dest, ResizeConfig(executor="ray"), c),
        ours_all_cpus(args.workers): lambda c: run_ours(source, dest, ResizeConfig(executor="ray", concurrency=args.workers), c),
        # Its workers start in every run (a forkserver's: Ray runs in this process).
        OURS_POOL: lambda c: run_ours(source, dest, ResizeConfig(executor="pool"), c),
        BASE_BYTES: lambda c: run_baseline_bytes(ray, folder, blocks, rg_rows, c),
        POOL_STEP: lambda c: pool_step(source, str(root / f"{s.label}-pool-step"), mp_pool, c),
    }
    if not args.no_read_images:
        ray_methods[BASE_IMAGES] = lambda c: run_baseline_read_images(ray, folder, blocks, c)
    pool_methods = {floor_name(args.workers): decode_floor, pool_name(args.workers): resize_one}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*ray_methods, *pool_methods]}

    for rep in range(args.repeats + 1):  # round 0 warms everything up, untimed
        for name, fn in pool_methods.items():
            elapsed = time_pool(mp_pool, fn, blobs, args.workers)
            if rep:
                runs[name].append({"total_s": elapsed, "steady_img_s": s.count / elapsed})
        for name, ray_fn in ray_methods.items():
            clock: Clock = []
            t0 = time.perf_counter()
            rows = ray_fn(clock)
            elapsed = time.perf_counter() - t0
            if rows != s.count:
                raise RuntimeError(f"{name} returned {rows} rows for {s.count} images")
            first_s, steady = steady_rate(t0, clock)
            if rep:
                runs[name].append({"total_s": elapsed, "first_batch_s": first_s, "steady_img_s": steady})
        print(
            f"{s.label}: round {rep} done, load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )

    methods: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        total = statistics.median(r["total_s"] for r in rs)
        steadies = [r["steady_img_s"] for r in rs if r["steady_img_s"] is not None]
        firsts = [r["first_batch_s"] for r in rs if "first_batch_s" in r]
        methods[name] = {
            "median_s": total,
            "img_s": s.count / total,
            "steady_img_s": statistics.median(steadies) if steadies else None,
            "first_batch_s": statistics.median(firsts) if firsts else None,
            "runs": rs,
        }
    return {
        "set": s.label,
        "source": source,
        "images": s.count,
        "width": s.width,
        "height": s.height,
        "megapixels": round(s.width * s.height / 1e6, 2),
        "mean_jpeg_kb": round(sum(len(b) for b in blobs) / len(blobs) / 1e3, 1),
        "row_group_rows": rg_rows,
        "draft_scales": scales,
        "methods": methods,
    }
