"""Benchmark: images/s delivered to the training loop, imgpipe's loader against the common recipe.

Every pipeline reads the same images with the same number of worker processes, in one run:

* **recipe**: ``torchvision.datasets.ImageFolder`` of the dataset's JPEG files on local
  disk, at ``--source-size`` (default 500x375, the Oxford-IIIT Pet average: what a user
  has without an offline resize step; ``--source-size 224x224`` compares at equal size), PIL
  ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``RandAugment`` + ``ToTensor`` +
  ``Normalize``, ``DataLoader(shuffle=True, num_workers=cores)``.
* **imgpipe raw / jpeg**: the resize step's layout (``train/part-*.parquet``) streamed by
  :class:`imgpipe.train.loader.ImageLoader` with the same three augmentations on the CPU
  path (albumentations on the shards' ``H x W x C`` uint8 arrays in the workers,
  :mod:`imgpipe.train.augment_cpu`), normalized in the loop (where the GPU would do it); the
  shards hold what the resize step makes of the same JPEGs (``short-side-crop`` to
  ``--size``), raw pixels or JPEG q95. On a machine without CUDA the normalization of
  the loop runs on the same cores, so a fourth row, **imgpipe raw, uint8 out**, stops at
  the uint8 batch: the CPU's share when a GPU normalizes, as in training on one.

Two figures per pipeline, each as a ratio to the recipe measured the same way in the
same run, and per core (images/s divided by the worker processes, one per core):

* **cold**: a fresh process (``python bench/steps/loader.py --child NAME``, started with
  ``subprocess``) that imports, builds its loader, starts its workers and reads one
  epoch, as a training pod does; timed from outside, from the start of the process to
  its exit (``--cold-repeats`` times, interleaved, the median kept).
* **warm**: steady state in this process, epochs after the first (``--epochs``; the
  first is warm-up: worker start, page cache), the pipelines' epochs interleaved so that
  background load hits all alike.

It also prints the CPU cores a GPU needs from each pipeline at an assumed 3,000
img/s (a typical H100 rate for ResNet-50 bf16 at 224 px; no GPU is measured here).
With ``--aug-device gpu`` the imgpipe side instead augments batches with kornia on the
training device (CUDA when available).

    python bench/steps/loader.py [--images 2000 --size 224 --batch-size 128 --epochs 3 --cold-repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from imgpipe import contract, resources, storage
from imgpipe.train.augment_config import AugmentConfig

# What a pipeline needs is imported where it is built, so that a --child process (the cold
# figure) imports what a pod running that pipeline would, and nothing for the others.
if TYPE_CHECKING:
    from imgpipe.train.augment import BatchAugment
    from imgpipe.train.loader import ImageLoader

CLASSES = 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE = "recipe: ImageFolder + PIL"
GPU_RATE = 3000  # img/s: an assumed H100 rate, ResNet-50 bf16 at 224 px (not measured here)
# The recipe's augmentations only (RandomResizedCrop, flip, RandAugment), for both imgpipe paths.
RECIPE_AUGMENT = AugmentConfig(policy="randaugment", color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0)


def make_image(index: int, size: int) -> Image.Image:
    """A smooth colour field with noise: compresses like a photo, not like a flat fill."""
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def _sample(i: int, folder: Path, size: int, source: tuple[int, int]) -> tuple[dict, dict]:
    """Image ``i``: its source-size JPEG written under ``folder``, and its raw and JPEG resize rows."""
    from imgpipe.resize.ops import encode_jpeg, resize_image
    from imgpipe.resize.spec import ResizeSpec

    label = i % CLASSES
    buf = io.BytesIO()
    make_image(i, source[1]).resize(source, Image.BILINEAR).save(buf, "JPEG", quality=90)
    original = buf.getvalue()
    path = folder / f"class_{label:02d}" / f"{i:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(original)
    pixels = resize_image(original, ResizeSpec(size=size, mode="short-side-crop"))  # what the resize step stores
    jpeg = encode_jpeg(pixels, 95)
    meta = {
        "path": str(path.relative_to(folder)),
        "label": label,
        "label_name": f"class_{label:02d}",
        "split": "train",
        "order": i,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
        "height": size,
        "width": size,
        "channels": 3,
    }
    return {**meta, "pixels": pixels.tobytes()}, {**meta, "image": {"bytes": jpeg, "path": meta["path"]}}


def write_datasets(root: Path, count: int, size: int, source: tuple[int, int], workers: int = 1, held_out: bool = False) -> tuple[Path, str, str]:
    """Writes an ImageFolder of source-size JPEGs, and their resize-step outputs (raw and JPEG).

    ``workers`` > 1 makes the images in that many processes (the same bytes: each image's
    pixels come from its index alone). ``held_out``: a tenth of each class goes to ``val``
    and a tenth to ``test`` (as the clean step's default split), else every row is ``train``.
    """
    import multiprocessing

    import pyarrow as pa

    from imgpipe.steps.resize import output_schema
    from imgpipe.writer import OutputWriter

    folder = root / "imagefolder"
    make = functools.partial(_sample, folder=folder, size=size, source=source)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            samples = pool.map(make, range(count), chunksize=max(1, min(64, count // (4 * workers))))
    else:
        samples = [make(i) for i in range(count)]
    if held_out:
        for i, pair in enumerate(samples):
            split = {8: "val", 9: "test"}.get((i // CLASSES) % 10, "train")
            for row in pair:
                row["split"] = split
    rows: dict[str, list[dict]] = {"raw": [s[0] for s in samples], "jpeg": [s[1] for s in samples]}
    uris = {}
    for fmt, fmt_rows in rows.items():
        out = OutputWriter(storage.normalize_uri(str(root / f"resize-{fmt}")), "resize")
        out.begin()
        for split in dict.fromkeys(r["split"] for r in fmt_rows):
            in_split = [r for r in fmt_rows if r["split"] == split]
            for shard, start in enumerate(range(0, len(in_split), 1024)):
                table = pa.Table.from_pylist(in_split[start : start + 1024], schema=output_schema(fmt))
                out.write_table(f"{split}/part-{shard:05d}.parquet", table, row_group_size=64)
        storage.write_bytes(out.uri(contract.LABELS), json.dumps({str(k): f"class_{k:02d}" for k in range(CLASSES)}).encode())
        out.commit(inputs=count, rejects=[], config={"generated_by": "bench/steps/loader.py"}, extra={"format": fmt, "size": size})
        uris[fmt] = out.dest
    return folder, uris["raw"], uris["jpeg"]


def dataset_paths(root: Path) -> tuple[Path, str, str]:
    """Where :func:`write_datasets` put the ImageFolder and the raw and JPEG resize outputs."""
    return (
        root / "imagefolder",
        storage.normalize_uri(str(root / "resize-raw")),
        storage.normalize_uri(str(root / "resize-jpeg")),
    )


def recipe_loader(folder: Path, size: int, batch_size: int, workers: int) -> Iterable:
    """The common recipe, as in the torchvision classification references."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.RandAugment(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=True,
    )


