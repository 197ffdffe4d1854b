"""validate_and_normalize's plain-JPEG path (simplejpeg) against Pillow's decode, the path it stands in for.

Pillow is the oracle twice: the pixels of every accepted JPEG are Pillow's, bit for bit,
and on hundreds of mutated JPEGs the verdict (kept, or rejected with which reason) is the
one Pillow's decode alone gives (the plain path switched off). The reduced decode clean's
workers ask for (``reduce_to``: the luma at a smaller DCT scale) is held to the same: its
pixels are Pillow's ``draft("L", ...)`` decode, and its verdicts Pillow's full decode's.
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


def _verdict(data: bytes, grayscale: bool = False, reduce_to: int = 0) -> tuple[str, object]:
    try:
        out = validate_and_normalize(data, grayscale=grayscale, min_side=1, reduce_to=reduce_to)
    except ImageRejected as exc:
        return "rejected", exc.reason
    kept = (out.data, out.mode, out.format, out.changes, out.width, out.height)
    return "kept", kept if reduce_to else (*kept, out.pixels.tobytes(), out.pixels.shape)


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
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img, num=8: calls.append(1) or real(data, img, num))
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
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img, num=8: pytest.fail("a JPEG to convert took the plain path"))
    out = validate_and_normalize(_jpeg(1, (120, 90), mode=mode, quality=90), grayscale=grayscale, min_side=1)
    assert change in out.changes and out.pixels.shape[2] == (1 if grayscale else 3)


def test_a_rotated_jpeg_takes_pillows_path(monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(2, (120, 90), quality=90, exif=exif.tobytes())
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img, num=8: pytest.fail("a rotated JPEG took the plain path"))
    out = validate_and_normalize(data, min_side=1)
    assert out.changes == ("exif_rotate:6",) and out.pixels.shape == (120, 90, 3)


def _mutations(count: int, large: bool = False) -> list[bytes]:
    rng = random.Random(50)
    side = (520, 400) if large else (96, 64)  # large: decoded at 2/8 to 4/8 for measures (reduce_to=128)
    bases = [_jpeg(s, (side[0] + 8 * s, side[1] + 4 * s), quality=85, progressive=s % 3 == 0) for s in range(6)]
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
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img, num=8: None)
    pillow = [_verdict(data) for data in mutated]
    differ = [i for i, (a, b) in enumerate(zip(plain, pillow)) if a != b]
    assert not differ, [(i, plain[i][0], pillow[i][0], plain[i][1] if plain[i][0] == "rejected" else "") for i in differ[:5]]
    # The set exercises both sides: kept ones (damage the decoder tolerates) and each reject reason.
    kinds = {v[0] if v[0] == "kept" else v[1] for v in pillow}
    assert {"kept", "truncated", "corrupt"} <= kinds


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("size", "scale"), [((1024, 768), 1 / 4), ((2048, 1536), 1 / 8), ((700, 260), 1 / 2), ((1001, 75), 1)])
def test_a_decode_for_measures_is_pillows_draft_in_grey(case, size, scale):
    """reduce_to: the luma at the smallest n/8 scale keeping both sides >= 128; Pillow's draft("L") is the oracle."""
    data = _jpeg(size[0] // 7, size, **CASES[case])
    out = validate_and_normalize(data, min_side=1, reduce_to=128)
    assert out.data is data and out.mode == "RGB" and (out.width, out.height) == size and out.scale == scale
    want = (-(-size[1] * int(scale * 8) // 8), -(-size[0] * int(scale * 8) // 8))
    if scale == 1:  # a side too short to reduce: the full colour decode, as without reduce_to
        assert np.array_equal(out.pixels, _pillow(data))
        return
    assert out.pixels.shape == (*want, 1)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (want[1], want[0]))
        img.load()
        assert img.mode == "L" and img.size == (want[1], want[0])
        assert np.array_equal(out.pixels[..., 0], np.asarray(img))


def test_a_decode_for_measures_takes_scales_between_the_powers_of_two():
    """libjpeg-turbo scales by any n/8: 3/8 keeps a 400-pixel side at 150 >= 128, where 1/4 would give 100."""
    out = validate_and_normalize(_jpeg(9, (600, 400), quality=90), min_side=1, reduce_to=128)
    assert out.scale == 3 / 8 and out.pixels.shape == (150, 225, 1)


def test_mutated_jpegs_decoded_for_measures_get_pillows_verdict(monkeypatch):
    """A reduced decode entropy-decodes every coefficient: what it keeps or rejects, and why, is Pillow's full decode's."""
    mutated = _mutations(400, large=True)
    reduced = [_verdict(data, reduce_to=128) for data in mutated]
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img, num=8: None)
    pillow = [_verdict(data, reduce_to=128) for data in mutated]
    differ = [i for i, (a, b) in enumerate(zip(reduced, pillow)) if a != b]
    assert not differ, [(i, reduced[i][0], pillow[i][0], reduced[i][1] if reduced[i][0] == "rejected" else "") for i in differ[:5]]
    kinds = {v[0] if v[0] == "kept" else v[1] for v in pillow}
    assert {"kept", "truncated", "corrupt"} <= kinds


def test_an_unusual_sampling_layout_gets_pillows_verdict_when_decoded_for_measures(monkeypatch):
    """Luma 1 x 1 under chroma 2 x 2: a decode of the luma alone skips the chroma upsampling that a colour decode needs.

    The reduced decode must not keep what the colour decode would refuse: it gives the verdict
    and the pixels Pillow's path gives (simplejpeg refuses the layout, so Pillow decodes it).
    """
    data = bytearray(_jpeg(4, (640, 480), quality=85, subsampling=2))
    sof = data.find(b"\xff\xc0")
    data[sof + 11], data[sof + 14] = 0x11, 0x22  # Y 2x2 -> 1x1, Cb 1x1 -> 2x2
    with Image.open(io.BytesIO(bytes(data))) as img:
        assert [layer[1:3] for layer in img.layer] == [(1, 1), (2, 2), (1, 1)]
    reduced = _verdict(bytes(data), reduce_to=128)
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda data, img, num=8: None)
    assert reduced == _verdict(bytes(data), reduce_to=128)
