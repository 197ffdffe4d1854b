"""Unit tests for image validation and normalization (no storage, no pools)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, features

from imgpipe.data import formats, images
from imgpipe.data.formats import sniff_format
from imgpipe.data.images import ImageRejected, to_8bit, validate_and_normalize
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
# Only the decoders clean accepts: an EPS must never reach Ghostscript; a real image in a
# format outside the accepted set is unsupported_format, named, and never parsed.

EPS = f.EPS
DEFAULT_ACCEPTED = "accepted: jpeg, png, gif, bmp, tiff, webp"
WITH_JPEG2000 = ("jpeg", "png", "gif", "bmp", "tiff", "webp", "jpeg2000")


def _refuse_programs(monkeypatch, name):
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name}: an external program was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)


def test_a_file_without_a_known_signature_is_not_an_image_and_starts_nothing(monkeypatch):
    # Pillow's IM format: a plugin Pillow has, a signature clean does not look for.
    _refuse_programs(monkeypatch, "im")
    im = b"Image type: RGB image\r\nName: x\r\nImage size (x*y): 64*64\r\n\x1a" + b"\x00" * 600
    assert reason_of(im) == "not_an_image"


UNSUPPORTED = [
    pytest.param(f.jpeg2000(), "JPEG2000", "jpeg2000", id="jp2"),
    pytest.param(f.jpeg2000(codestream=True), "JPEG2000", "jpeg2000", id="j2k"),
    pytest.param(f.icns(), "ICNS", "icns", id="icns"),
    pytest.param(f.encode(f.photo(48, 48), "ICO"), "ICO", "ico", id="ico"),
    pytest.param(f.encode(f.photo(48, 48), "QOI"), "QOI", "qoi", id="qoi"),
    pytest.param(f.encode(f.photo(48, 48), "SGI"), "SGI", "sgi", id="sgi"),
    pytest.param(f.encode(f.photo(48, 48), "PCX"), "PCX", "pcx", id="pcx"),
    pytest.param(f.encode(f.photo(48, 48), "DDS"), "DDS", "dds", id="dds"),
    pytest.param(f.encode(f.photo(48, 48), "PPM"), "PPM", "ppm", id="ppm"),
    pytest.param(b"8BPS\x00\x01" + bytes(40), "PSD", "psd", id="psd"),
    pytest.param(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "AVIF", "avif", id="avif"),
]
NEVER = [
    pytest.param(EPS, "EPS", "Ghostscript", id="eps"),
    pytest.param(b"\xc5\xd0\xd3\xc6" + b"\x00" * 28 + EPS, "EPS", "Ghostscript", id="eps-binary-header"),
    pytest.param(f.heic_header(), "HEIF", "no HEIF/HEIC decoder", id="heic"),
    pytest.param(bytes(128) + b"DICM" + bytes(64), "DICOM", "pydicom", id="dicom"),
]


def _unsupported(data, monkeypatch, **kwargs):
    """The reject of ``data``, with Image.open made to fail: no plugin may parse the file."""

    def no_plugin(*args, **kw):
        raise AssertionError("the file reached Image.open")

    monkeypatch.setattr(images.Image, "open", no_plugin)
    with pytest.raises(ImageRejected) as info:
        validate_and_normalize(data, **kwargs)
    return info.value


@pytest.mark.parametrize(("data", "shown", "name"), UNSUPPORTED)
def test_a_real_image_in_a_format_not_accepted_is_unsupported_format_and_never_parsed(data, shown, name, monkeypatch):
    rejected = _unsupported(data, monkeypatch)
    assert rejected.reason == "unsupported_format"
    assert rejected.detail == (f"{shown} is not an accepted format ({DEFAULT_ACCEPTED}); add it with --set formats=jpeg,png,gif,bmp,tiff,webp,{name}")
    assert sniff_format(data) == name


@pytest.mark.parametrize(("data", "shown", "why"), NEVER)
def test_formats_clean_never_decodes_are_unsupported_and_start_nothing(data, shown, why, monkeypatch):
    _refuse_programs(monkeypatch, shown)
    rejected = _unsupported(data, monkeypatch, formats=formats.DECODABLE_FORMATS)
    assert rejected.reason == "unsupported_format"
    assert rejected.detail.startswith(f"{shown} is not an accepted format (accepted: jpeg, png,") and why in rejected.detail
    assert "--set formats" not in rejected.detail, "no advice to accept what cannot be accepted"


def test_the_accepted_set_is_the_callers_choice(monkeypatch):
    # Taking JPEG 2000 in does not make PNG welcome when it is left out.
    rejected = _unsupported(f.png_in_jpg(), monkeypatch, formats=("jpeg", "jpeg2000"))
    assert rejected.reason == "unsupported_format"
    assert rejected.detail == "PNG is not an accepted format (accepted: jpeg, jpeg2000); add it with --set formats=jpeg,jpeg2000,png"


@pytest.mark.skipif(not features.check("jpg_2000"), reason="this Pillow has no OpenJPEG codec")
@pytest.mark.parametrize("codestream", [False, True], ids=["jp2", "j2k"])
def test_jpeg2000_decodes_once_accepted_and_is_stored_as_png(codestream):
    data = f.jpeg2000(96, 64, seed=3, codestream=codestream)
    out = validate_and_normalize(data, formats=WITH_JPEG2000)
    assert (out.width, out.height, out.mode, out.format, out.changes) == (96, 64, "RGB", "png", ("jpeg2000->png",))
    source = np.asarray(decode(data), dtype=np.int16)
    assert np.abs(np.asarray(decode(out.data), dtype=np.int16) - source).max() == 0, "stored losslessly"


def test_an_accepted_format_that_does_not_parse_is_corrupt():
    broken = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40
    assert reason_of(broken, formats=WITH_JPEG2000) == "corrupt"
    assert reason_of(broken) == "unsupported_format"


def test_check_formats_at_the_edge(monkeypatch):
    assert formats.check_formats(["JPEG", "png", "jpeg"]) == ("jpeg", "png")
    assert formats.check_formats(formats.DEFAULT_FORMATS) == formats.DEFAULT_FORMATS
    with pytest.raises(ValueError, match=r"unknown format 'jpg'; valid formats are jpeg, png, gif, bmp, tiff, webp, jpeg2000, "):
        formats.check_formats(["jpeg", "jpg"])
    with pytest.raises(ValueError, match="cannot accept 'eps'.*Ghostscript"):
        formats.check_formats(["jpeg", "eps"])
    with pytest.raises(ValueError, match="at least one format"):
        formats.check_formats([])
    with pytest.raises(TypeError, match="list of format names"):
        formats.check_formats("jpeg,png")
    with pytest.raises(ValueError, match="unknown format"):
        validate_and_normalize(f.jpeg(), formats=("jpeg", "tga"))
    monkeypatch.setattr(formats.features, "check", lambda name: False)
    with pytest.raises(ValueError, match=r"'jpeg2000' needs Pillow built with its jpg_2000 codec"):
        formats.check_formats(WITH_JPEG2000)


def test_signatures_that_are_not_images():
    assert sniff_format(b"\n\nplain text that starts with newlines") is None  # not a PCX
    assert sniff_format(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2mp41" + bytes(16)) is None  # MP4 video
    assert sniff_format(b"P6 is a paragraph of text") is None  # not a PPM
    assert sniff_format(b"P5\n# a comment\n64 64\n255\n") == "ppm"


# ----------------------------------------------------------------------------------------
# Memory: to_8bit in row blocks, and a per-image budget checked from the header.


def _reference_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """to_8bit's documented mapping on a whole array, with negatives clipped to 0."""
    if mode == "F":
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        scaled = (arr - lo) / (hi - lo) * np.float32(255) if hi > lo else np.zeros_like(arr)
        return np.clip(np.nan_to_num(scaled).round(), 0, 255).astype(np.uint8)
    wide = arr.astype(np.int64)
    if mode.startswith("I;16") or wide.max() > 255:
        wide = wide * 255 // max(65535, int(wide.max()))
    return np.clip(wide, 0, 255).astype(np.uint8)


