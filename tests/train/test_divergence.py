"""A diverging run is told from a weak one: caught, named, marked, restarted on request, never promoted (issue 49)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from imgpipe import contract, storage
from imgpipe.steps.compare import compare
from imgpipe.steps.promote import decide
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from imgpipe.train.divergence import DivergenceGuard, DivergenceRecord, TrainingDiverged
from tests.train.test_loader import write_resize_output

# ---------------------------------------------------------------------------------------
# The rule, on loss traces.


def _fed(guard: DivergenceGuard, losses, epoch: int = 0):
    return guard.update(list(losses), first_step=0, epoch=epoch, lr=0.01)


def test_a_non_finite_loss_is_divergence_at_its_own_step():
    for bad in (math.nan, math.inf, -math.inf):
        event = _fed(DivergenceGuard(1.5, 5, 10), [2.3, 2.2, bad, 2.0])
        assert event is not None and event.step == 2 and event.reason == "non_finite_loss"
        assert json.loads(json.dumps(event.to_dict()))["loss"] == str(bad), "JSON has no number for it: a string"


def test_a_noisy_falling_loss_as_mixup_gives_it_is_not_divergence():
    """Per-batch losses swinging by half their level (MixUp/CutMix batches) around a falling trend."""
    rng = np.random.default_rng(0)
    trend = np.linspace(2.4, 1.2, 2000)
    losses = trend * rng.uniform(0.6, 1.4, trend.size)
    assert _fed(DivergenceGuard(1.5, 5, 10), losses) is None


def test_a_loss_near_zero_with_noise_above_it_is_not_divergence():
    """The lowest value is floored at ln(classes) / 10: a memorizing run's 0.001 -> 0.05 is noise, not divergence."""
    losses = np.r_[np.linspace(2.0, 0.001, 300), np.full(200, 0.05)]
    assert _fed(DivergenceGuard(1.5, 5, 10), losses) is None


def test_a_loss_that_leaps_and_stays_up_is_divergence_named_with_its_step():
    """The trace of resnet18 on the digits at 100 x the default learning rate (docs/training.md, "Divergence")."""
    losses = [2.48, 8.75, 4.55, 5.66, 6.82, 5.78, 3.82, 6.31, 3.54, 3.14, 2.68, 2.46]
    event = _fed(DivergenceGuard(1.5, 5, 10), losses, epoch=3)
    assert event is not None and event.reason == "loss_exploded" and event.epoch == 3
    assert event.step == 6, "steps 2 to 6: five in a row above 1.5 x the lowest smoothed loss"
    assert "1.5 x its lowest" in event.detail


def test_a_short_spike_that_comes_back_is_not_divergence():
    losses = [2.3] * 20 + [6.0, 5.0] + [2.2] * 30
    assert _fed(DivergenceGuard(1.5, 5, 10), losses) is None


def _half_mixed_trace(steps: int = 1200, seed: int = 0):
    """A run at mixup_prob 0.5 to the end of its schedule: the mixed batches' losses fall to about 1.3, the unmixed ones' to 0.3."""
    rng = np.random.default_rng(seed)
    mixed = rng.random(steps) < 0.5
    t = np.linspace(0, 1, steps)
    losses = np.where(mixed, (2.2 - 0.9 * t) * rng.uniform(0.7, 1.3, steps), (2.0 - 1.7 * t) * rng.uniform(0.8, 1.2, steps))
    return losses, ["mixed" if m else "unmixed" for m in mixed]


def test_half_mixed_batches_are_not_divergence_when_each_kind_is_watched_apart():
    """One stream of both kinds: a streak of unmixed batches sets a lowest that the mixed ones then stay above (seen on the digits at lr 4e-5)."""
    caught = 0
    for seed in range(5):
        losses, kinds = _half_mixed_trace(seed=seed)
        caught += _fed(DivergenceGuard(1.5, 5, 10), losses) is not None
        assert DivergenceGuard(1.5, 5, 10).update(list(losses), first_step=0, epoch=0, lr=0.01, kinds=kinds) is None, seed
    assert caught >= 3, "the trace is the one the rule of one stream gets wrong"


def test_a_divergence_is_caught_on_every_kind_and_named_by_it():
    losses, kinds = _half_mixed_trace(steps=400)
    exploded = np.r_[losses, np.full(40, 9.0)]
    guard = DivergenceGuard(1.5, 5, 10)
    event = guard.update(list(exploded), first_step=0, epoch=1, lr=0.01, kinds=kinds + kinds[:40])
    assert event is not None and event.reason == "loss_exploded" and 400 <= event.step < 420
    assert re.match(r"the loss of the (un)?mixed batches \(smoothed", event.detail), event.detail
    assert guard.worrying
    with pytest.raises(ValueError, match="one each"):
        guard.update([1.0, 2.0], first_step=0, epoch=0, lr=0.01, kinds=["mixed"])


