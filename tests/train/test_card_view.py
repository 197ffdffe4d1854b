"""A model card that cannot mislead: following ``model.json``'s ``input`` alone reproduces the train step's predictions (issue 49).

The card used to say ``resize_short_side: 73, center_crop: 64`` for every model, though the
evaluation of data stored at the model's size (``short-side-crop``, ``fixed``, ``pad``) does
neither: a reader who followed it zoomed every picture by 12.5%. Here a reader who knows only
the card (OpenCV, NumPy and onnxruntime; no imgpipe code) prepares the stored test images and
must get the train step's own test predictions (``predictions.parquet``).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.steps.train import train
from imgpipe.train.card import VIEW_INTERPOLATION, read_card
from imgpipe.train.config import TrainConfig
from imgpipe.train.partition import describe_split
from imgpipe.train.rows import read_rows
from tests.train.test_loader import write_resize_output

SIZE = 24


def _trained(root, whole: tuple[str, ...]) -> tuple[str, str]:
    data = write_resize_output("file://" + str(root / "resize"), counts={"train": 32, "val": 8, "test": 16}, size=SIZE, whole=whole)
    out = "file://" + str(root / "train")
    cfg = TrainConfig(
        model="tiny_cnn", recipe="none", epochs=2, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=8, mixup=0.0, cutmix=0.0, seed=3
    )
    train(data, out, cfg)
    return data, out


@pytest.fixture(scope="module")
def as_stored(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("stored"), whole=())


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("whole"), whole=("train", "val", "test"))


def _follow(image: np.ndarray, spec: dict) -> np.ndarray:
    """What a reader does with the card's ``input`` alone: resize and crop only where it says so."""
    if "resize_short_side" in spec:
        h, w = image.shape[:2]
        scale = spec["resize_short_side"] / min(h, w)
        size = (max(spec["size"], int(w * scale)), max(spec["size"], int(h * scale)))
        if size != (w, h):
            shrinking = scale < 1
            assert spec["interpolation"] == "area when shrinking, bilinear when enlarging (OpenCV)", spec
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR).reshape(size[1], size[0], -1)
    if "center_crop" in spec:
        c = spec["center_crop"]
        top, left = (image.shape[0] - c) // 2, (image.shape[1] - c) // 2
        image = image[top : top + c, left : left + c]
    x = image.astype(np.float32) * spec["scale"]
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return x.transpose(2, 0, 1)


def _card_predictions(data: str, out: str, spec: dict | None = None) -> np.ndarray:
    card = read_card(out)
    spec = spec or card["input"]
    info = describe_split(data, "test", contract.read_manifest(data))
    images = read_rows(info, list(range(info.num_samples)))
    x = np.stack([_follow(img, spec) for img in images]).astype(np.float32)
    session = ort.InferenceSession(storage.read_bytes(storage.join(out, card["files"]["onnx"])), providers=["CPUExecutionProvider"])
    return session.run(None, {card["input"]["name"]: x})[0]


def _train_step_predictions(out: str) -> np.ndarray:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, contract.PREDICTIONS)))).to_pandas()
    return table[table["split"] == "test"].sort_values("index")["predicted"].to_numpy()


def test_a_model_of_images_stored_at_its_size_has_no_resize_or_crop_on_its_card(as_stored):
    _, out = as_stored
    spec = read_card(out)["input"]
    assert "center_crop" not in spec and "resize_short_side" not in spec, spec
    assert spec["view"].startswith("as stored")


def test_following_the_card_alone_gives_the_train_steps_predictions(as_stored):
    data, out = as_stored
    logits = _card_predictions(data, out)
    assert (logits.argmax(1) == _train_step_predictions(out)).all()


def test_the_old_cards_crop_numbers_would_have_predicted_from_other_pixels(as_stored):
    """The card as it was (short side to size / 0.875, then the centre crop) feeds the model other pixels."""
    data, out = as_stored
    spec = dict(read_card(out)["input"])
    ours = _card_predictions(data, out)
    old = _card_predictions(data, out, {**spec, "resize_short_side": round(SIZE / 0.875), "center_crop": SIZE, "interpolation": VIEW_INTERPOLATION})
    assert not np.allclose(ours, old, atol=1e-3), "the zoom-crop changes what the model sees"


def test_a_model_of_whole_pictures_states_its_resize_and_crop_and_following_them_agrees(whole):
    data, out = whole
    spec = read_card(out)["input"]
    assert spec["resize_short_side"] == round(SIZE / 0.875) and spec["center_crop"] == SIZE
    assert (_card_predictions(data, out).argmax(1) == _train_step_predictions(out)).all()
