"""Benchmark: fine-tuning from cached pretrained weights against training from scratch, on synth data.

Real ImageNet weights cannot be downloaded here, so the pretrained weights are made the way a
hub's are, on other data: the same architecture is trained on a *different* synth dataset
(``imgpipe synth --seed 1``) whose classes are none of the target's. A synth class's look
(shape, texture, hue) follows its index in the generated set, and the target's 12 breeds are
indices 0-11 of the 37, so the source keeps the other 25 breeds only: new shape, texture and hue
combinations, drawn by the same generator (a related domain, as ImageNet is to pets). Its
weights are saved as torchvision publishes a file (a state dict, ``<model>-<sha256 prefix>.pth``).

The target (``--seed 0``, 12 breeds, few images per class, a large test split) is then trained
from scratch and fine-tuned with ``--pretrained DEFAULT``, same seed, epochs and recipe; a third
run adds ``--freeze-backbone-epochs`` and ``--backbone-lr-mult``. The first fine-tune finds the
weights cache empty and fills it through torch.hub (torchvision's URL for the weights pointed at
the local file, the only difference from a pod), the second reads the cache.

Every step is a fresh process, as a pod runs it (``imgpipe synth/download/clean/resize/train``).
About 17 minutes on two shared, busy CPU cores, 7 of them the pre-training. Resize starts Ray:
run it inside the loopback-only namespace::

    scripts/in-loopback-netns .venv/bin/python bench/race/pretrained.py [--workdir DIR --json results.json]
        [--epochs 15 --pretrain-epochs 12 --seeds 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

MODEL = "resnet18"
WEIGHTS = "DEFAULT"
from crop_modes import TRAIN  # noqa: E402 - bench/ is the script's folder, on sys.path

# The recipe of every training run: bench/probes/crop_modes.py's (no mixing: small data, few
# epochs), on the CPU; the model is this bench's own.
RECIPE = {**{k: v for k, v in TRAIN.items() if k not in ("model", "num_workers")}, "device": "cpu"}
TARGET_CLASSES = 12
SOURCE_CLASSES = 37  # all of synth's breeds; the target's are taken out


def imgpipe(*args: str, log: Path) -> float:
    """Runs ``imgpipe ARGS`` in a fresh process (its output appended to ``log``); returns its seconds."""
    started = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ imgpipe {' '.join(args)}\n")
        fh.flush()
        subprocess.run([sys.executable, "-m", "imgpipe.cli", *args], stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def train_args(data: Path, out: Path, epochs: int, seed: int, batch_size: int, extra: dict[str, object]) -> list[str]:
    args = ["train", str(data), str(out), "--model", MODEL, "--epochs", str(epochs), "--seed", str(seed)]
    args += ["--batch-size", str(batch_size), "--workers", "1"]
    for key, value in {**RECIPE, **extra}.items():
        args += ["--set", f"{key}={value}"]
    return args


def without_breeds(archive: Path, dest: Path, drop: set[str]) -> int:
    """Copies ``archive`` to ``dest`` without the members of the breeds in ``drop``; returns members kept."""
    kept = 0
    with tarfile.open(archive, "r:gz") as src, tarfile.open(dest, "w:gz") as out:
        for member in src:
            breed = Path(member.name).stem.rpartition("_")[0]
            if member.isfile() and breed not in drop:
                out.addfile(member, src.extractfile(member))
                kept += 1
    return kept


def prepare(name: str, workdir: Path, log: Path, *, seed: int, per_class: int, split: str, size: int, drop: set[str]) -> Path:
    """synth -> (filter) -> download -> clean -> resize; returns the resize output."""
    root = workdir / name
    imgpipe(
        "synth",
        str(root / "synth"),
        "--classes",
        str(SOURCE_CLASSES if drop else TARGET_CLASSES),
        "--per-class",
        str(per_class),
        "--seed",
        str(seed),
        "--set",
        "max_side=400",
        log=log,
    )
    archive = root / "synth" / "images.tar.gz"
    if drop:
        archive, kept = root / "images.tar.gz", without_breeds(archive, root / "images.tar.gz", drop)
        print(f"{name}: {kept} archive members of {SOURCE_CLASSES - len(drop)} breeds", flush=True)
    imgpipe("download", str(archive), str(root / "download"), log=log)
    imgpipe("clean", str(root / "download"), str(root / "clean"), "--split", split, "--seed", "0", log=log)
    imgpipe("resize", str(root / "clean"), str(root / "resize"), "--size", str(size), log=log)
    return root / "resize"


def publish_weights(model_pt: Path, hub: Path) -> Path:
    """Saves the model of a train output as torchvision publishes weights: ``hub/<model>-<sha256[:8]>.pth``."""
    import torch

    from imgpipe.train.models import extract_state_dict

    state = extract_state_dict(torch.load(model_pt, map_location="cpu", weights_only=True))
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    hub.mkdir(parents=True, exist_ok=True)
    path = hub / f"{MODEL}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path


def train_with_weights_at(url: str, argv: list[str]) -> int:
    """``imgpipe train ARGV`` with torchvision's URL of the weights pointed at ``url`` (this process only)."""
    from imgpipe import cli
    from imgpipe.train.models import resolve_weights

    resolve_weights(MODEL, WEIGHTS).value.url = url
    return cli.main(argv)


