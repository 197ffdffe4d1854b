"""A label audit's suspects out to Label Studio and the reviewers' answers back (imgpipe.review.labelstudio),
checked against payloads recorded from a real Label Studio 1.23.2 (label-studio-sdk 2.1.2) on loopback.

``payloads/`` holds the server's own answers: a project created, three tasks imported with
predictions (``22``), the JSON export after one "dog" and one skip by one reviewer (``38``), and
after a second user chose "cat" on a third task (``95``), the users list (``84``), and an import
whose prediction names a choice the interface lacks, which the server takes (``54``: so imgpipe
checks the labels itself). Their interface's choice tag is ``choice``.
"""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imgpipe.review.labelstudio import CURRENT, FROM_NAME, ReviewRefused, label_config, read_review, suspect_tasks

PAYLOADS = Path(__file__).parent / "payloads"
CLASSES = ["cat", "dog", "bird"]


def _payload(name: str) -> dict:
    return json.loads((PAYLOADS / f"{name}.json").read_text())


def _export(name: str) -> list[dict]:
    return _payload(name)["response_body"]


def _users() -> dict[int, str]:
    return {u["id"]: u["email"] for u in _payload("84-users-list")["response_body"]}


def test_the_reviewers_choice_becomes_an_override_and_a_skip_leaves_the_label():
    given = {"a/x1.jpg": "cat", "a/x2.jpg": "dog", "a/x3.jpg": "bird"}
    review = read_review(_export("38-export-json"), CLASSES, given, _users(), from_name="choice")
    assert review.changes == [("a/x1.jpg", "cat", "dog", "reviewer@example.com", "2026-11-29T01:27:21.601269Z", 1)]
    assert review.unchanged == ["a/x2.jpg"] and review.confirmed == [] and review.rejects == []
    rows = list(csv.DictReader(io.StringIO(review.overrides_csv())))
    assert [(r["path"], r["label"], r["previous_label"], r["annotator"]) for r in rows] == [("a/x1.jpg", "dog", "cat", "reviewer@example.com")]
    assert review.summary() == "1 label(s) changed, 0 confirmed, 1 left as they were (skipped or not reviewed), 0 rejected"


def test_two_reviewers_each_change_what_they_reviewed_and_a_kept_label_is_confirmed():
    given = {"a/x1.jpg": "dog", "a/x2.jpg": "dog", "a/x3.jpg": "bird"}
    review = read_review(_export("95-B-export-json-all"), CLASSES, given, _users(), from_name="choice")
    assert review.confirmed == ["a/x1.jpg"] and review.unchanged == ["a/x2.jpg"]
    ((path, old, new, who, _, task),) = review.changes
    assert (path, old, new, task) == ("a/x3.jpg", "bird", "cat", 10)
    assert who == "annotator2@example.com"
    unnamed = read_review(_export("95-B-export-json-all"), CLASSES, given, {}, from_name="choice")
    assert unnamed.changes[0][3] == "user 2", "a user the users list does not name is said by id"


def test_a_review_that_cannot_be_applied_whole_is_refused_and_nothing_is_applied():
    export = _export("38-export-json")
    export[0]["annotations"][0]["result"][0]["value"]["choices"] = ["wolf"]  # Label Studio takes it (payload 54)
    with pytest.raises(ReviewRefused) as refused:
        read_review(export, CLASSES, {"a/x1.jpg": "cat", "a/x2.jpg": "dog"}, from_name="choice")
    said = str(refused.value)
    assert "\n" not in said and "nothing was" in said and "task 1 (a/x1.jpg): unknown_label: 'wolf' is not among the dataset's classes" in said
    with pytest.raises(ReviewRefused, match=r"task 2 \(a/x2.jpg\): unknown_path"):
        read_review(_export("38-export-json"), CLASSES, {"a/x1.jpg": "cat"}, from_name="choice")


def test_the_server_takes_a_prediction_naming_no_choice_so_imgpipe_checks_its_own():
    assert _payload("54-err-import-prediction-unknown-choice")["status"] == 201
    rows = [{"path": "p.jpg", "sha256": "s", "given_label": "wolf", "suggested_label": "cat", "suggested_prob": 0.9, "label_quality": 0.1}]
    with pytest.raises(ValueError, match="'wolf'"):
        suspect_tasks(rows, CLASSES, lambda r: "http://store/p.jpg")


def test_suspects_become_tasks_worst_first_with_the_current_label_and_the_top_k_pre_annotated():
    def row(path, sha, given, suggested, prob, quality, **more):
        return {
            "path": path,
            "sha256": sha,
            "given_label": given,
            "suggested_label": suggested,
            "suggested_prob": prob,
            "label_quality": quality,
            **more,
        }

    rows = [
        row("b.jpg", "h2", "dog", "cat", 0.7, 0.2, issue_rank=1),
        row("a.jpg", "h1", "cat", "dog", 0.9, 0.05, issue_rank=0, top_labels=["dog", "bird", "cat"], top_probs=[0.9, 0.07, 0.03]),
        row("ok.jpg", "h3", "bird", "bird", 0.99, 0.99, is_issue=False),
    ]
    tasks = suspect_tasks(rows, CLASSES, lambda r: f"https://store.example/{r['sha256']}.jpg?X-Amz-Signature=x")
    assert [t["data"]["path"] for t in tasks] == ["a.jpg", "b.jpg"], "suspects only, worst first"
    first = tasks[0]
    assert first["data"]["image"].startswith("https://store.example/h1.jpg") and first["data"]["rank"] == 0
    assert [(p["model_version"], p["result"][0]["value"]["choices"][0]) for p in first["predictions"]] == [
        (CURRENT, "cat"), ("imgpipe audit top-1", "dog"), ("imgpipe audit top-2", "bird"), ("imgpipe audit top-3", "cat")
    ]  # fmt: skip
    assert all(r["from_name"] == FROM_NAME and r["to_name"] == "image" for p in first["predictions"] for r in p["result"])
    # The shape Label Studio took (payload 22): data and predictions with model_version, score and a choices result.
    recorded = _payload("22-import-tasks-with-predictions")["request_body"][0]
    assert set(recorded) <= {"data", "meta", "predictions"} and set(recorded["predictions"][0]) == set(first["predictions"][1])


def test_the_interface_offers_each_class_once_even_with_markup_in_its_name():
    config = label_config(["cat", 'a "quoted" & <odd> class'])
    root = ET.fromstring(config)
    (choices,) = root.iter("Choices")
    assert choices.get("name") == FROM_NAME and choices.get("toName") == "image"
    assert [c.get("value") for c in choices.iter("Choice")] == ["cat", 'a "quoted" & <odd> class']
    # The recorded project's interface parses the same way (payload 16).
    ET.fromstring(_payload("16-project-create")["response_body"]["label_config"])
    with pytest.raises(ValueError):
        label_config([])
