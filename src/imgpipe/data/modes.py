"""Mode normalization: what every decoded image is made into (8-bit RGB, or L), and the memory that takes.

    img, changes = normalize_mode(img, grayscale=False)   # e.g. ["I;16->L"], ["RGBA->RGB"]
    need = decode_bytes(header, grayscale=False)         # bytes, from the header alone

:func:`imgpipe.data.images.validate_and_normalize` applies these after its full decode, and
checks :func:`decode_bytes` against the per-image memory budget before it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

__all__ = ["HIGH_BIT_MODES", "to_8bit", "flatten_alpha", "first_conversion", "normalize_mode", "target_mode", "decode_bytes"]

# Modes that to_8bit maps to L, and modes whose alpha flatten_alpha composites away.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# Memory per pixel, the table decode_bytes estimates from. Pillow stores "1", "L" and "P"
# in one byte per pixel, the 16-bit modes in two, and every other mode, RGB included, in
# a 32-bit word (libImaging/Storage.c, ImagingNewPrologueSubtype).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_WORD_BYTES = 4
# Per first conversion of _normalize_mode: the mode it produces and the bytes per pixel it
# holds beside the decoded image. to_8bit holds its 8-bit result (its scratch is bounded by
# _BLOCK_BYTES); flatten_alpha an RGBA copy, the background and the composite, then the RGB.
_CONVERSIONS: dict[str, tuple[str, int]] = {
    "to_8bit": ("L", 1),
    "flatten_alpha": ("RGB", 4 * _WORD_BYTES),
    "1->L": ("L", 1),
}
# libjpeg keeps every DCT coefficient of a progressive JPEG until its last scan: two bytes
# per sample, at most one sample per band and pixel (no chroma subsampling).
_PROGRESSIVE_JPEG_BYTES = 2
# Encoding holds the encoder's output twice (the growing BytesIO, then getvalue's copy), at
# worst one byte per channel for an incompressible PNG.
_ENCODE_COPIES = 2

# to_8bit converts this many bytes of its widest scratch array (int64) at a time: a 16-bit
# conversion costs its 8-bit result plus a constant, not whole-image int64 copies.
_BLOCK_BYTES = 1 << 20


def to_8bit(img: Image.Image) -> Image.Image:
    """Maps 16/32-bit integer and float images to 8-bit ``L`` without clipping the range.

    PIL's own ``convert('L')`` on ``I;16`` clips values above 255 to white, which turns
    most 16-bit photographs into a blank image; scale by the container's range instead:
    ``I;16`` by 65535, ``I`` by 65535 (or its peak, when larger) once its peak passes 255,
    ``F`` from its minimum to its maximum. Negative values become 0.

    Rows are converted a block at a time into the preallocated result, so the memory on
    top of the 8-bit result is bounded by :data:`_BLOCK_BYTES`, whatever the image size.
    """
    out = np.empty((img.height, img.width), dtype=np.uint8)
    if img.mode == "F":
        lo, hi = _float_range(img)
        for top, block in _row_blocks(img):
            out[top : top + len(block)] = _scale_float(block, lo, hi)
    else:
        full: int | None = 65535  # a 16-bit container's range
        if not img.mode.startswith("I;16"):
            peak = max((int(block.max()) for _, block in _row_blocks(img)), default=0)
            # I values up to 255 are 8-bit already; above, I is a 16-bit image or wider.
            full = max(65535, peak) if peak > 255 else None
        for top, block in _row_blocks(img):
            out[top : top + len(block)] = _scale_int(block, full)
    return Image.fromarray(out, "L")


def _row_blocks(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first row, pixels)`` of consecutive row blocks; only a block is ever copied.

    ``np.asarray(img)`` would copy the whole image twice over (Pillow's ``tobytes`` joins
    its chunks), so each block is cropped first.
    """
    width, height = img.size
    rows = max(1, _BLOCK_BYTES // (np.dtype(np.int64).itemsize * max(width, 1)))
    for top in range(0, height, rows):
        yield top, np.asarray(img.crop((0, top, width, min(top + rows, height))))


def _float_range(img: Image.Image) -> tuple[float, float]:
    """Smallest and largest value of a float image, ignoring NaN (NaN if all are)."""
    lo, hi = np.nan, np.nan
    for _, block in _row_blocks(img):
        lo = float(np.fmin(lo, np.fmin.reduce(block, axis=None)))
        hi = float(np.fmax(hi, np.fmax.reduce(block, axis=None)))
    return lo, hi


def _scale_float(block: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:  # one value throughout, or all NaN
        return np.zeros(block.shape, dtype=np.uint8)
    work = block.astype(np.float32)
    work -= lo
    work /= hi - lo
    work *= 255.0
    np.nan_to_num(work, copy=False)
    return np.clip(work.round(out=work), 0, 255, out=work).astype(np.uint8)


def _scale_int(block: np.ndarray, full: int | None) -> np.ndarray:
    # int64: a 32-bit I value times 255 overflows int32.
    work = block.astype(np.int64)
    if full is not None:
        work *= 255
        work //= full
    return np.clip(work, 0, 255, out=work).astype(np.uint8)


def flatten_alpha(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composites an image with transparency onto a solid background, returning RGB.

    Dropping the alpha channel instead would expose whatever colour the encoder left in
    fully transparent pixels (often black), which is noise for a classifier.
    """
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def first_conversion(img: Image.Image) -> str | None:
    """The first conversion :func:`normalize_mode` applies to ``img``; its header suffices."""
    if img.mode in HIGH_BIT_MODES:
        return "to_8bit"
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return "flatten_alpha"
    if img.mode == "1":
        return "1->L"
    return None


def normalize_mode(img: Image.Image, grayscale: bool) -> tuple[Image.Image, list[str]]:
    changes: list[str] = []
    mode = img.mode
    conversion = first_conversion(img)
    if conversion == "to_8bit":
        img = to_8bit(img)
        changes.append(f"{mode}->L")
    elif conversion == "flatten_alpha":
        img = flatten_alpha(img)
        changes.append("P+alpha->RGB" if mode == "P" else f"{mode}->RGB")
    elif conversion == "1->L":
        img = img.convert("L")
        changes.append("1->L")
    target = target_mode(grayscale)
    if img.mode != target:
        # CMYK, P, YCbCr, LAB, HSV, RGBX, and L->RGB for colour datasets.
        changes.append(f"{img.mode}->{target}")
        img = img.convert(target)
    return img, changes


def target_mode(grayscale: bool) -> str:
    return "L" if grayscale else "RGB"


def decode_bytes(img: Image.Image, grayscale: bool = False) -> int:
    """Estimates the peak memory that decoding and normalizing an opened image takes.

    Reads only the header (mode, size, transparency, progressive), so it is known before
    any pixel is decoded. The peak is the largest of four phases: decoding (the image, and
    a progressive JPEG's coefficients); the decoded image and a rotated copy (EXIF
    orientation); the decoded image and what its conversion to the target mode holds; the
    normalized image and the encoder's output. The encoded input itself is not counted.

    Args:
        img: An image from ``Image.open``, loaded or not.
        grayscale: Whether the target mode is ``L`` rather than ``RGB``.

    Returns:
        Bytes, from :data:`_STORED_BYTES` and :data:`_CONVERSIONS` times the pixel count.
    """
    decoded = _stored_bytes(img.mode)
    target = target_mode(grayscale)
    conversion = first_conversion(img)
    produced, held = _CONVERSIONS[conversion] if conversion else (img.mode, 0)
    if produced != target:
        held += _stored_bytes(target)
        if Image.getmodebase(produced) not in (produced, target):
            # Without a direct path Pillow converts through the base mode: CMYK->L via RGB.
            held += _stored_bytes(Image.getmodebase(produced))
    decoding = decoded
    if img.format == "JPEG" and img.info.get("progressive"):
        decoding += _PROGRESSIVE_JPEG_BYTES * len(img.getbands())
    encode = _stored_bytes(target) + _ENCODE_COPIES * Image.getmodebands(target)
    return img.width * img.height * max(decoding, 2 * decoded, decoded + held, encode)


def _stored_bytes(mode: str) -> int:
    return _STORED_BYTES.get(mode, _WORD_BYTES)
