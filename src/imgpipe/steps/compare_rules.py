"""The branches of a sweep as the comparison sees them, how they rank, and the rules that flag them.

    ranked = rank(group_seeds(runs, groups) if groups else runs, keys)
    flag = diagnose(branch.history, thresholds)      # over_regularized / overfitting, or None

:mod:`imgpipe.steps.compare` reads each branch's train output into a :class:`BranchResult`,
applies these and writes the comparison. The rules read the notes' tuning procedure (how
each is decided: docs/internals/steps.md, "imgpipe.steps.compare"); their thresholds are the
named constants here, which :class:`imgpipe.steps.compare.CompareConfig` defaults to.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "TREND_WINDOW",
    "MIN_TRAIN_LOSS_DROP",
    "MAX_VAL_ACC_GAIN",
    "TRAIN_VAL_LOSS_RATIO",
    "UNDERFIT_LOSS_RATIO",
    "UNDERFIT_ACC_GAP",
    "COLLAPSED_RECALL",
    "COLLAPSE_REFERENCE",
    "Thresholds",
    "Flag",
    "BranchResult",
    "SeedGroup",
    "group_seeds",
    "rank",
    "trend",
    "diagnose",
    "class_collapse",
    "under_fitting",
    "diverged_flag",
]

# The last epochs the over-regularization trend is read over (fewer epochs: no verdict).
TREND_WINDOW = 3
# Training loss fell by at least this fraction of its value at the window's start...
MIN_TRAIN_LOSS_DROP = 0.05
# ...while the last epoch's validation accuracy beat the window's best earlier epoch by at most this.
MAX_VAL_ACC_GAIN = 0.005
# Over-regularized if the last training loss is at least this times the validation loss, else overfitting.
TRAIN_VAL_LOSS_RATIO = 1.0
# Under-fitted: last training loss at least this times the winner's...
UNDERFIT_LOSS_RATIO = 1.25
# ...and validation accuracy at least this below the winner's.
UNDERFIT_ACC_GAP = 0.05
# A class's recall collapses in a branch when it is at most this...
COLLAPSED_RECALL = 0.1
# ...while another branch reaches at least this on the same class (the notes' warning:
# too strong a recipe can wipe out a class while the averages still look fine).
COLLAPSE_REFERENCE = 0.5


class Thresholds(Protocol):
    """What the rules read of the step's config (:class:`imgpipe.steps.compare.CompareConfig`)."""

    trend_window: int
    min_train_loss_drop: float
    max_val_acc_gain: float
    train_val_loss_ratio: float
    underfit_loss_ratio: float
    underfit_acc_gap: float
    collapsed_recall: float
    collapse_reference: float


@dataclass(frozen=True)
class Flag:
    """A diagnosis of one branch, with the numbers it rests on.

    Attributes:
        kind: ``over_regularized``, ``overfitting``, ``under_fitted``, ``class_collapse`` or ``diverged``.
        message: What the numbers say and what to do, in one sentence.
        numbers: The values the rule compared.
    """

    kind: str
    message: str
    numbers: dict[str, Any]


@dataclass
class BranchResult:
    """One branch as the comparison sees it.

    Attributes:
        name: The branch name.
        prefix: Its committed train output.
        settings: Its grid settings (grid key -> value).
        history: ``metrics.json``'s per-epoch records.
        config: Its resolved TrainConfig (the manifest's ``config``).
        flags: Its diagnoses.
        diverged: Its training diverged (``metrics.json``'s ``diverged``): ranked last, never the winner.
    """

    name: str
    prefix: str
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    flags: list[Flag] = field(default_factory=list)

    kept: dict[str, Any] = field(default_factory=dict)
    kept_epoch: int | None = None
    diverged: bool = False

    def class_recall(self) -> dict[str, float]:
        """Validation recall per class of the kept epoch (else the last), classes without images left out."""
        at = [h for h in self.history if h.get("epoch") == self.kept_epoch] or self.history[-1:]
        recall = (at[0].get("val_per_class_recall") if at else None) or {}
        return {c: float(v) for c, v in recall.items() if v is not None}

    def last(self, key: str) -> float | None:
        """``key`` of the weights the branch kept (``metrics.json``'s ``kept``), else of its last epoch; or ``None``."""
        value = self.kept.get(key) if key in self.kept else (self.history[-1].get(key) if self.history else None)
        return None if value is None else float(value)