def summary(out: Path, seconds: float) -> dict[str, object]:
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["epochs"]
    return {
        "test_accuracy": metrics["test"]["accuracy"],
        "test_macro_f1": metrics["test"]["macro_f1"],
        "val_accuracy": epochs[-1]["val_accuracy"],
        "val_accuracy_epoch_1": epochs[0]["val_accuracy"],
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="a new or empty directory for data and runs (default: a temporary one)")
    parser.add_argument("--size", type=int, default=64, help="training side (resize --size)")
    parser.add_argument("--source-per-class", type=int, default=80)
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=40, help="target images per class (half of them train)")
    parser.add_argument("--epochs", type=int, default=15, help="target epochs, every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--freeze-fraction", type=float, default=0.2, help="the third run's freeze_fraction")
    parser.add_argument("--backbone-lr-mult", type=float, default=0.3, help="the third run's backbone_lr_mult")
    parser.add_argument("--seeds", default="0", help="training seeds, comma separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="imgpipe-bench-pretrained-") as tmp:
            return run(args, Path(tmp))
    args.workdir.mkdir(parents=True, exist_ok=True)
    return run(args, args.workdir.resolve())


def run(args: argparse.Namespace, work: Path) -> int:
    """Prepares both datasets in ``work``, pre-trains, then trains every variant on the target."""
    from imgpipe.data.synth_images import choose_breeds

    log = work / "bench.log"
    started = time.perf_counter()
    target_breeds = set(choose_breeds(TARGET_CLASSES))
    source = prepare("source", work, log, seed=1, per_class=args.source_per_class, split="0.8,0.1,0.1", size=args.size, drop=target_breeds)
    target = prepare("target", work, log, seed=0, per_class=args.per_class, split="0.5,0.1,0.4", size=args.size, drop=set())
    pre_seconds = imgpipe(*train_args(source, work / "pretrain", args.pretrain_epochs, 0, args.batch_size, {}), log=log)
    pre = summary(work / "pretrain", pre_seconds)
    print(f"pretrain on {SOURCE_CLASSES - TARGET_CLASSES} other classes: {pre}", flush=True)
    url = publish_weights(work / "pretrain" / "model.pt", work / "hub").as_uri()

    cache = work / "weights"
    variants = {
        "scratch": {},
        "pretrained": {"pretrained": WEIGHTS, "weights_cache": cache},
        "pretrained_frozen": {
            "pretrained": WEIGHTS,
            "weights_cache": cache,
            "freeze_fraction": args.freeze_fraction,
            "backbone_lr_mult": args.backbone_lr_mult,
        },
    }
    results: dict[str, list[dict[str, object]]] = {name: [] for name in variants}
    for seed in (int(s) for s in args.seeds.split(",") if s):
        for name, extra in variants.items():
            out = work / "runs" / f"{name}-seed{seed}"
            cmd = train_args(target, out, args.epochs, seed, args.batch_size, extra)
            tick = time.perf_counter()
            with open(log, "a") as fh:
                fh.write(f"\n$ {name}: imgpipe {' '.join(cmd)}\n")
                fh.flush()
                runner = [sys.executable, __file__, "--train-with-weights-at", url, "--", *cmd]
                subprocess.run(runner if extra else [sys.executable, "-m", "imgpipe.cli", *cmd], stdout=fh, stderr=subprocess.STDOUT, check=True)
            results[name].append(summary(out, time.perf_counter() - tick))
            print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    cached = sorted(str(p.relative_to(work)) for p in cache.rglob("*") if p.is_file())
    downloads = sum(line.startswith("Downloading: ") for line in log.read_text().splitlines())

    def mean(name: str, key: str) -> float:
        values = [float(r[key]) for r in results[name]]  # type: ignore[arg-type]
        return sum(values) / len(values)

    scratch = mean("scratch", "test_accuracy")
    report = {
        "model": MODEL,
        "size": args.size,
        "target_epochs": args.epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain": pre,
        "results": results,
        "weights_cache": cached,
        "hub_downloads": downloads,
        "total_seconds": round(time.perf_counter() - started, 1),
        "vs_scratch": {
            name: {
                "test_accuracy_difference": round(mean(name, "test_accuracy") - scratch, 4),
                "test_accuracy_ratio": round(mean(name, "test_accuracy") / scratch, 3) if scratch else None,
            }
            for name in variants
            if name != "scratch"
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-with-weights-at"]:
        sys.exit(train_with_weights_at(sys.argv[2], sys.argv[4:]))  # argv: flag, URL, "--", imgpipe args
    sys.exit(main())
