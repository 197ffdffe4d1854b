"""predict decodes raw images as clean does: every colour mode and EXIF orientation, a bad file a reject (issue 47).

A folder of grey, CMYK, palette, 16-bit, LA and EXIF-rotated pictures used to kill the Ray
job (``np.stack`` of views with 1 and 3 channels); now every picture gets clean's own
decode (:func:`imgpipe.data.images.validate_and_normalize`) before the card's preprocessing,
and what cannot be made valid is a reject with its reason. The EXIF oracle is Pillow's own
:func:`PIL.ImageOps.exif_transpose`, not imgpipe's code.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from imgpipe import contract, storage
from imgpipe.steps.predict import PredictConfig, _Predictor, predict
from imgpipe.steps.train import train
from imgpipe.train.card import check_view, read_card, to_input
from imgpipe.train.config import TrainConfig
from tests import imagefactory as f
from tests.train.test_loader import write_resize_output

SIZE = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("modes")
    data = write_resize_output("file://" + str(root / "resize"), counts={"train": 24, "val": 8, "test": 8}, size=SIZE)
    prefix = "file://" + str(root / "model")
    cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=8, mixup=0.0, cutmix=0.0)
    train(data, prefix, cfg)
    return prefix


def _png(img: Image.Image) -> bytes:
    return f.encode(img, "PNG")


def _pictures() -> dict[str, bytes]:
    """One picture per mode clean normalizes, each 96 x 64 (the EXIF one upright 64 x 96)."""
    photo = f.photo(96, 64, seed=1)
    la = photo.convert("LA")
    la.putalpha(Image.new("L", la.size, 128))
    return {
        "rgb.jpg": f.jpeg(seed=1),
        "grey.jpg": f.grayscale_jpeg(seed=1),
        "cmyk.jpg": f.cmyk_jpeg(seed=1),
        "palette.png": _png(photo.convert("P", palette=Image.ADAPTIVE, colors=16)),
        "palette_alpha.png": f.palette_png_with_transparency(seed=1),
        "sixteen.png": f.png16(seed=1),
        "la.png": _png(la),
        "rotated.jpg": f.exif_rotated_jpeg(6, seed=1),
    }


def _upright(data: bytes) -> Image.Image:
    """The outside oracle: Pillow's own EXIF transpose of the decoded picture."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def test_the_card_says_exif_orientation_and_modes_are_normalized(model):
    card = read_card(model)
    assert card["input"]["exif_orientation"] == "applied"
    assert set(card["input"]["mode_normalization"]) == {"alpha", "high_bit_depth", "other_modes"}


def test_a_card_without_the_normalization_fields_is_still_read(model, tmp_path):
    card = read_card(model)
    for key in ("exif_orientation", "mode_normalization"):
        del card["input"][key]
    older = "file://" + str(tmp_path / "older")
    storage.write_bytes(storage.join(older, contract.MODEL_CARD), json.dumps(card).encode())
    assert "exif_orientation" not in read_card(older)["input"]
    view = np.zeros((SIZE, SIZE, 3), np.uint8)
    assert to_input([view], read_card(older)).shape == (1, 3, SIZE, SIZE)


def test_every_mode_gets_the_models_view(model):
    predictor = _Predictor(model, "download", [], [], {"threads": 1, "batch_size": 8, "top_k": 2})
    views = {name: predictor._image({"path": name, "bytes": data}, "jpeg") for name, data in _pictures().items()}
    assert {name: v.shape for name, v in views.items()} == {name: (SIZE, SIZE, 3) for name in views}
    for name in ("grey.jpg", "sixteen.png"):  # grey pictures become RGB with three equal channels
        assert (views[name][..., 0] == views[name][..., 1]).all() and (views[name][..., 1] == views[name][..., 2]).all(), name
    assert views["sixteen.png"].min() < 200, "16-bit is scaled to 8 bits, not clipped to white"
    to_input(list(views.values()), predictor.card)  # one batch: the shapes agree


def test_an_exif_rotated_jpeg_is_seen_upright(model):
    """The view of the rotated JPEG is the view of Pillow's upright picture (stored losslessly), up to clean's q95 re-encode."""
    predictor = _Predictor(model, "download", [], [], {"threads": 1, "batch_size": 8, "top_k": 2})
    data = _pictures()["rotated.jpg"]
    upright, stored = _upright(data), Image.open(io.BytesIO(data))
    assert upright.size == (64, 96) and stored.size == (96, 64)

    def view(raw: bytes) -> np.ndarray:
        return predictor._image({"path": "x", "bytes": raw}, "jpeg").astype(np.int16)

    got = view(data)
    assert np.abs(got - view(_png(upright))).mean() < 3
    # The picture as stored (EXIF dropped) is another view altogether: the check has teeth.
    stored.load()
    assert np.abs(got - view(_png(stored))).mean() > 10


def test_a_view_of_another_mode_is_refused_with_what_to_do(model):
    card = read_card(model)
    with pytest.raises(ValueError, match=r"16x16x1, the model takes 16x16x3 \(RGB\): decode the picture"):
        check_view(np.zeros((SIZE, SIZE), np.uint8), card)
    with pytest.raises(ValueError, match="16x16x3"):
        to_input([np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE, 4), np.uint8)], card)


@pytest.mark.ray
def test_a_folder_of_every_mode_is_predicted_and_a_bad_file_is_a_reject(model, tmp_path, ray_session):
    folder = tmp_path / "imgs"
    folder.mkdir()
    pictures = _pictures()
    pictures["upright.png"] = _png(_upright(pictures["rotated.jpg"]))  # the oracle, for the predictions
    for name, data in pictures.items():
        (folder / name).write_bytes(data)
    (folder / "truncated.jpg").write_bytes(f.truncated_jpeg(seed=2))
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    dest = "file://" + str(tmp_path / "pred")
    report = predict(model, str(folder), dest, PredictConfig(actors=1, batch_size=4))
    assert report.inputs == report.outputs + report.rejected == len(pictures) + 2
    assert report.outputs == len(pictures)
    rejects = {r["path"].rsplit("/", 1)[-1]: r for r in contract.read_rejects(dest).to_pylist()}
    assert set(rejects) == {"truncated.jpg", "garbage.png"}
    assert rejects["truncated.jpg"]["reason"] == "truncated" and rejects["garbage.png"]["reason"] == "corrupt"
    assert all(r["detail"] for r in rejects.values())
    (uri,) = contract.data_files(dest)
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()}
    assert set(rows) == set(pictures)
    rotated, upright = rows["rotated.jpg"], rows["upright.png"]
    probs = [dict(zip(r["top_classes"], r["top_probs"])) for r in (rotated, upright)]
    assert probs[0].keys() == probs[1].keys()
    assert all(abs(probs[0][c] - probs[1][c]) < 0.02 for c in probs[0])
