"""JPEG rows decoded only as large as the crop needs (issue 50): libjpeg-turbo's DCT scales, within a tolerance of the full decode.

The oracle is torchvision's own ``decode_jpeg`` + ``resized_crop`` (antialiased) of the full
image; imgpipe's full-size path (albumentations' pixels) is held to the same bound.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms.v2 import functional as TF

from imgpipe.data import jpeg_region
from imgpipe.train import rows as rows_mod
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.augment_cpu import KEEP_FOR_RESIZE, build_crop_transform, build_eval_transform
from imgpipe.train.loader import ImageLoader
from imgpipe.train.loader_config import LoaderConfig
from imgpipe.train.partition import describe_split
from tests.train.test_loader import write_resize_output

OUT = 64
# Mean absolute difference per pixel, in grey levels, against the oracle: the DCT's scaling is
# not the oracle's triangle filter, so edges differ by a few levels (measured on these pictures:
# the reduced decode 1.7-1.9 on average, 3.2 at worst; albumentations' full-size path 1.0, 1.8).
MEAN_TOLERANCE = 3.5


def _photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth photo-like picture with detail at several scales, JPEG quality 90 (4:2:0)."""
    rng = np.random.default_rng(seed)
    layers = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC), np.float32)
        for s in (4, 16, 64)
    ]
    picture = np.clip(0.5 * layers[0] + 0.3 * layers[1] + 0.2 * layers[2], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _crop_transform():
    crop_only = AugmentConfig(policy="basic", hflip=False, color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0)
    return build_crop_transform(crop_only, OUT, 3)


def _oracle(data: bytes, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return TF.resized_crop(full, y1, x1, y2 - y1, x2 - x1, [OUT, OUT], antialias=True).permute(1, 2, 0).numpy()


def _box(transform, shape: tuple[int, int, int], seed: int) -> tuple[int, int, int, int]:
    """The crop box ``from_jpeg`` draws for ``seed`` (the same draws, from the shape alone)."""
    transform._reseed(seed)
    return transform._head_params(shape)[0]


@pytest.mark.parametrize("size", [(1600, 1200), (1200, 1600), (900, 700)])
def test_a_reduced_decode_is_within_the_tolerance_of_torchvisions_full_decode_and_crop(size, monkeypatch):
    data = _photo_jpeg(*size, seed=sum(size))
    array = np.frombuffer(data, np.uint8)
    shape = (size[1], size[0], 3)
    transform = _crop_transform()
    scales = []
    real = jpeg_region.decode_box

    def recording(data, shape, box, num=8):
        scales.append(num)
        return real(data, shape, box, num)

    monkeypatch.setattr(jpeg_region, "decode_box", recording)
    reduced = 0
    for seed in range(40):
        box = _box(transform, shape, seed)
        ours = transform.from_jpeg(array, shape, seed)
        full = transform(simplejpeg.decode_jpeg(data, colorspace="RGB"), seed)
        oracle = _oracle(data, box)
        x1, y1, x2, y2 = box
        reducing = scales[-1] < 8
        reduced += reducing
        if reducing:
            assert min(y2 - y1, x2 - x1) >= 2 * KEEP_FOR_RESIZE * OUT * 7 / 8 / 2, "only a box well above the output is reduced"
        else:
            assert np.array_equal(ours, full), "no scale below 1 keeps the box twice the output: the full decode's pixels exactly"
        assert np.abs(ours.astype(int) - oracle.astype(int)).mean() <= MEAN_TOLERANCE
        assert np.abs(full.astype(int) - oracle.astype(int)).mean() <= MEAN_TOLERANCE
    assert reduced >= 10, "most crops of a picture this size allow a reduced decode"


def test_the_decoded_pixels_are_those_the_box_needs_and_no_fewer():
    data = _photo_jpeg(1600, 1200, seed=3)
    box = (100, 200, 900, 800)  # 800 x 600 for a 64 x 64 output: 1/8 keeps 100 x 75
    region = rows_mod.decode_jpeg_for_box(np.frombuffer(data, np.uint8), (1200, 1600, 3), box, (OUT, OUT), KEEP_FOR_RESIZE)
    assert region.shape[0] >= 2 * OUT and region.shape[1] >= 2 * OUT, "at least twice the output, for the resize to smooth"
    assert region.shape[0] < 600 // 2, "the smallest scale that keeps it so: 1/4 here (150 x 200)"


def test_the_decoder_reads_the_rows_bytes_only(monkeypatch):
    """The row's data is a view of the row group's buffer: exactly the recorded bytes go to the decoder."""
    data = _photo_jpeg(900, 700, seed=5)
    buffer = np.frombuffer(data + b"\xff" * 4096, np.uint8)  # what lies beyond the row in its buffer
    seen = []
    real = jpeg_region.decode_box
    monkeypatch.setattr(jpeg_region, "decode_box", lambda d, *args: seen.append(len(d)) or real(d, *args))
    _crop_transform().from_jpeg(buffer[: len(data)], (700, 900, 3), seed=1)
    assert seen == [len(data)]


def test_a_corrupt_jpeg_row_is_a_reject_not_a_dead_worker(tmp_path):
    """A row whose header is sound but whose data is not: rejected with its reason, the rest of the batch trains."""

    def corrupt(split: str, i: int, row: dict) -> None:
        if split == "train" and i == 3:
            good = row["image"]["bytes"]
            row["image"]["bytes"] = good[: len(good) // 3]  # truncated: a header, then nothing

    data = write_resize_output("file://" + str(tmp_path / "resize"), counts={"train": 8, "val": 2, "test": 2}, size=48, fmt="jpeg", forge=corrupt)
    for engine in ("threads", "processes"):
        loader = ImageLoader(
            describe_split(data, "train"),
            LoaderConfig(batch_size=8, shuffle=False, drop_last=False, num_workers=1, engine=engine),
            transform=build_crop_transform(AugmentConfig(policy="basic"), 32, 3),
        )
        loader.set_epoch(0)
        batches = list(loader)
        assert sum(len(b["label"]) for b in batches) == 7, engine
        assert loader.rejected == {"undecodable": 1}, (engine, loader.rejected)


@pytest.mark.parametrize("size", [(341, 256), (256, 341), (256, 256), (400, 300), (300, 250)])
@pytest.mark.parametrize("channels", [3, 1])
def test_the_evaluation_view_decodes_its_centre_alone_with_the_whole_decodes_pixels(size, channels, monkeypatch):
    """Shorter side already the view's size: only the centre box is decoded; the pixels are those of decode-then-transform."""
    boxes = []
    real = jpeg_region.decode_box
    monkeypatch.setattr(jpeg_region, "decode_box", lambda d, shape, box, *a: boxes.append(box) or real(d, shape, box, *a))
    width, height = size
    picture = Image.open(io.BytesIO(_photo_jpeg(width, height, seed=width + height)))
    buf = io.BytesIO()
    (picture.convert("L") if channels == 1 else picture).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    transform = build_eval_transform(224, channels, resize_to=256)
    assert transform.crops_first
    shape = (height, width, channels)
    whole = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
    expected = transform(whole, 0)
    out = np.empty((224, 224, channels), np.uint8)
    got = transform.from_jpeg(np.frombuffer(data, np.uint8), shape, 0, out=out)
    assert got is out and np.array_equal(got, expected), size
    x1, y1, x2, y2 = boxes[-1]
    decoded = (x2 - x1, y2 - y1)
    assert decoded == ((224, 224) if min(size) == 256 else size), "the centre alone, where no resize comes first"
