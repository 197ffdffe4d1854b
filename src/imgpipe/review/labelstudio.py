"""A label audit's suspects as Label Studio tasks, and the reviewers' answers back as clean's ``label_overrides``.

    config = label_config(classes)                          # the project's labelling interface
    tasks = suspect_tasks(rows, classes, image_url)         # one task a suspect, worst first, with pre-annotations
    review = read_review(export, classes, known)            # Label Studio's JSON export -> overrides and who changed what

Only data: no HTTP here. The task and export
shapes are Label Studio 1.23's (``POST /api/projects/{id}/import``, ``GET
/api/projects/{id}/export?exportType=JSON``), checked against payloads recorded from a real server
(``tests/review/payloads/``). A review changes a label only where a reviewer submitted a choice
that names one of the classes, for an image the dataset has; a skipped task, or one nobody
finished, leaves the label as it was.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

from imgpipe.data.labels import escape_csv_cell

__all__ = [
    "FROM_NAME",
    "TO_NAME",
    "MODEL_VERSION",
    "Review",
    "ReviewRefused",
    "label_config",
    "suspect_tasks",
    "read_review",
]

# The interface's tag names: the choice a reviewer makes (``from_name``) about the picture (``to_name``).
FROM_NAME = "label"
TO_NAME = "image"
# The pre-annotations' model versions: the label the dataset has now, and the audit's models' top-k.
CURRENT = "current label"
MODEL_VERSION = "imgpipe audit"


def label_config(classes: Sequence[str]) -> str:
    """The project's labelling interface: the picture, its path and cleanlab's score, one choice among ``classes``."""
    if not classes:
        raise ValueError("a review needs the dataset's classes (labels.json): none given")
    choices = "\n".join(f"    <Choice value={quoteattr(str(c))}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        '  <Header value="$path"/>\n'
        '  <Text name="context" value="$context"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInLine="true" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def _choice(label: str, score: float | None = None, version: str = MODEL_VERSION) -> dict[str, Any]:
    result = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]
    return {"model_version": version, **({"score": round(float(score), 6)} if score is not None else {}), "result": result}


def suspect_tasks(rows: Iterable[Mapping[str, Any]], classes: Sequence[str], image_url: Callable[[Mapping[str, Any]], str]) -> list[dict[str, Any]]:
    """One Label Studio task per suspect row of an audit (``label_issues.parquet``), worst first.

    Each task's data names the image (``image``: ``image_url(row)``, a presigned or proxied URL
    of the picture in the object store), its ``path`` and ``sha256`` (what the review is joined
    back on), the given label and cleanlab's label quality; its pre-annotations are the current
    label and the audit's top-k suggestions with their probabilities.

    Raises:
        ValueError: For a row whose label is not one of ``classes``.
    """
    known = set(map(str, classes))
    suspects = sorted((r for r in rows if r.get("is_issue", True)), key=lambda r: (r.get("issue_rank") is None, r.get("issue_rank") or 0))
    tasks = []
    for rank, row in enumerate(suspects):
        given = str(row["given_label"])
        top = list(zip(row.get("top_labels") or [row["suggested_label"]], row.get("top_probs") or [row["suggested_prob"]]))
        unknown = sorted({given, *(str(label) for label, _ in top)} - known)
        if unknown:
            raise ValueError(f"audit row {row['path']!r} names {unknown}, which are not among the dataset's classes {sorted(known)}")
        shown = ", ".join(f"{label} {float(p):.2f}" for label, p in top)
        data = {
            TO_NAME: image_url(row),
            "path": str(row["path"]),
            "sha256": str(row["sha256"]),
            "given_label": given,
            "label_quality": round(float(row["label_quality"]), 6),
            "rank": rank,
            "context": f"given: {given} · the audit's models: {shown} · label quality {float(row['label_quality']):.3f}",
        }
        predictions = [_choice(given, version=CURRENT)] + [_choice(str(label), p, f"{MODEL_VERSION} top-{i}") for i, (label, p) in enumerate(top, 1)]
        tasks.append({"data": data, "predictions": predictions})
    return tasks


class ReviewRefused(ValueError):
    """A review that cannot be applied whole: what is wrong with it, task by task."""


@dataclass
class Review:
    """What a project's export says, checked against the dataset.

    Attributes:
        changes: ``(path, old label, new label, annotator, annotated at, task id)`` for each
            image whose label a reviewer changed.
        confirmed: Paths whose given label a reviewer kept.
        unchanged: Paths left as they were: skipped, or not reviewed yet.
        rejects: ``(task id, path, reason, detail)`` of what cannot be applied.
    """

    changes: list[tuple[str, str, str, str, str, int]] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rejects: list[tuple[int, str, str, str]] = field(default_factory=list)

    def overrides_csv(self) -> str:
        """``path,label`` for clean's ``label_overrides``, then who changed it and when (columns clean ignores)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", "previous_label", "annotator", "annotated_at", "task"])
        for path, old, new, who, when, task in self.changes:
            writer.writerow([escape_csv_cell(str(c)) for c in (path, new, old, who, when, task)])
        return buf.getvalue()

    def summary(self) -> str:
        return (
            f"{len(self.changes)} label(s) changed, {len(self.confirmed)} confirmed, "
            f"{len(self.unchanged)} left as they were (skipped or not reviewed), {len(self.rejects)} rejected"
        )


