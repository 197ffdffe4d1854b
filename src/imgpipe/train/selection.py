"""Which weights a run keeps: the best epoch by the metric ``compare`` ranks on, early stopping.

Early stopping ends a run when there is no more to gain: after ``patience`` epochs without a
better validation score, or at once when the kept score is at its ceiling (every ranking key
1.0), which no later epoch can beat, so the kept epoch is the one a full run would keep.

The ranking follows the notes' tuning procedure, as :mod:`imgpipe.steps.compare` applies
it across branches: macro-F1 (ties broken by accuracy) when the validation classes are
balanced, PR-AUC (ties broken by macro-F1) when the largest class has more than
:data:`IMBALANCE_RATIO` times the images of the smallest. Within one run the same rule
picks the epoch, and between the trained weights and their exponential moving average
(``ema_decay``), so the model a run ships is the one a sweep would have ranked.

No torch here: the train step feeds it the per-epoch records it writes to ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "IMBALANCE_RATIO",
    "BALANCED_KEYS",
    "IMBALANCED_KEYS",
    "EMA_PREFIX",
    "imbalance",
    "ranking_keys",
    "Kept",
    "Selection",
]

# Largest / smallest validation class count above which the classes count as imbalanced.
IMBALANCE_RATIO = 1.5
BALANCED_KEYS = ("val_macro_f1", "val_accuracy")
IMBALANCED_KEYS = ("val_pr_auc", "val_macro_f1")
# The per-epoch record's keys of the EMA weights' validation: ``ema_`` + the model's key.
EMA_PREFIX = "ema_"
# The best any ranking key can score (each is a rate: macro-F1, accuracy, PR-AUC).
CEILING = 1.0


def imbalance(counts: Sequence[int]) -> float:
    """Largest / smallest count over the classes with at least one image (1 when fewer than two)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if len(present) > 1 else 1.0


def ranking_keys(imbalanced: bool) -> tuple[str, str]:
    """The per-epoch keys runs and branches are ranked on: primary, then the tie-break."""
    return IMBALANCED_KEYS if imbalanced else BALANCED_KEYS


@dataclass(frozen=True)
class Kept:
    """The weights a run keeps.

    Attributes:
        epoch: The epoch (0-based) after which they were taken.
        weights: ``model`` (the trained weights) or ``ema`` (their moving average).
        score: The ranking keys' values, primary first.
    """

    epoch: int
    weights: str
    score: tuple[float, ...]


@dataclass
class Selection:
    """Tracks the best weights over the epochs and the epochs since they improved.

    Attributes:
        keys: The ranking keys, fixed at the first validation.
        imbalanced: Whether the validation classes are imbalanced.
        best: The weights kept so far.
        since_best: Epochs finished since ``best`` last improved.
        stopped_at: The epoch after which early stopping ended the run, if it did.
        stop_reason: Why it ended there: ``patience`` (no better score for that many epochs)
            or ``ceiling`` (every ranking key at 1.0, which no later epoch can beat).
    """

    keys: tuple[str, ...] = ()
    imbalanced: bool = False
    best: Kept | None = None
    since_best: int = 0
    stopped_at: int | None = None
    stop_reason: str | None = None

    def fix_keys(self, class_counts: Sequence[int], ratio: float = IMBALANCE_RATIO) -> None:
        """Chooses the ranking keys from the validation class counts (once)."""
        if not self.keys:
            self.imbalanced = imbalance(class_counts) > ratio
            self.keys = ranking_keys(self.imbalanced)

    def consider(self, epoch: int, record: Mapping[str, Any]) -> str | None:
        """Weighs an epoch's validation of the model (and of its EMA, when the record has it).

        Strictly better scores win, so among equal ones the earliest epoch, and the trained
        weights over their average, are kept.

        Returns:
            ``model`` or ``ema`` when this epoch's weights become the kept ones, else ``None``.
        """
        if not self.keys:
            raise ValueError("Selection.fix_keys must be called before the first epoch is considered")
        chosen = None
        for weights, prefix in (("model", ""), ("ema", EMA_PREFIX)):
            values = [record.get(prefix + key) for key in self.keys]
            if any(v is None for v in values):
                continue
            score = tuple(float(v) for v in values)
            if self.best is None or score > self.best.score:
                self.best, chosen = Kept(epoch, weights, score), weights
        self.since_best = 0 if chosen else self.since_best + 1
        return chosen

    def at_ceiling(self) -> bool:
        """Whether the kept score is the highest there is: every ranking key (a rate) at 1.0.

        Only a strictly better score replaces the kept weights, so from here no later epoch
        can be kept: training on would change nothing the run ships.
        """
        return self.best is not None and all(v >= CEILING for v in self.best.score)

    def should_stop(self, patience: int) -> str | None:
        """Why early stopping (``patience`` > 0) ends the run now, or ``None`` to go on.

        ``ceiling`` when the kept score cannot be beaten (:meth:`at_ceiling`), ``patience`` when
        ``patience`` epochs have passed without a better one; 0 trains every epoch.
        """
        if patience <= 0:
            return None
        if self.at_ceiling():
            return "ceiling"
        return "patience" if self.since_best >= patience else None

    def stop(self, epoch: int, reason: str) -> None:
        """Records that early stopping ends the run after ``epoch``, and why."""
        self.stopped_at, self.stop_reason = epoch, reason

    def stop_message(self, patience: int) -> str:
        """One line on why the run stopped early (empty when it did not)."""
        if self.stopped_at is None:
            return ""
        if self.stop_reason == "ceiling":
            score = ", ".join(f"{k} {v:.4f}" for k, v in zip(self.keys, self.best.score)) if self.best else ""
            return f"stopped early after epoch {self.stopped_at + 1}: validation at its ceiling ({score}), which no later epoch can beat"
        return f"stopped early after epoch {self.stopped_at + 1}, {patience} epochs without improvement"

    def summary(self, patience: int, epochs: int, trained: int) -> dict[str, Any]:
        """What ``metrics.json`` and the report say about the kept weights, and why."""
        assert self.best is not None
        best = self.best
        which = "their exponential moving average" if best.weights == "ema" else "the trained weights"
        primary = f"{self.keys[0]} {best.score[0]:.4f}"
        reason = (
            f"best {primary} of {trained} epochs ({'imbalanced' if self.imbalanced else 'balanced'} classes): {which} after epoch {best.epoch + 1}"
        )
        if self.stopped_at is not None:
            reason += "; " + self.stop_message(patience)
        return {
            "epoch": best.epoch,
            "weights": best.weights,
            "ranked_by": list(self.keys),
            "score": dict(zip(self.keys, best.score)),
            "imbalanced": self.imbalanced,
            "patience": patience,
            "epochs_planned": epochs,
            "epochs_trained": trained,
            "stopped_early": self.stopped_at is not None,
            "stop_reason": self.stop_reason,
            "reason": reason,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "imbalanced": self.imbalanced,
            "best": None if self.best is None else {**asdict(self.best), "score": list(self.best.score)},
            "since_best": self.since_best,
            "stopped_at": self.stopped_at,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.keys = tuple(state["keys"])
        self.imbalanced = bool(state["imbalanced"])
        best = state["best"]
        self.best = None if best is None else Kept(int(best["epoch"]), str(best["weights"]), tuple(best["score"]))
        self.since_best = int(state["since_best"])
        self.stopped_at = state["stopped_at"]
        # A checkpoint from before stop reasons were recorded stopped on patience, the one rule then.
        self.stop_reason = state.get("stop_reason", None if self.stopped_at is None else "patience")