@dataclass
class SeedGroup(BranchResult):
    """A branch trained over several seeds: its runs, compared as one by their mean.

    ``prefix`` and ``config`` are the base seed's run's (the lowest seed: the run a sweep
    without seeds would have made), ``history`` the epoch-wise mean of the runs over the
    epochs they all trained.

    Attributes:
        runs: The branch's runs, lowest seed first.
    """

    runs: list[BranchResult] = field(default_factory=list)

    def values(self, key: str) -> list[float] | None:
        """``key`` of each run's kept weights (:meth:`BranchResult.last`), or ``None`` if a run lacks it."""
        values = [r.last(key) for r in self.runs]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    def last(self, key: str) -> float | None:
        """The mean of ``key`` over the runs, or ``None`` if a run lacks it."""
        values = self.values(key)
        return None if values is None else statistics.fmean(values)

    def spread(self, key: str) -> dict[str, float] | None:
        """``std`` (sample standard deviation), ``min`` and ``max`` of ``key`` over the runs, or ``None``."""
        values = self.values(key)
        if values is None:
            return None
        return {"std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}

    def class_recall(self) -> dict[str, float]:
        """Each class's mean validation recall over the runs that report it."""
        recalls = [r.class_recall() for r in self.runs]
        classes = sorted(set().union(*recalls))
        return {c: statistics.fmean(r[c] for r in recalls if c in r) for c in classes}


def group_seeds(runs: Sequence[BranchResult], groups: Mapping[str, str]) -> list[SeedGroup]:
    """The runs of each branch as one :class:`SeedGroup` (``groups``: run name -> its branch), in first-seen order.

    Raises:
        ValueError: If a run has no branch in ``groups``, or two runs of a branch trained
            with the same seed (their spread would be no spread).
    """
    members: dict[str, list[BranchResult]] = {}
    for run in runs:
        if run.name not in groups:
            raise ValueError(f"run {run.name} belongs to no branch of the plan's groups ({', '.join(sorted(set(groups.values())))})")
        members.setdefault(groups[run.name], []).append(run)
    out = []
    for name, group_runs in members.items():
        ordered = sorted(group_runs, key=lambda r: (r.config.get("seed", 0), r.name))
        seeds = [r.config.get("seed") for r in ordered]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"the runs of branch {name} ({', '.join(r.name for r in ordered)}) repeat a seed ({seeds}); each needs its own")
        base = ordered[0]
        diverged = any(r.diverged for r in ordered)
        out.append(SeedGroup(name, base.prefix, base.settings, _mean_history(ordered), base.config, runs=ordered, diverged=diverged))
    return out


def _mean_history(runs: Sequence[BranchResult]) -> list[dict[str, Any]]:
    """Per epoch, the mean of each number every run recorded, over the epochs all the runs trained."""
    out = []
    for records in zip(*(r.history for r in runs)):  # stops at the shortest (early stopping)
        numbers = [k for k, v in records[0].items() if _is_number(v) and all(_is_number(x.get(k)) for x in records)]
        out.append({**{k: statistics.fmean(float(x[k]) for x in records) for k in numbers}, "epoch": records[0].get("epoch")})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rank(results: Sequence[BranchResult], keys: Sequence[str]) -> list[BranchResult]:
    """``results`` best first, on the last epoch's ``keys`` (higher is better; name breaks exact ties).

    A :class:`SeedGroup` ranks by its mean over its runs. Diverged branches come last, in
    name order, whatever their numbers (they may have none).

    Raises:
        ValueError: If a branch that did not diverge lacks a key in its last epoch.
    """
    for r in results:
        missing = [k for k in keys if r.last(k) is None]
        if missing and not r.diverged:
            raise ValueError(f"branch {r.name} has no {', '.join(missing)} in its last epoch ({r.prefix}/metrics.json)")
    trained = sorted((r for r in results if not r.diverged), key=lambda r: (*(-r.last(k) for k in keys), r.name))  # type: ignore[operator]
    return trained + sorted((r for r in results if r.diverged), key=lambda r: r.name)


def trend(history: Sequence[Mapping[str, Any]], cfg: Thresholds) -> dict[str, Any] | None:
    """The numbers of the over-regularization trend over the last ``cfg.trend_window`` epochs.

    Returns:
        ``None`` with fewer epochs (or values missing); else the 1-based ``epochs`` of
        the window, ``train_loss_first``/``_last``, ``train_loss_drop`` (relative fall),
        ``val_acc_best_before`` (best of the window's earlier epochs), ``val_acc_last``,
        ``val_acc_gain`` (last minus that best), ``val_loss_last`` and ``holds``.
    """
    window = list(history[-cfg.trend_window :])
    if len(window) < cfg.trend_window:
        return None
    losses = [w.get("train_loss") for w in window]
    accs = [w.get("val_accuracy") for w in window]
    if any(v is None for v in (*losses, *accs)) or losses[0] <= 0:
        return None
    drop = (losses[0] - losses[-1]) / losses[0]
    gain = accs[-1] - max(accs[:-1])
    return {
        "epochs": [int(w["epoch"]) + 1 for w in window],
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "train_loss_drop": drop,
        "val_acc_best_before": max(accs[:-1]),
        "val_acc_last": accs[-1],
        "val_acc_gain": gain,
        "val_loss_last": window[-1].get("val_loss"),
        "holds": drop >= cfg.min_train_loss_drop and gain <= cfg.max_val_acc_gain,
    }


