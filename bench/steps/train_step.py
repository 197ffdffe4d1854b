"""The whole train step on the CPU, by loader engine and row cache: optimizer steps per second and data-wait fraction.

Each configuration is one cold ``imgpipe train`` process, as a pod runs the step, on the
same resize-shaped outputs (``bench/steps/loader.py``'s ``write_datasets``: photo-like images,
raw and JPEG, ``--size`` px, 10 classes), with the step's defaults but for the settings
measured: ``loader_engine`` (``processes``, ``threads``, and ``auto`` when the step has it),
``loader_cache_gb`` (0, or 2 GiB: more than the split), the model (``tiny_cnn``, where the
loader is the bottleneck, and ``resnet18``) and the batch. From ``metrics.json``: the
epochs after the first (warm) give images/s, optimizer steps/s and the data-wait fraction
(time the loop waited on the loader over the epoch's wall time); the first epoch and the
process's wall time are the cold figures. Configurations run interleaved, ``--repeats``
times; the tables give medians.

    scripts/in-loopback-netns .venv/bin/python bench/steps/train_step.py --images 1024 --size 96 --epochs 3 --repeats 1 \\
        --json bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from loader import write_datasets  # noqa: E402

IMGPIPE = Path(sys.executable).with_name("imgpipe")
CACHE_GB = 2.0


# What each run's config.yaml settled "auto" and the unset fields to (recorded beside its figures).
RESOLVED_KEYS = ("loader_engine", "loader_cache_gb", "num_workers", "aug_device", "amp", "channels_last", "aug_policy", "recipe")


def run_config(
    data: str,
    out: Path,
    *,
    model: str,
    batch: int,
    engine: str = "default",
    cache: float | None = None,
    epochs: int,
    seed: int,
    device: str = "cpu",
    sets: Sequence[str] = (),
    launcher: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One cold ``imgpipe train`` (``launcher`` + ``train ...``; default: the ``imgpipe`` command) and its figures.

    The epochs after the first (warm) give images/s, optimizer steps/s and the data-wait
    fraction, from ``metrics.json``; ``sets`` are more ``--set KEY=VALUE``.
    """
    cmd = [*(launcher or [str(IMGPIPE)]), "train", data, str(out), "--model", model, "--epochs", str(epochs), "--batch-size", str(batch)]
    cmd += ["--device", device, "--seed", str(seed)]
    if engine != "default":
        cmd += ["--set", f"loader_engine={engine}"]
    if cache is not None:
        cmd += ["--set", f"loader_cache_gb={cache}"]
    for setting in sets:
        cmd += ["--set", setting]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": "\n".join(done.stderr.strip().splitlines()[-15:]) or "?"}
    metrics = json.loads((out / "metrics.json").read_text())
    config = (out / "__imgpipe__" / "config.yaml").read_text()
    epochs_ = metrics["epochs"]
    warm = epochs_[1:] or epochs_
    img_s = statistics.median(e["images_per_s"] for e in warm)
    return {
        "wall_s": round(wall, 2),
        "first_epoch_s": epochs_[0]["seconds"],
        "warm_img_s": round(img_s, 1),
        "warm_steps_s": round(img_s / batch, 3),
        "data_wait": round(statistics.median(e["data_wait_fraction"] for e in warm), 4),
        "first_data_wait": round(epochs_[0]["data_wait_fraction"], 4),
        "resolved": {k: v for k, v in (line.split(": ", 1) for line in config.splitlines() if ": " in line) if k in RESOLVED_KEYS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", default="tiny_cnn,resnet18")
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--formats", default="raw,jpeg")
    parser.add_argument("--engines", default="processes,threads", help="add 'default' for the step's own choice")
    parser.add_argument("--caches", default="0,2", help="loader_cache_gb values; 'default' for the step's own")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    caches = [None if c == "default" else float(c) for c in args.caches.split(",")]
    grid = list(
        itertools.product(args.formats.split(","), args.models.split(","), [int(b) for b in args.batches.split(",")], args.engines.split(","), caches)
    )
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-train-step-") as tmp:
        _, raw, jpeg = write_datasets(Path(tmp), args.images, args.size, (args.size * 2, args.size * 3 // 2))
        data = {"raw": raw, "jpeg": jpeg}
        for repeat in range(args.repeats):
            for fmt, model, batch, engine, cache in grid:
                key = f"{fmt} | {model} | {batch} | {engine} | {'default' if cache is None else cache}"
                out = Path(tmp) / "out" / f"{len(results)}-{repeat}"
                r = run_config(data[fmt], out, model=model, batch=batch, engine=engine, cache=cache, epochs=args.epochs, seed=repeat)
                results.setdefault(key, []).append(r)
                print(key, r, file=sys.stderr, flush=True)
    lines = [
        "| data | model | batch | engine | cache GiB | warm steps/s | warm img/s | data wait | first epoch s | process s |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary = {}
    for key, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {' | '.join(key.split(' | '))} | failed: {runs[0]['error']} | | | | |")
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("warm_steps_s", "warm_img_s", "data_wait", "first_epoch_s", "wall_s")}
        summary[key] = {**med, "resolved": ok[0]["resolved"]}
        lines.append(
            f"| {' | '.join(key.split(' | '))} | {med['warm_steps_s']:.2f} | {med['warm_img_s']:.0f} | {med['data_wait']:.3f} | "
            f"{med['first_epoch_s']:.1f} | {med['wall_s']:.1f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
