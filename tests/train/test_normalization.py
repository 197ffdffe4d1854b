"""Which mean and std a training run normalizes with: the weights' own, else the data's, else ImageNet's.

The unit tests call the train step's choice on hand-made manifests. The round trips resize
a small generated dataset on a real local Ray (its manifest records the statistics), train
on it and predict with the result (run them inside ``scripts/in-loopback-netns``).
"""

from __future__ import annotations

import io
import json
import logging
from functools import partial

import pytest
import torch
from torchvision.transforms._presets import ImageClassification

from imgpipe import contract, storage
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.statistics import split_moments
from imgpipe.steps.predict import PredictConfig, predict
from imgpipe.steps.resize import resize
from imgpipe.steps.train import train
from imgpipe.train import assembly
from imgpipe.train.augment import IMAGENET, Normalization, channel_stats
from imgpipe.train.config import TrainConfig
from imgpipe.train.models import build_model, resolve_weights
from tests.helpers import build_clean
from tests.train.test_pretrained import count_downloads, serve_weights

# For a training whose ONNX and TorchScript exports nothing reads (predict reads the ONNX one).
NO_EXPORTS = pytest.mark.usefixtures("no_exports")

DATA_MEAN, DATA_STD = [0.41, 0.52, 0.33], [0.21, 0.19, 0.24]


def manifest(ops: list[str] | None = None, mean=DATA_MEAN, std=DATA_STD, statistics: bool = True) -> dict:
    """A resize manifest as the train step reads it: the ops and the train split's statistics."""
    extra: dict = {"ops": ops or []}
    if statistics:
        extra["statistics"] = {
            "color_space": "RGB",
            "splits": {
                "train": {"mean": mean, "std": std},
                "val": {"mean": [0.9] * 3, "std": [0.1] * 3},
            },
        }
    return {"step": "resize", "extra": extra}


def cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"model": "tiny_cnn", "device": "cpu", "num_workers": 0, **overrides})


# ------------------------------------------------------------------ the choice (no training)


def test_from_scratch_normalizes_with_the_train_splits_statistics():
    assert assembly.normalization_for(cfg(), manifest()) == Normalization(tuple(DATA_MEAN), tuple(DATA_STD))
    # A colour-space op is fine from scratch: the statistics are of what it stored.
    assert assembly.normalization_for(cfg(), manifest(["to_lab"])) == Normalization(tuple(DATA_MEAN), tuple(DATA_STD))
    grey = assembly.normalization_for(cfg(), manifest(mean=[0.4], std=[0.2]))
    assert channel_stats(1, grey) == ((pytest.approx(0.4),), (pytest.approx(0.2),))


def test_an_older_manifest_without_statistics_falls_back_to_imagenet_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        assert assembly.normalization_for(cfg(), manifest(statistics=False)) == IMAGENET
    assert any("records no statistics" in r.getMessage() and "re-run resize" in r.getMessage() for r in caplog.records)


def test_pretrained_weights_keep_their_own_statistics():
    for model, member in [("resnet18", "DEFAULT"), ("efficientnet_v2_l", "DEFAULT")]:
        own = assembly.normalization_for(cfg(model=model, pretrained=member), manifest())
        assert own == assembly.pretrained.normalization(resolve_weights(model, member)) != Normalization(tuple(DATA_MEAN), tuple(DATA_STD))
    # Grey (one-channel ops) is what a first convolution's summed RGB filters take.
    assert assembly.normalization_for(cfg(model="resnet18", pretrained="DEFAULT"), manifest(["sobel"])) == IMAGENET


@pytest.mark.parametrize("ops, space", [(["to_ycbcr"], "YCbCr"), (["clahe", "to_lab", "gaussian_blur:1.0"], "Lab")])
def test_pretrained_rgb_weights_refuse_a_colour_space_op(ops, space):
    op = next(o for o in ops if o.startswith("to_"))
    with pytest.raises(
        ValueError,
        match=rf"pretrained='DEFAULT' \(resnet18\) expects RGB.*{op} stored {space}.*from scratch.*without {op}",
    ):
        assembly.normalization_for(cfg(model="resnet18", pretrained="DEFAULT"), manifest(ops))


