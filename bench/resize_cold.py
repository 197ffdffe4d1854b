"""Resize cold, as a pod pays it: ``imgpipe resize`` in a fresh process against a fresh process-pool
run and the process-pool step, on the same clean output.

    cold = measure_cold(root, result, workers)   # result: one set's warm measurement
    print_cold([cold])

``bench/resize.py --cold`` runs it; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import io
import multiprocessing
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet
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


def measure_cold(root: Path, r: dict[str, Any], workers: int) -> dict[str, Any]:
    """One fresh ``imgpipe resize`` and one fresh pool process on a set's clean output (see the docstring)."""
    source, dest = r["source"], str(root / f"{r['set']}-cold")
    timings = {}
    for name, cmd in (
        ("step", [sys.executable, "-m", "imgpipe.cli", "resize", source, dest]),
        ("pool", [sys.executable, __file__, "--pool-run", source, str(workers)]),
        ("pool_step", [sys.executable, __file__, "--pool-step-run", source, dest, str(workers)]),
    ):
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        timings[name] = time.perf_counter() - t0
    steady_step = r["methods"][OURS]["steady_img_s"] or r["methods"][OURS]["img_s"]
    steady_pool = r["methods"][pool_name(workers)]["img_s"]
    fixed_step = timings["step"] - r["images"] / steady_step
    fixed_pool = timings["pool"] - r["images"] / steady_pool
    pool_step_rate = r["methods"][POOL_STEP]["img_s"]
    fixed_pool_step = timings["pool_step"] - r["images"] / pool_step_rate
    return {
        "pool_step_cold_s": timings["pool_step"],
        "pool_step_fixed_s": fixed_pool_step,
        "fixed_over_pool_step_s": fixed_step - fixed_pool_step,
        "set": r["set"],
        "images": r["images"],
        "step_cold_s": timings["step"],
        "pool_cold_s": timings["pool"],
        "step_fixed_s": fixed_step,
        "pool_fixed_s": fixed_pool,
        "fixed_over_pool_s": fixed_step - fixed_pool,
        "steady_step_over_pool": steady_step / steady_pool,
        "cold_step_over_pool": timings["pool"] / timings["step"],
    }


def print_cold(cold: list[dict[str, Any]]) -> None:
    print("\nCold, a fresh process each (as a pod runs it):\n")
    print(
        "| set | images | `imgpipe resize` cold s | pool cold s | process-pool step cold s | step / pool speed, cold | step fixed cost s "
        "| pool fixed cost s | fixed cost over the pool s | fixed cost over the process-pool step s | step / pool, steady |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cold:
        print(
            f"| {c['set']} | {c['images']} | {c['step_cold_s']:.2f} | {c['pool_cold_s']:.2f} | {c['pool_step_cold_s']:.2f} "
            f"| {c['cold_step_over_pool']:.2f} | {c['step_fixed_s']:.2f} | {c['pool_fixed_s']:.2f} | **{c['fixed_over_pool_s']:.2f}** "
            f"| **{c['fixed_over_pool_step_s']:.2f}** | **{c['steady_step_over_pool']:.2f}** |"
        )
