"""Resize's CPU per image, in one process: the full decode, the reduced-scale decode our fast path
picks, our resize and the torchvision recipe, on the same bytes.

    per_image = per_image_cpu(photos)   # milliseconds per image by method
    print_per_image({"0.2MP": per_image}, images=len(photos))

``bench/steps/resize.py --per-image N`` runs it; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import io
import math
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
    SPEC,
    decode_floor,
    draft_scale,
    region_decode,
    resize_one,
)

from imgpipe.resize.ops import resize_image, resize_image_reference
from imgpipe.resize.spec import ResizeSpec

__all__ = ["PER_IMAGE_PASSES", "baseline_one", "full_decode", "per_image_cpu", "print_per_image"]

PER_IMAGE_PASSES = 9


# The train split's default storage (ResizeConfig.train_mode): the whole picture.
_WHOLE = ResizeSpec(mode="whole")


def baseline_one(data: bytes, transform: Any) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(transform(img.convert("RGB")))


def full_decode(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.width


def resize_whole_decode(data: bytes) -> bytes:
    """:func:`resize_one` as it was before the window decode (issue 50): the whole JPEG decoded, at the draft's scale."""
    from imgpipe.resize import jpeg_window

    applies = jpeg_window.applies
    jpeg_window.applies = lambda img, geometry: False
    try:
        return resize_one(data)
    finally:
        jpeg_window.applies = applies


def per_image_cpu(photos: Sequence[Photo], repeats: int = PER_IMAGE_PASSES) -> dict[str, Any]:
    """CPU ms per image (best of ``repeats`` interleaved passes, ``time.process_time``) of each piece.

    CPU time of one process is far less disturbed by other load than wall time, so these
    show the per-image work each method does, free of Ray and pool effects. Also the mean
    absolute difference (grey levels) of the fast path from the full-decode reference, for
    the default ``short-side-crop`` and for ``whole`` (the train split's default).
    """
    # As the step runs it (resize_batch): one OpenCV thread per process. OpenCV's own pool
    # would add its threads' CPU time to this process's and overstate the work.
    import cv2

    cv2.setNumThreads(1)
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    blobs = [p.data for p in photos]

    def mad(spec: ResizeSpec) -> float:
        pairs = [(resize_image(b, spec), resize_image_reference(b, spec)) for b in blobs]
        return float(np.mean([np.abs(a.astype(np.int16) - r.astype(np.int16)).mean() for a, r in pairs]))

    methods: dict[str, Callable[[bytes], Any]] = {
        "full decode": full_decode,
        "draft decode (floor)": decode_floor,
        "region decode": region_decode,
        "1/8 decode": lambda b: region_decode(b, 1),
        "resize_image": resize_one,
        "resize_image, whole decode": resize_whole_decode,
        "resize_image_reference": lambda b: resize_image_reference(b, SPEC),
        "baseline PIL + torchvision": lambda b: baseline_one(b, transform),
        "resize_image whole": lambda b: resize_image(b, _WHOLE),
    }
    # Interleaved: every pass times each method once, so a slow spell of the machine
    # (frequency, a neighbour's load) falls on all of them alike and the ratios hold.
    best = dict.fromkeys(methods, math.inf)
    for fn in methods.values():
        fn(blobs[0])
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.process_time()
            for b in blobs:
                fn(b)
            best[name] = min(best[name], time.process_time() - t0)
    row: dict[str, Any] = {name: 1000 * t / len(blobs) for name, t in best.items()}
    row.update({"mad": mad(SPEC), "mad whole": mad(_WHOLE), "draft": sorted({draft_scale(b) for b in blobs})})
    return row


def print_per_image(per_image: dict[str, dict[str, Any]], images: int) -> None:
    print(f"Per-image CPU time, one process, no Ray (ms, best of {PER_IMAGE_PASSES} interleaved passes over {images} images):")
    print()
    print(
        "| set | full decode | draft decode (floor) | resize_image | resize_image_reference "
        "| baseline PIL + torchvision | speed-up vs baseline | speed vs floor | MAD vs reference "
        "| draft | `whole` mode | its speed vs floor | its MAD |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for label, r in per_image.items():
        ours, whole = r["resize_image"], r["resize_image whole"]
        base, floor = r["baseline PIL + torchvision"], r["draft decode (floor)"]
        drafts = ", ".join(f"1/{round(1 / v)}" for v in r["draft"])
        print(
            f"| {label} | {r['full decode']:.1f} | {floor:.1f} | {ours:.2f} "
            f"| {r['resize_image_reference']:.1f} | {base:.1f} | {base / ours:.2f} | {floor / ours:.2f} "
            f"| {r['mad']:.2f} | {drafts} | {whole:.2f} | {floor / whole:.2f} | {r['mad whole']:.2f} |"
        )
    print()
    print("The window decode (only what the resize reads) against the whole decode, and libjpeg's least work (1/8, DC only), ms:")
    print()
    print("| set | resize_image, whole decode | resize_image | speed-up | region decode | 1/8 decode | whole-decode resize / 1/8 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in per_image.items():
        before, ours, least = r["resize_image, whole decode"], r["resize_image"], r["1/8 decode"]
        print(f"| {label} | {before:.2f} | {ours:.2f} | {before / ours:.2f} | {r['region decode']:.2f} | {least:.2f} | {before / least:.2f} |")
    print()
