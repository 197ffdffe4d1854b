"""The promotion gate: same test images, both numbers, latest.json moved only by a promotion."""

from __future__ import annotations

import json

import pytest

from imgpipe import contract, storage
from imgpipe.report.steps import build_report
from imgpipe.stepio import artifacts as ka
from imgpipe.steps.promote import PromoteConfig, promote, read_decision
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from tests.train.test_loader import write_resize_output

COUNTS = {"train": 48, "val": 12, "test": 24}


def _cfg(**kw) -> TrainConfig:
    values = dict(
        model="tiny_cnn", epochs=3, batch_size=8, lr=3e-3, warmup_fraction=0.2, num_workers=0, device="cpu", shuffle_buffer=16, mixup=0.0, cutmix=0.0
    )
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A trained model and an untrained one (lr 0: its initial weights) on the same data."""
    root = tmp_path_factory.mktemp("promote")
    data = write_resize_output("file://" + str(root / "resize"), counts=COUNTS, size=16)
    good, bad = "file://" + str(root / "good"), "file://" + str(root / "bad")
    train(data, good, _cfg())
    train(data, bad, _cfg(lr=0.0, epochs=1))
    other = write_resize_output("file://" + str(root / "other"), counts=COUNTS, size=16, classes=3)
    foreign = "file://" + str(root / "foreign")
    train(other, foreign, _cfg(epochs=1))
    return {"root": root, "data": data, "good": good, "bad": bad, "foreign": foreign}


def _test_f1(prefix: str) -> float:
    return json.loads(storage.read_bytes(storage.join(prefix, "metrics.json")))["test"]["macro_f1"]


def test_the_first_model_promotes_itself(models):
    d = promote(models["bad"], None, "file://" + str(models["root"] / "p1"))
    assert d.promoted and d.current is None and "first model" in d.reason
    assert read_decision("file://" + str(models["root"] / "p1")) == d
    # `imgpipe show` opens a decision: the verdict and the reason, its own page as the HTML.
    shown = build_report("file://" + str(models["root"] / "p1"))
    assert shown.metrics["promoted"] == 1.0 and "first model" in shown.text() and "promoted" in shown.html()


def test_a_worse_candidate_is_not_promoted_and_both_numbers_are_kept(models):
    dest = "file://" + str(models["root"] / "p2")
    d = promote(models["bad"], models["good"], dest)
    assert not d.promoted and d.metric == "macro_f1"
    assert d.candidate == pytest.approx(_test_f1(models["bad"]))
    # The current model re-scored on the candidate's test images is its own test score: the same images.
    assert d.current == pytest.approx(_test_f1(models["good"]), abs=1e-6) and d.current > d.candidate
    assert d.images == COUNTS["test"] and len(d.images_digest) == 64
    assert "below" in d.reason and f"{d.current:.4f}" in d.reason
    assert contract.read_manifest(dest)["extra"]["decision"]["promoted"] is False
    assert "not promoted" in storage.read_bytes(storage.join(dest, "promotion.html")).decode()


def test_a_better_candidate_or_one_within_the_tolerance_is_promoted(models):
    better = promote(models["good"], models["bad"], "file://" + str(models["root"] / "p3"))
    assert better.promoted and better.candidate >= better.current
    gap = _test_f1(models["good"]) - _test_f1(models["bad"])
    within = promote(models["bad"], models["good"], "file://" + str(models["root"] / "p4"), PromoteConfig(tolerance=min(1.0, gap + 1e-6)))
    assert within.promoted and "within the tolerance" in within.reason


def test_a_current_model_of_other_classes_is_not_compared_silently(models):
    d = promote(models["good"], models["foreign"], "file://" + str(models["root"] / "p5"))
    assert not d.promoted and d.current is None and "other classes" in d.reason


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="tolerance"):
        PromoteConfig(tolerance=-0.1)
    with pytest.raises(ValueError, match="split"):
        PromoteConfig(split="train")
    # A model's epoch was selected on its validation split: scoring it there is not like for like.
    with pytest.raises(ValueError, match="split must be test.*selected on its validation split"):
        PromoteConfig(split="val")
    with pytest.raises(ValueError, match="min_images"):
        PromoteConfig(min_images=0)


def test_both_models_are_scored_by_one_evaluation_not_the_candidates_own_figure(models, monkeypatch):
    from imgpipe.train import saved

    calls = []
    real = saved.evaluate_saved
    monkeypatch.setattr(saved, "evaluate_saved", lambda *a, **k: calls.append((a[1:], k)) or real(*a, **k))
    # The candidate's run claims a perfect test score; the gate re-scores it instead.
    forged = "file://" + str(models["root"] / "forged")
    for name in [o.uri[len(models["bad"]) + 1 :] for o in storage.list_objects(models["bad"])]:
        storage.write_bytes(storage.join(forged, name), storage.read_bytes(storage.join(models["bad"], name)))
    metrics = json.loads(storage.read_bytes(storage.join(forged, "metrics.json")))
    metrics["test"]["macro_f1"] = 1.0
    storage.write_bytes(storage.join(forged, "metrics.json"), json.dumps(metrics).encode())
    d = promote(forged, models["good"], "file://" + str(models["root"] / "p-one"))
    assert len(calls) == 2 and calls[0] == calls[1], "the same data, split, device and batch for both"
    assert d.trained_score == 1.0 and d.candidate == pytest.approx(_test_f1(models["bad"])) and not d.promoted
    assert d.evaluation.startswith("evaluate_saved") and d.overlap == 0


def test_test_images_the_current_model_saw_are_left_out_and_counted(models, tmp_path):
    # The current model trained on data whose train split holds 6 of the candidate's 24 test images.
    seen = write_resize_output("file://" + str(tmp_path / "seen"), counts={"train": 66, "val": 12, "test": 6}, size=16)
    current = "file://" + str(tmp_path / "current")
    train(seen, current, _cfg(epochs=1))
    d = promote(models["good"], current, "file://" + str(tmp_path / "p"), PromoteConfig(min_images=10))
    assert d.overlap == 6 and d.images == COUNTS["test"] - 6 and "leaving out 6" in d.reason
    strict = promote(models["good"], current, "file://" + str(tmp_path / "p-strict"), PromoteConfig(min_images=20))
    assert not strict.promoted and strict.overlap == 6 and "fewer than 20" in strict.reason


def test_a_current_model_whose_training_data_is_gone_is_compared_and_the_overlap_is_said_unchecked(models, tmp_path):
    moved = "file://" + str(tmp_path / "moved")
    for name in [o.uri[len(models["good"]) + 1 :] for o in storage.list_objects(models["good"])]:
        storage.write_bytes(storage.join(moved, name), storage.read_bytes(storage.join(models["good"], name)))
    card = json.loads(storage.read_bytes(storage.join(moved, "model.json")))
    card["data"]["uri"] = "file://" + str(tmp_path / "deleted" / "resize")  # e.g. removed by a retention policy
    storage.write_bytes(storage.join(moved, "model.json"), json.dumps(card).encode())
    d = promote(models["good"], moved, "file://" + str(tmp_path / "p"))
    assert d.promoted and d.overlap is None and "overlap unchecked" in d.reason and d.images == COUNTS["test"]


def test_a_current_model_that_cannot_be_loaded_is_a_decision_not_a_crash(models, tmp_path):
    broken = "file://" + str(tmp_path / "broken")
    for name in [o.uri[len(models["good"]) + 1 :] for o in storage.list_objects(models["good"])]:
        storage.write_bytes(storage.join(broken, name), storage.read_bytes(storage.join(models["good"], name)))
    storage.write_bytes(storage.join(broken, "model.pt"), b"not a checkpoint")  # e.g. a truncated upload
    d = promote(models["good"], broken, "file://" + str(tmp_path / "p"))
    assert not d.promoted and d.reason.startswith("current model cannot be scored: not promoted, reason")


def test_models_whose_preprocessing_differs_are_not_compared(models, tmp_path):
    other = "file://" + str(tmp_path / "other-pre")
    for name in [o.uri[len(models["good"]) + 1 :] for o in storage.list_objects(models["good"])]:
        storage.write_bytes(storage.join(other, name), storage.read_bytes(storage.join(models["good"], name)))
    card = json.loads(storage.read_bytes(storage.join(other, "model.json")))
    card["preprocessing"]["resize"]["ops"] = ["clahe"]
    storage.write_bytes(storage.join(other, "model.json"), json.dumps(card).encode())
    d = promote(models["good"], other, "file://" + str(tmp_path / "p"))
    assert not d.promoted and "preprocessing differs" in d.reason and "ops" in d.reason


@pytest.fixture
def run_policy(models, monkeypatch):
    """A task's read policy over a local data root: local files allowed, the shared test data listed."""
    monkeypatch.setenv("IMGPIPE_SOURCE_LOCAL", "1")
    monkeypatch.setenv("IMGPIPE_READ_PREFIXES", models["data"])


