"""What each Kubeflow component shows in the UI: its Metrics, HTML, Model and confusion-matrix artifacts.

    publish_step_report(prefix, metrics=metrics, report=report)   # a data step's, from its committed output
    publish_training(train_prefix, model=m, metrics=mt, classification=c, report=r)

Like :mod:`imgpipe.stepio.artifacts`, it never imports kfp: docs/internals/kubeflow.md, "imgpipe.stepio.artifacts".
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgpipe import contract, storage
from imgpipe.report import html as htmlpage
from imgpipe.report import steps as step_report
from imgpipe.report.output import OutputReport

__all__ = [
    "find_confusion",
    "publish_training",
    "publish_promotion",
    "with_promotion",
    "publish_audit",
    "publish_step_report",
    "publish_comparison",
]

log = logging.getLogger(__name__)


def find_confusion(metrics: Mapping[str, Any]) -> tuple[str, list[list[int]]] | None:
    """The confusion matrix a train ``metrics.json`` carries: test first, then the last validation.

    Returns:
        ``(split, matrix)`` with ``matrix[true][predicted]``, or ``None`` when the
        metrics hold none.
    """
    test = metrics.get("test")
    if isinstance(test, Mapping) and test.get("confusion"):
        return "test", test["confusion"]
    for key in ("val_confusion", "confusion"):
        if metrics.get(key):
            return "val", metrics[key]
    epochs = metrics.get("epochs") or []
    if epochs and isinstance(epochs[-1], Mapping) and epochs[-1].get("val_confusion"):
        return "val", epochs[-1]["val_confusion"]
    return None


def _copy_into(artifact: Any, uri: str) -> None:
    """Copies the object ``uri`` to ``artifact.path``, where kfp uploads it from."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    storage.download_file(uri, artifact.path)


def publish_training(
    out: str,
    *,
    model: Any,
    metrics: Any,
    classification: Any,
    report: Any,
) -> dict[str, Any]:
    """Fills the train component's UI artifacts from a committed train output.

    * ``model`` (Model): a copy of ``model.pt``; metadata: where the original lives,
      the architecture, labels, input size.
    * ``metrics`` (Metrics): the final scalars (validation, test, train loss).
    * ``classification`` (ClassificationMetrics): the confusion matrix, when
      ``metrics.json`` carries one (:func:`find_confusion`).
    * ``report`` (HTML): ``report.html`` (augmentation grid, curves, tables).

    Returns:
        The train manifest.
    """
    out = storage.normalize_uri(out)
    manifest = contract.read_manifest(out, expect_step="train")
    extra = manifest.get("extra") or {}
    model_uri = storage.join(out, contract.MODEL)
    _copy_into(model, model_uri)
    model.metadata.update(
        framework="pytorch",
        model_uri=model_uri,
        model=extra.get("model"),
        num_classes=extra.get("num_classes"),
        image_size=extra.get("image_size"),
        channels=extra.get("channels"),
        prefix=out,
    )
    for key, value in step_report.train_metrics(manifest).items():
        metrics.log_metric(key, value)
    history = json.loads(storage.read_bytes(storage.join(out, contract.METRICS)))
    found = find_confusion(history)
    if found is not None:
        split, matrix = found
        classification.log_confusion_matrix(list(history.get("labels") or []), [list(map(int, r)) for r in matrix])
        classification.metadata["split"] = split
    else:
        log.warning("train: %s/metrics.json holds no confusion matrix; the ClassificationMetrics artifact stays empty", out)
    _copy_into(report, storage.join(out, contract.REPORT))
    return manifest


def publish_promotion(decision: Any, *, metrics: Any, report: Any) -> None:
    """Adds the promotion verdict to the promote task's Metrics and to its HTML report artifact (the training report)."""
    metrics.log_metric("promoted", 1.0 if decision.promoted else 0.0)
    if decision.candidate is not None:  # None: not scored (a diverged candidate)
        metrics.log_metric(f"promotion_candidate_{decision.metric}", decision.candidate)
    if decision.current is not None:
        metrics.log_metric(f"promotion_current_{decision.metric}", decision.current)
    path = Path(report.path)
    if path.exists():
        storage.write_text(str(path), with_promotion(path.read_text(), decision.promoted, decision.reason))


