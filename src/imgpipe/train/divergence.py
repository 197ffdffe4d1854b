"""Telling a diverging run from a weak one: the training loss watched step by step, without torch.

    guard = DivergenceGuard(factor=1.5, steps=5, classes=10)
    event = guard.update(losses, first_step=32, epoch=2, lr=0.004)   # None, or what diverged where

A run has diverged when a step's loss is not finite, or when the loss, smoothed over
``2 x steps`` steps (an exponential moving average), stays above ``factor`` times its lowest
smoothed value so far for ``steps`` steps in a row. The lowest value is floored at a tenth of
the loss of a uniform guess (``ln(classes) / 10``), so that a run whose loss reached nearly 0
is not called diverged for the noise above it. The guard's state carries over epochs and into
checkpoints.

Batches of different kinds have losses of different levels: with ``mixup_prob`` below 1 a
mixed batch's loss sits well above an unmixed one's, and a streak of unmixed batches sets a
lowest value that the mixed ones after it stay above by chance (a digits run at ``mixup_prob``
0.5 was called diverged at a learning rate of 4e-5: smoothed 1.27 against a lowest of 0.79). So
the rule runs on each kind's losses apart (``kinds``: one label per step, ``mixed`` or
``unmixed``); a run that blows up shows it on whichever kind it trains next.

The defaults (1.5, 5) come from loss traces of resnet18 on scikit-learn's digits
(docs/training.md, "Divergence"): with the default recipe's MixUp/CutMix the per-batch loss
swings by half its level, which a span of 10 steps smooths to well under 1.5 x; at 100 x
the default learning rate the loss leaps from 2.5 to 8.8 in one step and the smoothed loss
stays above 1.5 x its start for 5 steps by step 6; the run then sits at chance.

The train step (:func:`imgpipe.steps.train.train_one_epoch`) feeds it the losses of each
few steps in one copy from the device, the same on every rank (averaged over them), so that
every rank stops at the same step. What the run does then is the step's: restart from the
last checkpoint with the learning rate halved (``divergence_restarts``), or stop and mark
the run ``diverged`` (``metrics.json``, the report, the model card), which promotion refuses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["Divergence", "DivergenceGuard", "DivergenceRecord", "TrainingDiverged"]


class TrainingDiverged(ValueError):
    """A training run diverged (and its restarts, if any, did too); its output is committed, marked so."""


@dataclass(frozen=True)
class Divergence:
    """Where and how a run diverged.

    Attributes:
        epoch: The epoch (from 0).
        step: The optimizer step within the epoch (from 0) at which it was seen.
        lr: The learning rate of that step.
        loss: The loss of that step (``nan`` or ``inf`` for a non-finite one).
        reason: ``non_finite_loss``, ``loss_exploded`` or ``non_finite_validation``.
        detail: One line for the log and the report.
    """

    epoch: int
    step: int
    lr: float
    loss: float
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (a non-finite loss as a string, which JSON has no number for)."""
        d = asdict(self)
        d["loss"] = self.loss if math.isfinite(self.loss) else str(self.loss)
        return d


@dataclass
class DivergenceRecord:
    """What a run saw of divergence: each event, what was done about it, and whether it ended diverged.

    Attributes:
        events: Each divergence, with ``action``: ``restarted`` (from the checkpoint after
            epoch ``from_epoch``, learning rate scaled to ``lr_scale``) or ``stopped``.
        lr_scale: The factor every learning rate of the run carries after the restarts (1: none).
        diverged: The run stopped diverged: its output must not be promoted.
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    lr_scale: float = 1.0
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"diverged": self.diverged, "lr_scale": self.lr_scale, "events": list(self.events)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DivergenceRecord:
        if not d:
            return cls()
        return cls(events=list(d.get("events") or []), lr_scale=float(d.get("lr_scale", 1.0)), diverged=bool(d.get("diverged")))

    @property
    def restarts(self) -> int:
        return sum(1 for e in self.events if e.get("action") == "restarted")

    def summary(self) -> str:
        """One line: what diverged and what was done (empty when nothing diverged)."""
        if not self.events:
            return ""
        last = self.events[-1]
        where = f"epoch {last['epoch'] + 1} step {last['step'] + 1} at lr {last['lr']:.3g}: {last['detail']}"
        if self.diverged:
            tried = f" after {self.restarts} restart(s) with the learning rate halved" if self.restarts else ""
            return f"diverged{tried}: {where}"
        return f"recovered: {self.restarts} restart(s) from the last checkpoint, learning rate x {self.lr_scale:g} (last: {where})"


@dataclass
class _Stream:
    """The rule's state for one kind of batch."""

    smoothed: float | None = None
    lowest: float = math.inf
    above: int = 0