def _place(root: str, run_id: str, model: str) -> None:
    """A run's prefixes as the pipeline lays them out; train is a copy of a trained model."""
    for step in ("clean", "resize"):
        storage.write_bytes(storage.join(ka.run_prefix(root, run_id, step), "x"), b"")
    src, dst = model, ka.run_prefix(root, run_id, "train")
    for name in [f["name"] for f in contract.read_manifest(src)["files"]] + [contract.MANIFEST, contract.SUCCESS]:
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))


def test_a_forged_latest_json_naming_a_model_outside_the_data_root_is_a_decision_not_a_read(models, tmp_path, run_policy):
    root = "file://" + str(tmp_path / "root")
    _place(root, "r1", models["good"])
    forged = {"run_id": "r0", "prefixes": {"train": models["good"]}}  # a good model, but not under this data root
    storage.write_bytes(storage.join(root, ka.LATEST), json.dumps(forged).encode())
    d = ka.promote_run(root, "r1")
    assert not d.promoted and "latest.json's train prefix" in d.reason and "outside what this run may read" in d.reason
    assert d.current is None and ka.read_latest(root) == forged, "nothing outside was scored, latest.json is as it was"


def test_latest_json_moves_only_on_a_promotion(models, tmp_path, run_policy):
    root = "file://" + str(tmp_path / "root")

    def place(run_id: str, model: str) -> None:
        _place(root, run_id, model)

    place("r1", models["good"])
    assert ka.promote_run(root, "r1").promoted
    assert ka.read_latest(root)["run_id"] == "r1"
    place("r2", models["bad"])
    d = ka.promote_run(root, "r2")
    assert not d.promoted and ka.read_latest(root)["run_id"] == "r1", "a worse run leaves latest.json as it was"
    assert contract.is_committed(ka.run_prefix(root, "r2", "promote")), "the rejected candidate's decision stays"


