"""The review loop's two ends (imgpipe.review.loop) on a real audit output and the local S3 server.

Label Studio itself is the in-memory stand-in below, which answers the client's calls with the
shapes the recorded payloads have (``payloads/``: tasks with ``id``, ``data`` and ``annotations``,
the export a list of them); ``make test-review`` runs the same loop against a real Label Studio
and a reviewer in Chromium. What is checked here: the pictures written once and reachable by their
presigned links with no credentials, worst first, nothing duplicated, links renewed and answers
kept on a second publish, the answers back as clean's overrides, and a review that cannot be
applied writing nothing.
"""

from __future__ import annotations

import csv
import io
import itertools
import urllib.request
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import storage
from imgpipe.review import loop
from imgpipe.review.labelstudio import FROM_NAME, TO_NAME, ReviewRefused
from imgpipe.review.loop import import_review, publish
from imgpipe.steps.audit import LABEL_ISSUES
from tests.steps.test_audit import audited  # noqa: F401 - the fixture: a real two-fold audit

pytestmark = pytest.mark.usefixtures("s3_endpoint")


class Studio:
    """Label Studio's projects, tasks and export as the client sees them, in memory."""

    def __init__(self) -> None:
        self.projects: dict[int, dict[str, Any]] = {}
        self.task_ids = itertools.count(1)
        self.calls: list[str] = []

    def project(self, title: str, label_config: str) -> int:
        self.calls.append("project")
        for pid, p in self.projects.items():
            if p["title"] == title:
                return pid
        pid = len(self.projects) + 1
        self.projects[pid] = {"title": title, "label_config": label_config, "tasks": []}
        return pid

    def find_project(self, title: str) -> int:
        return next(pid for pid, p in self.projects.items() if p["title"] == title)

    def tasks(self, project: int) -> list[dict[str, Any]]:
        return [dict(t) for t in self.projects[project]["tasks"]]

    def add_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        have = {t["data"]["path"] for t in self.projects[project]["tasks"]}
        new = [t for t in tasks if t["data"]["path"] not in have]
        for t in new:
            self.projects[project]["tasks"].append({"id": next(self.task_ids), "data": dict(t["data"]), "annotations": []})
        return len(new)

    def update_task_data(self, task: int, data: dict[str, Any]) -> None:
        for p in self.projects.values():
            for t in p["tasks"]:
                if t["id"] == task:
                    t["data"] = dict(data)

    def export(self, project: int) -> list[dict[str, Any]]:
        return self.tasks(project)

    def users(self) -> dict[int, str]:
        return {1: "reviewer@example.com"}

    def answer(self, project: int, path: str, label: str | None) -> None:
        """A reviewer's submitted choice (``None``: skipped)."""
        task = next(t for t in self.projects[project]["tasks"] if t["data"]["path"] == path)
        result = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}] if label else []
        task["annotations"].append(
            {"id": 100 + task["id"], "completed_by": 1, "was_cancelled": label is None, "result": result, "updated_at": "2026-11-29T04:00:00Z"}
        )


def _issues(audit: str) -> list[dict[str, Any]]:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(audit, LABEL_ISSUES)))).to_pylist()


def test_publish_puts_the_worst_suspects_first_with_pictures_reachable_by_their_links(audited, s3_bucket):  # noqa: F811
    studio = Studio()
    images = f"{s3_bucket}/label-review"
    done = publish(audited["dest"], studio, top=4, images=images)
    assert (done.suspects, done.added, done.renewed) == (4, 4, 0)
    tasks = studio.tasks(done.project)
    suspects = sorted((r for r in _issues(audited["dest"]) if r["is_issue"]), key=lambda r: r["issue_rank"])[:4]
    assert [t["data"]["path"] for t in tasks] == [r["path"] for r in suspects], "worst first"
    for task in tasks:
        url = task["data"][TO_NAME]
        assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url
        with urllib.request.urlopen(url, timeout=10) as answer:  # no credentials: the link is the key
            picture = np.asarray(Image.open(io.BytesIO(answer.read())))
        assert picture.shape[:2] == (16, 16), "the picture as the folds' models saw it"
    assert len(storage.list_objects(images)) == 4