def test_the_limit_the_log_names_is_the_worrying_kinds():
    guard = DivergenceGuard(1.5, 5, 10)
    guard.update([1.0] * 4 + [0.4] * 4, first_step=0, epoch=0, lr=0.01, kinds=["mixed"] * 4 + ["unmixed"] * 4)
    assert guard.limit("mixed") == pytest.approx(1.5) and guard.limit("unmixed") == pytest.approx(0.6)
    guard.update([10.0, 0.4], first_step=8, epoch=0, lr=0.01, kinds=["mixed", "unmixed"])
    assert guard.worrying and guard.limit() == pytest.approx(1.5), "the mixed batches' limit, though an unmixed one came last"


def test_a_checkpoint_of_one_stream_starts_every_kind():
    old = {"smoothed": 1.0, "lowest": 1.0, "above": 0}  # what checkpoints held before kinds
    kinds = ["mixed", "unmixed"] * 20
    assert DivergenceGuard(1.5, 5, 10).update([1.6] * 40, first_step=0, epoch=0, lr=0.01, kinds=kinds) is None, "fresh: 1.6 is its lowest"
    guard = DivergenceGuard(1.5, 5, 10)
    guard.load_state_dict(old)
    event = guard.update([1.6] * 40, first_step=0, epoch=0, lr=0.01, kinds=kinds)
    assert event is not None and event.reason == "loss_exploded", "each kind starts from the old lowest (1.0): 1.6 is above 1.5 x it"
    again = DivergenceGuard(1.5, 5, 10)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again.state_dict() == guard.state_dict() and again.limit("mixed") == guard.limit("mixed")


def test_factor_zero_leaves_only_the_non_finite_rule():
    assert _fed(DivergenceGuard(0, 5, 10), [2.0, 50.0, 80.0, 90.0, 100.0, 120.0, 150.0, 190.0]) is None
    assert _fed(DivergenceGuard(0, 5, 10), [2.0, math.nan]).reason == "non_finite_loss"


def test_the_guards_state_survives_a_checkpoint():
    a = DivergenceGuard(1.5, 5, 10)
    _fed(a, [2.4, 2.0, 1.5, 1.2])
    b = DivergenceGuard(1.5, 5, 10)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    tail = [3.0, 3.2, 3.5, 3.9, 4.2, 4.8]
    assert _fed(a, tail) == _fed(b, tail)


def test_a_non_finite_validation_loss_is_divergence():
    assert DivergenceGuard.validation(0.7, epoch=0, step=9, lr=0.1) is None
    assert DivergenceGuard.validation(math.nan, epoch=0, step=9, lr=0.1).reason == "non_finite_validation"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"divergence_factor": 1.0}, "divergence_factor must be above 1"),
        ({"divergence_factor": -1.0}, "divergence_factor"),
        ({"divergence_factor": math.nan}, "divergence_factor"),
        ({"divergence_steps": 0}, "divergence_steps"),
        ({"divergence_restarts": 11}, "divergence_restarts"),
    ],
)
def test_bad_divergence_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


# ---------------------------------------------------------------------------------------
# A forced divergence, end to end: 100 x the learning rate the defaults give this batch.

# resnet18 at batch 8: lr_base 1e-3 x sqrt(8 / 128) (imgpipe.train.schedule.effective_lr).
DEFAULT_LR = 1e-3 * math.sqrt(8 / 128)


