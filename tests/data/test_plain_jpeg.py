"""validate_and_normalize's plain-JPEG path (simplejpeg) against Pillow's decode, the path it stands in for.

Pillow is the oracle twice: the pixels of every accepted JPEG are Pillow's, bit for bit,
and on hundreds of mutated JPEGs the verdict (kept, or rejected with which reason) is the
one Pillow's decode alone gives (the plain path switched off).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from imgpipe.data import images
from imgpipe.data.images import ImageRejected, validate_and_normalize
from imgpipe.data.synth_images import image_rng, render_image


def _jpeg(seed: int, size: tuple[int, int], mode: str = "RGB", **save) -> bytes:
    img = render_image(seed % 12, image_rng(3, seed % 12, seed), size)[0].convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img).reshape(img.height, img.width, len(img.getbands()))


def _verdict(data: bytes, grayscale: bool = False) -> tuple[str, object]:
    try:
        out = validate_and_normalize(data, grayscale=grayscale, min_side=1)
    except ImageRejected as exc:
        return "rejected", exc.reason
    return "kept", (out.data, out.mode, out.format, out.changes, out.pixels.tobytes(), out.pixels.shape)


CASES = {
    "4:2:0 q75": dict(quality=75, subsampling=2),
    "4:2:2 q90": dict(quality=90, subsampling=1),
    "4:4:4 q95": dict(quality=95, subsampling=0),
    "progressive": dict(quality=85, progressive=True),
    "optimized": dict(quality=80, optimize=True),
    "restart markers": dict(quality=85, restart_marker_blocks=4),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [(320, 240), (33, 517), (1001, 75)])
def test_plain_jpegs_give_pillows_pixels(case, size, monkeypatch):
    calls = []
    real = images._decode_plain_jpeg
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img: calls.append(1) or real(data, img))
    data = _jpeg(size[0] + size[1], size, **CASES[case])
    out = validate_and_normalize(data, min_side=1)
    assert calls and out.data is data and out.changes == () and out.format == "jpeg"
    assert out.pixels.shape == (size[1], size[0], 3) and out.pixels.dtype == np.uint8
    assert np.array_equal(out.pixels, _pillow(data))


def test_a_grey_jpeg_in_a_grey_dataset_gives_pillows_pixels():
    data = _jpeg(5, (200, 150), mode="L", quality=90)
    out = validate_and_normalize(data, grayscale=True, min_side=1)
    assert out.mode == "L" and out.pixels.shape == (150, 200, 1)
    assert np.array_equal(out.pixels, _pillow(data))


@pytest.mark.parametrize(
    ("mode", "grayscale", "change"),
    [("L", False, "L->RGB"), ("RGB", True, "RGB->L"), ("CMYK", False, "CMYK->RGB")],
)
def test_jpegs_that_need_normalizing_take_pillows_path(mode, grayscale, change, monkeypatch):
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img: pytest.fail("a JPEG to convert took the plain path"))
    out = validate_and_normalize(_jpeg(1, (120, 90), mode=mode, quality=90), grayscale=grayscale, min_side=1)
    assert change in out.changes and out.pixels.shape[2] == (1 if grayscale else 3)


def test_a_rotated_jpeg_takes_pillows_path(monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(2, (120, 90), quality=90, exif=exif.tobytes())
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img: pytest.fail("a rotated JPEG took the plain path"))
    out = validate_and_normalize(data, min_side=1)
    assert out.changes == ("exif_rotate:6",) and out.pixels.shape == (120, 90, 3)


def _mutations(count: int) -> list[bytes]:
    rng = random.Random(50)
    bases = [_jpeg(s, (96 + 8 * s, 64 + 4 * s), quality=85, progressive=s % 3 == 0) for s in range(6)]
    out = []
    for i in range(count):
        buf = bytearray(rng.choice(bases))
        kind = i % 5
        if kind == 0:  # truncated anywhere
            del buf[rng.randrange(1, len(buf)) :]
        elif kind == 1:  # bit flips in the entropy-coded data
            for _ in range(rng.randint(1, 16)):
                at = rng.randrange(len(buf) // 2, len(buf))
                buf[at] ^= 1 << rng.randrange(8)
        elif kind == 2:  # the end marker lost
            del buf[-2:]
        elif kind == 3:  # a run of zeros
            at = rng.randrange(len(buf))
            buf[at : at + 64] = bytes(len(buf[at : at + 64]))
        else:  # bytes after the end marker, or a header byte changed
            if rng.random() < 0.5:
                buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
            else:
                buf[rng.randrange(2, 64)] = rng.randrange(256)
        out.append(bytes(buf))
    return out


def test_mutated_jpegs_get_pillows_verdict(monkeypatch):
    mutated = _mutations(400)
    plain = [_verdict(data) for data in mutated]
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img: None)
    pillow = [_verdict(data) for data in mutated]
    differ = [i for i, (a, b) in enumerate(zip(plain, pillow)) if a != b]
    assert not differ, [(i, plain[i][0], pillow[i][0], plain[i][1] if plain[i][0] == "rejected" else "") for i in differ[:5]]
    # The set exercises both sides: kept ones (damage the decoder tolerates) and each reject reason.
    kinds = {v[0] if v[0] == "kept" else v[1] for v in pillow}
    assert {"kept", "truncated", "corrupt"} <= kinds
