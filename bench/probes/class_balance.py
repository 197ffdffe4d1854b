"""Benchmark: class-weighted loss on a 10:1 imbalanced training split.

A synth set (12 breeds) is cleaned with a 0.6/0.2/0.2 split and resized to 64 px; then the
train split keeps every image of six breeds and a tenth of the other six's (10:1), written
as a resize output of its own (val and test stay balanced, so macro-F1 and the minority
classes' recall say what imbalance costs). The same recipe trains twice, with
``class_weights: none`` and ``balanced``; reported: test macro-F1, accuracy, and the mean
recall of the minority and majority classes. Steps run in this process; resize starts Ray::

    scripts/in-loopback-netns .venv/bin/python bench/probes/class_balance.py [--json results.json] [--epochs 10]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]


def _imbalanced(src: str, dest: str, keep: float, seed: int) -> list[str]:
    """A copy of the resize output ``src`` whose train split keeps ``keep`` of the odd half of the classes."""
    from imgpipe import contract, storage
    from imgpipe.writer import OutputWriter

    manifest = contract.read_manifest(src, expect_step="resize")
    classes = list((manifest.get("extra") or {}).get("classes") or [])
    minority = set(range(len(classes) // 2, len(classes)))
    rng = np.random.default_rng(seed)
    out = OutputWriter(dest, "resize")
    out.begin()
    total = 0
    for uri in contract.data_files(src, manifest):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        name = uri[len(src.rstrip("/")) + 1 :]
        if name.startswith("train/"):
            labels = table.column("label").to_numpy()
            keep_row = np.array([(lab not in minority) or rng.random() < keep for lab in labels])
            table = table.filter(pa.array(keep_row, pa.bool_())) if len(labels) else table
        total += table.num_rows
        out.write_table(name, table)
    storage.write_bytes(out.uri(contract.LABELS), contract.read_side_file(src, contract.LABELS))
    out.commit(
        inputs=total,
        rejects=[],
        config={"made_by": "bench/probes/class_balance.py", "keep": keep},
        extra=manifest.get("extra") or {},
        upstream={"source": src, "step": "resize"},
    )
    return [classes[i] for i in sorted(minority)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from prepared import plain_recipe, prepare  # bench/ is the script's folder, on sys.path

    from imgpipe import storage
    from imgpipe.clean.config import CleanConfig
    from imgpipe.steps.train import train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgpipe-bench-balance-"))
    root = "file://" + str(work)
    started = time.monotonic()
    resized = prepare(root, per_class=args.per_class, seed=args.seed, size=64, clean_cfg=CleanConfig(split=(0.6, 0.2, 0.2)))
    minority = _imbalanced(resized, storage.join(root, "imbalanced"), args.keep, args.seed)
    results = {}
    for weights in ("none", "balanced"):
        out = storage.join(root, f"train-{weights}")
        cfg = plain_recipe("resnet18", args.epochs, class_weights=weights)
        train(storage.join(root, "imbalanced"), out, cfg)
        test = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))["test"]
        recall = test["per_class_recall"]
        results[weights] = {
            "test_macro_f1": round(test["macro_f1"], 4),
            "test_accuracy": round(test["accuracy"], 4),
            "minority_recall": round(float(np.mean([recall[c] for c in minority])), 4),
            "majority_recall": round(float(np.mean([v for c, v in recall.items() if c not in minority])), 4),
        }
    doc = {
        "keep": args.keep,
        "ratio": round(1 / args.keep, 1),
        "epochs": args.epochs,
        "per_class": args.per_class,
        "minority": minority,
        "results": results,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
