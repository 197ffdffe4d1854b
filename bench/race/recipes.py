"""Each size recipe before and after issue 34, on the same data, seeds and epochs: macro-F1 and its spread.

"Before" is the recipe tables of commit fab8432 written out as explicit settings (RandAugment
everywhere, smoothing 0.1, colour jitter on top of the policy, crop scale (0.08, 1)); "after"
is ``recipe: NAME`` as it resolves now (its learning rate by the ``lr_base`` rule, or with
``--same-lr`` the same 1e-3 as before, to tell the recipe's values from the LR rule). Both train ``--model`` from scratch for ``--epochs``
epochs on one generated data set (download -> clean -> resize, once), seeds 0..N-1, and are
scored on the test split.

    python bench/race/recipes.py --classes 6 --per-class 60 --size 48 --epochs 8 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imgpipe import storage  # noqa: E402
from imgpipe.clean.config import CleanConfig  # noqa: E402
from imgpipe.data.synth import SynthConfig, generate  # noqa: E402
from imgpipe.resize.config import ResizeConfig  # noqa: E402
from imgpipe.steps.clean import clean  # noqa: E402
from imgpipe.steps.download import DownloadConfig, download  # noqa: E402
from imgpipe.steps.resize import resize  # noqa: E402
from imgpipe.steps.train import train  # noqa: E402
from imgpipe.train.config import TrainConfig  # noqa: E402

# The tables of commit fab8432 (train/recipes.py then), as explicit settings.
BEFORE = {
    "small": {
        "aug_policy": "randaugment",
        "randaugment_n": 2,
        "randaugment_m": 5,
        "mixup": 0.2,
        "cutmix": 0.0,
        "mixup_prob": 0.5,
        "label_smoothing": 0.1,
        "weight_decay": 0.1,
        "drop_path": 0.0,
    },
    "medium": {
        "aug_policy": "randaugment",
        "randaugment_n": 2,
        "randaugment_m": 9,
        "mixup": 0.2,
        "cutmix": 1.0,
        "mixup_prob": 0.5,
        "label_smoothing": 0.1,
        "weight_decay": 0.05,
        "drop_path": 0.1,
    },
    "large": {
        "aug_policy": "randaugment",
        "randaugment_n": 2,
        "randaugment_m": 9,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "label_smoothing": 0.1,
        "weight_decay": 0.05,
        "drop_path": 0.1,
    },
}
BEFORE_COMMON = {"color_jitter": 0.2, "crop_scale": (0.08, 1.0), "mixup_switch_prob": 0.5, "patience": 0, "lr": 1e-3}


def prepare(root: Path, args: argparse.Namespace) -> str:
    synth = root / "synth"
    generate(str(synth), SynthConfig(classes=args.classes, per_class=args.per_class, seed=7, min_side=64, max_side=160, quirks=False), progress=False)
    uri = lambda name: "file://" + str(root / name)  # noqa: E731
    download(storage.join("file://" + str(synth), "images.tar.gz"), uri("download"), DownloadConfig())
    clean(uri("download"), uri("clean"), CleanConfig(workers=1))
    resize(uri("clean"), uri("resize"), ResizeConfig(size=args.size, concurrency=1))
    return uri("resize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--same-lr", action="store_true", help="give 'after' the same lr as 'before' (1e-3), not lr_base's scaling")
    parser.add_argument("--json", default="bench/results/recipes.json")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-recipes-") as tmp:
        data = prepare(Path(tmp), args)
        common = {"model": args.model, "epochs": args.epochs, "batch_size": 16, "num_workers": 0, "device": "cpu", "shuffle_buffer": 64}
        for name in ("small", "medium", "large"):
            after = {"recipe": name, **({"lr": BEFORE_COMMON["lr"]} if args.same_lr else {})}
            for when, settings in (("before", {**BEFORE[name], **BEFORE_COMMON}), ("after", after)):
                scores = results.setdefault(f"{name} {when}", [])
                for seed in range(args.seeds):
                    out = "file://" + str(Path(tmp) / f"{name}-{when}-{seed}")
                    started = time.monotonic()
                    train(data, out, TrainConfig(**common, **settings, seed=seed))
                    metrics = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
                    scores.append(float(metrics["test"]["macro_f1"]))
                    print(f"{name} {when} seed {seed}: test macro-F1 {scores[-1]:.3f} ({time.monotonic() - started:.0f} s)", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "macro_f1": results}, indent=2))
    print("\n| recipe | before: macro-F1 mean ± std (min-max) | after |")
    print("| --- | --- | --- |")
    for name in ("small", "medium", "large"):
        cells = []
        for when in ("before", "after"):
            s = results[f"{name} {when}"]
            cells.append(f"{statistics.mean(s):.3f} ± {statistics.pstdev(s):.3f} ({min(s):.3f}-{max(s):.3f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
