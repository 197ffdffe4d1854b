"""One region of a JPEG decoded at one of libjpeg-turbo's DCT scales, and nothing below it.

A RandomResizedCrop keeps a box of the image; a whole decode pays for every pixel. libjpeg-turbo's
libjpeg API can do less (``jpeg_skip_scanlines``, ``jpeg_crop_scanline``): the rows above the box
are only entropy-decoded, the rows below it are never read, and the columns left and right of it
skip the IDCT, the upsampling and the colour conversion. The C extension
:mod:`imgpipe.data._jpeg_region` (``src/imgpipe/data/_jpeg_region.c``) calls it with the GIL
released; the pixels are those of a whole decode at the same scale, cut to the box, bit for bit
(``tests/data/test_jpeg_region.py``, against simplejpeg and torchvision's ``decode_jpeg``).

* :func:`scale_for`: the smallest ``n/8`` scale whose image is at least ``need`` pixels.
* :func:`decode_box`: a box of the full-size image, decoded at a scale.
* :func:`decode_scaled`: a window of the scaled image, decoded exactly (the resize's reads).
* :func:`reduced_scale`: the scale a box needs to stay a given number of times its output.

Where the extension was not built (no compiler or no libjpeg headers at install time: it is
optional), :func:`decode_box` decodes the whole image with simplejpeg and cuts the box: the same
pixels, slower; :data:`AVAILABLE` says which, and the first call logs it once.
"""

from __future__ import annotations

import logging
import math

import numpy as np

try:
    from imgpipe.data import _jpeg_region
except ImportError:  # the optional extension was not built
    _jpeg_region = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "decode_box", "decode_scaled", "reduced_scale", "scale_for", "scaled_size"]

log = logging.getLogger(__name__)

AVAILABLE = _jpeg_region is not None

# How far from the end of a JPEG its end-of-image marker may lie (trailing padding). The decoder
# stops at the box's last row, so a file cut short below the box would decode; without the
# marker it is refused whatever the box, as a whole decode refuses it (every epoch alike).
EOI_WITHIN = 64

# Columns decoded on each side of a box beyond it: libjpeg's fancy upsampling of a chroma edge
# reads one neighbour, which a decode cut at the box's own edge would replicate instead.
MARGIN = 1

_told = False


def scaled_size(height: int, width: int, num: int) -> tuple[int, int]:
    """The size libjpeg gives an image decoded at ``num/8`` (each side rounded up)."""
    return -(-height * num // 8), -(-width * num // 8)


def scale_for(height: int, width: int, need_h: int, need_w: int) -> int:
    """The smallest ``num`` (1..8) whose ``num/8`` scale keeps the image at least ``need_h x need_w``."""
    for num in range(1, 8):
        h, w = scaled_size(height, width, num)
        if h >= need_h and w >= need_w:
            return num
    return 8


def decode_box(data: np.ndarray | bytes, shape: tuple[int, int, int], box: tuple[int, int, int, int], num: int = 8) -> np.ndarray:
    """The pixels of ``box`` (``x1, y1, x2, y2`` of the full-size image) at scale ``num/8``, ``h x w x C`` uint8.

    At a scale below 1 the box's edges are rounded outwards to the scaled image's pixels
    (under one scaled pixel more on each side). ``shape`` is the row's (height, width,
    channels): a JPEG whose header says another size is refused before anything is decoded
    for it, so a decode never allocates more than the row's recorded size.

    Raises:
        ValueError: For a box outside the image, bytes the decoder refuses (corrupt within
            the box), bytes without an end-of-image marker (truncated), or a header of
            another size than ``shape``.
    """
    height, width, _ = shape
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"no box {box} in a {width}x{height} image")
    if not 1 <= num <= 8:
        raise ValueError(f"no DCT scale {num}/8 (1/8 to 8/8)")
    if _jpeg_region is None:
        return _whole_then_cut(data, shape, box, num)
    sh, sw = scaled_size(height, width, num)
    return decode_scaled(data, shape, _scaled_box(box, height, width, sh, sw), num)