def test_to_8bit_memory_is_about_its_8bit_result():
    import tracemalloc

    arr = np.random.default_rng(0).integers(0, 65536, (2000, 2000), dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    tracemalloc.start()
    try:
        out = to_8bit(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Whole-image int64 copies cost ~17 bytes per pixel; the 8-bit result is 1.
    assert peak / arr.size < 4, f"{peak / arr.size:.1f} bytes per pixel"
    assert np.array_equal(np.asarray(out), _reference_8bit(arr, "I;16"))


@pytest.mark.parametrize(
    "arr",
    [
        np.random.default_rng(1).integers(0, 65536, (37, 23), dtype=np.uint16),
        np.random.default_rng(2).integers(-9, 10**7, (37, 23), dtype=np.int32),
        np.random.default_rng(3).integers(0, 256, (37, 23), dtype=np.int32),
        np.where(np.eye(37, 23, dtype=bool), np.nan, np.random.default_rng(4).random((37, 23))).astype(np.float32),
    ],
    ids=["I;16", "I-wide", "I-8bit", "F-with-nan"],
)
def test_to_8bit_blocks_join_into_the_whole_image_mapping(arr, monkeypatch):
    from imgpipe.data import modes

    monkeypatch.setattr(modes, "_BLOCK_BYTES", 23 * 8 * 5)  # 5 rows a block, the last one short
    img = Image.fromarray(arr)
    assert np.array_equal(np.asarray(to_8bit(img)), _reference_8bit(arr, img.mode))


def test_to_8bit_clips_negative_values_instead_of_wrapping():
    img = Image.fromarray(np.array([[-5, 1000, 70000, 0]] * 3, dtype=np.int32))
    out = np.asarray(to_8bit(img))
    assert out[:, 0].tolist() == [0, 0, 0], "a negative value is black, not 255 by wrapping around"
    assert out[0].tolist() == [0, 1000 * 255 // 70000, 255, 0]


def test_memory_budget_rejects_from_the_header_before_decoding(monkeypatch):
    from imgpipe.data import images

    def no_decoding(img):
        raise AssertionError("the budget must be checked before any pixel is decoded")

    monkeypatch.setattr(images, "_decode", no_decoding)
    data = f.png_bomb(4000)  # 16 megapixels of L in a 16 kB file
    need = images.decode_bytes(Image.open(io.BytesIO(data)))
    with pytest.raises(ImageRejected) as info:
        validate_and_normalize(data, max_decode_bytes=need - 1)
    assert info.value.reason == "too_large"
    assert f"({need} bytes)" in info.value.detail and f"({need - 1} bytes)" in info.value.detail
    assert "more memory or fewer workers" in info.value.detail


def test_memory_budget_depends_on_the_mode_and_target():
    from imgpipe.data.images import decode_bytes

    rgba, gray = Image.open(io.BytesIO(f.rgba_png())), Image.open(io.BytesIO(f.grayscale_jpeg()))
    assert rgba.size == gray.size and (rgba.mode, gray.mode) == ("RGBA", "L")
    # L kept as L needs the fewest bytes; compositing alpha onto RGB the most.
    assert decode_bytes(gray, grayscale=True) < decode_bytes(gray) < decode_bytes(rgba)
    budget = decode_bytes(gray)
    assert validate_and_normalize(f.grayscale_jpeg(), max_decode_bytes=budget).mode == "RGB"
    assert reason_of(f.rgba_png(), max_decode_bytes=budget) == "too_large"
    assert validate_and_normalize(f.rgba_png(), max_decode_bytes=None).mode == "RGB"
    with pytest.raises(ValueError, match="max_decode_bytes"):
        validate_and_normalize(f.jpeg(), max_decode_bytes=-1)


def test_memory_estimate_counts_a_progressive_jpegs_coefficients():
    from imgpipe.data.images import decode_bytes

    def jpeg(**kwargs) -> Image.Image:
        buf = io.BytesIO()
        f.photo(96, 64, 0).save(buf, "JPEG", subsampling=0, **kwargs)
        return Image.open(io.BytesIO(buf.getvalue()))

    # libjpeg holds 2 bytes per sample until the last scan: 4 + 2 * 3 per pixel, grayscale or not.
    assert decode_bytes(jpeg(progressive=True), grayscale=True) == 96 * 64 * 10
    assert decode_bytes(jpeg(), grayscale=True) == 96 * 64 * 8  # the image and a rotated copy
