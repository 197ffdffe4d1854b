"""Benchmark: images/s delivered to the training loop, imgpipe's loader against the common recipe.

Both sides read the same images with the same number of worker processes, in one run:

* **recipe**: ``torchvision.datasets.ImageFolder`` of the dataset's JPEG files on local
  disk, at ``--source-size`` (default 500x375, the Oxford-IIIT Pet average: what a user
  has without an offline resize step; ``--source-size 224x224`` compares at equal size), PIL
  ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``RandAugment`` + ``ToTensor`` +
  ``Normalize``, ``DataLoader(shuffle=True, num_workers=cores)``.
* **imgpipe raw / jpeg**: the resize step's layout (``train/part-*.parquet``) streamed by
  :class:`imgpipe.loader.ImageLoader` with the same three augmentations as a
  ``transforms.v2`` pipeline on uint8 tensors in the workers, normalized in the loop
  (where the GPU would do it); the shards hold what the resize step makes of the same
  JPEGs (``short-side-crop`` to ``--size``), raw pixels or JPEG q95.

With ``--aug-device gpu`` the imgpipe side instead augments batches with kornia on the
training device (CUDA when available). Each pipeline runs ``--epochs`` epochs; the first
is warm-up (worker start, page cache) and the rest are timed.

    python bench/loader.py [--images 2000 --size 224 --batch-size 128 --epochs 3]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from imgpipe import resources, storage
from imgpipe.augment import AugmentConfig, BatchAugment, build_train_transform, normalize
from imgpipe.contract import OutputWriter
from imgpipe.loader import (
    ImageLoader,
    LoaderConfig,
    decode_jpeg_batch,
    describe_split,
)
from imgpipe.resize_ops import ResizeSpec, encode_jpeg, resize_image
from imgpipe.steps.resize import output_schema

CLASSES = 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE = "recipe: ImageFolder + PIL"
# The recipe's augmentations only (RandomResizedCrop, flip, RandAugment), for both imgpipe paths.
RECIPE_AUGMENT = AugmentConfig(policy="randaugment", color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0)


def make_image(index: int, size: int) -> Image.Image:
    """A smooth colour field with noise: compresses like a photo, not like a flat fill."""
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def write_datasets(root: Path, count: int, size: int, source: tuple[int, int]) -> tuple[Path, str, str]:
    """Writes an ImageFolder of source-size JPEGs, and their resize-step outputs (raw and JPEG)."""
    folder = root / "imagefolder"
    rows: dict[str, list[dict]] = {"raw": [], "jpeg": []}
    spec = ResizeSpec(size=size, mode="short-side-crop")
    for i in range(count):
        label = i % CLASSES
        buf = io.BytesIO()
        make_image(i, source[1]).resize(source, Image.BILINEAR).save(buf, "JPEG", quality=90)
        original = buf.getvalue()
        path = folder / f"class_{label:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(original)
        pixels = resize_image(original, spec)  # what the resize step stores
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
        rows["raw"].append({**meta, "pixels": pixels.tobytes()})
        rows["jpeg"].append({**meta, "image": {"bytes": jpeg, "path": meta["path"]}})
    uris = {}
    for fmt, fmt_rows in rows.items():
        out = OutputWriter(storage.normalize_uri(str(root / f"resize-{fmt}")), "resize")
        out.begin()
        for shard, start in enumerate(range(0, count, 1024)):
            table = pa.Table.from_pylist(fmt_rows[start : start + 1024], schema=output_schema(fmt))
            out.write_table(f"train/part-{shard:05d}.parquet", table, row_group_size=64)
        storage.write_bytes(out.uri("labels.json"), json.dumps({str(k): f"class_{k:02d}" for k in range(CLASSES)}).encode())
        out.commit(inputs=count, rejects=[], config={"generated_by": "bench/loader.py"}, extra={"format": fmt, "size": size})
        uris[fmt] = out.dest
    return folder, uris["raw"], uris["jpeg"]


def recipe_loader(folder: Path, size: int, batch_size: int, workers: int) -> Iterable:
    """The common recipe, as in the torchvision classification references."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.RandAugment(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
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
    cfg = LoaderConfig(batch_size=batch_size, num_workers=workers, shuffle_buffer=1024)
    transform = None if on_device else build_train_transform(RECIPE_AUGMENT, size, 3)
    device = "cuda" if on_device and torch.cuda.is_available() else "cpu"
    return ImageLoader(describe_split(data, "train"), cfg, transform=transform, decode_device=device)


def our_epoch(loader: ImageLoader, device: torch.device, augment: BatchAugment | None, epoch: int) -> int:
    """One epoch of imgpipe's loader, ending in normalized float batches on ``device``."""
    loader.set_epoch(epoch)
    n = 0
    for step, batch in enumerate(loader):
        images = batch["image"]
        if isinstance(images, list):  # JPEG bytes left for the GPU decoder
            images = decode_jpeg_batch(images, 3, device)
        images = images.to(device, non_blocking=True)
        images = augment(images, seed=step) if augment is not None else normalize(images, 3)
        n += len(images)
    return n


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="stored image side (both sides train at this size)")
    parser.add_argument(
        "--source-size", default="500x375", help="WxH of the recipe's JPEGs, the dataset as downloaded"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--workers", type=int, default=resources.available_cpus(), help="worker processes for every pipeline")
    parser.add_argument("--aug-device", choices=["cpu", "gpu"], default="cpu", help="where imgpipe augments")
    parser.add_argument("--root", type=Path, help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_device = args.aug_device == "gpu"

    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        root = args.root or Path(tmp)
        source = tuple(int(v) for v in args.source_size.lower().split("x"))
        folder, raw, jpeg = write_datasets(root, args.images, args.size, source)
        recipe = recipe_loader(folder, args.size, args.batch_size, args.workers)

        def recipe_epoch(epoch: int) -> int:
            n = 0
            for images, _labels in recipe:
                images.to(device, non_blocking=True)
                n += len(images)
            return n

        pipelines: dict[str, Callable[[int], int]] = {RECIPE: recipe_epoch}
        augment = BatchAugment(RECIPE_AUGMENT, args.size, 3).to(device) if on_device else None
        for name, data in (("raw", raw), ("jpeg", jpeg)):
            loader = imgpipe_loader(data, args.size, args.batch_size, args.workers, on_device)
            label = f"imgpipe {name}" + (" + kornia" if on_device else "")
            pipelines[label] = functools.partial(our_epoch, loader, device, augment)
        results = measure(args.epochs, pipelines)
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = results[RECIPE]
    base_rate = base[0] / base[1]
    print(f"\n{args.images} images: recipe reads {args.source_size} JPEGs, imgpipe {args.size}x{args.size} shards; "
          f"batch {args.batch_size}, {args.workers} workers, "
          f"{args.epochs - 1 if args.epochs > 1 else 1} timed epoch(s), device {device}\n")
    print("| pipeline | images | seconds | images/s | vs recipe |")
    print("|---|---:|---:|---:|---:|")
    for name, (n, s) in results.items():
        rate = n / s
        print(f"| {name} | {n} | {s:.2f} | {rate:.0f} | {rate / base_rate:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({k: {"images": n, "seconds": s} for k, (n, s) in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
