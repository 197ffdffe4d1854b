"""What a training writes about itself: metrics.json carries the config as run, and the report shows its result first."""

from __future__ import annotations

import re

from imgpipe import contract, storage
from imgpipe.steps.train import train
from tests.steps.conftest import COUNTS, read_json, tiny
from tests.train.test_loader import write_resize_output


def test_metrics_carry_the_config_and_the_report_lists_only_what_took_effect(tmp_path, no_exports):
    # The case: the small recipe (auto) would bring RandAugment and MixUp, but the config turns both off.
    data = write_resize_output("file://" + str(tmp_path / "resize"), counts=COUNTS, size=32, row_group_rows=4)
    out = "file://" + str(tmp_path / "model")
    train(data, out, tiny(epochs=1, recipe="auto", aug_policy="basic", mixup=0.0, cutmix=0.0))

    metrics = read_json(storage.join(out, contract.METRICS))
    assert metrics["config"]["aug_policy"] == "basic" and metrics["config"]["mixup"] == 0.0, "the config as run"
    final = contract.read_manifest(out, expect_step="train")["metrics"]
    assert final["test_macro_f1"] == metrics["test"]["macro_f1"], "the headline score reaches the manifest (and the UI's Metrics)"

    page = storage.read_bytes(storage.join(out, contract.REPORT)).decode()
    body = page[page.index("</h1>") :]
    assert body.index("<h2>Result</h2>") < body.index("<h2>Recipe</h2>"), "the result comes first"
    assert re.search(r"test macro-F1 \d\.\d{3}, accuracy \d\.\d{3} on 8 test images", body)
    recipe = body[body.index("<h2>Recipe</h2>") : body.index("<h2>", body.index("<h2>Recipe</h2>") + 1)]
    for inert in ("randaugment_n", "randaugment_m", "mixup_prob", "mixup_switch_prob"):
        assert f"<td>{inert}</td>" not in recipe, inert
