"""A JPEG's region decoded alone (imgpipe.data.jpeg_region, issue 50) against whole decodes by simplejpeg and torchvision.

The oracle is the whole image decoded by the libraries themselves (simplejpeg at the same DCT
scale, torchvision's ``decode_jpeg`` at full size) and cut to the box: the region decode must
give those pixels bit for bit, on every chroma subsampling, grey and progressive files alike.
"""

from __future__ import annotations

import io
import random
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from imgpipe.data import jpeg_region
from imgpipe.data.jpeg_region import decode_box, scaled_size

needs_extension = pytest.mark.skipif(not jpeg_region.AVAILABLE, reason="imgpipe.data._jpeg_region was not built (no libjpeg headers)")


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """Photo-like: smooth colour at three scales, so every block has detail and chroma."""
    rng = np.random.default_rng(seed)
    layers = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC), np.float32)
        for s in (4, 16, 64)
    ]
    return np.clip(0.5 * layers[0] + 0.3 * layers[1] + 0.2 * layers[2], 0, 255).astype(np.uint8)


def _jpeg(width: int, height: int, seed: int, *, subsampling: int = 2, gray: bool = False, progressive: bool = False) -> bytes:
    """Pillow's encoder: ``subsampling`` 0 (4:4:4), 1 (4:2:2), 2 (4:2:0)."""
    picture = _picture(width, height, seed)
    image = Image.fromarray(picture).convert("L") if gray else Image.fromarray(picture)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    return buf.getvalue()


def _boxes(width: int, height: int, count: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = random.Random(seed)
    boxes = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, width, height), (width // 2, 0, width // 2 + 1, height)]
    while len(boxes) < count:
        x1, x2 = sorted(rng.sample(range(width + 1), 2))
        y1, y2 = sorted(rng.sample(range(height + 1), 2))
        boxes.append((x1, y1, x2, y2))
    return boxes


FILES = {
    "420": dict(subsampling=2),
    "422": dict(subsampling=1),
    "444": dict(subsampling=0),
    "grey": dict(gray=True),
    "progressive 420": dict(subsampling=2, progressive=True),
}


@needs_extension
@pytest.mark.parametrize("kind", FILES)
@pytest.mark.parametrize("size", [(341, 256), (250, 333), (17, 9)])
def test_a_region_at_full_scale_is_torchvisions_whole_decode_cut_to_the_box(kind, size):
    width, height = size
    data = _jpeg(width, height, seed=width, **FILES[kind])
    channels = 1 if kind == "grey" else 3
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    whole = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode).permute(1, 2, 0).numpy()
    for box in _boxes(width, height, 60, seed=height):
        x1, y1, x2, y2 = box
        region = decode_box(np.frombuffer(data, np.uint8), (height, width, channels), box)
        assert np.array_equal(region, whole[y1:y2, x1:x2]), (kind, box)


@needs_extension
@pytest.mark.parametrize("kind", ["420", "444", "grey"])
def test_a_region_at_a_reduced_scale_is_simplejpegs_whole_reduced_decode_cut_to_the_box(kind):
    width, height = 1000, 750
    data = _jpeg(width, height, seed=7, **FILES[kind])
    channels = 1 if kind == "grey" else 3
    for num in range(1, 9):
        sh, sw = scaled_size(height, width, num)
        whole = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB", min_height=sh, min_width=sw)
        if whole.shape[:2] != (sh, sw):
            continue  # a scale simplejpeg does not offer: nothing of its own to compare with
        for box in _boxes(width, height, 15, seed=num):
            x1, y1, x2, y2 = box
            region = decode_box(data, (height, width, channels), box, num)
            top, left = y1 * sh // height, x1 * sw // width
            bottom, right = -(-y2 * sh // height), -(-x2 * sw // width)
            assert np.array_equal(region, whole[top:bottom, left:right]), (kind, num, box)


@needs_extension
def test_grey_out_of_a_colour_file_is_its_luma_as_simplejpeg_gives_it():
    data = _jpeg(300, 200, seed=2)
    whole = simplejpeg.decode_jpeg(data, colorspace="GRAY")
    assert np.array_equal(decode_box(data, (200, 300, 1), (10, 20, 250, 190)), whole[20:190, 10:250])


def test_without_the_extension_the_pixels_are_the_same(monkeypatch):
    data = _jpeg(341, 256, seed=4)
    cases = [(box, num) for box in _boxes(341, 256, 20, seed=4) for num in (8, 4)]
    expected = [decode_box(data, (256, 341, 3), box, num) for box, num in cases]
    monkeypatch.setattr(jpeg_region, "_jpeg_region", None)
    for (box, num), pixels in zip(cases, expected):
        assert np.array_equal(decode_box(data, (256, 341, 3), box, num), pixels), (box, num)


def test_the_scale_is_the_smallest_that_keeps_the_need():
    assert jpeg_region.scale_for(1200, 1600, 256, 256) == 2  # 300 x 400; 1/8 gives 150 x 200
    assert jpeg_region.scale_for(1200, 1600, 1200, 1) == 8
    assert jpeg_region.scale_for(100, 100, 13, 13) == 1  # ceil(12.5)
    assert jpeg_region.reduced_scale(1200, 1600, (0, 0, 1600, 1200), (224, 224), 2.0) == 3  # 450 x 600 keeps 448
    assert jpeg_region.reduced_scale(256, 341, (0, 0, 341, 256), (224, 224), 2.0) == 8, "no scale below 1 keeps twice the output"


# --- bad input: a clear ValueError, never a crash, never a read past the row ---------------


@needs_extension
@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "empty"),
        (b"not a jpeg at all, but long enough to look" * 4, "not a JPEG"),
        (b"\xff\xd8\xff\xd9", "markers only"),
    ],
)
def test_bytes_that_are_not_a_jpeg_are_a_value_error(data, why):
    with pytest.raises(ValueError, match="JPEG"):
        decode_box(data, (8, 8, 3), (0, 0, 8, 8))


