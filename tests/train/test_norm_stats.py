"""Precise BN: batch-norm statistics recomputed from train images before a validation (issue 49)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from imgpipe import contract, storage
from imgpipe.steps.train import train
from imgpipe.train.checkpoint import CHECKPOINT
from imgpipe.train.config import TrainConfig
from imgpipe.train.distributed import DistInfo
from imgpipe.train.norm_stats import norm_layers, recompute
from tests.train.test_loader import write_resize_output


def _images(batches: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Channels with different levels and spreads, as pictures have.
    return [rng.normal([[[0.5]], [[-1.0]], [[2.0]]], [[[1.0]], [[0.3]], [[2.5]]], (size, 3, 8, 8)).astype(np.float32) for _ in range(batches)]


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4))
    model.train()
    return model


def test_the_statistics_are_the_images_own_as_numpy_computes_them():
    """The first layer sees the images themselves: its mean and variance are numpy's over the batches, each batch weighing the same."""
    model = _model()
    images = _images(5)
    seen = recompute(model, (torch.from_numpy(x) for x in images), 10_000, DistInfo())
    assert seen == 80
    first = model[0]
    np.testing.assert_allclose(first.running_mean.numpy(), np.mean([x.mean(axis=(0, 2, 3)) for x in images], axis=0), rtol=1e-5, atol=1e-6)
    per_batch_var = [x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1) for x in images]  # unbiased, as BatchNorm keeps it
    np.testing.assert_allclose(first.running_var.numpy(), np.mean(per_batch_var, axis=0), rtol=1e-5)


def test_what_it_changes_is_put_back_but_the_statistics():
    model = _model()
    model[3].momentum = 0.3
    model[0].num_batches_tracked.fill_(17)
    recompute(model, (torch.from_numpy(x) for x in _images(2)), 10_000, DistInfo())
    assert model[0].momentum == 0.1 and model[3].momentum == 0.3, "each layer's momentum is its own again"
    assert int(model[0].num_batches_tracked) == 17
    assert all(m.training for m in model.modules()), "the model trains on as it was"


def test_the_rest_of_the_model_runs_as_evaluation_does():
    """Dropout is off while measuring: the second layer's statistics are those of the features evaluation gives it (numpy)."""
    model = _model()
    weight = model[1].weight.detach().numpy()[:, :, 0, 0]
    bias = model[1].bias.detach().numpy()
    images = _images(3)
    recompute(model, (torch.from_numpy(x) for x in images), 10_000, DistInfo())
    means, variances = [], []
    for x in images:
        # The first layer measures too, so it normalizes by the batch (biased variance, eps 1e-5).
        z = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
        f = np.einsum("oc,bchw->bohw", weight, z) + bias[None, :, None, None]
        means.append(f.mean(axis=(0, 2, 3)))
        variances.append(f.transpose(1, 0, 2, 3).reshape(4, -1).var(axis=1, ddof=1))
    np.testing.assert_allclose(model[3].running_mean.numpy(), np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model[3].running_var.numpy(), np.mean(variances, axis=0), rtol=1e-4)


def test_frozen_layers_keep_their_statistics():
    """A frozen block's layers are in evaluation mode while training: their pretrained statistics stay."""
    model = _model()
    model[0].running_mean.fill_(0.25)
    model[0].eval()  # as set_trainable leaves a frozen block
    assert [name for name, _ in norm_layers(model)] == ["3"]
    recompute(model, (torch.from_numpy(x) for x in _images(2)), 10_000, DistInfo())
    assert torch.all(model[0].running_mean == 0.25)
    assert not model[0].training and model[3].training


def test_it_stops_at_the_cap_and_reads_no_further():
    pulled = []

    def batches():
        for i, x in enumerate(_images(10)):
            pulled.append(i)
            yield torch.from_numpy(x)

    assert recompute(_model(), batches(), 40, DistInfo()) == 48, "whole batches: the one that reaches the cap is the last"
    assert pulled == [0, 1, 2]


def test_a_lone_image_is_left_out():
    """A split's last batch of one image: a 1 x 1 map has no variance, which BatchNorm refuses in training mode."""
    model = nn.Sequential(nn.Conv2d(3, 2, 8), nn.BatchNorm2d(2))  # 8 x 8 to 1 x 1
    images = [torch.from_numpy(x) for x in _images(2)] + [torch.from_numpy(_images(1, size=1)[0])]
    assert recompute(model, iter(images), 10_000, DistInfo()) == 32


def test_no_batch_or_no_layer_leaves_the_statistics_as_they_were():
    model = _model()
    model[0].running_mean.fill_(0.5)
    assert recompute(model, iter(()), 100, DistInfo()) == 0
    assert torch.all(model[0].running_mean == 0.5) and model[0].momentum == 0.1
    plain = nn.Sequential(nn.Conv2d(3, 2, 1), nn.LayerNorm([2, 8, 8]))
    assert recompute(plain, (torch.from_numpy(x) for x in _images(1)), 100, DistInfo()) == 0


# ---------------------------------------------------------------------------------------
# In the train step.


def _tiny(**overrides) -> TrainConfig:
    values = {"model": "tiny_cnn", "epochs": 2, "batch_size": 8, "lr": 3e-3, "num_workers": 0, "shuffle_buffer": 16, "device": "cpu", "patience": 0}
    return TrainConfig(**{**values, **overrides})


def test_each_validation_follows_a_recompute_and_the_kept_model_carries_it(tmp_path):
    data, out = write_resize_output(str(tmp_path / "resize")), str(tmp_path / "train")
    train(data, out, _tiny(precise_bn=16))
    epochs = json.loads(storage.read_bytes(storage.join(out, contract.METRICS)))["epochs"]
    assert [e["precise_bn_images"] for e in epochs] == [16, 16], "two batches of 8 (the training's batch, not the evaluations'): the cap"
    kept = torch.load(tmp_path / "train" / contract.MODEL, weights_only=True)["model"]
    tracked = {k: int(v) for k, v in kept.items() if k.endswith("num_batches_tracked")}
    assert tracked and all(v > 0 for v in tracked.values()), "the training count is kept, not the recompute's"


def test_without_a_validation_split_the_last_weights_ship_measured(tmp_path):
    """No val split: no epoch is validated, and the shipped weights still get the statistics measured (the checkpoint keeps the running ones)."""
    data = write_resize_output(str(tmp_path / "resize"), counts={"train": 24, "test": 8})
    out = str(tmp_path / "train")
    train(data, out, _tiny(precise_bn=1024))
    shipped = torch.load(tmp_path / "train" / contract.MODEL, weights_only=True)["model"]
    last = torch.load(tmp_path / "train" / CHECKPOINT, weights_only=False)["model"]
    means = [k for k in shipped if k.endswith("running_mean")]
    assert means and torch.equal(shipped[means[0].replace("running_mean", "weight")], last[means[0].replace("running_mean", "weight")])
    assert all(not torch.equal(shipped[k], last[k]) for k in means), "the same weights, other statistics"


def test_off_it_leaves_the_running_averages(tmp_path):
    data, out = write_resize_output(str(tmp_path / "resize")), str(tmp_path / "train")
    train(data, out, _tiny(precise_bn=0))
    epochs = json.loads(storage.read_bytes(storage.join(out, contract.METRICS)))["epochs"]
    assert all("precise_bn_images" not in e for e in epochs)


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="precise_bn"):
        _tiny(precise_bn=-1)
