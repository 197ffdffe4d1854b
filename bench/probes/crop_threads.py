"""Benchmark: the loader's per-sample transform on threads against processes, and its time outside the native kernels.

The thread engine (``loader_engine: threads``) runs every sample's transform in threads of the
training process; a sample's OpenCV kernels release the GIL, the Python between them holds it.
This measures what that costs, for the crop alone (``build_crop_transform``: the workers' work
when the GPU augments) and the default CPU recipe (``build_train_transform``), on the sets of
``bench/probes/crop.py`` (real photographs, the shapes the loader meets):

* **throughput**: images/s of one thread, of ``--workers`` threads (a transform each, as the
  engine gives each thread its own) and of ``--workers`` forked processes, over the same
  samples; the median of ``--rounds`` interleaved rounds. Threads over processes is the
  share of the cores the GIL leaves to threads.
* **outside the kernels**: under cProfile, the share of a sample's time spent outside the
  calls that release the GIL (OpenCV's functions, listed in :data:`NATIVE`): the Python a
  sample runs while holding it.

    python bench/probes/crop_threads.py [--images 400 --reps 6 --rounds 3 --workers 2]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from crop import SETS, _images  # noqa: E402 - the sibling module, after the path

CONTENDERS = ("crop", "recipe")
# The OpenCV functions a sample calls (cProfile names a builtin by its name alone); each
# releases the GIL for its work.
NATIVE = frozenset(
    {"resize", "GaussianBlur", "sepFilter2D", "filter2D", "flip", "LUT", "remap", "warpAffine", "cvtColor", "calcHist", "minMaxLoc", "addWeighted"}
)


def _transform(kind: str, size: int) -> Callable[..., np.ndarray]:
    import cv2

    from imgpipe.train.augment_config import AugmentConfig
    from imgpipe.train.augment_cpu import build_crop_transform, build_train_transform

    cv2.setNumThreads(0)  # as the loader sets it: the threads are the parallelism
    build = build_crop_transform if kind == "crop" else build_train_transform
    return build(AugmentConfig(), size, 3)


def _work(transform: Callable[..., np.ndarray], images: list[np.ndarray], reps: int, size: int) -> None:
    row = np.empty((size, size, 3), np.uint8)
    for rep in range(reps):
        for i, image in enumerate(images):
            transform(image, rep * len(images) + i, out=row)


def _threads(transform: Callable[..., np.ndarray], images: list[np.ndarray], reps: int, size: int, n: int) -> float:
    copies = [copy.deepcopy(transform) for _ in range(n)]
    threads = [threading.Thread(target=_work, args=(c, images, reps, size)) for c in copies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n * reps * len(images) / (time.perf_counter() - start)


def _processes(transform: Callable[..., np.ndarray], images: list[np.ndarray], reps: int, size: int, n: int) -> float:
    start = time.perf_counter()
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # the child: the work, then out without the parent's exit handlers
            code = 0
            try:
                _work(transform, images, reps, size)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"a worker process failed (status {status})")
    return n * reps * len(images) / (time.perf_counter() - start)


def _builtin(name: str) -> str:
    """A builtin's bare name from cProfile's label (``<resize>``, ``{built-in method cv2.resize}``)."""
    return name.strip("<>{}").split(" ")[-1].split(".")[-1]


def _outside_native(transform: Callable[..., np.ndarray], images: list[np.ndarray], size: int) -> float:
    """The share of a sample's time under cProfile outside the GIL-releasing kernels."""
    profile = cProfile.Profile()
    profile.enable()
    _work(transform, images, 2, size)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(tottime for (_, _, _), (_, _, tottime, _, _) in stats.items())
    native = sum(tottime for (_, _, name), (_, _, tottime, _, _) in stats.items() if _builtin(name) in NATIVE)
    return 1 - native / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--reps", type=int, default=6, help="passes over the images per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    n = args.workers
    print(f"| set | transform | 1 thread img/s | {n} threads | {n} processes | threads / processes | time outside the kernels (cProfile) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for set_name, width, height, size in SETS:
        images = _images(width, height, args.images)
        for kind in CONTENDERS:
            transform = _transform(kind, size)
            _work(transform, images[:20], 1, size)  # first calls: lazy imports, tables
            one, many, procs = [], [], []
            for _ in range(args.rounds):
                one.append(_threads(transform, images, args.reps, size, 1))
                many.append(_threads(transform, images, args.reps, size, args.workers))
                procs.append(_processes(transform, images, args.reps, size, args.workers))
            one_m, many_m, procs_m = (statistics.median(v) for v in (one, many, procs))
            outside = _outside_native(transform, images, size)
            print(f"| {set_name} | {kind} | {one_m:,.0f} | {many_m:,.0f} | {procs_m:,.0f} | {many_m / procs_m:.2f} | {outside:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
