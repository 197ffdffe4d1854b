"""Resize's memory with the image count: peak RSS and PSS of the step's whole process tree (driver and Ray workers), sampled while it runs.

    rows = measure_memory(root, counts=[1000, 4000], width=516, height=388, distinct=64, seed=0)

``bench/steps/resize.py --memory-counts`` runs it; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from photos import Photo, photo_set  # noqa: E402
from proctree import process_tree  # noqa: E402
from resize_common import (
    run_ours,
    write_clean_output,
)

from imgpipe.clean.config import CleanConfig  # noqa: E402
from imgpipe.resize.config import ResizeConfig

__all__ = ["TreeSampler", "tree_memory_kib", "memory_run", "measure_memory"]


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of this process tree until stopped; keeps the peaks."""

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_rss_kib = self.peak_pss_kib = self.peak_driver_kib = self.peak_procs = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            pids = process_tree(me)
            rss = pss = 0
            for pid in pids:
                r, p = _rss_pss_kib(pid)
                rss, pss = rss + r, pss + p
                if pid == me:
                    self.peak_driver_kib = max(self.peak_driver_kib, r)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.samples += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def tree_memory_kib() -> tuple[int, int]:
    """Summed RSS and PSS of this process and its descendants, now."""
    rss = pss = 0
    for pid in process_tree(os.getpid()):
        r, p = _rss_pss_kib(pid)
        rss, pss = rss + r, pss + p
    return rss, pss


def memory_run(source: str, dest: str) -> dict[str, Any]:
    """One peak-memory measurement: the resize step with defaults on Ray, starting its own Ray."""
    rss_before, pss_before = tree_memory_kib()
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    outputs = run_ours(source, dest, ResizeConfig(executor="ray"), [])
    elapsed = time.perf_counter() - t0
    sampler.stop()
    return {
        "outputs": outputs,
        "seconds": round(elapsed, 2),
        "rss_before_mib": round(rss_before / 1024),
        "pss_before_mib": round(pss_before / 1024),
        "peak_rss_mib": round(sampler.peak_rss_kib / 1024),
        "peak_pss_mib": round(sampler.peak_pss_kib / 1024),
        "peak_driver_rss_mib": round(sampler.peak_driver_kib / 1024),
        "processes": sampler.peak_procs,
        "samples": sampler.samples,
    }


def measure_memory(root: Path, counts: Sequence[int], width: int, height: int, distinct: int, seed: int) -> list[dict[str, Any]]:
    """Peak memory of the resize step per image count, each in a fresh driver process.

    The input uses clean's default layout (shard and row-group sizes) and repeats
    ``distinct`` photos under new names. Each count runs in its own Python process, so
    no count inherits the heap high-water mark of an earlier one.
    """
    pool = photo_set(distinct, width, height, seed=seed + 99)
    defaults = CleanConfig()
    results = []
    for n in counts:
        photos = [Photo(f"{p.source}_{i:06d}.jpg", p.source, p.width, p.height, p.data) for i, p in ((i, pool[i % distinct]) for i in range(n))]
        source = write_clean_output(root / f"mem-clean-{n}", photos, defaults.row_group_rows, defaults.rows_per_shard)
        del photos
        dest = root / f"mem-resize-{n}"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve().with_name("resize.py")), "--memory-run", source, str(dest)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        result = {"images": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
        result["img_s"] = round(n / result["seconds"], 1)
        results.append(result)
        print(f"memory: {result}", file=sys.stderr, flush=True)
        shutil.rmtree(dest)  # 3 GB of pixels at 20,000 images
        shutil.rmtree(source.removeprefix("file://"), ignore_errors=True)
    return results
