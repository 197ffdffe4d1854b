"""Only the part of a JPEG that a resize reads, decoded alone (issue 50, item 5).

The resize of :mod:`imgpipe.resize.ops` reads a box of the picture and what its filter reaches
beyond it: a centre crop leaves the sides and the top and bottom unread. For an RGB or L JPEG
(what clean stores) and no ``roi_crop``, :func:`decode_window` decodes that window alone with
:func:`imgpipe.data.jpeg_region.decode_scaled`, at the scale the whole decode would have used
(full size for OpenCV's warp; for Pillow's filter, the scale Pillow's own ``draft`` picked), so the resize that
follows sees the same pixels and gives the same output, bit for bit
(``tests/resize/test_jpeg_window.py``).

* :func:`applies`: whether an image gets this path.
* :func:`window_around`: a box widened by a margin, within the image.
* :func:`decode_window`: the window's pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from imgpipe.data import jpeg_region
from imgpipe.resize.spec import Geometry, ResizeError

__all__ = ["applies", "decode_window", "window_around"]


def applies(img: Image.Image, geometry: Geometry) -> bool:
    """An RGB or L JPEG without a ``roi_crop`` region, and the region decoder built."""
    return jpeg_region.AVAILABLE and img.format == "JPEG" and img.mode in ("RGB", "L") and geometry.region is None


def window_around(box: tuple[float, float, float, float], size: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """``box`` (floats) widened by ``margin`` pixels on each side, in integers, within ``size`` (width, height)."""
    x0, y0, x1, y1 = box
    width, height = size
    return max(0, math.floor(x0) - margin), max(0, math.floor(y0) - margin), min(width, math.ceil(x1) + margin), min(height, math.ceil(y1) + margin)


def decode_window(data: bytes, mode: str, size: tuple[int, int], window: tuple[int, int, int, int], num: int) -> np.ndarray:
    """``window`` of the ``size`` (width, height, full scale) JPEG decoded at ``num/8``: ``H x W x C`` uint8 (C = 3 for RGB, 1 for L).

    Raises:
        ResizeError: ``undecodable``, for bytes the decoder refuses or a truncated file.
    """
    shape = (size[1], size[0], 1 if mode == "L" else 3)
    try:
        return jpeg_region.decode_scaled(data, shape, window, num)
    except ValueError as exc:
        raise ResizeError("undecodable", str(exc)) from None
