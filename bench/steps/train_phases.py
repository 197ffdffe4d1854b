"""Where a train step's time goes, by phase, at 500, 5,000 and 50,000 images (issue 71).

Each size is one cold ``imgpipe train`` process, as a pod runs the step, with the step's
defaults (resnet18, the recipe by size, validation every epoch, precise BN, the exports and
the report) on resize-shaped outputs of photo-like images (``bench/steps/loader.py``'s
``write_datasets``, 80/10/10 train/val/test, 10 classes) at ``--size`` px. Early stopping is
off (``patience=0``), so that every size trains the epochs asked. The phases:

- **start**: from the process's start to its first optimizer step: imports and the command
  line (until the step's ``started_at``), then the step's setup (the manifest, loaders,
  model, optimizer, the output's claim);
- **steps**: the optimizer steps of every epoch (loading, augmenting, forward, backward);
- **per-epoch extras**: each epoch's validation (precise BN, the model and its EMA) and
  checkpoint;
- **end**: the test evaluation, the outputs (predictions, figures, ONNX and TorchScript
  exports, the report) and the commit, to the process's exit.

The fixed cost is everything but the steps. The step records its phases in its manifest
(``extra.phase_s``); the process's wall time comes from here. Figures:
``bench/results/train_phases.json``, ``docs/img/train-phases.png``, docs/benchmarks.md.

    scripts/in-loopback-netns .venv/bin/python bench/steps/train_phases.py --sizes 500,5000,50000 --epochs 10,10,1 \\
        --json bench/results/train_phases.json --plot docs/img/train-phases.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from loader import write_datasets  # noqa: E402

from imgpipe import contract  # noqa: E402

IMGPIPE = Path(sys.executable).with_name("imgpipe")
# The bars, bottom to top, and their colours.
PHASES = (("start", "#8c8c8c"), ("steps", "#1f77b4"), ("per-epoch extras", "#ff7f0e"), ("end", "#d62728"))


def phases_of(wall: float, launched_at: float, manifest: dict[str, Any]) -> dict[str, float]:
    """The four phases (s) of one run from its manifest's ``phase_s`` and ``started_at`` and the process's wall time.

    Raises:
        ValueError: If the manifest lacks the phases (a step from before they were recorded).
    """
    extra = manifest.get("extra") or {}
    phase = extra.get("phase_s")
    if not phase or "started_at" not in extra:
        raise ValueError("the train manifest has no extra.phase_s / started_at: an imgpipe from before issue 71")
    imports = max(0.0, extra["started_at"] - launched_at)
    start = imports + phase.get("setup", 0.0)
    steps = phase.get("steps", 0.0)
    extras = phase.get("validation", 0.0) + phase.get("checkpoints", 0.0)
    return {
        "start": round(start, 2),
        "steps": round(steps, 2),
        "per-epoch extras": round(extras, 2),
        "end": round(max(0.0, wall - start - steps - extras), 2),
        # The parts, as recorded.
        "imports": round(imports, 2),
        **{k: round(v, 2) for k, v in phase.items()},
    }


def run_size(data: str, out: Path, epochs: int, seed: int) -> dict[str, Any]:
    """One cold ``imgpipe train`` with the defaults but early stopping; its phases and wall time."""
    cmd = [str(IMGPIPE), "train", data, str(out), "--epochs", str(epochs), "--device", "cpu", "--seed", str(seed), "--set", "patience=0"]
    launched_at = time.time()
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": "\n".join(done.stderr.strip().splitlines()[-15:]) or "?"}
    manifest = contract.read_manifest(str(out), expect_step="train")
    metrics = json.loads((out / "metrics.json").read_text())
    phases = phases_of(wall, launched_at, manifest)
    fixed = wall - phases["steps"]
    return {
        "wall_s": round(wall, 2),
        "phases": phases,
        "fixed_s": round(fixed, 2),
        "fixed_fraction": round(fixed / wall, 4),
        "epochs": len(metrics["epochs"]),
        "val_macro_f1": (metrics.get("kept") or {}).get("val_macro_f1"),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """One bar per size, its phases as shares of the process's time; the seconds written above each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = [k for k, v in results.items() if "error" not in v]
    fig = Figure(figsize=(3.6 + 1.6 * len(sizes), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bottoms = [0.0] * len(sizes)
    for name, colour in PHASES:
        heights = [100 * results[s]["phases"][name] / results[s]["wall_s"] for s in sizes]
        ax.bar(range(len(sizes)), heights, bottom=bottoms, color=colour, label=name, width=0.6)
        for i, (b, h) in enumerate(zip(bottoms, heights, strict=True)):
            if h >= 4:
                ax.text(i, b + h / 2, f"{h:.0f} %", ha="center", va="center", fontsize=8, color="white")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for i, s in enumerate(sizes):
        r = results[s]
        ax.text(i, 101, f"{r['wall_s']:.0f} s, fixed {100 * r['fixed_fraction']:.0f} %", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(sizes)), [f"{int(s):,} images\n{results[s]['epochs']} epoch{'s' * (results[s]['epochs'] != 1)}" for s in sizes])
    ax.set_ylim(0, 112)
    ax.set_ylabel("share of the cold process's time, %")
    ax.set_title("train step on CPU: where the time goes", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(results: dict[str, Any]) -> str:
    lines = [
        "| images | epochs | start s | steps s | per-epoch extras s | end s | process s | fixed share |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, r in results.items():
        if "error" in r:
            lines.append(f"| {int(size):,} | failed: {r['error'].splitlines()[-1]} | | | | | | |")
            continue
        p = r["phases"]
        lines.append(
            f"| {int(size):,} | {r['epochs']} | {p['start']:.1f} | {p['steps']:.1f} | {p['per-epoch extras']:.1f} | {p['end']:.1f} | "
            f"{r['wall_s']:.1f} | {100 * r['fixed_fraction']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,5000,50000", help="images per dataset (80/10/10 train/val/test)")
    parser.add_argument("--epochs", default="10,10,1", help="epochs at each size")
    parser.add_argument("--size", type=int, default=64, help="stored side, px (the race's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, help="draw --plot from this --json of an earlier run, running nothing")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text())["results"], args.plot)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    epochs = [int(e) for e in args.epochs.split(",")]
    if len(epochs) != len(sizes):
        parser.error(f"--epochs names {len(epochs)} values for {len(sizes)} sizes")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-train-phases-") as tmp:
        for count, n_epochs in zip(sizes, epochs, strict=True):
            root = Path(tmp) / str(count)
            _, raw, _ = write_datasets(root, count, args.size, (args.size * 2, args.size * 3 // 2), workers=os.cpu_count() or 1, held_out=True)
            results[str(count)] = run_size(raw, root / "out", n_epochs, args.seed)
            print(count, results[str(count)], file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
