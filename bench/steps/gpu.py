"""The GPU rows: the train step on one GPU with its defaults, augmentation on the CPU against the GPU, nvJPEG against the CPU.

Three measurements, in one process that starts the train runs as cold children:

* **train step**: ``imgpipe train`` on the resize-shaped outputs of ``bench/steps/loader.py``
  (``write_datasets``: photo-like images stored at ``--size``, raw and JPEG rows), one fresh
  process per configuration as a pod runs it, ResNet-50 at 224 with the step's defaults
  (bf16 autocast, channels-last, ``loader_engine: auto``, the row cache, ``aug_device: auto``,
  which is ``gpu`` on CUDA) against the same with ``aug_device: cpu``. From ``metrics.json``:
  the epochs after the first give images/s and the data-wait fraction (time the loop waited
  on the loader over the epoch). The model's exports (ONNX, TorchScript) are skipped in
  these children: they come after training and are not timed.
* **batched augmentation**: :class:`imgpipe.train.augment.BatchAugment` alone on uint8
  batches already on the device (the crop, flips, the policy, normalization), images/s.
* **decode**: one photo-like JPEG at 1, 12 and 24 MP decoded by nvJPEG
  (``torchvision.io.decode_jpeg(device="cuda")``, batched as the loader does) against
  libjpeg-turbo on the CPU (simplejpeg, one thread, and one thread per core).

    python bench/steps/gpu.py --images 8192 --epochs 4 --json bench/results/gpu.json
    python bench/steps/gpu.py --plot docs/img/gpu.png bench/recorded/gpu.json   # the figure from the recorded runs
    python bench/steps/gpu.py --images 8192 --plan raw:default:4,raw:cpu:4,raw:default:8,raw:cpu:8 --parts train
        # runs pinned to 4 and 8 cores; with --plot, runs at several core counts also draw NAME-cores.png

On a machine without CUDA it runs on the CPU at whatever size it is given (a smoke test of
the script, not a GPU row).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from loader import write_datasets  # noqa: E402
from train_step import run_config  # noqa: E402

# A cold `imgpipe train` whose exports are skipped (not timed; they follow training).
TRAIN_CHILD = """
import sys
import imgpipe.train.outputs as outputs
outputs._exports = lambda run: ({}, {})
from imgpipe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augment_rate(device: torch.device, batch: int, size: int, iters: int) -> dict[str, float]:
    """Images/s of BatchAugment on uint8 batches already on ``device``: the defaults and RandAugment."""
    from imgpipe.train.augment import BatchAugment
    from imgpipe.train.augment_config import AugmentConfig

    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    rates = {}
    for name, cfg in (("defaults", AugmentConfig()), ("randaugment", AugmentConfig(policy="randaugment"))):
        aug = BatchAugment(cfg, size, 3).to(device)
        for i in range(3):
            aug(x, seed=i)
        _sync(device)
        started = time.perf_counter()
        for i in range(iters):
            aug(x, seed=100 + i)
        _sync(device)
        rates[name] = round(batch * iters / (time.perf_counter() - started), 1)
    return rates


@contextlib.contextmanager
def pinned_to(cores: int | None) -> Iterator[None]:
    """This process (and so the train child it starts) on its first ``cores`` CPUs, as a pod with that CPU limit sees them.

    imgpipe sizes its loader from ``os.sched_getaffinity`` (:func:`imgpipe.resources.available_cpus`).
    """
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:cores])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def photo_jpeg(megapixels: float, seed: int = 0) -> bytes:
    """A 4:3 photo-like JPEG (smooth colour field with noise) of about ``megapixels``, quality 90."""
    h = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    w = h * 4 // 3
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-8, 9, size=base.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _timed(call, per_call: int, device: torch.device, seconds: float) -> float:
    """Calls per second of ``call`` times ``per_call`` images, after two warm-up calls (handles, allocator)."""
    call()
    call()
    _sync(device)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        n += per_call
    _sync(device)
    return n / (time.perf_counter() - started)