def with_promotion(page: str, promoted: bool, reason: str) -> str:
    """A training report with the promotion verdict and its reason at the top, under the run's result."""
    return htmlpage.at_top(page, htmlpage.section(f"Promotion: {'promoted' if promoted else 'not promoted'}", note=reason))


def publish_audit(out: str, *, report: Any, metrics: Any, overrides: Any) -> dict[str, Any]:
    """Fills the audit component's artifacts from a committed audit output.

    * ``report`` (HTML): ``label_issues.html``, the gallery of suspects.
    * ``metrics`` (Metrics): images audited, suspected label errors, folds.
    * ``overrides`` (Artifact): ``label_overrides.csv``, to review and hand to clean.

    Returns:
        The audit manifest.
    """
    from imgpipe.steps.audit import LABEL_ISSUES_HTML, LABEL_OVERRIDES

    out = storage.normalize_uri(out)
    manifest = contract.read_manifest(out, expect_step="audit")
    extra = manifest.get("extra") or {}
    _copy_into(report, storage.join(out, LABEL_ISSUES_HTML))
    _copy_into(overrides, storage.join(out, LABEL_OVERRIDES))
    for key in ("images", "issues", "folds"):
        metrics.log_metric(key, float(extra.get(key) or 0))
    overrides.metadata.update(prefix=out, issues=extra.get("issues"), clean_setting="label_overrides")
    report.metadata["prefix"] = out
    return manifest


def publish_step_report(prefix: str, *, metrics: Any, report: Any) -> OutputReport:
    """Fills a data step's UI artifacts from its committed output (:func:`imgpipe.report.steps.build_report`).

    * ``metrics`` (Metrics): counts, rejects by reason and the step's own figures.
    * ``report`` (HTML): the self-contained page (tables, class histograms, thumbnails).

    Logs how long building them took, against the step's own time.

    Returns:
        The report.

    Raises:
        UncommittedOutputError: If ``prefix`` is not committed.
    """
    started = time.monotonic()
    built = step_report.build_report(prefix)
    for key, value in built.metrics.items():
        metrics.log_metric(key, value)
    page = built.html()
    storage.write_text(report.path, page)
    seconds, step_seconds = time.monotonic() - started, built.metrics.get("seconds", 0.0)
    share = f"{100 * seconds / step_seconds:.1f}% of the step's {step_seconds:.1f} s" if step_seconds else "the step took 0 s"
    log.info("%s: UI report built in %.2f s (%s), %d KiB", built.step, seconds, share, len(page.encode()) >> 10)
    return built


def publish_comparison(out: str, *, report: Any, metrics: Any, winner: Any) -> dict[str, Any]:
    """Fills the compare component's artifacts from a committed compare output.

    * ``report`` (HTML): ``comparison.html``.
    * ``metrics`` (Metrics): the winner's validation figures and each branch's ranking value.
    * ``winner`` (Artifact): ``winner.yaml``; metadata: the branch, its ranking value and
      ``step_config`` (what the main pipeline's ``step_config`` parameter takes).

    Returns:
        The compare output's ``comparison.json``.
    """
    # Here, not at the top: steps.compare draws with matplotlib, which the cpu image's users of
    # this module (every data step's component, compiling the pipeline) must not need.
    from imgpipe.steps.compare import COMPARISON_HTML, COMPARISON_JSON, WINNER_YAML

    out = storage.normalize_uri(out)
    result = json.loads(storage.read_bytes(storage.join(out, COMPARISON_JSON)))
    for artifact, name in ((report, COMPARISON_HTML), (winner, WINNER_YAML)):
        _copy_into(artifact, storage.join(out, name))
    best, key = result["branches"][0], result["ranked_by"][0]
    for name in ("val_macro_f1", "val_pr_auc", "val_accuracy", "val_loss"):
        if best.get(name) is not None:
            metrics.log_metric(f"winner_{name}", float(best[name]))
    for row in result["branches"]:
        if row.get(key) is not None:
            metrics.log_metric(f"{row['branch']}_{key}", float(row[key]))
    metrics.log_metric("branches", float(len(result["branches"])))
    winner.metadata.update(branch=best["branch"], ranked_by=key, value=best.get(key), step_config=result["winner"]["step_config"], prefix=out)
    report.metadata["prefix"] = out
    return result
