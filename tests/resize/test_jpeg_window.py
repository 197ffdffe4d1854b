"""The resize decoding only the window it reads (imgpipe.resize.jpeg_window, issue 50 item 5): the same output as the whole decode.

The oracle is the path it replaces, run on the same bytes: OpenCV's whole decode and the warp, or
Pillow's draft decode and its filtered resize (``jpeg_window.applies`` off).
"""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.data import jpeg_region
from imgpipe.resize import jpeg_window
from imgpipe.resize.ops import resize_image
from imgpipe.resize.spec import MODES, ResizeError, ResizeSpec
from tests import imagefactory as f
from tests.resize.conftest import textured_photo

pytestmark = pytest.mark.skipif(not jpeg_region.AVAILABLE, reason="imgpipe.data._jpeg_region was not built (no libjpeg headers)")


def _whole_decode_output(data: bytes, spec: ResizeSpec, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(jpeg_window, "applies", lambda img, geometry: False)
        return resize_image(data, spec)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "size",
    [(516, 388), (388, 516), (400, 300), (1000, 750), (2000, 1500), (1500, 2000), (333, 1000)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
@pytest.mark.parametrize("grey", [False, True], ids=["RGB", "L"])
def test_the_window_decode_gives_the_whole_decodes_output(mode, size, grey, monkeypatch):
    picture = textured_photo(*size, seed=sum(size))
    data = f.encode(picture.convert("L") if grey else picture, "JPEG", quality=90)
    spec = ResizeSpec(size=224, mode=mode)
    windows = []
    real = jpeg_window.decode_window
    monkeypatch.setattr(jpeg_window, "decode_window", lambda *a: windows.append(a[3:]) or real(*a))
    ours = resize_image(data, spec)  # (a whole box with no draft, as "fixed" at 516 x 388, keeps PIL's whole decode)
    assert np.array_equal(ours, _whole_decode_output(data, spec, monkeypatch)), (mode, size, windows)


@pytest.mark.parametrize("resample", ["bicubic", "lanczos", "box"])
def test_every_pil_filter_reads_within_the_window(resample, monkeypatch):
    """The window holds all a filter reads; the box's offset moves PIL's float coefficients in their last bit, 1 grey level at a few pixels."""
    data = f.encode(textured_photo(1600, 1200, seed=1), "JPEG", quality=90)
    for mode in ("short-side-crop", "whole"):
        spec = ResizeSpec(size=160, mode=mode, resample=resample)
        diff = np.abs(resize_image(data, spec).astype(int) - _whole_decode_output(data, spec, monkeypatch))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (resample, mode, diff.max(), (diff > 0).mean())


def test_a_centre_crop_decodes_less_than_the_picture(monkeypatch):
    data = f.encode(textured_photo(2000, 1500, seed=2), "JPEG", quality=90)
    windows = []
    real = jpeg_window.decode_window
    monkeypatch.setattr(jpeg_window, "decode_window", lambda *a: windows.append(a[3:]) or real(*a))
    resize_image(data, ResizeSpec(size=224, mode="short-side-crop"))
    ((left, top, right, bottom), num) = windows[0]
    assert num == 2, "Pillow's draft for 224 from 1500 with the margin: 1/4"
    assert right - left < 0.75 * 500 and bottom - top <= 375, "the centre square and the filter's reach, not the 500 x 375 picture"


def test_roi_crop_and_png_keep_the_whole_decode(monkeypatch):
    calls = []
    monkeypatch.setattr(jpeg_window, "decode_window", lambda *a: calls.append(a))
    png = f.encode(textured_photo(600, 400, seed=3), "PNG")
    resize_image(png, ResizeSpec(size=224, mode="short-side-crop"))
    jpeg = f.encode(textured_photo(600, 400, seed=3), "JPEG", quality=90)
    resize_image(jpeg, ResizeSpec(size=224, mode="short-side-crop", ops=("roi_crop",)), bbox=[0.1, 0.1, 0.6, 0.9])
    assert calls == []


@pytest.mark.parametrize("size", [(400, 300), (2000, 1500)], ids=["warp", "draft"])
def test_a_truncated_or_corrupt_jpeg_is_undecodable(size):
    data = f.encode(textured_photo(*size, seed=4), "JPEG", quality=90)
    spec = ResizeSpec(size=224, mode="short-side-crop")
    with pytest.raises(ResizeError) as err:
        resize_image(data[: len(data) * 2 // 3], spec)
    assert err.value.reason == "undecodable"
    scan = data.index(b"\xff\xda")
    bad = bytearray(data)
    bad[scan + 200 : scan + 4000] = bytes(range(256)) * 15 + bytes(range(40))
    try:
        out = resize_image(bytes(bad), spec)
    except ResizeError as exc:
        assert exc.reason == "undecodable"
    else:
        assert out.shape == (224, 224, 3), "corrupt data the decoder accepts still gives the output's shape"


def test_a_jpeg_whose_header_is_not_what_clean_recorded_is_refused_before_decoding():
    data = f.encode(textured_photo(400, 300, seed=5), "JPEG", quality=90)
    with pytest.raises(ResizeError) as err:
        resize_image(data, ResizeSpec(size=224), recorded=(4000, 3000))
    assert err.value.reason == "not_as_recorded"
