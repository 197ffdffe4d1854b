"""The policies' operations on one ``H x W x C`` uint8 numpy image: torchvision's uint8 kernels, in NumPy and OpenCV.

What the loader's workers apply for :mod:`imgpipe.train.policies` (RandAugment,
TrivialAugmentWide, AutoAugment) without a tensor per sample. Each operation computes what
``torchvision.transforms.v2.functional`` computes on a uint8 tensor: the same blends,
roundings and truncations, the geometric operations sampled as ``grid_sample`` does
(nearest neighbour, half-even rounding, fill 0, shear about the top-left corner, as the
policies call ``F.affine``). ``tests/train/test_aug_parity.py`` holds each against
torchvision itself.

Call ``apply_op(image, "Rotate", 12.0)``; :class:`PolicyTransform` is the albumentations
transform the CPU recipe holds.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

# albumentations asks PyPI for a newer version when imported; a pod must not (augment_cpu says why).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402 - after the setting above
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from imgpipe.train.policies import PolicySpec, draw  # noqa: E402

__all__ = ["apply_op", "PolicyTransform"]

_GREY = np.array([0.2989, 0.587, 0.114], np.float32)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


_LEVELS = np.arange(256, dtype=np.float32)  # every uint8 value, for the tables below


def _blend(img: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    """torchvision's ``_blend`` on uint8: ``img * r + other * (1 - r)``, clamped, truncated to uint8.

    With a scalar ``other`` (Brightness, Contrast) a pixel's result depends on its own value
    alone: the same arithmetic runs once on the 256 values and the image is looked up.
    """
    if np.ndim(other) == 0:
        return _lookup(img, _blended(_LEVELS, other, ratio))
    return _blended(img.astype(np.float32), other, ratio)


def _blended(values: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    out = values * np.float32(ratio) + np.asarray(other, np.float32) * np.float32(1.0 - ratio)
    return np.clip(out, 0, 255).astype(np.uint8)


def _lookup(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[img]``: one 256-entry uint8 table for every channel, or a ``256 x C`` one per channel (``cv2.LUT``)."""
    if table.ndim == 1 or img.shape[2] == 1:
        out = cv2.LUT(img, np.ascontiguousarray(table.reshape(256, -1)[:, 0]))
    else:
        out = cv2.LUT(img, np.ascontiguousarray(table.reshape(256, 1, img.shape[2])))
    return out.reshape(img.shape)


def _grey(img: np.ndarray) -> np.ndarray:
    """torchvision's ``rgb_to_grayscale`` in float, floored (as its colour kernels use it on uint8)."""
    f = img.astype(np.float32)
    return np.floor(f[..., 0:1] * _GREY[0] + f[..., 1:2] * _GREY[1] + f[..., 2:3] * _GREY[2])


def _saturation(img: np.ndarray, factor: float) -> np.ndarray:
    return img if img.shape[2] == 1 else _blend(img, _grey(img), factor)


def _contrast(img: np.ndarray, factor: float) -> np.ndarray:
    grey = _grey(img) if img.shape[2] == 3 else img.astype(np.float32)
    return _blend(img, np.float32(grey.mean(dtype=np.float32)), factor)


def _sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    if h <= 2 or w <= 2:
        return img
    f = img.astype(np.float32)
    blurred = np.rint(cv2.filter2D(f, -1, _SMOOTH).reshape(f.shape))
    out = f.copy()
    inner = out[1:-1, 1:-1]
    inner += (blurred[1:-1, 1:-1] - inner) * np.float32(1.0 - factor)  # the border keeps its pixels
    return np.clip(out, 0, 255).astype(np.uint8)


def _autocontrast(img: np.ndarray) -> np.ndarray:
    """Each channel stretched from its own minimum and maximum, one table per channel."""
    pixels = img.reshape(-1, img.shape[2])
    bounds = np.array([cv2.minMaxLoc(pixels[:, c])[:2] for c in range(img.shape[2])], np.float32)  # C x (min, max)
    lo, hi = bounds[:, 0], bounds[:, 1]
    flat = hi == lo
    scale = (hi - lo) * np.float32(1.0 / 255)
    lo, scale = np.where(flat, 0, lo), np.where(flat, 1, scale)
    table = np.clip((_LEVELS[:, None] - lo) / scale, 0, 255).astype(np.uint8)  # 256 x C
    return _lookup(img, table)


_EXACT_FLOAT32 = 1 << 24  # every count below it is exact in float32


