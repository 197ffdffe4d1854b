"""Benchmark: the train step's crop per sample, imgpipe's against albumentations' own and torchvision's.

The loader's workers crop every sample (``RandomResizedCrop`` to the model's size, scale
0.08-1, ratio 3/4-4/3) and, on the CPU path, run the rest of the recipe after it. This
times, per sample, on one core (OpenCV and torch at one thread, as in a worker):

* **imgpipe**: :func:`imgpipe.train.augment_cpu.build_crop_transform` (the crop alone: what
  the workers do when the GPU augments) and :func:`build_train_transform` with the default
  recipe, called as the loader calls them (``transform(image, seed, out=row)``);
* **imgpipe-area**: the same, with the shrink of a crop larger than the output done by
  ``cv2.INTER_AREA`` (albumentations' choice, and imgpipe's before ``imgpipe.resize.warp.shrink``);
* **albumentations**: the same operations run by albumentations itself (the transform's own
  ``albumentations.Compose``; its generators seeded once, not per sample);
* **torchvision** (crop only): ``transforms.v2.RandomResizedCrop(antialias=True)`` on the
  sample as a uint8 tensor, the reference training script's crop.

Sources: real photographs (``bench/common/photos.py``) decoded to arrays at each set's size,
the shapes the loader meets: rows stored whole at a short side of 256 cropped to 224, the
same at 128 to 96, and 500x375 (the Oxford-IIIT Pet average, no offline resize) to 224.

* **warm**: in this process, ``--passes`` passes over the set, every contender once per pass
  in turn (a slow spell of the machine falls on all alike); the median pass.
* **cold**: a fresh process per contender (``--child``: imports, builds the transform, one
  pass), timed from outside, as a worker's first batch pays it; ``--cold-repeats``
  interleaved, the median.

    python bench/probes/crop.py [--images 400 --passes 7 --cold-repeats 3 --json bench/results/crop.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

# (name, stored width, stored height, output side)
SETS = [("256->224", 341, 256, 224), ("128->96", 170, 128, 96), ("500x375->224", 500, 375, 224)]
CONTENDERS = [
    "imgpipe crop",
    "imgpipe-area crop",
    "albumentations crop",
    "torchvision crop",
    "imgpipe recipe",
    "imgpipe-area recipe",
    "albumentations recipe",
]


def _images(width: int, height: int, count: int) -> list[np.ndarray]:
    from photos import make_photo, source_photos

    sources, rng = source_photos(), np.random.default_rng(0)
    out = []
    for _ in range(count):
        _, pixels, _ = make_photo(sources, width, height, rng, 90)
        out.append(pixels)
    return out


def _contender(name: str, size: int) -> Callable[[np.ndarray, int, np.ndarray], object]:
    """One sample's work for ``name``: ``fn(image, seed, row)``."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if name.startswith("torchvision"):
        from torchvision.transforms import v2

        crop = v2.RandomResizedCrop(size, antialias=True)
        return lambda image, seed, row: crop(torch.from_numpy(image).permute(2, 0, 1))
    from imgpipe.train.augment_config import AugmentConfig
    from imgpipe.train.augment_cpu import build_crop_transform, build_train_transform

    build = build_crop_transform if name.endswith("crop") else build_train_transform
    transform = build(AugmentConfig(), size, 3)
    if name.startswith("imgpipe-area"):
        import imgpipe.train.augment_cpu as augment_cpu

        ours = augment_cpu.shrink

        def area(region: np.ndarray, out_size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
            return cv2.resize(region, out_size, dst=dst, interpolation=cv2.INTER_AREA)

        def before(image: np.ndarray, seed: int, row: np.ndarray) -> object:
            augment_cpu.shrink = area  # for this call only: the other contenders share the module
            try:
                return transform(image, seed, out=row)
            finally:
                augment_cpu.shrink = ours

        return before
    if name.startswith("imgpipe"):
        return lambda image, seed, row: transform(image, seed, out=row)
    pipeline = transform.pipeline
    pipeline.set_random_state(np.random.Generator(np.random.PCG64(0)), __import__("random").Random(0))
    return lambda image, seed, row: pipeline(image=image)["image"]


def _pass(fn: Callable[[np.ndarray, int, np.ndarray], object], images: list[np.ndarray], size: int) -> float:
    row = np.empty((size, size, 3), np.uint8)
    start = time.perf_counter()
    for seed, image in enumerate(images):
        fn(image, seed, row)
    return time.perf_counter() - start


def child(name: str, set_name: str) -> None:
    size = next(s for s in SETS if s[0] == set_name)[3]
    images = pickle.loads(Path(os.environ["IMGPIPE_BENCH_CROP_SET"]).read_bytes())  # written by this script's parent
    _pass(_contender(name, size), images, size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--passes", type=int, default=7)
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs=2, metavar=("CONTENDER", "SET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    import tempfile

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-crop-") as tmp:
        for set_name, width, height, size in SETS:
            images = _images(width, height, args.images)
            stored = Path(tmp) / f"{width}x{height}.pickle"  # a quarter of the photos are portrait
            stored.write_bytes(pickle.dumps(images))
            fns = {name: _contender(name, size) for name in CONTENDERS}
            for fn in fns.values():
                _pass(fn, images[:20], size)  # first calls: lazy imports, tables
            warm: dict[str, list[float]] = {name: [] for name in CONTENDERS}
            for _ in range(args.passes):
                for name, fn in fns.items():
                    warm[name].append(_pass(fn, images, size))
            cold: dict[str, list[float]] = {name: [] for name in CONTENDERS}
            env = {**os.environ, "IMGPIPE_BENCH_CROP_SET": str(stored)}
            for _ in range(args.cold_repeats):
                for name in CONTENDERS:
                    start = time.perf_counter()
                    cmd = [sys.executable, __file__, "--images", str(args.images), "--child", name, set_name]
                    subprocess.run(cmd, check=True, env=env)
                    cold[name].append(time.perf_counter() - start)
            for name in CONTENDERS:
                results.append(
                    {
                        "set": set_name,
                        "contender": name,
                        "images": args.images,
                        "warm_us_per_sample": statistics.median(warm[name]) / args.images * 1e6,
                        "cold_s": statistics.median(cold[name]),
                        "cold_range_s": [min(cold[name]), max(cold[name])],
                    }
                )
    print(f"| set | contender | warm µs/sample | warm vs albumentations | cold s ({args.images} samples, fresh process) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in results:
        kind = r["contender"].split()[1]
        base = next(b for b in results if b["set"] == r["set"] and b["contender"] == f"albumentations {kind}")
        ratio = base["warm_us_per_sample"] / r["warm_us_per_sample"]
        lo, hi = r["cold_range_s"]
        print(f"| {r['set']} | {r['contender']} | {r['warm_us_per_sample']:.0f} | {ratio:.2f}x | {r['cold_s']:.2f} ({lo:.2f}-{hi:.2f}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
