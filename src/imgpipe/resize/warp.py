"""OpenCV's antialiased bilinear resizes: a sub-pixel box (:func:`warp_resize`), a whole array (:func:`shrink`).

:mod:`imgpipe.resize.ops` uses :func:`warp_resize` where the box is within :data:`WARP_MAX_SCALE`
source pixels per output pixel (no JPEG draft would help); docs/internals/resize.md, "imgpipe.resize.ops",
says how it compares with PIL's filter. The train step's RandomResizedCrop
(:mod:`imgpipe.train.augment_cpu`) uses :func:`shrink` where a crop is larger than the output.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["ANTIALIAS_K", "WARP_MAX_SCALE", "hwc", "shrink", "warp_margin", "warp_resize", "within_warp"]


def hwc(arr: np.ndarray) -> np.ndarray:
    """OpenCV drops a trailing channel axis of 1; put it back."""
    return arr[:, :, None] if arr.ndim == 2 else arr


# Antialiasing of the fast path: a Gaussian of sigma ANTIALIAS_K * sqrt(s^2 - 1) per axis
# before bilinear sampling (s source pixels per output pixel; skimage's and kornia's
# antialiased rescale use the same form). Bilinear sampling is itself a triangle of
# half-width 1; the prefilter widens it to about what PIL's bilinear filter of support s
# applies. 0.5 gave the smallest difference from PIL on real photos (MAD 0.55 mean, 1.05
# at worst at 0.2 MP; 0.4 and 0.6 gave 0.74 and 0.86).
ANTIALIAS_K = 0.5
# Up to this many source pixels per output pixel the prefilter stays within ~0.5 grey
# levels of PIL's filter; beyond it (large PNGs, ratios a JPEG draft would have cut) the
# Gaussian and PIL's triangle part ways (MAD 2.35 at 10x), so PIL resizes. After a draft,
# PIL resizes too: the reduced decode already spends the error budget.
WARP_MAX_SCALE = 2.0


def _sigma(scale: float) -> float:
    return ANTIALIAS_K * math.sqrt(scale * scale - 1.0) if scale > 1.0 else 0.0


def _blur(arr: np.ndarray, sig_x: float, sig_y: float) -> np.ndarray:
    kx, ky = 2 * round(2 * sig_x) + 1, 2 * round(2 * sig_y) + 1
    return cv2.GaussianBlur(arr, (kx, ky), sigmaX=sig_x or 1e-6, sigmaY=sig_y or 1e-6, borderType=cv2.BORDER_REPLICATE)


def warp_resize(arr: np.ndarray, box: tuple[float, float, float, float], out_size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
    """Antialiased bilinear resize of the sub-pixel ``box`` of ``arr`` to ``out_size``, with OpenCV.

    The same geometry as ``PIL.Image.resize(size, BILINEAR, box=box)`` (output pixel
    centres map to the same source points) at about half its cost: a Gaussian prefilter
    (:data:`ANTIALIAS_K`) on the box and a small margin, then ``cv2.warpAffine`` sampling.
    Pixels beyond the edges of ``arr`` repeat the edge, so a caller that must keep pixels
    outside a region out of the output passes only that region.

    Args:
        arr: ``H x W x C`` uint8 (C = 1 or 3).
        box: (left, upper, right, lower) in ``arr`` pixels.
        out_size: (width, height) of the output.
        dst: An ``height x width x C`` uint8 array to write into, or None.

    Returns:
        ``height x width x C`` uint8 (``dst`` where one is given).
    """
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / out_size[0], (y1 - y0) / out_size[1]
    sig_x, sig_y = _sigma(sx), _sigma(sy)
    if box == (0.0, 0.0, float(arr.shape[1]), float(arr.shape[0])):
        # The whole array (whole, fixed and pad modes): cv2.resize maps output pixel
        # centres onto the same source points as the warp below and repeats the edge
        # too, at about 2/3 of warpAffine's cost (separable tables, no per-pixel map).
        if sig_x or sig_y:
            arr = _blur(arr, sig_x, sig_y)
        return hwc(cv2.resize(arr, out_size, dst=dst, interpolation=cv2.INTER_LINEAR))
    # Only the box and what the filters reach beyond it are touched.
    margin = warp_margin(box, out_size)
    left, top = max(0, math.floor(x0) - margin), max(0, math.floor(y0) - margin)
    right, bottom = min(arr.shape[1], math.ceil(x1) + margin), min(arr.shape[0], math.ceil(y1) + margin)
    sub = arr[top:bottom, left:right]
    if sig_x or sig_y:
        sub = _blur(sub, sig_x, sig_y)
    # Output pixel (u, v) samples the source at x0 + (u + 0.5) * sx - 0.5 (pixel centres).
    matrix = np.array([[sx, 0.0, x0 - left + 0.5 * sx - 0.5], [0.0, sy, y0 - top + 0.5 * sy - 0.5]])
    out = cv2.warpAffine(sub, matrix, out_size, dst=dst, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return hwc(out)


def shrink(arr: np.ndarray, out_size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
    """The whole of ``arr`` resized to ``out_size`` (width, height), antialiased on each axis it shrinks.

    Per axis, while the array is at least twice the output, a two-pixel average
    (``cv2.INTER_AREA``'s integer path, which leaves out an odd last row or column); then
    :func:`warp_resize` of the input's own extent in what is left (under 2 source pixels per
    output pixel: the Gaussian prefilter and bilinear sampling, the edge repeated where a
    dropped row or column was). An axis that does not shrink is sampled bilinearly.

    It is as close to torchvision's ``resized_crop(antialias=True)`` (PIL's triangle filter)
    as ``cv2.INTER_AREA`` is, at a quarter to a half of its cost at the non-integer ratios of
    random crops, where OpenCV's area resize takes a slow general path
    (``tests/resize/test_shrink.py``; docs/benchmarks.md, "The CPU recipe per sample").

    Args:
        arr: ``H x W x C`` uint8 (C = 1 or 3); a view is read within its own bounds.
        out_size: (width, height) of the output.
        dst: An ``height x width x C`` uint8 array to write into (a batch's row), or None.

    Returns:
        ``height x width x C`` uint8: ``dst`` where one is given.
    """
    out_w, out_h = out_size
    h, w = arr.shape[:2]
    ext_w, ext_h = float(w), float(h)  # the whole of the input, in the current array's pixels
    while w >= 2 * out_w or h >= 2 * out_h:
        fx, fy = (2 if w >= 2 * out_w else 1), (2 if h >= 2 * out_h else 1)
        w, h = w // fx, h // fy
        arr = hwc(cv2.resize(arr[: h * fy, : w * fx], (w, h), interpolation=cv2.INTER_AREA))
        ext_w, ext_h = ext_w / fx, ext_h / fy  # an odd last column or row dropped: the box reaches past the edge
    return warp_resize(arr, (0.0, 0.0, ext_w, ext_h), out_size, dst=dst)


def warp_margin(box: tuple[float, float, float, float], out_size: tuple[int, int]) -> int:
    """How many source pixels beyond ``box`` :func:`warp_resize` reads (its prefilter's reach, and sampling's)."""
    sx, sy = (box[2] - box[0]) / out_size[0], (box[3] - box[1]) / out_size[1]
    return 2 + 2 * math.ceil(2 * max(_sigma(sx), _sigma(sy)))


def within_warp(box: tuple[float, float, float, float], out_size: tuple[int, int]) -> bool:
    return max((box[2] - box[0]) / out_size[0], (box[3] - box[1]) / out_size[1]) <= WARP_MAX_SCALE
