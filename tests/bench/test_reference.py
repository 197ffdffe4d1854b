"""The model race's arithmetic (bench/race/reference.py): each reference recipe's threshold and every side's time to it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "race"))

import reference  # noqa: E402


def _run(seed: int, f1s: list[float], step: float) -> dict:
    return {
        "seed": seed,
        "seconds": step * len(f1s) + 5,
        "curve": [{"epoch": e, "t": step * (e + 1), "val_macro_f1": f} for e, f in enumerate(f1s)],
        "test_top1": 0.9,
        "test_macro_f1": 0.9,
        "best_test_top1": 0.9,
        "best_test_macro_f1": 0.9,
        "lr": 0.025,
    }


def test_each_reference_sets_a_threshold_and_every_side_is_timed_to_both():
    runs = {
        "imgpipe": [_run(0, [0.5, 0.8, 0.95], 10), _run(1, [0.6, 0.85, 0.9], 10)],
        "simple": [_run(0, [0.4, 0.6, 0.7], 4), _run(1, [0.5, 0.7, 0.6], 4)],
        "reference": [_run(0, [0.3, 0.7, 0.85], 8), _run(1, [0.4, 0.75, 0.85], 8)],
    }
    s = reference.summarize(runs)
    assert s["thresholds"] == pytest.approx({"simple": 0.65, "reference": 0.85}) and s["threshold"] == pytest.approx(0.85)
    assert s["threshold_epoch"] == 2
    # imgpipe reaches the simple recipe's best (0.65) at its second epoch on both seeds: 20 s.
    assert s["imgpipe"]["seconds_to_simple"]["mean"] == 20 and s["imgpipe"]["reached_simple"] == "2/2"
    # The simple recipe itself: seed 0 at 8 s (0.6 < 0.65, then 0.7 at 12 s), seed 1 at 8 s.
    assert [r["seconds_to_simple"] for r in runs["simple"]] == [12, 8]
    # It never reaches the v2 recipe's 0.85: counted with its whole run time, and said so.
    assert s["simple"]["reached"] == "0/2" and s["simple"]["seconds_to_threshold"]["mean"] == 17
    table = reference.table({"sets": {"digits": {"summary": s, "runs": runs}}})
    assert "s to the simple recipe's best" in table and "torchvision reference's defaults" not in table  # no ref_recipe set


def test_seconds_per_epoch_leave_the_first_epochs_start_up_out():
    curve = [{"epoch": 0, "t": 12.0}, {"epoch": 1, "t": 14.0}, {"epoch": 2, "t": 16.5}, {"epoch": 3, "t": 18.5}]
    assert reference.epoch_seconds(curve) == 2.0
    assert reference.epoch_seconds(curve[:1]) is None
