"""The label audit: folds that partition the train split, out-of-fold probabilities, cleanlab's ranking."""

from __future__ import annotations

import csv
import io

import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.steps.audit import (
    LABEL_ISSUES,
    LABEL_OVERRIDES,
    AuditConfig,
    fold_of_rows,
    make_folds,
    rank_label_issues,
)
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from tests.train.test_loader import write_resize_output

FLIPPED = {3, 17, 31, 45, 59, 73}  # train rows given the next class's label


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data = write_resize_output(
        "file://" + str(root / "resize"), counts={"train": 96, "val": 8, "test": 8}, size=16,
        mislabel=lambda split, i: split == "train" and i in FLIPPED,
    )  # fmt: skip
    cfg = AuditConfig(folds=2, seed=1)  # the fewest folds: each is a training run
    folds = make_folds(data, "file://" + str(root / "folds"), cfg)
    recipe = TrainConfig(model="tiny_cnn", epochs=4, batch_size=8, lr=3e-3, num_workers=0, device="cpu", shuffle_buffer=16,
                         warmup_epochs=0.5, mixup=0.0, cutmix=0.0, aug_policy="none", predictions_probs=True)  # fmt: skip
    models = []
    for i, fold in enumerate(folds):
        out = "file://" + str(root / f"train-fold-{i}")
        train(fold, out, recipe)
        models.append(out)
    report = rank_label_issues(models, "file://" + str(root / "audit"), cfg)
    return {"data": data, "folds": folds, "models": models, "report": report, "dest": "file://" + str(root / "audit")}


def _table(prefix: str, name: str):
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(prefix, name))))


def test_folds_partition_the_train_split_stratified():
    labels = [0] * 10 + [1] * 7 + [2] * 3
    import numpy as np

    fold = fold_of_rows(np.array(labels), 3, seed=0)
    for c in (0, 1, 2):
        counts = np.bincount(fold[np.array(labels) == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert (fold == fold_of_rows(np.array(labels), 3, seed=0)).all()


def _paths(files: list[str], split: str) -> list[str]:
    return [p for u in files if f"/{split}/" in u for p in pq.read_table(io.BytesIO(storage.read_bytes(u))).column("path").to_pylist()]


def test_each_train_image_is_held_out_exactly_once(audited):
    held_all = []
    for fold in audited["folds"]:
        files = contract.data_files(fold, contract.read_manifest(fold, expect_step="resize"))

        held, trained = _paths(files, "val"), _paths(files, "train")
        assert not set(held) & set(trained) and len(held) + len(trained) == 96, "a fold trains on the rest"
        held_all += held
    assert len(held_all) == len(set(held_all)) == 96


def test_the_planted_label_errors_rank_first(audited):
    issues = _table(audited["dest"], LABEL_ISSUES)
    assert issues.num_rows == 96
    flagged = [r["path"] for r in issues.to_pylist() if r["is_issue"]]
    planted = {f"images/train_{i:04d}.jpg" for i in FLIPPED}
    top = set(flagged[: len(planted)])
    assert len(top & planted) >= len(planted) - 1, f"recall of planted errors in the top {len(planted)}: {top & planted}"
    row = next(r for r in issues.to_pylist() if r["path"] == "images/train_0003.jpg")
    assert row["given_label"] == "class_0" and row["suggested_label"] == "class_3"  # i=3: class 3, given 0


def test_the_overrides_csv_is_what_clean_reads(audited):
    text = storage.read_bytes(storage.join(audited["dest"], LABEL_OVERRIDES)).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and set(rows[0]) >= {"path", "label"}
    assert audited["report"].extra["issues"] == len(rows)
    assert "label_issues.html" in {f["name"] for f in contract.read_manifest(audited["dest"])["files"]}


def test_bad_settings_and_folds_without_probs_are_refused(audited, tmp_path):
    with pytest.raises(ValueError, match="folds"):
        AuditConfig(folds=1)
    with pytest.raises(ValueError, match="filter_by"):
        AuditConfig(filter_by="vibes")
    plain = "file://" + str(tmp_path / "plain")
    train(audited["folds"][0], plain, TrainConfig(model="tiny_cnn", epochs=1, batch_size=8, num_workers=0, device="cpu"))
    with pytest.raises(ValueError, match="predictions_probs"):
        rank_label_issues([plain], "file://" + str(tmp_path / "a"))
