"""The compare step: the train outputs of a sweep's branches in, a ranking, flags and the winner's config out.

    report = compare({"ra": prefix_a, "base": prefix_b}, dest)   # ranks a sweep's branches: comparison.json, .html, winner.yaml

How it works in detail: docs/internals.md, "imgpipe.steps.compare".
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from imgpipe import contract, storage, writer
from imgpipe.config import check_numbers, check_range, config_to_dict, config_to_yaml
from imgpipe.contract import FileEntry, StepReport
from imgpipe.report import training as report
from imgpipe.report.comparison import CURVES_PNG, TABLE_KEYS, page
from imgpipe.sweep import GRID_KEYS, RECIPE_FIELDS
from imgpipe.train.selection import IMBALANCE_RATIO, imbalance, ranking_keys

__all__ = [
    "TREND_WINDOW",
    "MIN_TRAIN_LOSS_DROP",
    "MAX_VAL_ACC_GAIN",
    "TRAIN_VAL_LOSS_RATIO",
    "UNDERFIT_LOSS_RATIO",
    "UNDERFIT_ACC_GAP",
    "COLLAPSED_RECALL",
    "COLLAPSE_REFERENCE",
    "COMPARISON_JSON",
    "COMPARISON_HTML",
    "WINNER_YAML",
    "CompareConfig",
    "Flag",
    "BranchResult",
    "SeedGroup",
    "CompareReport",
    "class_counts",
    "group_seeds",
    "spread_metrics",
    "class_collapse",
    "rank",
    "trend",
    "diagnose",
    "under_fitting",
    "winner_config",
    "compare",
]

log = logging.getLogger(__name__)

# Largest / smallest validation class above this: rank by PR-AUC instead of macro-F1.
# IMBALANCE_RATIO: imgpipe.train.selection (one rule for picking an epoch and a branch).
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

COMPARISON_JSON = "comparison.json"
COMPARISON_HTML = "comparison.html"
WINNER_YAML = "winner.yaml"


@dataclass(frozen=True)
class CompareConfig:
    """The thresholds of the comparison (defaults: the module's named constants).

    Attributes:
        imbalance_ratio: Largest / smallest validation class count above which the
            ranking uses PR-AUC.
        trend_window: Last epochs read for the over-regularization trend.
        min_train_loss_drop: Relative fall of the training loss over the window that counts as falling.
        max_val_acc_gain: Gain of the last epoch's validation accuracy over the window's
            best earlier epoch that still counts as stalled.
        train_val_loss_ratio: The trend is over-regularization when the last training
            loss is at least this times the validation loss, else overfitting.
        underfit_loss_ratio: Under-fitted when the last training loss is at least this
            times the winner's ...
        underfit_acc_gap: ... and the validation accuracy at least this below the winner's.
        collapsed_recall: A class's validation recall at most this in a branch ...
        collapse_reference: ... while another branch reaches at least this on it: ``class_collapse``.
    """

    imbalance_ratio: float = IMBALANCE_RATIO
    trend_window: int = TREND_WINDOW
    min_train_loss_drop: float = MIN_TRAIN_LOSS_DROP
    max_val_acc_gain: float = MAX_VAL_ACC_GAIN
    train_val_loss_ratio: float = TRAIN_VAL_LOSS_RATIO
    underfit_loss_ratio: float = UNDERFIT_LOSS_RATIO
    underfit_acc_gap: float = UNDERFIT_ACC_GAP
    collapsed_recall: float = COLLAPSED_RECALL
    collapse_reference: float = COLLAPSE_REFERENCE

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range("trend_window", self.trend_window, 2, 10_000, integer=True, note="epochs")
        if not 0 <= self.collapsed_recall < self.collapse_reference <= 1:
            raise ValueError("collapsed_recall and collapse_reference must satisfy 0 <= collapsed_recall < collapse_reference <= 1")
        if self.imbalance_ratio < 1:
            raise ValueError(f"imbalance_ratio is a ratio of class counts, >= 1; got {self.imbalance_ratio}")
        if self.trend_window < 2:
            raise ValueError(f"trend_window must be >= 2 epochs, got {self.trend_window}")
        if not 0 <= self.min_train_loss_drop < 1:
            raise ValueError(f"min_train_loss_drop is a fraction in [0, 1), got {self.min_train_loss_drop}")
        if self.underfit_loss_ratio < 1 or self.underfit_acc_gap < 0 or self.train_val_loss_ratio <= 0:
            raise ValueError("underfit_loss_ratio must be >= 1, underfit_acc_gap >= 0 and train_val_loss_ratio > 0")


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


@dataclass
class CompareReport(StepReport):
    """What the compare step did.

    Attributes:
        ranked_by: The ranking keys, primary first.
        ranking: Branch names, best first.
        winner: The winner's ``step_config`` (``{"train": recipe}``).
    """

    ranked_by: tuple[str, ...] = ()
    ranking: list[str] = field(default_factory=list)
    winner: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return f"compare: {len(self.ranking)} branches ranked by {self.ranked_by[0]}, winner {self.ranking[0]} -> {self.dest}"


def class_counts(metrics: Mapping[str, Any]) -> list[int]:
    """Validation images per class: the row sums of ``metrics.json``'s ``val_confusion``.

    Raises:
        ValueError: If the metrics hold no validation confusion matrix.
    """
    matrix = metrics.get("val_confusion")
    if not matrix:
        raise ValueError("metrics.json holds no val_confusion: the branch trained without a val split")
    return [int(sum(row)) for row in matrix]


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


def spread_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The Kubeflow Metrics of a comparison's spread over seeds: ``{branch}_{key}_std``, ``_min``, ``_max``.

    ``key`` is the primary ranking key, whose mean ``publish_comparison`` logs as
    ``{branch}_{key}``; empty for a sweep without seeds.
    """
    key = result["ranked_by"][0]
    out = {}
    for row in result["branches"]:
        spread = (row.get("spread") or {}).get(key)
        if spread is not None:
            out.update({f"{row['branch']}_{key}_{stat}": float(spread[stat]) for stat in ("std", "min", "max")})
    return out


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


def trend(history: Sequence[Mapping[str, Any]], cfg: CompareConfig) -> dict[str, Any] | None:
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


def diagnose(history: Sequence[Mapping[str, Any]], cfg: CompareConfig) -> Flag | None:
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


def class_collapse(result: BranchResult, results: Sequence[BranchResult], cfg: CompareConfig) -> Flag | None:
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


def under_fitting(result: BranchResult, winner: BranchResult, cfg: CompareConfig) -> Flag | None:
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


_ALL_DIVERGED = "every branch diverged ({}; each one's metrics.json says where): no winner; sweep again with a lower learning rate (lr or lr_base)"


def diverged_flag(result: BranchResult) -> Flag:
    """The flag of a branch whose training diverged (or, for seeds, one of whose runs did)."""
    runs = result.runs if isinstance(result, SeedGroup) else [result]
    names = [r.name for r in runs if r.diverged]
    return Flag("diverged", f"training diverged ({', '.join(names)}): ranked last and never the winner; lower its learning rate", {"runs": names})


def winner_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``step_config`` of a full run with a branch's recipe: ``{"train": {field: value}}`` over :data:`RECIPE_FIELDS`.

    A field the branch left unset (``None``, e.g. ``lr``: the ``lr_base`` rule) stays unset:
    the full run applies its own rule, and a run parameter cannot carry a null.
    """
    return {"train": {k: config[k] for k in RECIPE_FIELDS if config.get(k) is not None}}


def _read_branch(name: str, prefix: str, settings: Mapping[str, Any]) -> tuple[BranchResult, dict[str, Any], dict[str, Any]]:
    manifest = contract.read_manifest(prefix, expect_step="train")
    metrics = json.loads(storage.read_bytes(storage.join(prefix, contract.METRICS)))
    history = list(metrics.get("epochs") or [])
    if not history:
        raise ValueError(f"branch {name}: {prefix}/metrics.json has no epochs")
    config = dict(manifest.get("config") or {})
    # The values as the branch trained with them (kfp hands the plan's numbers over as floats), in grid key order.
    shown = {k: config.get(GRID_KEYS[k], settings[k]) for k in GRID_KEYS if k in settings}
    kept_epoch = (metrics.get("selection") or {}).get("epoch")
    result = BranchResult(
        name,
        storage.normalize_uri(prefix),
        shown,
        history,
        config,
        kept=dict(metrics.get("kept") or {}),
        kept_epoch=kept_epoch,
        diverged=bool(metrics.get("diverged")),
    )
    return result, manifest, metrics


def _check_same_data(manifests: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]]) -> None:
    sources = {n: (m.get("upstream") or {}).get("source") for n, m in manifests.items()}
    labels = {n: tuple(m.get("labels") or ()) for n, m in metrics.items()}
    for what, values in (("data", sources), ("classes", labels)):
        if len(set(values.values())) > 1:
            raise ValueError(f"the branches trained on different {what} ({values}); a comparison needs the same")


def _rows(ranked: Sequence[BranchResult]) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(ranked, 1):
        row = {"rank": i, "branch": r.name, "prefix": r.prefix, "settings": r.settings, "epochs": len(r.history)}
        row.update({k: r.last(k) for k in TABLE_KEYS})
        if isinstance(r, SeedGroup):  # the figures above are the means over the runs
            row["seeds"] = len(r.runs)
            row["spread"] = {k: s for k in TABLE_KEYS if (s := r.spread(k)) is not None}
            row["runs"] = [
                {"branch": run.name, "seed": run.config.get("seed"), "prefix": run.prefix, **{k: run.last(k) for k in TABLE_KEYS}} for run in r.runs
            ]
        row["flags"] = [{"kind": f.kind, "message": f.message, "numbers": f.numbers} for f in r.flags]
        rows.append(row)
    return rows


def _winner_yaml(best: BranchResult, keys: Sequence[str], step_config: Mapping[str, Any]) -> str:
    figure, where = f"{keys[0]} {best.last(keys[0]):.4f}", best.prefix
    if isinstance(best, SeedGroup):
        s = best.spread(keys[0]) or {}
        figure = f"mean {figure} over {len(best.runs)} seeds, std {s['std']:.4f}, {s['min']:.4f}-{s['max']:.4f}"
        where = f"{best.prefix} and the other seeds' runs"
    header = (
        f"# The winner of an imgpipe sweep: branch {best.name} ({figure}), trained from\n"
        f"# {where}. Its augmentation recipe, for a full run:\n"
        "#   imgpipe train DATA OUT --config winner.yaml | imgpipe run --config winner.yaml\n"
        '#   imgpipe submit --param step_config="$(cat winner.yaml)"\n'
    )
    return header + yaml.safe_dump(dict(step_config), sort_keys=False)


def compare(
    branches: Mapping[str, str],
    dest: str,
    cfg: CompareConfig | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    groups: Mapping[str, str] | None = None,
) -> CompareReport:
    """Ranks and diagnoses a sweep's branches; commits the comparison to ``dest``.

    Args:
        branches: Branch name (a run's, with seeds) -> its committed train output prefix.
        dest: Output prefix; replaced (``contract.claim``).
        cfg: The thresholds; the module's constants when omitted.
        settings: Branch name -> its grid settings, for the table.
        groups: With seeds: run name -> the branch it repeats (the plan items'
            ``group``); each branch's runs are ranked as one :class:`SeedGroup`.

    Raises:
        ValueError: With no branch, branches trained on different data or classes, a
            branch without validation metrics, ``dest`` overlapping a branch, or runs
            outside ``groups`` or repeating a seed.
        UncommittedOutputError: If a branch's output is not committed.
    """
    cfg = cfg or CompareConfig()
    started = time.monotonic()
    if not branches:
        raise ValueError("compare needs at least one branch")
    dest = storage.normalize_uri(dest)
    contract.check_disjoint(dest, branches.values(), "compare")
    read = {n: _read_branch(n, p, (settings or {}).get(n, {})) for n, p in branches.items()}
    _check_same_data({n: m for n, (_, m, _) in read.items()}, {n: x for n, (_, _, x) in read.items()})
    if all(r.diverged for r, _, _ in read.values()):
        raise ValueError(_ALL_DIVERGED.format(", ".join(read)))
    # The class counts come from a branch that validated: a diverged one may have stopped before validating.
    first_metrics = next((x for r, _, x in read.values() if not r.diverged), next(iter(read.values()))[2])
    ratio = imbalance(class_counts(first_metrics))
    imbalanced = ratio > cfg.imbalance_ratio
    keys = ranking_keys(imbalanced)
    runs = [r for r, _, _ in read.values()]
    ranked = rank(group_seeds(runs, groups) if groups else runs, keys)
    best = ranked[0]
    if best.diverged:  # with seeds: every branch had a run that diverged
        raise ValueError(_ALL_DIVERGED.format(", ".join(r.name for r in ranked)))
    for r in ranked:
        checks = (diverged_flag(r),) if r.diverged else (diagnose(r.history, cfg), under_fitting(r, best, cfg), class_collapse(r, ranked, cfg))
        r.flags = [f for f in checks if f is not None]
    winner = winner_config(best.config)
    result = {
        "ranked_by": list(keys),
        "imbalanced": imbalanced,
        "imbalance": ratio,
        "class_counts": class_counts(first_metrics),
        "labels": first_metrics.get("labels") or [],
        "rules": config_to_dict(cfg),
        "branches": _rows(ranked),
        "winner": {"branch": best.name, "prefix": best.prefix, "step_config": winner},
    }
    curves = report.sweep_curves_png({r.name: r.history for r in ranked}, (keys[0], "val_accuracy", "train_loss", "val_loss"))
    winner_yaml = _winner_yaml(best, keys, winner)
    files = _write(dest, result, curves, winner_yaml, cfg)
    out = CompareReport(
        step="compare",
        dest=dest,
        inputs=len(runs),
        outputs=len(ranked),
        rejected=0,
        files=files,
        seconds=round(time.monotonic() - started, 3),
        extra={
            "ranked_by": list(keys),
            "imbalanced": imbalanced,
            "winner": best.name,
            "flags": {r.name: [f.kind for f in r.flags] for r in ranked if r.flags},
            **({"seeds": len(best.runs)} if isinstance(best, SeedGroup) else {}),
        },
        ranked_by=keys,
        ranking=[r.name for r in ranked],
        winner=winner,
    )
    log.info("%s", out.summary())
    return out


def _write(dest: str, result: Mapping[str, Any], curves: bytes, winner_yaml: str, cfg: CompareConfig) -> list[FileEntry]:
    """Claims ``dest``, writes the comparison's files, commits; returns the manifest's file entries."""
    attempt = contract.claim(dest, "compare")
    # Every run trained (with seeds, each seed's), so lineage and local copies reach them all.
    trained = [run for r in result["branches"] for run in r.get("runs", [r])]
    outputs = {
        COMPARISON_JSON: json.dumps(result, indent=2).encode(),
        COMPARISON_HTML: page(result, curves, winner_yaml).encode(),
        CURVES_PNG: curves,
        WINNER_YAML: winner_yaml.encode(),
        contract.CONFIG: config_to_yaml(cfg).encode(),
    }
    files = sorted((writer.write_entry(dest, name, data) for name, data in outputs.items()), key=lambda f: f.name)
    body = StepReport(
        step="compare",
        dest=dest,
        inputs=len(trained),
        outputs=len(result["branches"]),
        rejected=0,
        files=files,
        extra={"winner": result["winner"]["branch"], "ranked_by": result["ranked_by"]},
    )
    upstream = {"step": "train", "branches": {r["branch"]: r["prefix"] for r in trained}}
    contract.publish(dest, "compare", attempt, contract.manifest_body(body, cfg, upstream))
    return files
