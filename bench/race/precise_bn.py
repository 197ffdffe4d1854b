"""Which weights went wrong on LFW: the weights, or their batch-norm statistics (issue 49).

Trains imgpipe's defaults on a real set (bench/race/real_sets.py, the model race's split and
resize output) with ``precise_bn`` off and on, per seed, and scores on the test split
(scikit-learn's macro-F1 of the predicted classes) four models of each run: the kept
weights and the last epoch's (``checkpoint.pt``), each as trained and with its training
batch-norm layers' statistics measured over the whole train split in the evaluation view
(:func:`imgpipe.train.norm_stats.recompute`). The running averages are the weights'
only if measuring changes nothing.

    scripts/in-loopback-netns .venv/bin/python bench/race/precise_bn.py --set lfw --seeds 0,1,2   # about 3 min
    scripts/in-loopback-netns .venv/bin/python bench/race/precise_bn.py --set digits --counts 512,2048   # how many images it needs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from reference import _run, prepare  # noqa: E402

IMGPIPE = Path(sys.executable).with_name("imgpipe")


def _models(out: Path, labels: list[str]) -> dict[str, Any]:
    import torch

    from imgpipe.train.checkpoint import CHECKPOINT
    from imgpipe.train.models import build_model
    from imgpipe.train.saved import load_saved_model

    kept, card = load_saved_model("file://" + str(out), labels)
    last = build_model(card["architecture"], card["num_classes"], card["input"]["channels"])
    last.load_state_dict(torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)["model"])
    return {"kept": kept, "last": last.eval(), "card": card}


def _score(model: Any, data: str, card: dict) -> float:
    import torch
    from sklearn.metrics import f1_score

    from imgpipe.train.saved import saved_batches

    truth, predicted = [], []
    with torch.no_grad():
        for x, y, _ in saved_batches(data, "test", card)():
            predicted += model(x).argmax(1).tolist()
            truth += y.tolist()
    return float(f1_score(truth, predicted, average="macro"))


def score_run(out: Path, data: str) -> dict[str, float]:
    """Test macro-F1 of the kept and last weights, as trained and with measured statistics."""
    from imgpipe import contract
    from imgpipe.train.distributed import DistInfo
    from imgpipe.train.norm_stats import recompute
    from imgpipe.train.partition import read_labels
    from imgpipe.train.saved import saved_batches

    models = _models(out, read_labels(data, contract.read_manifest(data, expect_step="resize")))
    card = models.pop("card")
    scores = {}
    for name, model in models.items():
        scores[name] = round(_score(model, data, card), 3)
        model.train()  # every batch-norm layer measured (no block is frozen from scratch)
        recompute(model, (x for x, _, _ in saved_batches(data, "train", card)()), 1 << 30, DistInfo())
        scores[f"{name}, measured"] = round(_score(model.eval(), data, card), 3)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="lfw")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="the side every image is written at (the race's --set-sizes)")
    parser.add_argument("--counts", default="0,2048", help="precise_bn values (train images measured before each validation)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-precise-bn-") as tmp:
        work = Path(tmp)
        prep = prepare(args.set, work, args.size)
        for precise in (int(c) for c in args.counts.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                out = work / "runs" / f"{precise}-{seed}"
                cmd = [str(IMGPIPE), "train", prep["resize"], str(out), "--model", "resnet18", "--epochs", str(args.epochs)]
                cmd += ["--batch-size", "64", "--seed", str(seed), "--device", "cpu", "--set", f"precise_bn={precise}"]
                _run(cmd, out.with_suffix(".log"))
                kept = json.loads((out / "metrics.json").read_text())["selection"]["epoch"]
                results[f"precise_bn={precise} seed {seed}"] = {"kept_epoch": kept + 1, **score_run(out, prep["resize"])}
                print(f"precise_bn={precise} seed {seed}: {results[f'precise_bn={precise} seed {seed}']}", file=sys.stderr, flush=True)
    columns = ["kept", "kept, measured", "last", "last, measured"]
    print("| run | kept epoch | " + " | ".join(columns) + " |\n| --- | ---: |" + " ---: |" * len(columns))
    for name, row in results.items():
        print(f"| {name} | {row['kept_epoch']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