def _annotator(annotation: Mapping[str, Any], users: Mapping[int, str]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):  # some exports expand the user
        return str(who.get("email") or who.get("id"))
    return users.get(who, f"user {who}") if isinstance(who, int) else str(who)


def read_review(
    export: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    given: Mapping[str, str],
    users: Mapping[int, str] | None = None,
    from_name: str = FROM_NAME,
) -> Review:
    """The reviewers' answers in a project's JSON export, as label changes for the dataset.

    Per task, the newest submitted annotation counts (``updated_at``); a skipped one
    (``was_cancelled``) or none leaves the label as it was.

    Args:
        export: ``GET /api/projects/{id}/export?exportType=JSON``'s list of tasks.
        classes: The dataset's classes (``labels.json``): a choice must be one of them.
        given: Path -> the label the dataset has now, for every image the review may change.
        users: Label Studio's user id -> email, to say who changed what.
        from_name: The choice's tag in the project's interface (:func:`label_config`'s by default).

    Raises:
        ReviewRefused: If any task cannot be applied (a choice that is no class, a path the
            dataset does not have, an answer that is not one choice): all of them, one a line,
            and nothing is applied.
    """
    known, users = set(map(str, classes)), dict(users or {})
    review, seen = Review(), {}
    for task in export:
        task_id, data = int(task.get("id", -1)), task.get("data") or {}
        path = str(data.get("path", ""))
        if path not in given:
            review.rejects.append((task_id, path, "unknown_path", "the dataset has no image at this path"))
            continue
        if path in seen:
            review.rejects.append((task_id, path, "duplicate_task", f"task {seen[path]} reviews the same image"))
            continue
        seen[path] = task_id
        submitted = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not submitted:
            review.unchanged.append(path)
            continue
        newest = max(submitted, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        choices = [
            c
            for r in newest.get("result") or []
            if r.get("from_name") == from_name and r.get("type") == "choices"
            for c in (r.get("value") or {}).get("choices") or []
        ]
        if len(choices) != 1:
            review.rejects.append((task_id, path, "not_one_choice", f"the annotation chose {choices}"))
            continue
        label = str(choices[0])
        if label not in known:
            review.rejects.append((task_id, path, "unknown_label", f"{label!r} is not among the dataset's classes"))
            continue
        if label == given[path]:
            review.confirmed.append(path)
        else:
            when = str(newest.get("updated_at") or newest.get("created_at") or "")
            review.changes.append((path, given[path], label, _annotator(newest, users), when, task_id))
    if review.rejects:
        lines = [f"task {t} ({p or 'no path'}): {reason}: {detail}" for t, p, reason, detail in review.rejects]
        raise ReviewRefused(
            f"the review cannot be applied, nothing was: {len(review.rejects)} task(s) refused; "
            + "; ".join(lines[:5])
            + (" ..." if len(lines) > 5 else "")
        )
    return review
