"""Training-loader peers: imgpipe's loader against FFCV, torchvision ImageFolder, Hugging Face datasets, MosaicML Streaming, WebDataset.

Every contender reads the same train images: one resize output stored whole (the ``224``
preset with ``train_mode=whole``: short side 256, aspect kept), RandomResizedCrop 224
(scale 0.08-1, ratio 3/4-4/3) + horizontal flip, 2 workers (processes, FFCV's threads),
batch 128, uint8 batches out. imgpipe reads the resize outputs (``raw`` and ``jpeg``);
each peer reads its own copy of the same images, written once outside the timing
(:func:`prepare`). FFCV and MosaicML Streaming run in the peers' venv (``.venv/peers``).

    failed = prepare(root, images=3072, workers=2)        # {contender: why its copy could not be written}
    results = measure(root, CONTENDERS, repeats=3, warm_epochs=2, batch_size=128, workers=2, failed=failed)
    python bench/peers/peers_loader.py --child "FFCV raw .beton" --root ROOT --epochs 3   # one contender, a fresh process
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from peers_common import Run, fmt_spread, markdown, peers_python, rotated, spread, timed_child
from peers_loader_copies import COPIES, hf_dataset, photos
from peers_loader_copies import __file__ as COPIES_SCRIPT

__all__ = ["CONTENDERS", "IMGPIPE_RAW", "IMGPIPE_JPEG", "FFCV_JPEG", "imgpipe_loader", "prepare", "measure", "summarize", "tables"]

SIZE = 224
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)

IMGPIPE_RAW, IMGPIPE_JPEG = "imgpipe raw", "imgpipe jpeg"
# The same loader with LoaderConfig(engine="threads") (imgpipe.train.threads): its workers are threads.
IMGPIPE_RAW_THREADS, IMGPIPE_JPEG_THREADS = "imgpipe raw, threads", "imgpipe jpeg, threads"
# The loader as a train step with its defaults builds it (TrainConfig().loader: loader_engine auto,
# the row cache a quarter of the memory the process may use): the rows the targets apply to.
# (auto is threads here: the processes of resolve_engine's GPU rule need CUDA and CPU augmentation.)
IMGPIPE_RAW_DEFAULTS, IMGPIPE_JPEG_DEFAULTS = "imgpipe raw, defaults", "imgpipe jpeg, defaults"
# The defaults' LoaderConfig fields as JSON, from the bench's process to the contender's (defaults_loader_fields).
DEFAULTS_ENV = "IMGPIPE_BENCH_LOADER_DEFAULTS"
IMGPIPE = {
    IMGPIPE_RAW: ("raw", "processes"),
    IMGPIPE_JPEG: ("jpeg", "processes"),
    IMGPIPE_RAW_THREADS: ("raw", "threads"),
    IMGPIPE_JPEG_THREADS: ("jpeg", "threads"),
    IMGPIPE_RAW_DEFAULTS: ("raw", "defaults"),
    IMGPIPE_JPEG_DEFAULTS: ("jpeg", "defaults"),
}
FFCV_RAW, FFCV_JPEG = "FFCV raw .beton", "FFCV JPEG .beton"
TORCHVISION, HF, MDS, WDS = "torchvision ImageFolder", "HF datasets (Parquet)", "MosaicML Streaming (MDS)", "WebDataset (tar)"
CONTENDERS = [
    IMGPIPE_RAW_DEFAULTS,
    IMGPIPE_JPEG_DEFAULTS,
    IMGPIPE_RAW,
    IMGPIPE_JPEG,
    IMGPIPE_RAW_THREADS,
    IMGPIPE_JPEG_THREADS,
    FFCV_RAW,
    FFCV_JPEG,
    TORCHVISION,
    HF,
    MDS,
    WDS,
]
IN_PEERS_VENV = {FFCV_RAW, FFCV_JPEG, MDS}
# The copy each contender reads, written once by bench/peers/peers_loader_copies.py KEY (in the contender's venv).
COPY = {FFCV_RAW: "ffcv-raw", FFCV_JPEG: "ffcv-jpeg", TORCHVISION: "imagefolder", HF: "hf", MDS: "mds", WDS: "wds"}


def _python(name: str) -> str:
    return peers_python() if name in IN_PEERS_VENV else sys.executable


# ----------------------------------------------------------------------------------------
# The data, written once (the copies themselves: bench/peers/peers_loader_copies.py).


def prepare(root: Path, images: int, workers: int) -> dict[str, str]:
    """The resize outputs (imgpipe's own step) and every peer's copy of their train images.

    Returns why a contender's copy could not be written, by contender (its rows then say so).
    """
    from resize_common import write_clean_output

    from imgpipe import storage
    from imgpipe.raysession import ray_session
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.steps.resize import resize

    root.mkdir(parents=True, exist_ok=True)
    clean = write_clean_output(root / "clean", photos(root, images), 128, 2048)  # clean's default layout
    with ray_session():
        for fmt in ("raw", "jpeg"):
            resize(clean, storage.normalize_uri(str(root / f"resize-{fmt}")), ResizeConfig(preset="224", train_mode="whole", format=fmt))
    failed: dict[str, str] = {}
    for key in COPIES:  # mds reads the imagefolder, written before it
        python = peers_python() if key.startswith(("ffcv", "mds")) else sys.executable
        # A timeout: FFCV's writer waits forever on a worker that died.
        run = timed_child([python, COPIES_SCRIPT, key, "--root", str(root), "--workers", str(workers)], env=_child_env(), timeout=900)
        for name, copy in COPY.items():
            if copy == key and run.error:
                failed[name] = f"prepare failed: {run.error}"
        if key == "imagefolder" and run.error:
            failed[MDS] = f"prepare failed: {run.error}"
        print(f"prepare {key}: {run.error or f'{run.seconds:.1f} s'}", file=sys.stderr, flush=True)
    return failed


# ----------------------------------------------------------------------------------------
# The contenders: run_epoch(epoch) -> images.


# The thread engine's rows keep the row groups they read (LoaderConfig.cache_bytes): the
# whole train split fits (0.8 GB raw, 0.1 GB jpeg), as FFCV's .beton sits in the page cache.
THREADS_CACHE_BYTES = 2 << 30


def defaults_loader_fields(batch_size: int, workers: int) -> dict[str, Any]:
    """The loader settings ``TrainConfig`` gives a run that sets neither engine nor cache, at this batch and workers.

    Built in the bench's own process and handed to the contender's: ``TrainConfig`` checks its
    model name against torchvision's model list, the train step's check and not the loader's, and
    a cold figure of the loader should not carry torchvision's import for it.
    """
    import dataclasses

    from imgpipe.train.config import TrainConfig

    return dataclasses.asdict(TrainConfig(batch_size=batch_size, num_workers=workers).loader(shuffle=True))


def imgpipe_loader(data: str, batch_size: int, workers: int, engine: str = "processes", defaults: dict[str, Any] | None = None) -> Any:
    """imgpipe's contender: :class:`imgpipe.train.loader.ImageLoader` with exactly RandomResizedCrop + flip, uint8 out.

    The ``threads`` engine runs with the row cache (:data:`THREADS_CACHE_BYTES`); ``processes`` without;
    ``defaults`` is what ``TrainConfig`` gives a run that sets neither (``loader_engine`` auto,
    ``loader_cache_gb`` unset), at the same batch and workers: :func:`defaults_loader_fields`, or
    ``defaults`` when the bench's process built them.
    """
    from imgpipe.train.augment_config import AugmentConfig
    from imgpipe.train.augment_cpu import build_train_transform
    from imgpipe.train.loader import ImageLoader
    from imgpipe.train.loader_config import LoaderConfig
    from imgpipe.train.partition import describe_split

    crop_flip = AugmentConfig(policy="basic", color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0)
    if engine == "defaults":
        from imgpipe import resources

        resources.use_system_allocator()  # as the train step does for its loader
        cfg = LoaderConfig(**(defaults or defaults_loader_fields(batch_size, workers)))
    else:
        cache = THREADS_CACHE_BYTES if engine == "threads" else 0
        cfg = LoaderConfig(batch_size=batch_size, num_workers=workers, engine=engine, cache_bytes=cache)
    return ImageLoader(describe_split(data, "train"), cfg, transform=build_train_transform(crop_flip, SIZE, 3))


def _torchvision_transform() -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(SIZE, scale=SCALE, ratio=RATIO), T.RandomHorizontalFlip(), T.PILToTensor()])


def _data_loader(dataset: Any, batch_size: int, workers: int, shuffle: bool = True) -> Any:
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, persistent_workers=workers > 0, drop_last=True
    )


def _count(loader: Any) -> Callable[[int], int]:
    """One epoch of a loader of ``(images, labels)`` batches."""

    def run_epoch(epoch: int) -> int:
        return sum(len(images) for images, _labels in loader)

    return run_epoch


def build(name: str, root: Path, batch_size: int, workers: int) -> Callable[[int], int]:
    """``run_epoch(epoch) -> images`` of one contender, reading its copy under ``root``."""
    if name in IMGPIPE:
        from imgpipe import storage

        fmt, engine = IMGPIPE[name]
        defaults = json.loads(os.environ[DEFAULTS_ENV]) if engine == "defaults" and DEFAULTS_ENV in os.environ else None
        loader = imgpipe_loader(storage.normalize_uri(str(root / f"resize-{fmt}")), batch_size, workers, engine, defaults)

        def run_epoch(epoch: int) -> int:
            loader.set_epoch(epoch)
            return sum(len(batch["image"]) for batch in loader)

        return run_epoch
    if name in (FFCV_RAW, FFCV_JPEG):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToTensor

        pipelines = {
            "image": [RandomResizedCropRGBImageDecoder((SIZE, SIZE), scale=SCALE, ratio=RATIO), RandomHorizontalFlip(), ToTensor()],
            "label": [IntDecoder(), ToTensor()],
        }
        beton = root / ("ffcv-raw.beton" if name == FFCV_RAW else "ffcv-jpeg.beton")
        return _count(Loader(str(beton), batch_size, num_workers=workers, os_cache=True, order=OrderOption.RANDOM, pipelines=pipelines))
    transform = _torchvision_transform()
    if name == TORCHVISION:
        from torchvision.datasets import ImageFolder

        return _count(_data_loader(ImageFolder(str(root / "imagefolder"), transform=transform), batch_size, workers))
    if name == HF:
        dataset = hf_dataset(root).select_columns(["image", "label"])
        dataset.set_transform(lambda b: {"image": [transform(im.convert("RGB")) for im in b["image"]], "label": b["label"]})
        loader = _data_loader(dataset, batch_size, workers)
        return lambda epoch: sum(len(batch["image"]) for batch in loader)
    if name == MDS:
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        class Images(StreamingDataset):  # the documented way: a subclass whose __getitem__ transforms
            def __getitem__(self, i: int) -> tuple[Any, int]:
                sample = super().__getitem__(i)
                return transform(sample["image"].convert("RGB")), sample["label"]

        clean_stale_shared_memory()
        dataset = Images(local=str(root / "mds"), shuffle=True, batch_size=batch_size)
        return _count(_data_loader(dataset, batch_size, workers, shuffle=False))  # the dataset shuffles
    if name == WDS:
        import webdataset as wds

        urls = [str(p) for p in sorted((root / "wds").glob("shard-*.tar"))]
        dataset = (
            wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
            .shuffle(1000)
            .decode("pil")
            .map(lambda s: (transform(s["jpg"].convert("RGB")), s["cls"]))
            .batched(batch_size)  # each worker's last batch may be short: every image is delivered, as by the others
        )
        return _count(wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0))
    raise ValueError(f"unknown contender {name!r}")


def child_main(args: argparse.Namespace) -> int:
    """One contender in this fresh process: ``--epochs`` epochs; prints images and seconds per epoch as JSON."""
    started = time.time()
    run_epoch = build(args.child, args.root, args.batch_size, args.workers)
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        images = run_epoch(epoch)
        epochs.append([images, time.perf_counter() - t0])
    print(json.dumps({"main": started, "epochs": epochs}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# Measuring and reporting.


def _child_env() -> dict[str, str]:
    # No hub look-ups: every peer reads local files (the bench runs in a loopback-only namespace).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(name: str, root: Path, epochs: int, batch_size: int, workers: int) -> Run:
    cmd = [_python(name), __file__, "--child", name, "--root", str(root), "--epochs", str(epochs)]
    env = _child_env()
    if name in IMGPIPE and IMGPIPE[name][1] == "defaults":
        env[DEFAULTS_ENV] = json.dumps(defaults_loader_fields(batch_size, workers))
    return timed_child([*cmd, "--batch-size", str(batch_size), "--workers", str(workers)], env=env)


def measure(
    root: Path, names: list[str], repeats: int, warm_epochs: int, batch_size: int, workers: int, failed: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Cold (a fresh process, one epoch, timed from outside) and warm (the epochs after the first in a fresh process) per contender.

    The contenders take turns within each repeat, in a rotated order, cold first, then warm.
    """
    runs: dict[str, dict[str, list]] = {n: {"cold": [], "warm": [], "errors": []} for n in names}
    live = [n for n in names if n not in failed]
    for repeat in range(repeats):
        for kind, epochs in (("cold", 1), ("warm", 1 + warm_epochs)):
            for name in rotated(live, repeat):
                run = _run(name, root, epochs, batch_size, workers)
                if not run.error and not all(images for images, _ in run.result["epochs"]):
                    run = Run(run.seconds, None, "an epoch delivered no images")
                if run.error:
                    runs[name]["errors"].append(run.error)
                else:
                    runs[name][kind].append((run.seconds, run.result["epochs"]))
                print(f"loader {kind} {repeat}: {name}: {run.error or f'{run.seconds:.1f} s'}", file=sys.stderr, flush=True)
    results = {}
    for name in names:
        r = runs[name]
        warm = [sum(n for n, _ in ep[1:]) / sum(s for _, s in ep[1:]) for _, ep in r["warm"]]
        cold_images = [ep[0][0] for _, ep in r["cold"]]
        results[name] = {
            "venv": "peers" if name in IN_PEERS_VENV else "main",
            "error": failed.get(name) or (r["errors"][0] if r["errors"] else None),
            "failed_runs": len(r["errors"]),
            "images": max(cold_images) if cold_images else None,
            "cold_s": spread(s for s, _ in r["cold"]),
            "warm_img_s": spread(warm),
        }
    return results


def _speedup(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, key: str) -> float | None:
    """How many times faster ``ours`` is, on medians: img/s over img/s, or seconds under seconds."""
    if not ours or not theirs or not ours.get(key) or not theirs.get(key):
        return None
    a, b = ours[key]["median"], theirs[key]["median"]
    return a / b if key == "warm_img_s" else b / a


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios: imgpipe (its defaults first) against the best peer and FFCV's .beton of the same format (speed, >1 = imgpipe faster)."""
    peers = {n: r for n, r in results.items() if not n.startswith("imgpipe") and r["cold_s"] and r["warm_img_s"]}
    best_cold = min(peers, key=lambda n: peers[n]["cold_s"]["median"], default=None)
    best_warm = max(peers, key=lambda n: peers[n]["warm_img_s"]["median"], default=None)
    rows = []
    for ours, theirs, what in (
        (IMGPIPE_RAW_DEFAULTS, best_cold, "cold_s"),
        (IMGPIPE_RAW_DEFAULTS, best_warm, "warm_img_s"),
        (IMGPIPE_RAW_DEFAULTS, FFCV_RAW, "warm_img_s"),
        (IMGPIPE_JPEG_DEFAULTS, best_cold, "cold_s"),
        (IMGPIPE_JPEG_DEFAULTS, FFCV_JPEG, "warm_img_s"),
        (IMGPIPE_RAW, best_cold, "cold_s"),
        (IMGPIPE_RAW, best_warm, "warm_img_s"),
        (IMGPIPE_JPEG, FFCV_JPEG, "cold_s"),
        (IMGPIPE_JPEG, FFCV_JPEG, "warm_img_s"),
        (IMGPIPE_RAW_THREADS, best_cold, "cold_s"),
        (IMGPIPE_RAW_THREADS, best_warm, "warm_img_s"),
        (IMGPIPE_RAW_THREADS, FFCV_RAW, "warm_img_s"),
        (IMGPIPE_JPEG_THREADS, FFCV_JPEG, "cold_s"),
        (IMGPIPE_JPEG_THREADS, FFCV_JPEG, "warm_img_s"),
    ):
        ratio = _speedup(results.get(ours), results.get(theirs) if theirs else None, what)
        row = {"ours": ours, "peer": theirs, "figure": "cold" if what == "cold_s" else "warm", "speedup": ratio}
        if row not in rows:
            rows.append(row)
    return rows


def tables(results: dict[str, dict[str, Any]], ratios: list[dict[str, Any]], repeats: int) -> str:
    rows = []
    for name, r in results.items():
        if r["cold_s"] is None and r["warm_img_s"] is None:
            rows.append([name, r["venv"], "—", f"**failed**: {r['error']}", "—", "—"])
            continue
        cold_rate = r["images"] / r["cold_s"]["median"] if r["cold_s"] else None
        note = f"{r['failed_runs']} run(s) failed: {r['error']}" if r["error"] else ""
        warm = fmt_spread(r["warm_img_s"], 0) + (f" {note}" if note else "")
        rows.append([name, r["venv"], r["images"], fmt_spread(r["cold_s"]), f"{cold_rate:.0f}" if cold_rate else "—", warm])
    head = ["contender", "venv", "images", f"cold s, one epoch (median of {repeats}, min–max)", "cold img/s", "warm img/s (median, min–max)"]
    out = [markdown(head, rows, [False, False, True, True, True, True]), ""]
    out.append(
        markdown(
            ["imgpipe", "peer", "figure", "speed ratio (>1: imgpipe faster)"],
            [[r["ours"], r["peer"] or "—", r["figure"], "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"] for r in ratios],
            [False, False, False, True],
        )
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help="run this contender's epochs in this process")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    parser.error("--child (bench/peers/peers.py runs the comparison)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