def imgpipe_loader(data: str, size: int, batch_size: int, workers: int, on_device: bool) -> ImageLoader:
    """imgpipe's loader with the recipe's three augmentations (CPU path) or none (GPU path)."""
    from imgpipe.train.augment_cpu import build_train_transform
    from imgpipe.train.loader import ImageLoader
    from imgpipe.train.loader_config import LoaderConfig
    from imgpipe.train.partition import describe_split

    cfg = LoaderConfig(batch_size=batch_size, num_workers=workers, shuffle_buffer=1024)
    transform = None if on_device else build_train_transform(RECIPE_AUGMENT, size, 3)
    device = "cuda" if on_device and torch.cuda.is_available() else "cpu"
    return ImageLoader(describe_split(data, "train"), cfg, transform=transform, decode_device=device)


def recipe_epoch(loader: Iterable, device: torch.device, epoch: int, first_batch: list[float] | None = None) -> int:
    """One epoch of the recipe (already normalized float batches), moved to ``device``."""
    n = 0
    for images, _labels in loader:
        images.to(device, non_blocking=True)
        n += len(images)
        if first_batch is not None and not first_batch:
            first_batch.append(time.time())
    return n


def our_epoch(
    loader: ImageLoader,
    device: torch.device,
    augment: BatchAugment | None,
    epoch: int,
    first_batch: list[float] | None = None,
    *,
    finish: bool = True,
) -> int:
    """One epoch of imgpipe's loader, ending in normalized float batches on ``device``.

    With ``finish=False`` the uint8 batches are only moved to ``device``: what the CPU
    does when a GPU normalizes (or augments), for a machine that has none.
    """
    from imgpipe.train.augment import normalize
    from imgpipe.train.rows import decode_jpeg_batch

    loader.set_epoch(epoch)
    n = 0
    for step, batch in enumerate(loader):
        images = batch["image"]
        if isinstance(images, list):  # JPEG bytes left for the GPU decoder
            images = decode_jpeg_batch(images, 3, device)
        images = images.to(device, non_blocking=True)
        if finish:
            images = augment(images, seed=step) if augment is not None else normalize(images, 3)
        n += len(images)
        if first_batch is not None and not first_batch:
            first_batch.append(time.time())
    return n


