"""``imgpipe.resize.warp.shrink`` (the train crop's antialiased shrink) against torchvision's ``resized_crop``.

torchvision's ``resized_crop(antialias=True)`` is the oracle: the reference training recipe's
resize. ``cv2.INTER_AREA``, which the crop used before, is measured beside it: the shrink must
stay about as close to torchvision as that was, on smooth and textured pictures, at the ratios a
random crop meets and at the reduced JPEG decode's (2 to 4 source pixels per output pixel).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from imgpipe.resize.warp import shrink
from tests import imagefactory as f


def _picture(kind: str, width: int, height: int) -> np.ndarray:
    base = np.asarray(f.photo(width, height, seed=3), dtype=np.float32)
    if kind == "textured":  # mid-frequency detail, the hard case for a shrink
        rng = np.random.default_rng(3)
        noise = rng.normal(128, 40, size=(height // 2, width // 2, 3)).clip(0, 255).astype(np.uint8)
        base += np.asarray(Image.fromarray(noise).resize((width, height), Image.BILINEAR), np.float32) - 128
    return np.clip(base, 0, 255).astype(np.uint8)


def _torchvision(image: np.ndarray, box: tuple[int, int, int, int], out: tuple[int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    got = F.resized_crop(t, y1, x1, y2 - y1, x2 - x1, [out[1], out[0]], antialias=True)
    return got.permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.parametrize("kind", ["smooth", "textured"])
@pytest.mark.parametrize("box_w, box_h", [(240, 240), (291, 291), (321, 401), (448, 448), (564, 470), (560, 560), (640, 854), (874, 874), (300, 150)])
def test_shrink_is_as_close_to_torchvision_as_inter_area(kind, box_w, box_h):
    image = _picture(kind, 900, 900)
    box, out = (7, 5, 7 + box_w, 5 + box_h), (224, 224)
    region = image[box[1] : box[3], box[0] : box[2]]
    reference = _torchvision(image, box, out)
    ours = np.abs(shrink(region, out).astype(np.int16) - reference).mean()
    area = np.abs(cv2.resize(region, out, interpolation=cv2.INTER_AREA).astype(np.int16) - reference).mean()
    # Measured: ours 0.4-1.7 (smooth) and 0.8-2.9 (textured) grey levels, INTER_AREA 0.3-2.0 and 0.4-3.9.
    assert ours <= area + 0.6 and ours < 3.0, (ours, area)


@pytest.mark.parametrize("width, height", [(300, 200), (301, 203)])  # halvings that end exact, and that drop odd pixels
def test_shrink_writes_into_dst_and_keeps_one_channel(width, height):
    image = _picture("smooth", width, height)[..., :1]
    dst = np.zeros((50, 60, 1), np.uint8)
    got = shrink(image, (60, 50), dst=dst)
    assert got.shape == (50, 60, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(dst, shrink(image, (60, 50)))
    reference = _torchvision(np.repeat(image, 3, axis=2), (0, 0, width, height), (60, 50))[..., :1]
    area = cv2.resize(image, (60, 50), interpolation=cv2.INTER_AREA)[..., None].astype(np.int16)
    ours, theirs = np.abs(got.astype(np.int16) - reference).mean(), np.abs(area - reference).mean()  # 1.7 and 2.7; 2.3 and 2.5
    assert ours <= theirs


def test_shrink_reads_nothing_outside_a_view():
    whole = np.full((400, 400, 3), 255, np.uint8)
    whole[100:300, 50:350] = 0
    got = shrink(whole[100:300, 50:350], (64, 40))  # every halving and filter stays inside the view
    assert got.max() == 0


def test_shrink_on_one_axis_samples_the_other_bilinearly():
    image = _picture("textured", 500, 100)
    got = shrink(image, (100, 160)).astype(np.int16)  # 5x narrower, 1.6x taller
    reference = _torchvision(image, (0, 0, 500, 100), (100, 160))
    area = cv2.resize(image, (100, 160), interpolation=cv2.INTER_AREA).astype(np.int16)  # OpenCV's mixed case: no antialiasing
    ours, theirs = np.abs(got - reference).mean(), np.abs(area - reference).mean()  # measured 3.5 and 15.6
    assert ours < 4.0 and ours < theirs / 3
