"""The imgpipe-sweep pipeline end to end through kfp.local: data steps once, two branches, the comparison.

The same pipeline function ``imgpipe compile --pipeline imgpipe-sweep`` compiles, under
``kfp.local.SubprocessRunner(use_venv=False)``, against the SeaweedFS S3 server of
``conftest.py`` and a local Ray (resize): marked ``ray``, run it inside
``scripts/in-loopback-netns``. Tiny on purpose (3 classes x 6 images, 32 px, ``tiny_cnn``,
3 epochs of 2 steps) so that it stays near the main pipeline's local test in time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from imgpipe import contract, storage
from imgpipe.config import load_config
from imgpipe.local.run import LocalRunConfig
from imgpipe.local.sweeps import run_sweep
from imgpipe.stepio import artifacts as kfp_artifacts
from imgpipe.train.config import TrainConfig

GRID = [
    {"name": "light", "policy": "basic", "mixup_alpha": 0, "cutmix_alpha": 0},
    {"name": "strong", "randaugment_n": 2, "randaugment_m": 15, "mixup_prob": 0.5},
]


# make test-slow: the sweep's compiled DAG (tests/test_sweep.py), its grid and branches
# (plan_sweep) and the ranking (tests/steps/test_compare.py) are tested apart in make test.
@pytest.mark.ray
@pytest.mark.slow
def test_sweep_through_kfp_local_trains_each_branch_and_ranks_them(s3_bucket, tmp_path):
    data_root = f"{s3_bucket}/imgpipe"
    cfg = LocalRunConfig(
        data_root=data_root,
        workdir=str(tmp_path / "work"),
        classes=3,
        per_class=6,
        params={"image_size": 32, "model": "tiny_cnn", "epochs": 3, "batch_size": 4},
        step_config={"clean": {"workers": 1}, "train": {"max_steps_per_epoch": 2, "device": "cpu", "seed": 5}},
    )
    result = run_sweep(cfg, GRID, {})

    run = f"{data_root}/runs/{result.run_id}"
    assert result.prefixes == {"compare": f"{run}/compare", "train-light": f"{run}/train-light", "train-strong": f"{run}/train-strong"}
    configs = {}
    for step in ("train-light", "train-strong"):
        manifest = contract.read_manifest(result.prefixes[step], expect_step="train")
        assert manifest["upstream"]["source"] == f"{run}/resize", "every branch trains on the one resize output"
        configs[step] = manifest["config"]
        history = json.loads(storage.read_bytes(f"{result.prefixes[step]}/metrics.json"))["epochs"]
        assert len(history) == 3 and all(0 <= e["val_pr_auc"] <= 1 for e in history), "PR-AUC per epoch"
    light, strong = configs["train-light"], configs["train-strong"]
    assert (light["aug_policy"], light["mixup"], light["cutmix"]) == ("basic", 0.0, 0.0)
    assert (strong["randaugment_n"], strong["randaugment_m"], strong["mixup_prob"]) == (2, 15, 0.5)
    assert light["seed"] == strong["seed"] == 5 and light["epochs"] == strong["epochs"] == 3
    # A sweep is no retraining run: latest.json is left alone.
    assert kfp_artifacts.read_latest(data_root) is None

    comparison = result.comparison
    assert {r["branch"] for r in comparison["branches"]} == {"light", "strong"}
    assert comparison["ranked_by"][0] in ("val_macro_f1", "val_pr_auc") and comparison["class_counts"]
    winner = comparison["winner"]["branch"]
    assert winner == comparison["branches"][0]["branch"]
    # The kfp artifacts: the HTML report, the Metrics, and the winner's config that a full run takes.
    html = Path(result.artifacts["report"]).read_text()
    assert "Ranking" in html and "data:image/png;base64" in html
    winner_file = Path(result.artifacts["winner"])
    recipe = yaml.safe_load(winner_file.read_text())["train"]
    assert recipe["aug_policy"] == configs[f"train-{winner}"]["aug_policy"]
    full = load_config(TrainConfig, winner_file, {"model": "tiny_cnn", "epochs": 30}, "train")
    assert full.epochs == 30 and full.randaugment_m == configs[f"train-{winner}"]["randaugment_m"]
    for path in result.artifacts.values():
        assert Path(path).resolve().is_relative_to((tmp_path / "work" / "kfp").resolve())
    summary = result.summary()
    assert "2 branches ranked by" in summary and "winner.yaml:" in summary