def decode_row(mp: float, device: torch.device, seconds: float) -> dict[str, Any]:
    """One JPEG of about ``mp`` megapixels: nvJPEG batched and single, simplejpeg on 1 and all cores."""
    import simplejpeg
    from torchvision.io import decode_jpeg

    cores = os.cpu_count() or 1
    data = photo_jpeg(mp)
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    row: dict[str, Any] = {"megapixels": round(h * w / 1e6, 2), "shape": [h, w], "bytes": len(data)}
    rates = {"cpu_1_thread": _timed(lambda: simplejpeg.decode_jpeg(data, fastdct=False), 1, device, seconds)}
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:  # simplejpeg lets go of the GIL
        copies = [data] * (cores * 2)

        def spread() -> None:
            list(pool.map(functools.partial(simplejpeg.decode_jpeg, fastdct=False), copies))

        rates[f"cpu_{cores}_threads"] = _timed(spread, len(copies), device, seconds)
    if device.type == "cuda":
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        batch = max(1, min(32, int(96 / mp)))
        rates["gpu_single"] = _timed(lambda: decode_jpeg(tensor, device=device), 1, device, seconds)
        rates[f"gpu_batch_{batch}"] = _timed(lambda: decode_jpeg([tensor] * batch, device=device), batch, device, seconds)
        # nvJPEG's pixels against libjpeg-turbo's (the colour conversion and upsampling may differ).
        ours = decode_jpeg(tensor, device=device).permute(1, 2, 0).cpu().numpy().astype(np.int16)
        ref = simplejpeg.decode_jpeg(data, fastdct=False).astype(np.int16)
        row["gpu_vs_cpu_mean_abs"] = round(float(np.abs(ours - ref).mean()), 3)
    row.update({k: {"img_s": round(r, 1), "mp_s": round(r * row["megapixels"], 1)} for k, r in rates.items()})
    return row