UINT8 = "imgpipe raw, uint8 out (the GPU normalizes)"


def pipeline_names(on_device: bool, device: torch.device) -> list[str]:
    """The recipe, imgpipe raw, imgpipe jpeg; on a machine without CUDA also raw without the loop's normalize."""
    suffix = " + kornia" if on_device else ""
    names = [RECIPE, f"imgpipe raw{suffix}", f"imgpipe jpeg{suffix}"]
    return names + [UINT8] if device.type == "cpu" and not on_device else names


def build_pipeline(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> Callable[..., int]:
    """``run_epoch(epoch, first_batch=None) -> images`` for one of :func:`pipeline_names`."""
    folder, raw, jpeg = dataset_paths(root)
    on_device = args.aug_device == "gpu"
    if name == RECIPE:
        return functools.partial(recipe_epoch, recipe_loader(folder, args.size, args.batch_size, args.workers), device)
    from imgpipe.train.augment import BatchAugment

    data = raw if name.startswith("imgpipe raw") else jpeg
    augment = BatchAugment(RECIPE_AUGMENT, args.size, 3).to(device) if on_device else None
    loader = imgpipe_loader(data, args.size, args.batch_size, args.workers, on_device)
    return functools.partial(our_epoch, loader, device, augment, finish=name != UINT8)


def measure(epochs: int, pipelines: dict[str, Callable[[int], int]]) -> dict[str, tuple[int, float]]:
    """Runs every pipeline epoch by epoch, interleaved, so background load hits all alike.

    Returns images and seconds per pipeline over all epochs but the first (warm-up).
    """
    totals = {name: (0, 0.0) for name in pipelines}
    for epoch in range(epochs):
        for name, run_epoch in pipelines.items():
            t0 = time.perf_counter()
            n = run_epoch(epoch)
            if epoch > 0 or epochs == 1:
                images, seconds = totals[name]
                totals[name] = (images + n, seconds + time.perf_counter() - t0)
    return totals


def run_child(name: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """One cold start: a fresh ``--child`` process reads one epoch; timed from outside, start to exit."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--root",
        str(root),
        "--size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--aug-device",
        args.aug_device,
    ]
    started, t0 = time.time(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"child {name!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "images": marks["images"],
        "seconds": wall,
        "to_main": marks["main"] - started,  # interpreter start and the module's imports (torch)
        "to_first_batch": marks["first_batch"] - started,
    }


def child_main(args: argparse.Namespace) -> int:
    """The ``--child`` process: one epoch of one pipeline; prints its time marks as JSON."""
    main_started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_epoch = build_pipeline(args.child, args.root, args, device)
    first_batch: list[float] = []
    images = run_epoch(0, first_batch=first_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"images": images, "main": main_started, "first_batch": first_batch[0], "end": time.time()}))
    return 0


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="stored image side (both sides train at this size)")
    parser.add_argument("--source-size", default="500x375", help="WxH of the recipe's JPEGs, the dataset as downloaded")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="warm figure: epochs in this process, the first is warm-up")
    parser.add_argument("--cold-repeats", type=int, default=2, help="cold figure: fresh processes per pipeline (median)")
    parser.add_argument("--workers", type=int, default=resources.available_cpus(), help="worker processes for every pipeline")
    parser.add_argument("--aug-device", choices=["cpu", "gpu"], default="cpu", help="where imgpipe augments")
    parser.add_argument("--root", type=Path, help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one cold epoch of this pipeline
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_device = args.aug_device == "gpu"
    names = pipeline_names(on_device, device)
    cores = max(1, args.workers)
    started_load = load_average()

    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        root = args.root or Path(tmp)
        source = tuple(int(v) for v in args.source_size.lower().split("x"))
        write_datasets(root, args.images, args.size, source)

        cold_runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for repeat in range(args.cold_repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order
                cold_runs[name].append(run_child(name, root, args))

        pipelines = {name: build_pipeline(name, root, args, device) for name in names}
        warm = measure(args.epochs, pipelines)
        if device.type == "cuda":
            torch.cuda.synchronize()

    cold = {}
    for name, runs in cold_runs.items():
        keep = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]  # the median run (lower middle)
        cold[name] = {**keep, "all_seconds": [round(r["seconds"], 3) for r in runs]}
    base_cold = cold[RECIPE]["images"] / cold[RECIPE]["seconds"]
    base_warm = warm[RECIPE][0] / warm[RECIPE][1]

    timed = args.epochs - 1 if args.epochs > 1 else 1
    print(
        f"\n{args.images} images: recipe reads {args.source_size} JPEGs, imgpipe {args.size}x{args.size} shards; "
        f"batch {args.batch_size}, {args.workers} workers ({cores} cores), device {device}; "
        f"load average at start {started_load}, at end {load_average()}\n"
    )
    print(f"Cold (a fresh process: imports, workers, one epoch; median of {args.cold_repeats}, timed from outside):\n")
    print("| pipeline | images | seconds (all runs) | to main (s) | to first batch (s) | images/s | per core | vs recipe |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in cold.items():
        rate = r["images"] / r["seconds"]
        runs = ", ".join(f"{v:.2f}" for v in r["all_seconds"])
        print(
            f"| {name} | {r['images']} | {r['seconds']:.2f} ({runs}) | {r['to_main']:.2f} | {r['to_first_batch']:.2f} | "
            f"{rate:.0f} | {rate / cores:.0f} | {rate / base_cold:.2f}x |"
        )
    print(f"\nWarm (steady state: {timed} epoch(s) after the first, interleaved, in one process):\n")
    print("| pipeline | images | seconds | images/s | per core | vs recipe |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (n, secs) in warm.items():
        rate = n / secs
        print(f"| {name} | {n} | {secs:.2f} | {rate:.0f} | {rate / cores:.0f} | {rate / base_warm:.2f}x |")
    print(
        f"\nCPU cores needed per GPU = {GPU_RATE:,} img/s / (warm images/s per core), at an assumed {GPU_RATE:,} img/s "
        "(a typical H100 rate for ResNet-50 bf16 at 224 px; no GPU measured here):\n"
    )
    for name in names:
        print(f"* {name}: {GPU_RATE / (warm[name][0] / warm[name][1] / cores):.1f}")
    if on_device and device.type == "cpu":
        print("\n(no CUDA: kornia's work ran on these cores, so the imgpipe rows are not per-GPU figures)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cores": cores,
                    "load_average": started_load,
                    "cold": cold,
                    "warm": {k: {"images": n, "seconds": secs} for k, (n, secs) in warm.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