def _equalize(img: np.ndarray) -> np.ndarray:
    """PIL's equalization per channel, as torchvision's ``equalize_image`` computes it: one table per channel."""
    channels = img.shape[2]
    table = np.empty((256, channels), np.uint8)
    for c in range(channels):
        if img.shape[0] * img.shape[1] < _EXACT_FLOAT32:  # OpenCV counts in float32
            hist = cv2.calcHist([img], [c], None, [256], [0, 256]).ravel().astype(np.int64)
        else:
            hist = np.bincount(img[..., c].ravel(), minlength=256)
        cum = np.cumsum(hist)
        step = (cum[-1] - hist[int(np.argmax(cum))]) // 255
        if step == 0:
            table[:, c] = np.arange(256)  # the channel as it is
            continue
        table[:, c] = np.concatenate([[0], np.clip((cum[:-1] + step // 2) // step, 0, 255)])
    return _lookup(img, table)


@lru_cache(maxsize=64)
def _centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel centres relative to the image centre, as ``torchvision``'s affine grid has them: a row and a column."""
    xs = np.arange(w, dtype=np.float32) - np.float32(w * 0.5 - 0.5)
    ys = np.arange(h, dtype=np.float32) - np.float32(h * 0.5 - 0.5)
    return xs[None, :], ys[:, None]


def _inverse_matrix(angle: float, translate: tuple[float, float], shear: tuple[float, float], centre: tuple[float, float]) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1): output -> input, centred coordinates."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = centre
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _warp(img: np.ndarray, m: list[float]) -> np.ndarray:
    """Nearest-neighbour resampling through the inverse matrix ``m``, fill 0 (``grid_sample``, ``align_corners=False``).

    The source coordinates are computed in float32, in torchvision's order; ``cv2.remap``'s
    nearest neighbour rounds them half to even (``cvRound``), as ``grid_sample`` does, and
    fills what falls outside with 0. OpenCV's remap takes sides under 32,767 pixels; the
    policies run on the crop, at the model's input size.
    """
    h, w = img.shape[:2]
    xs, ys = _centres(h, w)
    m32 = np.asarray(m, np.float32)
    sx = xs * m32[0] + ys * m32[1]
    sx += m32[2]
    sx += np.float32(w * 0.5 - 0.5)
    sy = xs * m32[3] + ys * m32[4]
    sy += m32[5]
    sy += np.float32(h * 0.5 - 0.5)
    out = cv2.remap(img, sx, sy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(img.shape)


def _geometric(img: np.ndarray, op: str, m: float) -> np.ndarray:
    h, w = img.shape[:2]
    if op == "Rotate":  # F.rotate: about the centre, counter-clockwise
        return _warp(img, _inverse_matrix(-m, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)))
    if op in ("ShearX", "ShearY"):  # F.affine(center=[0, 0]): about the top-left corner
        degrees = math.degrees(math.atan(m))
        shear = (degrees, 0.0) if op == "ShearX" else (0.0, degrees)
        return _warp(img, _inverse_matrix(0.0, (0.0, 0.0), shear, (-w * 0.5, -h * 0.5)))
    shift = (float(int(m)), 0.0) if op == "TranslateX" else (0.0, float(int(m)))
    return _warp(img, _inverse_matrix(0.0, shift, (0.0, 0.0), (0.0, 0.0)))


def apply_op(img: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    """One policy operation on ``H x W x C`` uint8 (C = 1 or 3), as torchvision applies it to a uint8 tensor.

    ``magnitude`` as :func:`imgpipe.train.policies.draw` gives it: signed factors, Posterize's
    bits, Solarize's threshold as a fraction of 255.
    """
    if op == "Identity":
        return img
    if op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        return _geometric(img, op, magnitude)
    if op == "Brightness":
        return _blend(img, 0.0, 1.0 + magnitude)
    if op == "Color":
        return _saturation(img, 1.0 + magnitude)
    if op == "Contrast":
        return _contrast(img, 1.0 + magnitude)
    if op == "Sharpness":
        return _sharpness(img, 1.0 + magnitude)
    if op == "Posterize":
        bits = int(magnitude)
        return img if bits >= 8 else img & np.uint8((0xFF << (8 - bits)) & 0xFF)
    if op == "Solarize":
        levels = _LEVELS
        return _lookup(img, np.where(levels >= np.float32(255.0 * magnitude), 255 - levels, levels).astype(np.uint8))
    if op == "AutoContrast":
        return _autocontrast(img)
    if op == "Equalize":
        return _equalize(img)
    if op == "Invert":
        return 255 - img
    raise ValueError(f"unknown policy operation {op!r}")


class PolicyTransform(A.ImageOnlyTransform):
    """A policy of :mod:`imgpipe.train.policies` as an albumentations transform (the CPU recipe's step).

    Draws from the generator the recipe's ``Compose`` hands it (reset per sample from the
    sample's seed), so a sample's operations depend on its seed alone.
    """

    def __init__(self, spec: PolicySpec, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.spec = spec

    def get_params(self) -> dict[str, Any]:
        return {"ops": draw(self.spec, self.random_generator)}

    def apply(self, img: np.ndarray, ops: list[tuple[str, float]] | None = None, **params: Any) -> np.ndarray:
        squeeze = img.ndim == 2
        out = img[..., None] if squeeze else img
        for op, magnitude in ops or ():
            out = apply_op(out, op, magnitude)
        return out[..., 0] if squeeze else out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("spec",)
