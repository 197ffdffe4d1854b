"""predict on raw images repeats the preprocessing the model trained with, or refuses (issue 34, items 5 and 9).

The run is the real pipeline on generated photos: download -> clean -> resize with CLAHE ->
train; then predict on the *download* output (the raw images), whose predictions must
agree with the train step's own ``predictions.parquet`` on its test images (by sha256).
"""

from __future__ import annotations

import dataclasses
import io
import json

import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.predict import PredictConfig, predict
from imgpipe.steps.resize import resize
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def clahe_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("clahe")
    synth = str(root / "synth")
    generate(synth, SynthConfig(classes=3, per_class=40, seed=3, min_side=48, max_side=96, quirks=False), progress=False)
    uri = lambda name: "file://" + str(root / name)  # noqa: E731
    download(storage.join("file://" + synth, "images.tar.gz"), uri("download"), DownloadConfig())
    clean(uri("download"), uri("clean"), CleanConfig(workers=1, seed=1))
    resize(uri("clean"), uri("resize"), ResizeConfig(size=32, ops=("clahe",), format="jpeg", concurrency=1))
    cfg = TrainConfig(
        model="tiny_cnn",
        epochs=8,
        batch_size=16,
        lr=3e-3,
        num_workers=0,
        device="cpu",
        shuffle_buffer=32,
        mixup=0.0,
        cutmix=0.0,
        aug_policy="basic",
        seed=1,
    )
    train(uri("resize"), uri("model"), cfg)
    return root, uri


def _table(prefix: str, name: str | None = None):
    uris = [storage.join(prefix, name)] if name else contract.data_files(prefix)
    return pq.read_table(io.BytesIO(storage.read_bytes(uris[0])))


def test_the_card_carries_the_whole_preprocessing(clahe_run):
    _, uri = clahe_run
    card = json.loads(storage.read_bytes(storage.join(uri("model"), contract.MODEL_CARD)))
    pre = card["preprocessing"]
    assert pre["resize"]["ops"] == ["clahe"] and pre["resize"]["size"] == 32 and pre["resize"]["mode"] == "short-side-crop"
    assert pre["resize"]["format"] == "jpeg" and pre["roi_crop"] is False and pre["color_space"] == "RGB"
    assert pre["channels"] == 3 and pre["normalization"]["mean"] == card["input"]["mean"]


def test_predict_on_the_raw_download_output_agrees_with_the_runs_own_test_predictions(clahe_run):
    """The done-when check: at least 97% of the test images, by sha256, from a model that tells the classes apart."""
    _, uri = clahe_run
    own = [r for r in _table(uri("model"), "predictions.parquet").to_pylist() if r["split"] == "test"]
    accuracy = sum(r["predicted"] == r["label"] for r in own) / len(own)
    assert accuracy >= 0.6, f"the model must tell the 3 classes apart (chance 0.33): {accuracy:.2f}"
    report = predict(uri("model"), uri("download"), uri("pred"), PredictConfig(actors=1))
    assert report.inputs == report.outputs + report.rejected
    assert report.extra["preprocessing"].startswith("resize short-side-crop 32 + clahe")
    raw = {r["sha256"]: r["predicted"] for r in _table(uri("pred"), contract.PREDICTIONS).to_pylist()}
    matched = [raw[r["sha256"]] == r["predicted"] for r in own if r["sha256"] in raw]
    assert len(matched) == len(own), "every test image is in the download output"
    assert sum(matched) / len(matched) >= 0.97, f"agreement {sum(matched)}/{len(matched)}"


def test_predict_refuses_a_resize_output_made_otherwise(clahe_run):
    _, uri = clahe_run
    resize(uri("clean"), uri("plain"), ResizeConfig(size=32, format="jpeg", concurrency=1))
    with pytest.raises(ValueError, match=r"resized otherwise than the data the model trained on \(.*ops \['clahe'\] vs \[\]"):
        predict(uri("model"), uri("plain"), uri("pred-plain"), PredictConfig(actors=1))


def test_predict_refuses_raw_images_it_cannot_prepare(clahe_run):
    from imgpipe.steps.predict import _check_preprocessing

    _, uri = clahe_run
    card = json.loads(storage.read_bytes(storage.join(uri("model"), contract.MODEL_CARD)))
    manifest = contract.read_manifest(uri("download"))
    files = contract.data_files(uri("download"), manifest)
    older = {k: v for k, v in card.items() if k != "preprocessing"}
    with pytest.raises(ValueError, match="records no preprocessing"):
        _check_preprocessing(uri("download"), "download", manifest, older, files)
    boxed = dict(
        card, preprocessing=dict(card["preprocessing"], roi_crop=True, resize=dict(card["preprocessing"]["resize"], ops=["roi_crop", "clahe"]))
    )
    with pytest.raises(ValueError, match="roi_crop.*has no boxes"):
        _check_preprocessing(uri("download"), "download", manifest, boxed, files)


def test_tta_averages_only_the_flips_the_model_trained_with_and_says_so(clahe_run, tmp_path):
    _, uri = clahe_run
    report = predict(uri("model"), uri("resize"), "file://" + str(tmp_path / "tta"), PredictConfig(actors=1, splits=("test",), tta=True))
    assert report.extra["tta"] == {"requested": True, "views": ["identity", "horizontal flip"], "domain": "natural"}
    # A text model flips nothing: TTA has no view to add, and its predictions are the plain ones.
    card_uri = storage.join(uri("model"), contract.MODEL_CARD)
    card = json.loads(storage.read_bytes(card_uri))
    text = tmp_path / "text-model"
    text.mkdir()
    for name in (contract.MODEL_CARD, card["files"]["onnx"]):
        (text / name).write_bytes(storage.read_bytes(storage.join(uri("model"), name)))
    card["recipe"] = dataclasses.asdict(TrainConfig(domain="text", hflip=False, vflip=False))
    (text / contract.MODEL_CARD).write_text(json.dumps(card))
    predict(str(text), uri("resize"), "file://" + str(tmp_path / "p1"), PredictConfig(actors=1, splits=("test",)))
    tta = predict(str(text), uri("resize"), "file://" + str(tmp_path / "p2"), PredictConfig(actors=1, splits=("test",), tta=True))
    assert tta.extra["tta"]["views"] == ["identity"]
    a, b = (_table("file://" + str(tmp_path / n), contract.PREDICTIONS) for n in ("p1", "p2"))
    assert a.column("top_probs").to_pylist() == b.column("top_probs").to_pylist()