def test_a_header_of_another_size_than_the_row_is_refused_before_decoding():
    data = _jpeg(64, 48, seed=1)
    with pytest.raises(ValueError, match="64x48 JPEG, its row says 6400x4800"):
        decode_box(data, (4800, 6400, 3), (0, 0, 10, 10))


def test_a_box_outside_the_image_or_a_scale_outside_1_to_8_is_refused():
    data = _jpeg(64, 48, seed=1)
    for box in [(0, 0, 65, 48), (-1, 0, 10, 10), (10, 10, 10, 20), (0, 30, 64, 20)]:
        with pytest.raises(ValueError, match="no box"):
            decode_box(data, (48, 64, 3), box)
    for num in (0, 9):
        with pytest.raises(ValueError, match="no DCT scale"):
            decode_box(data, (48, 64, 3), (0, 0, 8, 8), num)


@pytest.mark.parametrize("box", [(0, 0, 40, 10), (0, 0, 400, 300)], ids=["box above the cut", "whole image"])
def test_a_truncated_jpeg_is_refused_wherever_the_box_lies(box, monkeypatch):
    """The decoder stops at the box's last row; a file cut short is still refused, as a whole decode refuses it."""
    data = _jpeg(400, 300, seed=3)
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(ValueError, match="truncated|JPEG"):
        decode_box(cut, (300, 400, 3), box)
    monkeypatch.setattr(jpeg_region, "_jpeg_region", None)
    with pytest.raises(ValueError):
        decode_box(cut, (300, 400, 3), box)


@needs_extension
def test_corrupt_bytes_give_the_right_shape_or_a_value_error_never_a_crash():
    """300 files with bytes flipped after the header: each decodes to the box's shape or raises ValueError."""
    data = bytearray(_jpeg(120, 90, seed=5))
    start = data.index(b"\xff\xda")  # the scan: the header stays sound, so the decoder runs
    rng = random.Random(0)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            bad[rng.randrange(start, len(bad) - 2)] = rng.randrange(256)
        try:
            region = decode_box(bytes(bad), (90, 120, 3), (5, 7, 100, 80), rng.choice([8, 4, 1]))
        except ValueError:
            outcomes["refused"] += 1
        else:
            assert region.ndim == 3 and region.dtype == np.uint8
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0, outcomes


@needs_extension
def test_the_decoder_reads_within_the_buffer_it_is_given(monkeypatch):
    """A row is a view of its row group's buffer; the extension gets that view, not what lies after it."""
    data = _jpeg(200, 150, seed=6)
    buffer = np.frombuffer(data + b"\xff" * 4096, np.uint8)
    seen = []
    real = jpeg_region._jpeg_region.decode_region

    class Spy:
        @staticmethod
        def decode_region(buf, *args):
            seen.append(memoryview(buf).nbytes)
            return real(buf, *args)

    monkeypatch.setattr(jpeg_region, "_jpeg_region", Spy)
    decode_box(buffer[: len(data)], (150, 200, 3), (0, 0, 200, 150))
    assert seen == [len(data)]


@needs_extension
def test_threads_decode_at_once():
    """The GIL is released while decoding: threads give the same pixels as one after the other."""
    files = [_jpeg(400, 300, seed=s) for s in range(8)]
    expected = [decode_box(f, (300, 400, 3), (13, 17, 390, 290)) for f in files]
    got: list = [None] * len(files)

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = decode_box(files[i], (300, 400, 3), (13, 17, 390, 290))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_the_extension_is_built_wherever_libjpegs_headers_are():
    """A broken C build must not pass unseen as the slower fallback."""
    include = Path(sysconfig.get_config_var("INCLUDEDIR") or "/usr/include")
    headers = [include / "jpeglib.h", Path("/usr/include/jpeglib.h")]
    if not any(h.exists() for h in headers):
        pytest.skip("no libjpeg headers here: the extension is optional")
    assert jpeg_region.AVAILABLE, "libjpeg's headers are here but imgpipe.data._jpeg_region was not built: reinstall (make install)"