def test_a_second_publish_adds_only_new_suspects_renews_links_and_keeps_answers(audited, s3_bucket):  # noqa: F811
    studio = Studio()
    images = f"{s3_bucket}/label-review"
    first = publish(audited["dest"], studio, top=3, images=images)
    path = studio.tasks(first.project)[0]["data"]["path"]
    studio.answer(first.project, path, "class_1")
    again = publish(audited["dest"], studio, top=5, images=images)
    assert again.project == first.project, "the same dataset's classes: the same project"
    assert (again.added, again.renewed) == (2, 3)
    tasks = studio.tasks(first.project)
    assert len(tasks) == 5 and len({t["data"]["path"] for t in tasks}) == 5, "no task twice"
    assert next(t for t in tasks if t["data"]["path"] == path)["annotations"], "the reviewer's answer is kept"
    assert len(storage.list_objects(images)) == 5, "each picture written once"


def test_import_writes_the_changed_labels_as_overrides_with_who_and_when(audited, s3_bucket, tmp_path):  # noqa: F811
    studio = Studio()
    done = publish(audited["dest"], studio, top=3, images=f"{s3_bucket}/label-review")
    tasks = studio.tasks(done.project)
    rows = {r["path"]: r for r in _issues(audited["dest"])}
    changed, kept, skipped = (t["data"]["path"] for t in tasks)
    new_label = next(c for c in ("class_0", "class_1", "class_2", "class_3") if c != rows[changed]["given_label"])
    studio.answer(done.project, changed, new_label)
    studio.answer(done.project, kept, rows[kept]["given_label"])
    studio.answer(done.project, skipped, None)
    dest = f"file://{tmp_path}/overrides.csv"
    review = import_review(audited["dest"], studio, dest)
    assert (len(review.changes), review.confirmed, review.unchanged) == (1, [kept], [skipped])
    written = list(csv.DictReader(io.StringIO(storage.read_bytes(dest).decode())))
    assert written == [
        {
            "path": changed,
            "label": new_label,
            "previous_label": rows[changed]["given_label"],
            "annotator": "reviewer@example.com",
            "annotated_at": "2026-11-29T04:00:00Z",
            "task": str(tasks[0]["id"]),
        }
    ]


def test_a_review_naming_a_label_the_dataset_lacks_writes_nothing(audited, s3_bucket, tmp_path):  # noqa: F811
    studio = Studio()
    done = publish(audited["dest"], studio, top=2, images=f"{s3_bucket}/label-review")
    first, second = (t["data"]["path"] for t in studio.tasks(done.project))
    studio.answer(done.project, first, "class_1")
    studio.answer(done.project, second, "a-class-nobody-has")
    dest = tmp_path / "overrides.csv"
    with pytest.raises(ReviewRefused, match="unknown_label"):
        import_review(audited["dest"], studio, str(dest))
    assert not dest.exists(), "nothing half-applied"


def test_pictures_in_a_store_with_no_links_are_refused_before_anything_is_made(audited, tmp_path):  # noqa: F811
    studio = Studio()
    with pytest.raises(ValueError, match="S3-compatible store"):
        publish(audited["dest"], studio, images=f"file://{tmp_path}/pictures")
    assert studio.calls == [] and not (tmp_path / "pictures").exists()


def test_the_default_project_is_one_per_class_list():
    assert loop.project_title(["cat", "dog"]) == loop.project_title(["cat", "dog"]) != loop.project_title(["cat", "dog", "fox"])


@pytest.mark.parametrize(
    "folds", [[], [3], "s3://bucket/x", ["http://elsewhere/x"], ["s3://bucket/runs/r/../../other/model"], ["file:///data/./x"], ["s3://b/a//b"]]
)
def test_fold_models_named_by_the_manifest_are_checked_as_read_back_input(folds):
    from imgpipe.readpolicy import ReadRefused

    with pytest.raises((ValueError, ReadRefused), match="upstream.folds"):
        loop._folds({"upstream": {"folds": folds}})


def test_a_runs_review_url_must_be_the_label_studio_the_operator_named():
    from imgpipe.review.client import operator_url

    env = {"LABEL_STUDIO_URL": "http://label-studio:8080/"}
    assert operator_url("http://label-studio:8080", env) == "http://label-studio:8080"
    with pytest.raises(ValueError, match="not the Label Studio the operator named .* the API token goes only there"):
        operator_url("http://attacker.example:8080", env)
    with pytest.raises(ValueError, match="no Label Studio named by the operator: set url in the Secret imgpipe-label-studio"):
        operator_url("http://label-studio:8080", {})
