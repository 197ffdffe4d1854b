"""Benchmark: what a review of the audit's suspects buys, on a real set with labels flipped on purpose.

scikit-learn's digits (bench/race/real_sets.py: 1,797 handwritten digits, a fixed 60/20/20 split)
are downloaded as class folders and cleaned with a seeded share of the train labels given another
class (clean's own ``label_overrides``), resized and audited as ``imgpipe-audit`` does it (K folds,
one training each, cleanlab). A reviewer then looks at the audit's top ``N`` (``N`` = the number
of flips, where a person starts) and gives each its true class: what ``imgpipe review import``
hands the next run. The same recipe then trains three times, each on its own clean: the flips left
in, the flips with the review's corrections, and no flips at all (the ceiling). Reported per flip
share: flips in the top N, flips the review fixed, and test macro-F1 of each training (the val and
test labels are never flipped). Steps run in this process; resize starts Ray, so::

    scripts/in-loopback-netns .venv/bin/python bench/probes/review_loop.py --json bench/results/review_loop.json \\
        --plot docs/img/review-loop.png [--flips 0.05,0.2 --folds 5 --epochs 12 --size 32 --seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]


def _csv(rows: dict[str, str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(sorted(rows.items()))
    return buf.getvalue().encode()


def _macro_f1(model: str) -> float:
    from imgpipe import storage

    metrics = json.loads(storage.read_bytes(storage.join(model, "metrics.json")))
    return float(metrics["test"]["macro_f1"])


def main() -> int:  # noqa: PLR0915 - one measured procedure, top to bottom
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    parser.add_argument("--flips", default="0.05,0.2")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2", help="each a whole repetition: its flips, folds and trainings")
    args = parser.parse_args()

    base = Path(args.workdir or tempfile.mkdtemp(prefix="imgpipe-bench-review-"))
    started = time.monotonic()
    runs = []
    for seed in (int(x) for x in args.seeds.split(",")):
        runs.append(_one_seed(args, seed, base / f"seed-{seed}"))
    results = []
    for k, share in enumerate(float(x) for x in args.flips.split(",")):
        per_seed = [run[k] for run in runs]
        summary: dict = {"flip_share": share, "seeds": [r["seed"] for r in per_seed]}
        for key in ("train_images", "flipped", "reviewed_top_n", "flips_in_top_n", "fixed_by_review", "flagged"):
            summary[key] = [r[key] for r in per_seed]
        summary["test_macro_f1"] = {
            kind: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4), "each": v}
            for kind in ("flips_left", "after_review", "no_flips")
            for v in [[r["test_macro_f1"][kind] for r in per_seed]]
        }
        results.append(summary)
    out = {
        "set": "digits",
        "size": args.size,
        "model": args.model,
        "epochs": args.epochs,
        "folds": args.folds,
        "seeds": args.seeds,
        "results": results,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        _plot(out, Path(args.plot))
    return 0


def _one_seed(args: argparse.Namespace, seed: int, work: Path) -> list[dict]:
    """The whole procedure once: its flips, folds and trainings seeded by ``seed``; one row per flip share."""
    from prepared import plain_recipe  # bench/ is the script's folder, on sys.path
    from real_sets import load_set, write_set

    from imgpipe import contract, storage
    from imgpipe.clean.config import CleanConfig
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.steps.audit import LABEL_ISSUES, AuditConfig, make_folds, rank_label_issues
    from imgpipe.steps.clean import clean
    from imgpipe.steps.download import DownloadConfig, download
    from imgpipe.steps.resize import resize
    from imgpipe.steps.train import train

    root = "file://" + str(work)
    write_set(load_set("digits"), work / "digits", size=args.size)
    download(str(work / "digits"), storage.join(root, "download"), DownloadConfig())
    truth_clean = clean(storage.join(root, "download"), storage.join(root, "clean-truth"), CleanConfig(workers=1))
    rows = [
        r
        for uri in contract.data_files(truth_clean.dest, contract.read_manifest(truth_clean.dest))
        for r in pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["path", "label_name", "split"]).to_pylist()
    ]
    truth = {r["path"]: r["label_name"] for r in rows}
    train_paths = sorted(r["path"] for r in rows if r["split"] == "train")
    classes = sorted(set(truth.values()))
    recipe = plain_recipe(args.model, args.epochs, lr=3e-3, predictions_probs=True, seed=seed)

    def trained(name: str, overrides: dict[str, str] | None) -> tuple[str, float]:
        cfg = CleanConfig(workers=1, split_from="source")
        if overrides:
            storage.write_bytes(storage.join(root, f"{name}.csv"), _csv(overrides))
            cfg = CleanConfig(workers=1, split_from="source", label_overrides=storage.join(root, f"{name}.csv"))
        cleaned = clean(storage.join(root, "download"), storage.join(root, f"clean-{name}"), cfg)
        resized = resize(cleaned.dest, storage.join(root, f"resize-{name}"), ResizeConfig(size=args.size, mode="fixed", progress_bars=False))
        model = storage.join(root, f"train-{name}")
        train(resized.dest, model, recipe)
        return resized.dest, _macro_f1(model)

    _, ceiling = trained("truth", None)
    results = []
    for share in (float(s) for s in args.flips.split(",")):
        rng = random.Random(seed)
        flipped = sorted(rng.sample(train_paths, round(share * len(train_paths))))
        flips = {p: rng.choice([c for c in classes if c != truth[p]]) for p in flipped}
        tag = f"flip{round(share * 100)}"
        noisy_resize, noisy_f1 = trained(tag, flips)
        cfg = AuditConfig(folds=args.folds, seed=seed)
        models = []
        for i, fold in enumerate(make_folds(noisy_resize, storage.join(root, f"{tag}-folds"), cfg)):
            out = storage.join(root, f"{tag}-fold-{i}")
            train(fold, out, recipe)
            models.append(out)
        audit = storage.join(root, f"{tag}-audit")
        rank_label_issues(models, audit, cfg)
        issues = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(audit, LABEL_ISSUES)))).to_pylist()
        top = [r["path"] for r in issues[: len(flipped)]]
        # The reviewer gives each reviewed picture its true class: a flip is fixed, any other confirmed.
        fixed = {p: truth[p] for p in top if p in flips}
        _, reviewed_f1 = trained(f"{tag}-reviewed", {**flips, **fixed})
        results.append(
            {
                "seed": seed,
                "flip_share": share,
                "train_images": len(train_paths),
                "flipped": len(flipped),
                "reviewed_top_n": len(top),
                "flips_in_top_n": sum(p in flips for p in top),
                "fixed_by_review": len(fixed),
                "flagged": sum(bool(r["is_issue"]) for r in issues),
                "test_macro_f1": {"flips_left": round(noisy_f1, 4), "after_review": round(reviewed_f1, 4), "no_flips": round(ceiling, 4)},
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    kinds = (
        ("flips_left", "flips left in", "#c44e52"),
        ("after_review", "after the review of the top N", "#4c72b0"),
        ("no_flips", "no flips", "#999999"),
    )
    width = 0.26
    for k, (key, label, colour) in enumerate(kinds):
        xs = [i + (k - 1) * width for i in range(len(out["results"]))]
        ys = [r["test_macro_f1"][key]["mean"] for r in out["results"]]
        sds = [r["test_macro_f1"][key]["sd"] for r in out["results"]]
        ax.bar(xs, ys, width, yerr=sds, capsize=3, label=label, color=colour)
        for x, y, sd in zip(xs, ys, sds):
            ax.text(x, y + sd + 0.004, f"{y:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(out["results"])))

    def tick(r: dict) -> str:
        fixed, flipped = sum(r["fixed_by_review"]), sum(r["flipped"])
        return f"{r['flip_share']:.0%} flipped\nthe review fixed {fixed / flipped:.0%} of them"

    ax.set_xticklabels([tick(r) for r in out["results"]])
    low = min(r["test_macro_f1"]["flips_left"]["mean"] - r["test_macro_f1"]["flips_left"]["sd"] for r in out["results"])
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel("test macro-F1")
    seeds = len(out["seeds"].split(","))
    ax.set_title(f"The label review on {out['set']}: {out['model']}, {out['epochs']} epochs, {out['folds']}-fold audit, {seeds} seeds", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
