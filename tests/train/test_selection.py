"""Which weights a run keeps: the ranking rule, strict improvement, patience, the EMA, a resume."""

from __future__ import annotations

import pytest

from imgpipe.train.selection import BALANCED_KEYS, IMBALANCED_KEYS, Selection, imbalance


def record(f1: float, acc: float = 0.5, pr: float = 0.5, ema: tuple[float, float, float] | None = None) -> dict:
    out = {"val_macro_f1": f1, "val_accuracy": acc, "val_pr_auc": pr}
    if ema is not None:
        out.update(ema_val_macro_f1=ema[0], ema_val_accuracy=ema[1], ema_val_pr_auc=ema[2])
    return out


def test_balanced_classes_rank_on_macro_f1_and_imbalanced_on_pr_auc():
    s = Selection()
    s.fix_keys([10, 9, 8])
    assert s.keys == BALANCED_KEYS and not s.imbalanced
    s2 = Selection()
    s2.fix_keys([40, 10, 0])  # classes without images do not count
    assert s2.keys == IMBALANCED_KEYS and s2.imbalanced and imbalance([40, 10, 0]) == 4.0
    s.fix_keys([100, 1])
    assert s.keys == BALANCED_KEYS, "fixed at the first validation"


def test_only_a_strictly_better_score_replaces_the_kept_weights_and_patience_counts_the_rest():
    s = Selection()
    s.fix_keys([5, 5])
    assert s.consider(0, record(0.5)) == "model"
    assert s.consider(1, record(0.7)) == "model"
    assert s.consider(2, record(0.7)) is None, "a tie keeps the earlier epoch"
    assert s.should_stop(2) is None
    assert s.consider(3, record(0.6)) is None
    assert s.should_stop(2) == "patience" and s.should_stop(0) is None, "0 never stops"
    assert (s.best.epoch, s.best.weights, s.best.score) == (1, "model", (0.7, 0.5))
    # The tie-break decides between equal primaries.
    assert s.consider(4, record(0.7, acc=0.6)) == "model" and s.since_best == 0


def test_the_moving_average_is_kept_only_when_it_scores_better():
    s = Selection()
    s.fix_keys([5, 5])
    assert s.consider(0, record(0.5, ema=(0.5, 0.5, 0.5))) == "model", "equal: the trained weights"
    assert s.consider(1, record(0.6, ema=(0.65, 0.5, 0.5))) == "ema"
    summary = s.summary(patience=3, epochs=5, trained=2)
    assert summary["weights"] == "ema" and summary["epoch"] == 1 and "moving average" in summary["reason"]


def test_the_state_survives_a_round_trip():
    s = Selection()
    s.fix_keys([30, 10])
    s.consider(0, record(0.4, pr=0.8))
    s.consider(1, record(0.5, pr=0.7))
    s.stop(1, "ceiling")
    t = Selection()
    t.load_state_dict(s.state_dict())
    assert (t.keys, t.imbalanced, t.best, t.since_best, t.stopped_at, t.stop_reason) == (s.keys, s.imbalanced, s.best, s.since_best, 1, "ceiling")
    older = {k: v for k, v in s.state_dict().items() if k != "stop_reason"}  # a checkpoint from before the reasons
    t.load_state_dict(older)
    assert t.stop_reason == "patience"


def test_a_score_at_its_ceiling_stops_at_once_because_no_later_epoch_can_be_kept():
    s = Selection()
    s.fix_keys([5, 5])
    s.consider(0, record(0.9, acc=0.9))
    assert s.consider(1, record(1.0, acc=1.0)) == "model" and s.at_ceiling()
    assert s.should_stop(5) == "ceiling", "no need to wait out the patience"
    assert s.should_stop(0) is None, "patience 0 trains every epoch, ceiling or not"
    assert s.consider(2, record(1.0, acc=1.0, ema=(1.0, 1.0, 1.0))) is None, "what a later epoch could score is not kept"
    s.stop(1, "ceiling")
    summary = s.summary(patience=5, epochs=10, trained=2)
    assert summary["stop_reason"] == "ceiling" and "validation at its ceiling" in summary["reason"]
    assert "val_macro_f1 1.0000" in summary["reason"]


def test_a_perfect_primary_with_a_lower_tie_break_is_not_the_ceiling():
    s = Selection()
    s.fix_keys([50, 10])  # imbalanced: PR-AUC, then macro-F1
    s.consider(0, record(0.9, pr=1.0))
    assert not s.at_ceiling() and s.should_stop(3) is None, "a better macro-F1 at the same PR-AUC would still be kept"


def test_considering_before_the_keys_are_fixed_is_an_error():
    with pytest.raises(ValueError, match="fix_keys"):
        Selection().consider(0, record(0.5))