def diagnose(history: Sequence[Mapping[str, Any]], cfg: Thresholds) -> Flag | None:
    """``over_regularized`` or ``overfitting`` when the :func:`trend` holds, else ``None`` (module docstring)."""
    t = trend(history, cfg)
    if t is None or not t["holds"]:
        return None
    val_loss = t["val_loss_last"]
    ratio = t["train_loss_last"] / val_loss if val_loss else float("inf")
    numbers = {**{k: v for k, v in t.items() if k != "holds"}, "train_val_loss_ratio": ratio}
    first, last = t["epochs"][0], t["epochs"][-1]
    seen = (
        f"train loss fell {t['train_loss_drop']:.1%} over epochs {first}-{last} ({t['train_loss_first']:.3f} -> "
        f"{t['train_loss_last']:.3f}) while val accuracy moved {t['val_acc_gain']:+.3f} (best earlier "
        f"{t['val_acc_best_before']:.3f}, last {t['val_acc_last']:.3f})"
    )
    if ratio >= cfg.train_val_loss_ratio:
        advice = f"; train loss is {ratio:.2f}x val loss: the recipe is too strong, lower its strength"
        return Flag("over_regularized", seen + advice, numbers)
    advice = f"; train loss is only {ratio:.2f}x val loss: the model memorizes, regularize more or train fewer epochs"
    return Flag("overfitting", seen + advice, numbers)


def class_collapse(result: BranchResult, results: Sequence[BranchResult], cfg: Thresholds) -> Flag | None:
    """``class_collapse`` when some class's recall is near zero in ``result`` but fine in another branch, naming the classes."""
    mine = result.class_recall()
    collapsed = {}
    for cls, recall in mine.items():
        best = max((r.class_recall().get(cls, 0.0) for r in results if r is not result), default=0.0)
        if recall <= cfg.collapsed_recall and best >= cfg.collapse_reference:
            collapsed[cls] = {"recall": recall, "best_elsewhere": best}
    if not collapsed:
        return None
    named = ", ".join(f"{c} ({v['recall']:.2f} here, {v['best_elsewhere']:.2f} in another branch)" for c, v in sorted(collapsed.items()))
    message = f"per-class recall collapsed for {named}: the recipe wipes out these classes; weaken it or check their labels"
    return Flag("class_collapse", message, {"classes": collapsed})


def under_fitting(result: BranchResult, winner: BranchResult, cfg: Thresholds) -> Flag | None:
    """``under_fitted`` when ``result`` trains to a much higher loss and a lower accuracy than ``winner`` (module docstring)."""
    if result is winner:
        return None
    loss, best_loss = result.last("train_loss"), winner.last("train_loss")
    acc, best_acc = result.last("val_accuracy"), winner.last("val_accuracy")
    if None in (loss, best_loss, acc, best_acc) or not best_loss:
        return None
    ratio, gap = loss / best_loss, best_acc - acc  # type: ignore[operator]
    if ratio < cfg.underfit_loss_ratio or gap < cfg.underfit_acc_gap:
        return None
    message = (
        f"train loss {loss:.3f} is {ratio:.2f}x the winner's ({best_loss:.3f}) and val accuracy {acc:.3f} is "
        f"{gap:.3f} below it ({best_acc:.3f}): the branch has not fitted in these epochs; weaken the recipe or train longer"
    )
    numbers = {
        "train_loss": loss,
        "winner_train_loss": best_loss,
        "train_loss_ratio": ratio,
        "val_accuracy": acc,
        "winner_val_accuracy": best_acc,
        "val_acc_gap": gap,
    }
    return Flag("under_fitted", message, numbers)


def diverged_flag(result: BranchResult) -> Flag:
    """The flag of a branch whose training diverged (or, for seeds, one of whose runs did)."""
    runs = result.runs if isinstance(result, SeedGroup) else [result]
    names = [r.name for r in runs if r.diverged]
    return Flag("diverged", f"training diverged ({', '.join(names)}): ranked last and never the winner; lower its learning rate", {"runs": names})
