"""The compare step: the train outputs of a sweep's branches in, a ranking, flags and the winner's config out.

    report = compare({"ra": prefix_a, "base": prefix_b}, dest)   # ranks a sweep's branches: comparison.json, .html, winner.yaml

How it works in detail: docs/internals/steps.md, "imgpipe.steps.compare".
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from imgpipe import commit, contract, storage, writer
from imgpipe.config import check_numbers, check_range, config_record, config_to_yaml
from imgpipe.contract import FileEntry, StepReport
from imgpipe.report import training as report
from imgpipe.report.comparison import CURVES_PNG, TABLE_KEYS, page
from imgpipe.steps.compare_rules import (
    COLLAPSE_REFERENCE,
    COLLAPSED_RECALL,
    MAX_VAL_ACC_GAIN,
    MIN_TRAIN_LOSS_DROP,
    TRAIN_VAL_LOSS_RATIO,
    TREND_WINDOW,
    UNDERFIT_ACC_GAP,
    UNDERFIT_LOSS_RATIO,
    BranchResult,
    SeedGroup,
    class_collapse,
    diagnose,
    diverged_flag,
    group_seeds,
    rank,
    under_fitting,
)
from imgpipe.sweep import GRID_KEYS, RECIPE_FIELDS
from imgpipe.train.selection import IMBALANCE_RATIO, imbalance, ranking_keys

__all__ = [
    "COMPARISON_JSON",
    "COMPARISON_HTML",
    "WINNER_YAML",
    "CompareConfig",
    "CompareReport",
    "class_counts",
    "spread_metrics",
    "winner_config",
    "compare",
]

log = logging.getLogger(__name__)

# Largest / smallest validation class above which the ranking uses PR-AUC: IMBALANCE_RATIO,
# imgpipe.train.selection (one rule for picking an epoch and a branch). The flags' thresholds:
# imgpipe.steps.compare_rules.

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


_ALL_DIVERGED = "every branch diverged ({}; each one's metrics.json says where): no winner; sweep again with a lower learning rate (lr or lr_base)"


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
        dest: Output prefix; replaced (``commit.claim``).
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
    commit.check_disjoint(dest, branches.values(), "compare")
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
        "rules": config_record(cfg),
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
    attempt = commit.claim(dest, "compare")
    # Every run trained (with seeds, each seed's), so lineage and local copies reach them all.
    trained = [run for r in result["branches"] for run in r.get("runs", [r])]
    outputs = {
        COMPARISON_JSON: json.dumps(result, indent=2),
        COMPARISON_HTML: page(result, curves, winner_yaml),
        CURVES_PNG: curves,
        WINNER_YAML: winner_yaml,
        contract.CONFIG: config_to_yaml(cfg),
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
    commit.publish(dest, "compare", attempt, commit.manifest_body(body, cfg, upstream))
    return files