def test_latest_is_per_dataset_and_class_set_and_promoting_by_hand_is_a_command(models, tmp_path, monkeypatch):
    """The sample's model does not stand in the way of an own-data model (other classes), nor compete with it."""
    from imgpipe.kfp.promote_by_hand import promote_by_hand
    from imgpipe.stepio import lineage

    other = "file://" + str(models["root"] / "other")
    monkeypatch.setenv("IMGPIPE_SOURCE_LOCAL", "1")
    monkeypatch.setenv("IMGPIPE_READ_PREFIXES", f"{models['data']},{other}")
    root = "file://" + str(tmp_path / "root")
    pets, shapes = ["s3://team/pets.tar"], ["file:///home/me/shapes"]
    made = {"r1": pets, "r2": shapes, "r3": pets}
    # Which source each run downloaded (its download manifest's, which these copied models do not carry).
    monkeypatch.setattr(lineage, "sources_of", lambda prefixes, policy: made[prefixes["train"].rstrip("/").split("/")[-2]])
    _place(root, "r1", models["good"])
    assert ka.promote_run(root, "r1").promoted
    _place(root, "r2", models["foreign"])  # 3 classes of its own
    d2 = ka.promote_run(root, "r2")
    assert d2.promoted and d2.current_prefix is None and "first model" in d2.reason, "compared with its own lineage: none yet"
    key_pets = lineage.lineage_key(pets, [f"class_{k}" for k in range(4)])
    key_shapes = lineage.lineage_key(shapes, [f"class_{k}" for k in range(3)])
    assert ka.read_latest(root, key_pets)["run_id"] == "r1" and ka.read_latest(root, key_shapes)["run_id"] == "r2"
    assert ka.read_latest(root)["run_id"] == "r2", "latest.json names the newest promotion of any dataset"
    assert ka.read_latest(root, key_shapes)["dataset"] == {"key": key_shapes, "sources": shapes, "classes": ["class_0", "class_1", "class_2"]}
    _place(root, "r3", models["bad"])
    d3 = ka.promote_run(root, "r3")
    assert not d3.promoted and d3.current_prefix == ka.run_prefix(root, "r1", "train"), "compared with its own dataset's r1, not r2"
    assert ka.read_latest(root, key_pets)["run_id"] == "r1" and ka.read_latest(root)["run_id"] == "r2"
    # An operator overrules the gate: r3 becomes the pets' latest, marked as such, r1 named as replaced.
    done = promote_by_hand(ka.run_prefix(root, "r3", "train"))
    assert done["lineage"] == key_pets and done["previous"] == ka.run_prefix(root, "r1", "train")
    record = ka.read_latest(root, key_pets)
    assert record["run_id"] == "r3" and record["by_hand"] is True and record["replaced"] == ka.run_prefix(root, "r1", "train")
    assert ka.read_latest(root, key_shapes)["run_id"] == "r2", "another dataset's latest is untouched"


def test_a_latest_json_from_before_lineages_is_still_the_current_model(models, tmp_path, run_policy):
    """A data root promoted into by an earlier version (latest.json without a dataset) keeps its gate."""
    root = "file://" + str(tmp_path / "root")
    _place(root, "r1", models["good"])
    storage.write_bytes(
        storage.join(root, ka.LATEST), json.dumps({"run_id": "r1", "prefixes": {"train": ka.run_prefix(root, "r1", "train")}}).encode()
    )
    _place(root, "r2", models["bad"])
    d = ka.promote_run(root, "r2")
    assert not d.promoted and d.current_prefix == ka.run_prefix(root, "r1", "train")
