"""Benchmark: how well the label audit finds planted label errors.

A synth set (``imgpipe synth``, 12 breeds) is downloaded and cleaned with a seeded 5% of
its images given another breed's label (through clean's own ``label_overrides``: the audit's
output format, read the other way), resized, and audited as ``imgpipe-audit`` does it
(:mod:`imgpipe.steps.audit`: K stratified folds of the train split, one training per fold
with the given recipe, cleanlab over the out-of-fold probabilities). Reported: of the
flipped train images, how many the audit flags (recall), how many of its flags are flipped
images (precision), and both within the top ``n`` of the ranking, ``n`` being the number of
flipped images (where a reviewer starts). Steps run in this process (the library calls the
pipeline's components make); resize starts Ray, so::

    scripts/in-loopback-netns .venv/bin/python bench/probes/audit.py [--workdir DIR --json results.json]
        [--flip 0.05 --folds 5 --epochs 8 --model resnet18 --size 64]
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

import pyarrow.parquet as pq

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]


def _flip_csv(paths: list[str], classes: list[str], label_of: dict[str, str], fraction: float, seed: int) -> tuple[str, set[str]]:
    """A ``path,label`` CSV giving ``fraction`` of ``paths`` another class's label; and those paths."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(paths, round(fraction * len(paths))))
    rows = [(p, rng.choice([c for c in classes if c != label_of[p]])) for p in chosen]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    return buf.getvalue(), set(chosen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from prepared import (  # bench/ is the script's folder, on sys.path
        clean_and_resize,
        download_synth,
        plain_recipe,
    )

    from imgpipe import contract, storage
    from imgpipe.clean.config import CleanConfig
    from imgpipe.data.labels import oxford_label
    from imgpipe.steps.audit import LABEL_ISSUES, AuditConfig, make_folds, rank_label_issues
    from imgpipe.steps.train import train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgpipe-bench-audit-"))
    root = "file://" + str(work)
    started = time.monotonic()
    downloaded = download_synth(root, per_class=args.per_class, seed=args.seed)
    index = contract.data_files(downloaded, contract.read_manifest(downloaded))
    paths = [p for uri in index for p in pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["path"]).column("path").to_pylist()]
    label_of = {p: oxford_label(p) for p in paths}
    labelled = [p for p in paths if label_of[p]]
    classes = sorted({label_of[p] for p in labelled})
    text, flipped = _flip_csv(labelled, classes, label_of, args.flip, args.seed)
    overrides = storage.join(root, "flipped.csv")
    storage.write_bytes(overrides, text.encode())
    resized = clean_and_resize(root, size=args.size, clean_cfg=CleanConfig(label_overrides=overrides))
    cfg = AuditConfig(folds=args.folds, seed=args.seed)
    folds = make_folds(resized, storage.join(root, "folds"), cfg)
    recipe = plain_recipe(args.model, args.epochs, predictions_probs=True)
    models = []
    for i, fold in enumerate(folds):
        out = storage.join(root, f"train-fold-{i}")
        train(fold, out, recipe)
        models.append(out)
    report = rank_label_issues(models, storage.join(root, "audit"), cfg)
    issues = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, "audit", LABEL_ISSUES)))).to_pylist()
    in_train = {r["path"] for r in issues}
    planted = flipped & in_train
    flagged = [r["path"] for r in issues if r["is_issue"]]
    top = [r["path"] for r in issues[: len(planted)]]
    hits_flagged, hits_top = len(set(flagged) & planted), len(set(top) & planted)
    val_acc = [json.loads(storage.read_bytes(storage.join(m, "metrics.json")))["kept"]["val_accuracy"] for m in models]
    result = {
        "images": len(labelled),
        "train_images": len(in_train),
        "flip_fraction": args.flip,
        "flipped_in_train": len(planted),
        "folds": args.folds,
        "model": args.model,
        "size": args.size,
        "epochs": args.epochs,
        "fold_held_out_accuracy": [round(a, 3) for a in val_acc],
        "flagged": len(flagged),
        "precision_flagged": round(hits_flagged / max(1, len(flagged)), 3),
        "recall_flagged": round(hits_flagged / max(1, len(planted)), 3),
        "precision_at_n": round(hits_top / max(1, len(top)), 3),
        "recall_at_n": round(hits_top / max(1, len(planted)), 3),
        "seconds": round(time.monotonic() - started, 1),
        "issues_reported": report.extra["issues"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