class DivergenceGuard:
    """The divergence rule of the module docstring, fed the losses of consecutive steps.

    Args:
        factor: How many times its lowest value the smoothed loss may reach (0: only
            non-finite losses count).
        steps: How long (in steps of one kind) it may stay above that, and the smoothing span.
        classes: The number of classes (the floor of the lowest value is ``ln(classes) / 10``).
    """

    def __init__(self, factor: float, steps: int, classes: int) -> None:
        self.factor, self.steps = float(factor), int(steps)
        self.floor = math.log(max(classes, 2)) / 10
        self.alpha = 2.0 / (2 * self.steps + 1)  # an EMA with a span of 2 x `steps` steps
        self._streams: dict[str, _Stream] = {}
        # A checkpoint of before kinds: its one state starts every kind.
        self._legacy: _Stream | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"streams": {k: asdict(v) for k, v in self._streams.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if "streams" not in state:  # one stream, as checkpoints of before kinds hold it
            self._legacy = _Stream(state["smoothed"], float(state["lowest"]), int(state["above"]))
            return
        self._streams = {k: _Stream(v["smoothed"], float(v["lowest"]), int(v["above"])) for k, v in state["streams"].items()}

    @property
    def worrying(self) -> bool:
        """The loss is above the limit now (not yet long enough to call it diverged): no checkpoint worth keeping."""
        return any(s.above > 0 for s in self._streams.values())

    def limit(self, kind: str | None = None) -> float:
        """The smoothed loss above which a step of ``kind`` counts towards divergence (unnamed: of the kind that is :attr:`worrying`)."""
        named = self._streams.get(kind) if kind is not None else next((s for s in self._streams.values() if s.above), None)
        return self.factor * max((named or _Stream()).lowest, self.floor)

    def _stream(self, kind: str) -> _Stream:
        if kind not in self._streams:
            self._streams[kind] = replace(self._legacy) if self._legacy is not None else _Stream()
        return self._streams[kind]

    def update(self, losses: Sequence[float], *, first_step: int, epoch: int, lr: float, kinds: Sequence[str] | None = None) -> Divergence | None:
        """Takes the losses of steps ``first_step``, ``first_step + 1``, ...; returns the first divergence, if any.

        ``kinds`` names each step's kind of batch (``mixed``, ``unmixed``), one each; unnamed, all are one kind.
        """
        if kinds is not None and len(kinds) != len(losses):
            raise ValueError(f"{len(kinds)} kinds for {len(losses)} losses: one each")
        for offset, loss in enumerate(losses):
            step = first_step + offset
            loss = float(loss)
            if not math.isfinite(loss):
                return Divergence(epoch, step, lr, loss, "non_finite_loss", f"the loss is {loss} (not a finite number)")
            kind = "" if kinds is None else str(kinds[offset])
            s = self._stream(kind)
            s.smoothed = loss if s.smoothed is None else s.smoothed + self.alpha * (loss - s.smoothed)
            if self.factor <= 0:
                continue
            limit = self.limit(kind)
            if s.smoothed > limit:
                s.above += 1
                if s.above >= self.steps:
                    of = f" of the {kind} batches" if len(self._streams) > 1 else ""
                    return Divergence(
                        epoch,
                        step,
                        lr,
                        loss,
                        "loss_exploded",
                        f"the loss{of} (smoothed {s.smoothed:.4g}) stayed above {self.factor:g} x its lowest "
                        f"({max(s.lowest, self.floor):.4g}) for {self.steps} steps",
                    )
            else:
                s.above = 0
            s.lowest = min(s.lowest, s.smoothed)
        return None

    @staticmethod
    def validation(val_loss: float, *, epoch: int, step: int, lr: float) -> Divergence | None:
        """A divergence when a validation loss is not finite (the weights or the norms' statistics blew up)."""
        if math.isfinite(val_loss):
            return None
        return Divergence(epoch, step, lr, val_loss, "non_finite_validation", f"the validation loss is {val_loss}")
