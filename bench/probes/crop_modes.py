"""Benchmark: test accuracy with the train split stored whole against stored centre-cropped.

Resize mode ``short-side-crop`` stores the centre square of every image, so RandomResizedCrop at
training time samples from that square only; mode ``whole`` stores the whole picture and the
crop samples all of it (FFCV's and timm's practice). Evaluation is the same centre crop either
way. The data is ``imgpipe synth --off-centre``: wide or tall images whose object sits outside the
centre square about half the time, so a centre crop loses it.

Both runs are the whole Kubeflow pipeline through kfp.local (``imgpipe run``), same data, seeds,
model, epochs and recipe; only ``resize_train_mode`` differs. Starts Ray: run it inside the
loopback-only namespace::

    scripts/in-loopback-netns .venv/bin/python bench/probes/crop_modes.py [--epochs 12 --seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from imgpipe.local.run import LocalRunConfig, run_local

MODES = ("short-side-crop", "whole")
# The make-run recipe (configs/local.yaml) at a smaller size: quick on two CPU cores.
TRAIN = {
    "model": "resnet18",
    "lr": 0.002,
    "warmup_fraction": 0.05,
    "aug_policy": "basic",
    "mixup": 0.0,
    "cutmix": 0.0,
    "random_erasing": 0.0,
    "num_workers": 0,
}


def run_mode(mode: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """One pipeline run; returns its test and last-epoch validation accuracy."""
    cfg = LocalRunConfig(
        workdir=str(workdir),
        classes=args.classes,
        per_class=args.per_class,
        seed=0,  # the same data for every run
        off_centre=True,
        params={
            "image_size": args.size,
            "epochs": args.epochs,
            "batch_size": 32,
            "seed": seed,
            "resize_train_mode": mode,
            "ray_address": "",
        },
        step_config={"train": {**TRAIN, "seed": seed}},
    )
    result = run_local(cfg)
    # The run's own S3 server is gone by now: read the local copy of the train output.
    metrics = json.loads(Path(result.copies["metrics.json"]).read_text())
    return {
        "test_accuracy": metrics["test"]["accuracy"],
        "test_macro_f1": metrics["test"]["macro_f1"],
        "val_accuracy": metrics["epochs"][-1]["val_accuracy"],
        "seconds": round(result.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=80)
    parser.add_argument("--size", type=int, default=64, help="training side (image_size)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", default="0", help="training seeds, comma separated (one run per mode each)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="imgpipe-crop-modes-") as tmp:
        for seed in seeds:
            for mode in MODES:
                results[mode].append(run_mode(mode, seed, args, Path(tmp) / f"{mode}-{seed}"))
                print(mode, seed, results[mode][-1], file=sys.stderr, flush=True)
    print(f"| train split stored as | test accuracy ({len(seeds)} seed(s)) | test macro-F1 | last val accuracy |")
    print("| --- | ---: | ---: | ---: |")
    for mode in MODES:
        rows = results[mode]
        acc = ", ".join(f"{r['test_accuracy']:.3f}" for r in rows)
        f1 = statistics.mean(r["test_macro_f1"] for r in rows)
        val = statistics.mean(r["val_accuracy"] for r in rows)
        print(f"| `{mode}` | {acc} | {f1:.3f} | {val:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