def _cfg(**kw) -> TrainConfig:
    base = dict(model="resnet18", recipe="none", epochs=3, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=8, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("diverge")
    return write_resize_output("file://" + str(root / "resize"), counts={"train": 64, "val": 16, "test": 16}, size=24)


@pytest.fixture(scope="module")
def diverged(data, tmp_path_factory) -> tuple[str, TrainingDiverged]:
    out = "file://" + str(tmp_path_factory.mktemp("diverged") / "train")
    with pytest.raises(TrainingDiverged) as caught:
        train(data, out, _cfg(lr=100 * DEFAULT_LR))
    return out, caught.value


def test_lr_times_100_is_caught_with_the_step_and_the_lr_named(diverged):
    out, error = diverged
    message = str(error)
    assert re.match(r"train diverged: epoch \d+ step \d+ at lr 0\.0\d+: the loss \(smoothed [\d.]+\) stayed above 1\.5 x", message), message
    assert "never promoted" in message and "divergence_restarts" in message, "what to do next"
    assert contract.is_committed(out), "the output is committed first: its report says what happened"


def test_the_diverged_run_is_marked_in_metrics_report_and_card(diverged):
    out, _ = diverged
    metrics = json.loads(storage.read_bytes(storage.join(out, contract.METRICS)))
    assert metrics["diverged"] is True
    (event,) = metrics["divergence"]["events"]
    assert event["action"] == "stopped" and event["reason"] == "loss_exploded"
    assert metrics["epochs"][-1]["diverged"]["step"] == event["step"]
    card = json.loads(storage.read_bytes(storage.join(out, contract.MODEL_CARD)))
    assert card["diverged"] is True and card["divergence"]["diverged"] is True
    report = storage.read_bytes(storage.join(out, contract.REPORT)).decode()
    assert "Diverged: not to be promoted" in report
    assert contract.read_manifest(out)["extra"]["diverged"] is True


def test_a_diverged_candidate_is_never_promoted(diverged, data, tmp_path):
    out, _ = diverged
    first = decide(out, None)
    assert not first.promoted and "diverged" in first.reason and first.candidate is None, "not even as the first model"
    good = "file://" + str(tmp_path / "good")
    train(data, good, _cfg(epochs=1))
    against = decide(out, good)
    assert not against.promoted and re.search(r"diverged in epoch \d+ at step \d+ \(lr 0\.0\d+\)", against.reason), against.reason


def test_a_sweep_branch_that_diverged_is_ranked_last_and_never_the_winner(diverged, data, tmp_path):
    out, _ = diverged
    good = "file://" + str(tmp_path / "good")
    train(data, good, _cfg(epochs=1))
    report = compare({"hot": out, "calm": good}, "file://" + str(tmp_path / "compare"))
    assert report.ranking == ["calm", "hot"] and report.extra["winner"] == "calm"
    assert report.extra["flags"]["hot"] == ["diverged"]
    with pytest.raises(ValueError, match="every branch diverged"):
        compare({"hot": out}, "file://" + str(tmp_path / "compare-all"))


def test_diverged_fails_off_ends_normally_marked(data, tmp_path):
    out = "file://" + str(tmp_path / "branch")
    report = train(data, out, _cfg(lr=100 * DEFAULT_LR, diverged_fails=False))
    assert report.extra["diverged"] is True and report.extra["divergence"].startswith("diverged:")


def test_restarts_halve_the_learning_rate_from_the_last_checkpoint(data, tmp_path):
    """Each restart goes back to the checkpoint (here the start) with every learning rate halved, and says so."""
    out = "file://" + str(tmp_path / "restarted")
    report = train(data, out, _cfg(lr=100 * DEFAULT_LR, divergence_restarts=8, epochs=2))
    metrics = json.loads(storage.read_bytes(storage.join(out, contract.METRICS)))
    record = DivergenceRecord.from_dict(metrics["divergence"])
    assert record.restarts >= 1 and not record.diverged and report.extra["diverged"] is False
    assert record.lr_scale == 0.5**record.restarts
    assert [e["lr_scale"] for e in record.events] == [0.5 ** (k + 1) for k in range(record.restarts)]
    assert all(e["from_epoch"] <= e["epoch"] for e in record.events), "back to the checkpoint before the epoch that diverged"
    assert metrics["learning_rate"]["lr"] == pytest.approx(100 * DEFAULT_LR), "the configured peak; the run's is scaled"
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert metrics["epochs"][-1]["lr"] <= 100 * DEFAULT_LR * record.lr_scale
    assert "Recovered from divergence" in storage.read_bytes(storage.join(out, contract.REPORT)).decode()
    assert decide(out, None).promoted, "a run that recovered is a candidate like any other"


def test_the_train_step_tells_the_guard_which_batches_were_mixed(data, tmp_path, monkeypatch):
    """At mixup_prob 0.5 every step's loss reaches the guard with its kind; at 1.0 (every batch mixed) with none."""
    seen: list = []
    update = DivergenceGuard.update

    def recording(self, losses, **kw):
        seen.append(kw.get("kinds"))
        return update(self, losses, **kw)

    monkeypatch.setattr(DivergenceGuard, "update", recording)
    train(data, "file://" + str(tmp_path / "half"), _cfg(epochs=1, mixup=0.2, cutmix=1.0, mixup_prob=0.5))
    kinds = [k for ks in seen for k in ks]
    assert len(seen) == 64 // 8 and set(kinds) == {"mixed", "unmixed"}, kinds
    seen.clear()
    train(data, "file://" + str(tmp_path / "all"), _cfg(epochs=1, mixup=0.2, cutmix=1.0, mixup_prob=1.0))
    assert seen == [None] * 8
