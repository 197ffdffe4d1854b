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
    assert not s.should_stop(2)
    assert s.consider(3, record(0.6)) is None
    assert s.should_stop(2) and not s.should_stop(0), "0 never stops"
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
    s.stopped_at = 1
    t = Selection()
    t.load_state_dict(s.state_dict())
    assert (t.keys, t.imbalanced, t.best, t.since_best, t.stopped_at) == (s.keys, s.imbalanced, s.best, s.since_best, 1)


def test_considering_before_the_keys_are_fixed_is_an_error():
    with pytest.raises(ValueError, match="fix_keys"):
        Selection().consider(0, record(0.5))
