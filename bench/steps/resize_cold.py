"""Resize cold, as a pod pays it: ``imgpipe resize`` on Ray and on its own pool, each in a fresh
process, against a fresh process-pool run and the process-pool step, on the same clean output.

    cold = measure_cold(root, result, workers, repeats)   # result: one set's warm measurement
    print_cold([cold])

``bench/steps/resize.py --cold`` runs it; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import io
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]
from resize_common import (
    OURS,
    POOL_STEP,
    pool_name,
    resize_one,
)

from imgpipe import contract  # noqa: E402

__all__ = ["read_blobs", "pool_map", "pool_run", "measure_cold", "print_cold"]


def read_blobs(source: str) -> list[bytes]:
    """Every image's encoded bytes in a committed clean output, in file order."""
    from imgpipe import storage

    blobs = []
    for uri in contract.data_files(source):
        table = pa.parquet.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image"])
        blobs.extend(row["bytes"] for row in table.column("image").to_pylist())
    return blobs


def pool_map(pool: Any, fn: Callable[[bytes], Any], blobs: list[bytes], workers: int) -> list[Any]:
    """``fn`` over ``blobs`` in ``pool``, about eight chunks per worker."""
    return pool.map(fn, blobs, chunksize=max(1, len(blobs) // (workers * 8)))


def pool_run(source: str, workers: int) -> int:
    """The cold process pool's child: read the clean output, resize every image in a Pool."""
    blobs = read_blobs(source)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return len(pool_map(pool, resize_one, blobs, workers))


# The children run bench/steps/resize.py, which parses --pool-run and --pool-step-run (this module has
# no command line).
_BENCH = str(Path(__file__).resolve().with_name("resize.py"))


def measure_cold(root: Path, r: dict[str, Any], workers: int, repeats: int = 1) -> dict[str, Any]:
    """Fresh ``imgpipe resize`` processes (on Ray, on its pool) and fresh pool processes on a set's clean output.

    Each method runs ``repeats`` times, the methods in turn; each time is the median.
    """
    source, dest = r["source"], str(root / f"{r['set']}-cold")
    step = [sys.executable, "-m", "imgpipe.cli", "resize", source, dest]
    commands = {
        "step": [*step, "--executor", "ray"],
        "step_pool": [*step, "--executor", "pool"],
        "pool": [sys.executable, _BENCH, "--pool-run", source, str(workers)],
        "pool_step": [sys.executable, _BENCH, "--pool-step-run", source, dest, str(workers)],
    }
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[name].append(time.perf_counter() - t0)
    timings = {name: statistics.median(times) for name, times in runs.items()}
    steady_step = r["methods"][OURS]["steady_img_s"] or r["methods"][OURS]["img_s"]
    steady_pool = r["methods"][pool_name(workers)]["img_s"]
    fixed_step = timings["step"] - r["images"] / steady_step
    fixed_pool = timings["pool"] - r["images"] / steady_pool
    pool_step_rate = r["methods"][POOL_STEP]["img_s"]
    fixed_pool_step = timings["pool_step"] - r["images"] / pool_step_rate
    fixed_step_pool = timings["step_pool"] - r["images"] / pool_step_rate
    return {
        "pool_step_cold_s": timings["pool_step"],
        "pool_step_fixed_s": fixed_pool_step,
        "fixed_over_pool_step_s": fixed_step - fixed_pool_step,
        "set": r["set"],
        "images": r["images"],
        "repeats": repeats,
        "runs": runs,
        "step_cold_s": timings["step"],
        "step_pool_cold_s": timings["step_pool"],
        "pool_cold_s": timings["pool"],
        "step_fixed_s": fixed_step,
        "step_pool_fixed_s": fixed_step_pool,
        "pool_fixed_s": fixed_pool,
        "fixed_over_pool_s": fixed_step - fixed_pool,
        "steady_step_over_pool": steady_step / steady_pool,
        "cold_step_over_pool": timings["pool"] / timings["step"],
        "cold_step_pool_over_pool": timings["pool"] / timings["step_pool"],
        "cold_step_pool_over_step": timings["step"] / timings["step_pool"],
    }


def print_cold(cold: list[dict[str, Any]]) -> None:
    print("\nCold, a fresh process each (as a pod runs it), median of each method's runs:\n")
    print(
        "| set | images | runs | `imgpipe resize --executor ray` cold s | `--executor pool` cold s | pool cold s | process-pool step cold s "
        "| step (ray) / pool speed, cold | step (pool) / pool speed, cold | step (pool) / step (ray) speed, cold "
        "| step (ray) fixed cost s | step (pool) fixed cost s | pool fixed cost s | ray fixed cost over the pool s "
        "| ray fixed cost over the process-pool step s | step (ray) / pool, steady |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cold:
        print(
            f"| {c['set']} | {c['images']} | {c['repeats']} | {c['step_cold_s']:.2f} | {c['step_pool_cold_s']:.2f} | {c['pool_cold_s']:.2f} "
            f"| {c['pool_step_cold_s']:.2f} | {c['cold_step_over_pool']:.2f} | **{c['cold_step_pool_over_pool']:.2f}** "
            f"| **{c['cold_step_pool_over_step']:.2f}** | {c['step_fixed_s']:.2f} | {c['step_pool_fixed_s']:.2f} | {c['pool_fixed_s']:.2f} "
            f"| **{c['fixed_over_pool_s']:.2f}** | **{c['fixed_over_pool_step_s']:.2f}** | **{c['steady_step_over_pool']:.2f}** |"
        )
