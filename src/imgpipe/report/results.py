"""Reports on the outputs that are results rather than data: a predict output and a promotion decision.

    report = build_report(prefix)   # imgpipe.report.steps dispatches a predict or promote output here

They read as the step reports do (:class:`~imgpipe.report.output.OutputReport`, bounded reads
through :class:`~imgpipe.report.parts.RowGroups`), so ``imgpipe show`` opens every output kind a
pipeline run writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imgpipe import contract, storage
from imgpipe.report.output import Chart, OutputReport, ReportLimits, Section, Table
from imgpipe.report.parts import RowGroups, data_files, rejects_tables, sample_table, step_facts, step_metrics

__all__ = ["RESULT_REPORTS", "predict_report", "promote_report"]

# The columns of predictions.parquet a report shows (imgpipe.steps.predict.PREDICT_SCHEMA).
_SAMPLE = ("path", "split", "label", "predicted_name", "confidence")


def predict_report(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> OutputReport:
    """A predict output: scores per split (labelled inputs), predicted classes, a sample of predictions, rejects."""
    extra = manifest.get("extra") or {}
    classes = [str(c) for c in extra.get("classes") or []]
    scores = extra.get("scores") or {}
    tta = (extra.get("tta") or {}).get("views") or ["identity"]
    facts = step_facts(manifest) + [
        ("model", extra.get("model")),
        ("architecture", extra.get("architecture")),
        ("classes", len(classes)),
        ("input", extra.get("input_kind")),
        ("views averaged", ", ".join(tta)),
    ]
    counts = [0] * len(classes)
    sample: list[dict] = []
    read_all = True
    for uri, rg in reader.groups(data_files(prefix, manifest)):
        table = reader.read(uri, rg, ("predicted",) + _SAMPLE)
        if table is None:
            read_all = False
            break
        for k in table.column("predicted").to_pylist():
            if 0 <= k < len(counts):
                counts[k] += 1
        if len(sample) < limits.table_rows:
            sample += table.slice(0, limits.table_rows - len(sample)).select([c for c in _SAMPLE if c in table.column_names]).to_pylist()
    reject_tables, _ = rejects_tables(prefix, manifest, limits)
    score_rows = tuple((split, s.get("images"), s.get("accuracy"), s.get("macro_f1")) for split, s in sorted(scores.items()))
    unlabelled = "" if score_rows else "no input had a label"
    partial = "" if read_all else "in the row groups read within the report's byte budget"
    sections: list[Section] = [
        Table("Scores (inputs with a label)", ("split", "images", "accuracy", "macro_f1"), score_rows, note=unlabelled),
        Chart("Predicted classes", tuple(classes), {"predicted": tuple(counts)}, note=partial),
        sample_table("Sample predictions", sample, _SAMPLE, limits),
        *reject_tables,
    ]
    per_split = {f"{split}_{k}": float(s[k]) for split, s in scores.items() for k in ("accuracy", "macro_f1") if s.get(k) is not None}
    metrics = step_metrics(manifest, **per_split)
    return OutputReport("predict", prefix, tuple(facts), metrics, tuple(sections), limits)


def promote_report(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> OutputReport:
    """A promotion decision: the verdict, both scores and what they were compared on; its own page as the HTML."""

    decision = json.loads(storage.read_bytes(storage.join(prefix, contract.PROMOTION_JSON)))
    if not isinstance(decision, dict):
        raise ValueError(f"{storage.join(prefix, contract.PROMOTION_JSON)} is not a decision imgpipe wrote")
    facts = [
        ("step", "promote"),
        ("prefix", manifest.get("dest")),
        ("created", manifest.get("created_at", "")),
        ("verdict", "promoted" if decision.get("promoted") else "NOT promoted"),
        ("reason", decision.get("reason")),
    ]
    rows = tuple(
        (name, decision.get(key))
        for name, key in (
            ("metric", "metric"),
            ("candidate score", "candidate"),
            ("current score", "current"),
            ("candidate", "candidate_prefix"),
            ("current", "current_prefix"),
            ("split", "split"),
            ("images compared", "images"),
            ("left out (seen by the current model)", "overlap"),
            ("tolerance", "tolerance"),
            ("serving repository", "serving"),
        )
    )
    metrics = {k: float(decision[k]) for k in ("candidate", "current") if isinstance(decision.get(k), (int, float))}
    metrics["promoted"] = float(bool(decision.get("promoted")))
    try:
        page = storage.read_bytes(storage.join(prefix, contract.PROMOTION_HTML)).decode("utf-8")
    except FileNotFoundError:
        page = None
    return OutputReport("promote", prefix, tuple(facts), metrics, (Table("Decision", ("", "value"), rows),), limits, page=page)


# The committed outputs that are not a pipeline step of imgpipe.step_table, by the manifest's step.
RESULT_REPORTS = {"predict": predict_report, "promote": promote_report}
