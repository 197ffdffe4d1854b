"""Benchmark: the loader's enlargement of a crop smaller than the output, OpenCV's against the alternatives.

With torchvision's RandomResizedCrop scale (0.08-1) on rows stored at a short side of 256, most
crops are smaller than a 224 output, and the loader enlarges them with OpenCV's bilinear
``cv2.resize`` (albumentations' kernel). This times that call, one thread, against torch's
``interpolate`` on the same uint8 pixels (channels-last), the same enlargement as two
one-channel passes with transposes, and OpenCV's nearest neighbour (what OpenCV takes only to
pick the output's pixels); and it gives how far torch's pixels are from OpenCV's::

    .venv/bin/python bench/probes/upscale.py [--calls 200] [--passes 9]

Figures: docs/benchmarks.md, "Python per sample on threads".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

BOXES = ((90, 110), (150, 180), (200, 210))
SIZE = 224


def best_us(call: Callable[[], object], calls: int, passes: int) -> float:
    """The best of ``passes`` timings of ``calls`` calls, in µs a call."""
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def two_passes(region: np.ndarray) -> np.ndarray:
    """The enlargement as two vertical one-channel resizes, the second on the transposed image."""
    h, w, c = region.shape
    tall = cv2.resize(np.ascontiguousarray(region).reshape(h, w * c), (w * c, SIZE), interpolation=cv2.INTER_LINEAR)
    turned = cv2.transpose(tall.reshape(SIZE, w, c))
    wide = cv2.resize(turned.reshape(w, SIZE * c), (SIZE * c, SIZE), interpolation=cv2.INTER_LINEAR)
    return cv2.transpose(wide.reshape(SIZE, SIZE, c))


def row(region: np.ndarray, calls: int, passes: int) -> str:
    """One box's markdown row: each contender's µs a call, and torch's pixels against OpenCV's."""
    out = np.empty((SIZE, SIZE, 3), np.uint8)
    copy = np.ascontiguousarray(region)
    tensor = torch.from_numpy(copy).permute(2, 0, 1)[None]
    size = (SIZE, SIZE)
    contenders = [
        lambda: cv2.resize(region, size, dst=out, interpolation=cv2.INTER_LINEAR),
        lambda: cv2.resize(copy, size, dst=out, interpolation=cv2.INTER_LINEAR),
        lambda: F.interpolate(tensor, size=size, mode="bilinear", align_corners=False),
        lambda: F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True),
        lambda: two_passes(region),
        lambda: cv2.resize(region, size, dst=out, interpolation=cv2.INTER_NEAREST),
    ]
    timings = " | ".join(f"{best_us(call, calls, passes):.1f}" for call in contenders)
    ref = cv2.resize(copy, size, interpolation=cv2.INTER_LINEAR).astype(np.int16)
    theirs = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy().astype(np.int16)
    diff = np.abs(ref - theirs)
    return f"| {region.shape[0]} x {region.shape[1]} | {timings} | {diff.mean():.2f} ({diff.max()}) |"


HEADER = (
    "| box | OpenCV bilinear µs | from a contiguous copy | torch interpolate | torch, antialias "
    "| two one-channel passes | OpenCV nearest | torch's pixels vs OpenCV's, mean (max) |"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--passes", type=int, default=9)
    args = parser.parse_args(argv)
    cv2.setNumThreads(0)  # as in a loader worker
    torch.set_num_threads(1)
    image = np.random.default_rng(0).integers(0, 256, (256, 341, 3), dtype=np.uint8)
    print(HEADER)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for h, w in BOXES:
        print(row(image[10 : 10 + h, 20 : 20 + w], args.calls, args.passes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
