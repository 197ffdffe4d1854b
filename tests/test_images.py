"""Unit tests for image validation and normalization (no storage, no pools)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgpipe.images import ImageRejected, sniff_format, to_8bit, validate_and_normalize
from tests import imagefactory as f


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageRejected) as info:
        validate_and_normalize(data, **kwargs)
    assert info.value.detail, "every reject carries a detail"
    return info.value.reason


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_plain_rgb_jpeg_keeps_original_bytes():
    data = f.jpeg()
    out = validate_and_normalize(data)
    assert out.data is data and out.changes == ()
    assert (out.width, out.height, out.mode, out.format) == (96, 64, "RGB", "jpeg")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_an_image"),
        (f.html_as_jpg(), "not_an_image"),
        (b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + bytes(100), "not_an_image"),
        (f.truncated_jpeg(), "truncated"),
        (f.jpeg()[:40], "truncated"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "corrupt"),
        (f.tiny_jpeg(), "too_small"),
    ],
    ids=["zero-bytes", "html-as-jpg", "mat-file", "truncated", "header-only", "jpeg-garbage-header", "tiny"],
)
def test_reject_reasons(data, reason):
    assert reason_of(data) == reason


def test_corrupt_entropy_data_is_rejected():
    assert reason_of(f.corrupt_jpeg()) in ("corrupt", "truncated")


def test_truncated_png_is_truncated():
    data = f.png_in_jpg()
    assert reason_of(data[: len(data) // 2]) == "truncated"


def test_decompression_bomb_rejected_before_decoding():
    bomb = f.png_bomb(30000)
    assert len(bomb) < 2_000_000  # 900 megapixels in a small file: a real bomb
    with pytest.raises(ImageRejected) as info:
        validate_and_normalize(bomb)
    assert info.value.reason == "too_large"
    assert "900000000" in info.value.detail or "pixels" in info.value.detail


def test_max_pixels_is_configurable():
    assert reason_of(f.jpeg(96, 64), max_pixels=96 * 64 - 1) == "too_large"
    assert validate_and_normalize(f.jpeg(96, 64), max_pixels=96 * 64).width == 96


def test_cmyk_becomes_rgb():
    out = validate_and_normalize(f.cmyk_jpeg())
    assert out.mode == "RGB" and "CMYK->RGB" in out.changes
    assert decode(out.data).mode == "RGB"


def test_grayscale_jpeg_becomes_rgb_for_colour_sets_and_stays_for_grayscale():
    out = validate_and_normalize(f.grayscale_jpeg())
    assert decode(out.data).mode == "RGB" and "L->RGB" in out.changes
    kept = validate_and_normalize(f.grayscale_jpeg(), grayscale=True)
    assert kept.mode == "L" and kept.changes == ()


def test_16bit_png_scaled_not_clipped():
    out = validate_and_normalize(f.png16())
    img = decode(out.data)
    assert img.mode == "RGB" and out.format == "png"
    arr = np.asarray(img.convert("L"))
    # 60000/65535*255 = 233; clipping would make it 255, and the random half would be mostly 255.
    assert 225 <= arr[:, :48].mean() <= 240
    assert 100 <= arr[:, 48:].mean() <= 160


def test_palette_with_transparency_composited_on_white():
    out = validate_and_normalize(f.palette_png_with_transparency())
    assert out.mode == "RGB" and any(c.startswith("P") for c in out.changes)
    assert decode(out.data).mode == "RGB"


def test_rgba_composited_on_white():
    out = validate_and_normalize(f.rgba_png())
    arr = np.asarray(decode(out.data))
    assert arr.shape == (64, 96, 3)
    assert (arr[:, 60:] == 255).all(), "fully transparent pixels become the white background"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(orientation):
    out = validate_and_normalize(f.exif_rotated_jpeg(orientation))
    expected = (96, 64) if orientation == 3 else (64, 96)
    assert (out.width, out.height) == expected
    img = decode(out.data)
    assert img.size == expected
    assert img.getexif().get(0x0112, 1) == 1, "orientation must not be applied twice downstream"


def test_exif_rotation_content_matches_manual_transpose():
    data = f.exif_rotated_jpeg(6)
    out = validate_and_normalize(data)
    manual = np.asarray(decode(data).transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    got = np.asarray(decode(out.data), dtype=np.int16)
    assert np.abs(manual - got).mean() < 3  # one extra JPEG generation at q95


def test_png_inside_jpg_name_is_fine_and_kept():
    data = f.png_in_jpg()
    out = validate_and_normalize(data)
    assert out.format == "png" and out.data is data


def test_grayscale_option_converts_rgb():
    out = validate_and_normalize(f.jpeg(), grayscale=True)
    assert out.mode == "L" and decode(out.data).mode == "L"


def test_to_8bit_float_and_int32():
    fimg = Image.fromarray(np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10), "F")
    arr = np.asarray(to_8bit(fimg))
    assert arr.min() == 0 and arr.max() == 255
    iimg = Image.fromarray(np.full((4, 4), 100, dtype=np.int32))
    assert np.asarray(to_8bit(iimg)).max() == 100


def test_sniff_format():
    assert sniff_format(f.jpeg()) == "jpeg"
    assert sniff_format(f.png_in_jpg()) == "png"
    assert sniff_format(f.html_as_jpg()) is None


def test_max_pixels_governs_not_pils_process_wide_default(monkeypatch):
    # PIL refuses by itself above 2x its global; the config's limit must win in every process.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    out = validate_and_normalize(f.jpeg(96, 64), max_pixels=96 * 64)
    assert out.width == 96
    assert Image.MAX_IMAGE_PIXELS == 100, "the global is restored"


# ----------------------------------------------------------------------------------------
# Only the decoders clean accepts: an EPS must never reach Ghostscript.

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        pytest.param(EPS, "eps", id="eps"),
        pytest.param(b"\xc5\xd0\xd3\xc6" + b"\x00" * 28 + EPS, "eps-binary-header", id="eps-binary-header"),
        pytest.param(b"Image type: RGB image\r\nName: x\r\nImage size (x*y): 64*64\r\n\x1a" + b"\x00" * 600, "im", id="im"),
    ],
)
def test_formats_outside_the_accepted_list_are_not_images_and_start_nothing(data, name, monkeypatch):
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name}: an external program was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)
    with pytest.raises(ImageRejected) as rejected:
        validate_and_normalize(data)
    assert rejected.value.reason == "not_an_image", rejected.value.detail
