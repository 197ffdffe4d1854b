"""Only the part of a JPEG that a resize reads, decoded alone (issue 50, item 5).

The resize of :mod:`imgpipe.resize.ops` reads a box of the picture and what its filter reaches
beyond it: a centre crop leaves the sides and the top and bottom unread. For an RGB or L JPEG
(what clean stores) and no ``roi_crop``, :func:`decode_window` decodes that window alone with
:func:`imgpipe.data.jpeg_region.decode_scaled`, at the scale the whole decode would have used
(full size for OpenCV's warp, Pillow's power-of-two draft for its filter), so the resize that
follows sees the same pixels and gives the same output, bit for bit
(``tests/resize/test_jpeg_window.py``).

* :func:`applies`: whether an image gets this path.
* :func:`draft_num`: the ``n/8`` scale Pillow's ``draft`` would have picked.
* :func:`window_around`: a box widened by a margin, within the image.
* :func:`decode_window`: the window's pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from imgpipe.data import jpeg_region
from imgpipe.resize.spec import Geometry, ResizeError

__all__ = ["applies", "decode_window", "draft_num", "window_around"]


def applies(img: Image.Image, geometry: Geometry) -> bool:
    """An RGB or L JPEG without a ``roi_crop`` region, and the region decoder built."""
    return jpeg_region.AVAILABLE and img.format == "JPEG" and img.mode in ("RGB", "L") and geometry.region is None


def draft_num(img: Image.Image, need: float) -> int:
    """``n`` of the ``n/8`` scale ``img.draft(mode, need * size)`` picks: the strongest of 1/8, 1/4, 1/2, 1 keeping ``need``.

    Pillow's rule (``JpegImageFile.draft``): the largest of 8, 4, 2, 1 that divides each side
    of the image at most as often as the requested size fits in it.
    """
    request = (max(1, math.ceil(img.width * need)), max(1, math.ceil(img.height * need)))
    fits = min(img.width // request[0], img.height // request[1])
    return 8 // next(s for s in (8, 4, 2, 1) if fits >= s)


def window_around(box: tuple[float, float, float, float], size: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """``box`` (floats) widened by ``margin`` pixels on each side, in integers, within ``size`` (width, height)."""
    x0, y0, x1, y1 = box
    width, height = size
    return max(0, math.floor(x0) - margin), max(0, math.floor(y0) - margin), min(width, math.ceil(x1) + margin), min(height, math.ceil(y1) + margin)


def decode_window(data: bytes, img: Image.Image, window: tuple[int, int, int, int], num: int) -> np.ndarray:
    """``window`` of ``img`` decoded at ``num/8``: ``H x W x C`` uint8 (C = 3 for RGB, 1 for L).

    Raises:
        ResizeError: ``undecodable``, for bytes the decoder refuses or a truncated file.
    """
    shape = (img.height, img.width, 1 if img.mode == "L" else 3)
    try:
        return jpeg_region.decode_scaled(data, shape, window, num)
    except ValueError as exc:
        raise ResizeError("undecodable", str(exc)) from None