def test_weights_from_storage_keep_what_their_model_file_records(tmp_path):
    model = build_model("tiny_cnn", 3)
    recorded = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.2, 0.2]}, recorded)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    assert assembly.normalization_for(cfg(weights=str(recorded)), manifest()) == Normalization((0.3, 0.4, 0.5), (0.2,) * 3)
    assert assembly.normalization_for(cfg(weights=str(bare)), manifest()) == IMAGENET


# ------------------------------------------------------------------ round trips on a real local Ray


@pytest.fixture(scope="module")
def resized(ray_session, tmp_path_factory) -> str:
    root = "file://" + str(tmp_path_factory.mktemp("normalization"))
    dest = storage.join(root, "resize")
    resize(build_clean(root), dest, ResizeConfig(size=32, batch_size=4))
    return dest


def _saved(out: str) -> tuple[dict, dict]:
    model = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.pt"))), weights_only=True)
    card = json.loads(storage.read_bytes(storage.join(out, "model.json")))
    return model, card


def tiny(**overrides) -> TrainConfig:
    return cfg(
        epochs=1,
        batch_size=4,
        shuffle_buffer=8,
        warmup_fraction=0.0,
        mixup=0.0,
        cutmix=0.0,
        **overrides,
    )


@pytest.mark.ray
def test_a_run_from_scratch_records_the_datas_statistics_and_predict_reproduces_it(resized, tmp_path):
    out = "file://" + str(tmp_path / "train")
    train(resized, out, tiny())
    mean, std = split_moments(contract.read_manifest(resized, expect_step="resize"))
    assert mean != list(IMAGENET.mean)
    model, card = _saved(out)
    assert (model["mean"], model["std"]) == (mean, std)
    assert (card["input"]["mean"], card["input"]["std"]) == (mean, std)
    # The card's normalization is what serving uses: predict scores the test split as training did.
    report = predict(
        out,
        resized,
        "file://" + str(tmp_path / "pred"),
        PredictConfig(splits=("test",), actors=1, batch_size=3),
    )
    metrics = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))["test"]
    score = report.extra["scores"]["test"]
    assert score["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert score["macro_f1"] == pytest.approx(metrics["macro_f1"], abs=1e-9)


@pytest.mark.ray
@NO_EXPORTS
@pytest.mark.slow  # test_pretrained_weights_keep_their_own_statistics (above) and test_train_transfer's cache run cover it
def test_a_pretrained_run_keeps_the_weights_statistics_on_data_with_its_own(resized, tmp_path, monkeypatch):
    weights, _ = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch, seed=1)
    own = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    monkeypatch.setattr(
        weights.value,
        "transforms",
        partial(ImageClassification, crop_size=32, mean=own.mean, std=own.std),
    )
    out = "file://" + str(tmp_path / "exp" / "train")
    train(
        resized,
        out,
        tiny(model="resnet18", pretrained="DEFAULT", lr=0.0, max_steps_per_epoch=1, aug_policy="none"),
    )
    model, card = _saved(out)
    assert tuple(model["mean"]) == tuple(card["input"]["mean"]) == own.mean
    assert tuple(model["std"]) == tuple(card["input"]["std"]) == own.std


@pytest.mark.ray
def test_pretrained_weights_and_a_colour_space_op_are_refused_before_anything_runs(ray_session, tmp_path, monkeypatch):
    root = "file://" + str(tmp_path)
    data = storage.join(root, "resize")
    resize(build_clean(root), data, ResizeConfig(size=32, ops=("to_ycbcr",), batch_size=4))
    serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch)
    downloads = count_downloads(monkeypatch)
    out = storage.join(root, "exp", "train")
    with pytest.raises(ValueError, match="to_ycbcr stored YCbCr: train from scratch"):
        train(data, out, tiny(model="resnet18", pretrained="DEFAULT"))
    assert downloads == [] and not storage.exists(storage.join(out, contract.OWNER)), "refused before the weights or the output"
    # From scratch, the same data trains, normalized with its own YCbCr statistics.
    train(data, out, tiny())
    model, _ = _saved(out)
    assert model["mean"] == split_moments(contract.read_manifest(data))[0]