def decode_scaled(data: np.ndarray | bytes, shape: tuple[int, int, int], window: tuple[int, int, int, int], num: int) -> np.ndarray:
    """The pixels of ``window`` (``left, top, right, bottom``) of the image decoded at ``num/8`` (:func:`scaled_size`), exactly.

    Needs the extension (:data:`AVAILABLE`). ``shape`` is the row's, as for :func:`decode_box`.

    Raises:
        ValueError: As :func:`decode_box`, and for a window outside the scaled image.
    """
    if _jpeg_region is None:
        raise RuntimeError("imgpipe.data._jpeg_region was not built: decode_scaled needs it (decode_box falls back)")
    height, width, channels = shape
    sh, sw = scaled_size(height, width, num) if 1 <= num <= 8 else (0, 0)
    left, top, right, bottom = window
    if not (0 <= left < right <= sw and 0 <= top < bottom <= sh):
        raise ValueError(f"no window {window} in a {width}x{height} image at scale {num}/8 ({sw}x{sh})")
    if b"\xff\xd9" not in bytes(data[-EOI_WITHIN:]):
        raise ValueError("JPEG: truncated (no end-of-image marker)")
    wide_left, wide_right = max(0, left - MARGIN), min(sw, right + MARGIN)
    buf, rows, columns, first = _jpeg_region.decode_region(data, height, width, top, wide_left, bottom, wide_right, num, channels == 1)
    decoded = np.frombuffer(buf, np.uint8).reshape(rows, columns, 1 if channels == 1 else 3)
    return decoded[:, left - first : right - first]


def _whole_then_cut(data: np.ndarray | bytes, shape: tuple[int, int, int], box: tuple[int, int, int, int], num: int) -> np.ndarray:
    """:func:`decode_box` without the extension: simplejpeg decodes the whole image (at ``num/8`` or the nearest larger scale it offers)."""
    import simplejpeg

    global _told
    if not _told:
        _told = True
        log.warning(
            "imgpipe.data._jpeg_region was not built (no C compiler or libjpeg headers when imgpipe was installed): "
            "JPEG crops decode the whole image (same pixels, slower); install libjpeg62-turbo-dev and reinstall imgpipe"
        )
    height, width, channels = shape
    colorspace = "GRAY" if channels == 1 else "RGB"
    header_h, header_w, _, _ = simplejpeg.decode_jpeg_header(data)
    if (header_h, header_w) != (height, width):
        raise ValueError(f"JPEG: a {header_w}x{header_h} JPEG, its row says {width}x{height}")
    if num == 8:
        image = simplejpeg.decode_jpeg(data, colorspace=colorspace)
    else:
        need_h, need_w = scaled_size(height, width, num)
        image = simplejpeg.decode_jpeg(data, colorspace=colorspace, min_height=need_h, min_width=need_w)
    left, top, right, bottom = _scaled_box(box, height, width, image.shape[0], image.shape[1])
    return image[top:bottom, left:right]


def _scaled_box(box: tuple[int, int, int, int], height: int, width: int, sh: int, sw: int) -> tuple[int, int, int, int]:
    """``box`` of the ``height x width`` image on its ``sh x sw`` scaled decode, edges rounded outwards."""
    x1, y1, x2, y2 = box
    return x1 * sw // width, y1 * sh // height, -(-x2 * sw // width), -(-y2 * sh // height)


def reduced_scale(height: int, width: int, box: tuple[int, int, int, int], out_size: tuple[int, int], keep: float) -> int:
    """The scale ``num`` that keeps ``box`` at least ``keep`` times ``out_size`` (height, width) after decoding; 8 where none below does."""
    x1, y1, x2, y2 = box
    need_h = math.ceil(height * keep * out_size[0] / (y2 - y1))
    need_w = math.ceil(width * keep * out_size[1] / (x2 - x1))
    if need_h >= height * 7 / 8 or need_w >= width * 7 / 8:
        return 8
    return scale_for(height, width, need_h, need_w)
