"""The exported model runs outside imgpipe and agrees with it: ONNX in onnxruntime, TorchScript, the card."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from imgpipe import contract, storage
from imgpipe.steps.train import train
from imgpipe.train.card import read_card
from imgpipe.train.config import TrainConfig
from imgpipe.train.models import build_model
from imgpipe.train.partition import describe_split
from tests.train.test_loader import write_resize_output

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_resize_output("file://" + str(root / "resize"), counts={"train": 64, "val": 16, "test": 400}, size=32, row_group_rows=16)
    out = "file://" + str(root / "model")
    cfg = TrainConfig(model="tiny_cnn", epochs=2, batch_size=16, num_workers=0, device="cpu", shuffle_buffer=16, warmup_fraction=0.2)
    train(data, out, cfg)
    return data, out


def _test_batches(data: str, card: dict):
    """The test split as evaluation feeds it: stored at the model's size, scaled and normalized from the card."""
    from imgpipe.train.rows import read_rows

    info = describe_split(data, "test", contract.read_manifest(data))
    images = np.stack(read_rows(info, list(range(info.num_samples)))).astype(np.float32)
    x = images.transpose(0, 3, 1, 2) * card["input"]["scale"]
    mean = np.array(card["input"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(card["input"]["std"], np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def test_onnxruntime_and_torch_agree_on_the_top_class_of_the_test_split(trained):
    data, out = trained
    card = read_card(out)
    assert card["files"]["onnx"] == "model.onnx" and not card["export_failures"]
    x = _test_batches(data, card)
    assert len(x) == 400
    payload = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.pt"))), weights_only=True)
    model = build_model(card["architecture"], card["num_classes"], card["input"]["channels"])
    model.load_state_dict(payload["model"])
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(x)).argmax(-1).numpy()
    session = ort.InferenceSession(storage.read_bytes(storage.join(out, "model.onnx")), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == card["input"]["name"] and isinstance(inp.shape[0], str), "a dynamic batch axis"
    got = np.concatenate([session.run(None, {inp.name: x[i : i + 37]})[0] for i in range(0, len(x), 37)]).argmax(-1)
    assert (got == reference).mean() >= 0.995
    scripted = torch.jit.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.ts"))))
    with torch.no_grad():
        assert (scripted(torch.from_numpy(x)).argmax(-1).numpy() == reference).mean() >= 0.995


def test_the_card_says_how_to_feed_the_model_and_what_it_is(trained):
    data, out = trained
    card = read_card(out)
    assert card["classes"] == [f"class_{k}" for k in range(4)]
    assert card["input"]["size"] == 32 and "center_crop" not in card["input"] and "resize_short_side" not in card["input"]
    assert card["input"]["view"].startswith("as stored"), "stored at the model's size: the evaluation neither resizes nor crops"
    assert card["diverged"] is False and card["divergence"]["events"] == []
    assert len(card["input"]["mean"]) == len(card["input"]["std"]) == card["input"]["channels"] == 3
    manifest = storage.read_bytes(storage.join(data, contract.MANIFEST))
    import hashlib

    assert card["data"] == {"uri": data, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    assert card["recipe"]["model"] == "tiny_cnn" and card["selection"]["weights"] == "model"
    assert set(card["metrics"]) >= {"val", "test"} and "accuracy" in card["metrics"]["test"]
    names = {f["name"] for f in contract.read_manifest(out)["files"]}
    assert {"model.json", "model.onnx", "model.ts"} <= names


def test_a_prefix_without_a_card_or_with_other_classes_is_refused(trained, tmp_path):
    _, out = trained
    with pytest.raises(ValueError, match="has no model.json"):
        read_card("file://" + str(tmp_path))
    with pytest.raises(ValueError, match="other classes"):
        read_card(out, classes=["cat", "dog"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="not an imgpipe model card"):
        read_card("file://" + str(bad))
