"""Which weights a run keeps: the best epoch by the metric ``compare`` ranks on, early stopping.

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
    """

    keys: tuple[str, ...] = ()
    imbalanced: bool = False
    best: Kept | None = None
    since_best: int = 0
    stopped_at: int | None = None

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

    def should_stop(self, patience: int) -> bool:
        """Whether ``patience`` epochs (> 0) have passed without improvement."""
        return patience > 0 and self.since_best >= patience

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
            reason += f"; stopped early after epoch {self.stopped_at + 1}, {patience} epochs without improvement"
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
            "reason": reason,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "imbalanced": self.imbalanced,
            "best": None if self.best is None else {**asdict(self.best), "score": list(self.best.score)},
            "since_best": self.since_best,
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.keys = tuple(state["keys"])
        self.imbalanced = bool(state["imbalanced"])
        best = state["best"]
        self.best = None if best is None else Kept(int(best["epoch"]), str(best["weights"]), tuple(best["score"]))
        self.since_best = int(state["since_best"])
        self.stopped_at = state["stopped_at"]
