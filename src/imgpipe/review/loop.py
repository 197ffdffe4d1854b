"""The review loop's two ends: an audit's suspects out to a Label Studio project, the reviewers' answers back.

    ls = LabelStudio(url, token)
    publish(audit, ls)                              # the suspects as tasks, worst first; again: new ones added, links renewed
    review = import_review(audit, ls, overrides)    # the project's answers as clean's label_overrides (who, when)

``audit`` is a committed audit output (``imgpipe audit``, the audit pipeline). Each suspect's
picture, as the folds' models saw it held out, is written once under ``images`` (by default the
audit's sibling ``label-review/``, in the same store and as private as the run) and reaches the
reviewer's browser by a presigned URL that lives at most 7 days; :func:`publish` run again renews
the links of the tasks it made and keeps every answer. :func:`import_review` refuses a review that
cannot be applied whole (:func:`imgpipe.review.labelstudio.read_review`); what it writes is the
``label_overrides`` file the clean step takes (``--set clean.label_overrides=URI``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from imgpipe import contract, storage
from imgpipe.readpolicy import ReadPolicy, ReadRefused, odd_segment
from imgpipe.review.client import LabelStudio
from imgpipe.review.labelstudio import Review, label_config, read_review, suspect_tasks
from imgpipe.steps.audit import LABEL_ISSUES, held_out_pictures

__all__ = ["IMAGES_DIR", "TOP", "URL_EXPIRES_S", "Published", "audit_classes", "import_review", "project_title", "publish"]

# The suspects a project gets at most, worst first: what a person reviews in a sitting or two.
TOP = 200
# The pictures' folder beside the audit output.
IMAGES_DIR = "label-review"
# How long a picture's link lives: SigV4's longest. Publishing again renews it.
URL_EXPIRES_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Published:
    """What :func:`publish` did: the project, the tasks it added and those whose links it renewed."""

    project: int
    title: str
    suspects: int
    added: int
    renewed: int
    images: str

    def summary(self) -> str:
        return (
            f"Label Studio project {self.title!r} ({self.project}): {self.suspects} suspect(s), {self.added} task(s) added, "
            f"{self.renewed} link(s) renewed; pictures in {self.images}"
        )


def _read_audit(audit: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    manifest = contract.read_manifest(audit, expect_step="audit")
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(audit, LABEL_ISSUES))))
    return manifest, table.to_pylist()


def _folds(manifest: Mapping[str, Any]) -> list[str]:
    """The fold models the audit's manifest names: read back from storage, so each is checked as a typed URI would be."""
    folds = (manifest.get("upstream") or {}).get("folds") or []
    if not folds or not isinstance(folds, list) or not all(isinstance(f, str) for f in folds):
        raise ValueError("the audit's manifest names no fold models (upstream.folds): not an output of imgpipe's audit")
    for f in folds:  # a plain path, even where the operator's own words could be relative (ReadPolicy.trusted)
        odd = odd_segment(f)
        if odd:
            raise ReadRefused(f"the audit manifest's upstream.folds: {storage.redact_uri(f)} has a {odd!r} segment: not what imgpipe's audit writes")
    return [ReadPolicy.trusted().check("the audit manifest's upstream.folds", f) for f in folds]


def audit_classes(manifest: Mapping[str, Any]) -> list[str]:
    """The dataset's classes, as the audit's models were trained on them (their ``model.json``)."""
    card = json.loads(storage.read_bytes(storage.join(_folds(manifest)[0], contract.MODEL_CARD)))
    return [str(c) for c in card["classes"]]


def project_title(classes: Sequence[str]) -> str:
    """The default project: one per class list, so a later audit of the same dataset lands in the same project."""
    digest = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:8]
    return f"imgpipe label review ({len(classes)} classes, {digest})"


def _default_images(audit: str) -> str:
    parent = audit.rstrip("/").rsplit("/", 1)[0]
    return storage.join(parent, IMAGES_DIR)


def _png(pixels: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze() if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def publish(
    audit: str,
    ls: LabelStudio,
    *,
    title: str | None = None,
    top: int = TOP,
    images: str | None = None,
    expires_s: int = URL_EXPIRES_S,
) -> Published:
    """Puts the audit's ``top`` most suspect images in a Label Studio project, worst first.

    Idempotent: a task is added only for an image the project has none for, and the tasks it has
    keep their answers; their picture links are renewed.

    Raises:
        ValueError: For ``top`` < 1, or an audit output imgpipe did not write.
        imgpipe.review.client.LabelStudioError: If Label Studio refuses or does not answer.
    """
    if top < 1:
        raise ValueError(f"top={top}: publish at least one suspect")
    audit = storage.normalize_uri(audit)
    manifest, rows = _read_audit(audit)
    classes = audit_classes(manifest)
    images = storage.normalize_uri(images) if images else _default_images(audit)
    storage.presigned_get(storage.join(images, "probe.png"), expires_s)  # a store with no links fails here, before anything is written
    suspects = sorted((r for r in rows if r.get("is_issue")), key=lambda r: r["issue_rank"])[:top]
    title = title or project_title(classes)
    project = ls.project(title, label_config(classes))
    existing = {str(t.get("data", {}).get("path")): t for t in ls.tasks(project)}

    def picture(row: Mapping[str, Any]) -> str:
        return storage.join(images, f"{row['sha256']}.png")

    missing = {r["path"] for r in suspects if not storage.exists(picture(r))}
    for path, pixels in held_out_pictures(_folds(manifest), missing).items():
        row = next(r for r in suspects if r["path"] == path)
        storage.write_bytes(picture(row), _png(pixels))  # at rest: a picture of the dataset, beside the audit
    unseen = [r["path"] for r in suspects if not storage.exists(picture(r))]
    if unseen:
        raise ValueError(f"the audit's folds hold no picture for {len(unseen)} suspect(s), e.g. {unseen[0]!r}: the fold outputs changed")

    def link(row: Mapping[str, Any]) -> str:
        return storage.presigned_get(picture(row), expires_s)

    added = ls.add_tasks(project, suspect_tasks([r for r in suspects if r["path"] not in existing], classes, link))
    renewed = 0
    by_path = {r["path"]: r for r in rows}
    for path, task in existing.items():
        if path in by_path and storage.exists(picture(by_path[path])):
            ls.update_task_data(int(task["id"]), {**task["data"], "image": link(by_path[path])})
            renewed += 1
    return Published(project=project, title=title, suspects=len(suspects), added=added, renewed=renewed, images=images)


def import_review(audit: str, ls: LabelStudio, dest: str, *, title: str | None = None) -> Review:
    """Reads the project's answers and writes them to ``dest`` as clean's ``label_overrides`` (with who and when).

    Nothing is written when the review cannot be applied whole (a choice that is not a class, an
    image the dataset does not have): :class:`imgpipe.review.labelstudio.ReviewRefused` says which tasks.
    """
    audit = storage.normalize_uri(audit)
    manifest, rows = _read_audit(audit)
    classes = audit_classes(manifest)
    title = title or project_title(classes)
    project = ls.find_project(title)
    review = read_review(ls.export(project), classes, {str(r["path"]): str(r["given_label"]) for r in rows}, ls.users())
    storage.write_text(dest, review.overrides_csv())
    return review