def decode_rates(device: torch.device, sizes: list[float], seconds: float) -> list[dict[str, Any]]:
    """:func:`decode_row` for each size, printed as it comes."""
    rows = []
    for mp in sizes:
        rows.append(decode_row(mp, device, seconds))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Train images/s and data wait per data format, augmentation device and engine (the latest run of each), decode MP/s per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[str, dict[str, Any]] = {}
    for run in runs:
        for key, r in run.get("train", {}).items():
            if "error" not in r:
                cores = next((part for part in key.split(" | ") if part.startswith("cores ")), "all cores")
                label = f"{key.split(' | ')[0]} rows, augment on {r['resolved']['aug_device']}, {r['resolved']['loader_engine']}, {cores}"
                train[label] = {**r, "on_gpu": r["resolved"]["aug_device"] == "gpu"}
    decode = next((r["decode"] for r in runs if "decode" in r), [])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 3.5 + 0.35 * (len(train) + 4 * len(decode))))
    names = sorted(train)
    rates = [train[n]["warm_img_s"] for n in names]
    top.barh(names, rates, color=["tab:blue" if train[n]["on_gpu"] else "tab:gray" for n in names])
    for y, n in enumerate(names):
        top.text(rates[y], y, f" {rates[y]:.0f} img/s, data wait {train[n]['data_wait']:.1%}", va="center", fontsize=8)
    top.invert_yaxis()
    top.set_xlim(0, max(rates, default=1) * 1.5)
    top.set_title(f"ResNet-50 train step, {runs[0]['device']}: warm images/s (blue: augmentation on the GPU)", fontsize=10)
    bars = [(f"{row['megapixels']:.0f} MP, {p}", v["mp_s"]) for row in decode for p, v in row.items() if isinstance(v, dict)]
    bottom.barh([b[0] for b in bars], [b[1] for b in bars], color=["tab:green" if "gpu" in b[0] else "tab:gray" for b in bars])
    bottom.invert_yaxis()
    bottom.set_title("JPEG decode, megapixels/s: nvJPEG (green), libjpeg-turbo (grey)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    by_cores = cores_curves(runs)
    if any(len(points) > 1 for points in by_cores.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for (fmt, aug), points in sorted(by_cores.items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", linestyle="-" if aug == "gpu" else "--", label=f"{fmt} rows, augment on {aug}")
        ax.set_xlabel("CPU cores of the train process (its loader workers: one less)")
        ax.set_ylabel("warm images/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"ResNet-50 train step on one {runs[0]['device']}, by the cores it may use", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_name(path.stem + "-cores" + path.suffix), dpi=110)


def cores_curves(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """Warm images/s by the cores a run was pinned to, per (data format, augmentation device); the latest run of each."""
    curves: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        for key, r in run.get("train", {}).items():
            if "error" in r:
                continue
            pinned = [int(part.split()[1]) for part in key.split(" | ") if part.startswith("cores ")]
            cores = pinned[0] if pinned else int(run["cores"])
            curves.setdefault((key.split(" | ")[0], r["resolved"]["aug_device"]), {})[cores] = r["warm_img_s"]
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--source-size", default="500x375")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    parser.add_argument("--formats", default="raw,jpeg")
    parser.add_argument("--augs", default="default,cpu", help="aug_device per run; 'default' leaves the step's own (auto)")
    parser.add_argument(
        "--plan",
        default="",
        help="train runs as FORMAT:AUG:CORES,... in this order (CORES: 'all' or a count, the run pinned to the first CORES "
        "cores as a pod with that CPU limit); default: every --formats x --augs on all cores",
    )
    parser.add_argument("--decode-sizes", default="1,12,24", help="megapixels")
    parser.add_argument("--decode-seconds", type=float, default=2.0)
    parser.add_argument("--parts", default="decode,augment,train")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every train run (e.g. loader_engine=processes)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="draw the figure here from the recorded runs named (positional) and stop")
    parser.add_argument("recorded", nargs="*", type=Path, help="with --plot: result files, each a run or {'runs': [...]}")
    args = parser.parse_args(argv)
    if args.plot:
        runs = []
        for f in args.recorded:
            loaded = json.loads(f.read_text())
            runs.extend(loaded.get("runs", [loaded]))
        plot(runs, args.plot)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cores": os.cpu_count(),
    }
    parts = args.parts.split(",")
    plan = [tuple(p.split(":")) for p in args.plan.split(",") if p] or [
        (fmt, aug, "all") for fmt in args.formats.split(",") for aug in args.augs.split(",")
    ]

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    if "decode" in parts:
        results["decode"] = decode_rates(device, [float(s) for s in args.decode_sizes.split(",")], args.decode_seconds)
        save()
    if "augment" in parts:
        results["augment"] = augment_rate(device, args.batch_size, args.size, iters=20 if device.type == "cuda" else 2)
        print("augment", results["augment"], file=sys.stderr, flush=True)
        save()
    if "train" in parts:
        results["train"] = {}
        with tempfile.TemporaryDirectory(prefix="imgpipe-gpu-bench-") as tmp:
            started = time.perf_counter()
            w, h = (int(v) for v in args.source_size.split("x"))
            _, raw, jpeg = write_datasets(Path(tmp), args.images, args.size, (w, h), workers=os.cpu_count() or 1)
            print(f"data written in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            data = {"raw": raw, "jpeg": jpeg}
            for fmt, aug, cores in plan:
                pinned = [] if cores == "all" else [f"cores {cores}"]
                key = " | ".join([fmt, args.model, str(args.batch_size), f"aug {aug}", *pinned, *args.set])
                out = Path(tmp) / "out" / key.replace(" | ", "-").replace(" ", "_")
                sets = ([] if aug == "default" else [f"aug_device={aug}"]) + args.set
                shape = {"model": args.model, "batch": args.batch_size, "epochs": args.epochs, "seed": 0}
                with pinned_to(None if cores == "all" else int(cores)):
                    r = run_config(data[fmt], out, **shape, device=device.type, sets=sets, launcher=[sys.executable, "-c", TRAIN_CHILD])
                results["train"][key] = r
                print(key, json.dumps(r), file=sys.stderr, flush=True)
                save()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
