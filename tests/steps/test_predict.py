"""Batch prediction on a real local Ray: the model's own test metrics back, every image accounted for."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import contract, storage
from imgpipe.report.steps import build_report
from imgpipe.steps.predict import PredictConfig, predict
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from tests.train.test_loader import write_resize_output

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("predict")
    data = write_resize_output("file://" + str(root / "resize"), counts={"train": 48, "val": 12, "test": 40}, size=16)
    model = "file://" + str(root / "model")
    cfg = TrainConfig(
        model="tiny_cnn", epochs=2, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=16, warmup_fraction=0.2, mixup=0.0, cutmix=0.0
    )
    train(data, model, cfg)
    return root, data, model


def _read(prefix: str):
    (uri,) = contract.data_files(prefix, contract.read_manifest(prefix))
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def test_predict_reproduces_the_models_test_metrics(trained):
    root, data, model = trained
    dest = "file://" + str(root / "pred")
    report = predict(model, data, dest, PredictConfig(splits=("test",), actors=2, batch_size=7))
    metrics = json.loads(storage.read_bytes(storage.join(model, "metrics.json")))["test"]
    score = report.extra["scores"]["test"]
    assert score["images"] == 40 and report.inputs == report.outputs == 40 and report.rejected == 0
    assert score["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert score["macro_f1"] == pytest.approx(metrics["macro_f1"], abs=1e-9)
    table = _read(dest)
    assert table.column("path").to_pylist() == sorted(table.column("path").to_pylist()), "input order"
    # The per-image predictions agree with the train step's own predictions.parquet.
    own = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(model, "predictions.parquet"))))
    own_test = {r["path"]: r["predicted"] for r in own.to_pylist() if r["split"] == "test"}
    assert {r["path"]: r["predicted"] for r in table.to_pylist()} == own_test
    # `imgpipe show` opens a predict output: its scores, the predicted classes counted, a sample.
    shown = build_report(dest)
    assert shown.step == "predict" and shown.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    counted = next(s for s in shown.sections if s.title == "Predicted classes")
    assert sum(counted.series["predicted"]) == 40
    text = shown.text()
    assert "Scores (inputs with a label)" in text and "Sample predictions" in text and "class_0" in text, text


@pytest.mark.slow  # a Ray Data run each; make test keeps the first test's
def test_a_folder_of_images_with_a_broken_one_is_predicted_and_reconciled(trained, tmp_path):
    root, _, model = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    dest = "file://" + str(tmp_path / "pred")
    report = predict(model, str(folder), dest, PredictConfig(actors=1))
    assert report.inputs == report.outputs + report.rejected
    assert report.outputs == 5 and report.extra["input_kind"] == "download"
    rejects = contract.read_rejects(dest).to_pylist()
    assert [r["path"].rsplit("/", 1)[-1] for r in rejects] == ["broken.jpg"]
    table = _read(dest)
    assert all(len(c) == 4 for c in table.column("top_classes").to_pylist())


@pytest.mark.slow  # a Ray Data run each; make test keeps the first test's
def test_an_archive_is_read_as_images_too(trained, tmp_path):
    _, _, model = trained
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (24, 18), (40 * i, 80, 120)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"images/x_{i}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    report = predict(model, str(archive), "file://" + str(tmp_path / "pred"), PredictConfig(actors=1))
    assert report.outputs == 3


@pytest.mark.slow  # a Ray Data run each; make test keeps the first test's
def test_data_of_another_class_set_or_channel_count_is_refused(trained, tmp_path):
    _, _, model = trained
    other = write_resize_output("file://" + str(tmp_path / "other"), classes=3, size=16)
    with pytest.raises(ValueError, match="another class set"):
        predict(model, other, "file://" + str(tmp_path / "p1"))
    grey = write_resize_output("file://" + str(tmp_path / "grey"), channels=1, size=16)
    with pytest.raises(ValueError, match="1-channel"):
        predict(model, grey, "file://" + str(tmp_path / "p2"))
    with pytest.raises(ValueError, match="has no model.json"):
        predict("file://" + str(tmp_path), other, "file://" + str(tmp_path / "p3"))


@pytest.mark.slow  # a Ray Data run each; make test keeps the first test's
def test_the_command_line_prints_the_scores(trained, tmp_path, capsys):
    from imgpipe.cli import main

    root, data, model = trained
    assert main(["predict", model, data, "file://" + str(tmp_path / "cli"), "--splits", "test", "--actors", "1"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(storage.read_bytes(storage.join(model, "metrics.json")))["test"]
    assert f"test: accuracy {metrics['accuracy']:.4f}" in out
