"""Per-image quality measures and the dataset's outliers: what clean learns of an image while it is decoded.

Two halves:

* :func:`measure`, in the decode workers, while the decoded image is in memory: one small
  greyscale thumbnail (:data:`THUMB_SIDE` pixels square, whatever the image's size, so
  every measure is comparable across sizes) gives brightness, contrast, blur, entropy and
  the perceptual hashes; the aspect ratio comes from the size. About 0.1 ms an image on the
  reduced decode clean's workers hand it (docs/benchmarks.md, "clean near its floor").
* :func:`assess`, in the step after the decode pass, over the dataset's own distribution:
  robust z-scores (median and MAD) flag outliers, and reject them only past the thresholds
  the config sets (:data:`OUTLIERS`); a blank image (no contrast) is rejected by its own
  absolute threshold.

The perceptual hash is pHash as the ``imagehash`` package defines it (DCT of a 32 x 32
greyscale picture, the 8 x 8 lowest frequencies against their median; ``imagehash.phash``,
after https://www.hackerfactor.com/blog/index.php?/archives/432-Looks-Like-It.html),
computed with two small matrix products instead of ``scipy.fftpack``: importing scipy
costs a cold step 0.5 s and ``imagehash.phash`` 1 ms an image, more than the rest of the
measures together. ``tests/clean/test_quality.py`` checks the transform against scipy's. The
hash of the mirrored image comes from the same 32 x 32 picture flipped, so mirrored copies are
found without a second resize. What the hashes find, against the definition before this one,
is ``bench/scale/measures.py``'s table in docs/benchmarks.md ("What they find").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "METRICS",
    "BLANK",
    "OUTLIERS",
    "Outlier",
    "THUMB_SIDE",
    "MEASURE_SIDE",
    "MEASURES_VERSION",
    "Measures",
    "measure",
    "phash_pair",
    "robust_z",
    "Assessment",
    "assess",
    "histogram",
]

# The measures, in the order of a metrics row (TaskResult.metrics) and of the output columns.
METRICS = ("brightness", "contrast", "blur", "entropy", "aspect_ratio")

# Reject code of an image without contrast (its grey thumbnail's std below CleanConfig.blank_std).
BLANK = "blank"

# Side of the square greyscale thumbnail every measure is taken on.
THUMB_SIDE = 64

# Which definition of the measures an output's columns hold (its manifest's ``quality.version``).
# 1: a 128-pixel nearest-neighbour grid of the full decode, boxed 2 x 2; 2: the antialiased
# thumbnail of :func:`measure`, of a reduced decode. Rows carried from an output of another
# version are measured anew, so one run never compares hashes of two definitions.
MEASURES_VERSION = 2

# pHash: a HASH_SIDE x HASH_SIDE picture, whose LOW x LOW lowest DCT frequencies make 64 bits.
_HASH_SIDE, _LOW = 32, 8


@dataclass(frozen=True)
class Outlier:
    """One kind of outlier: a reject code, the measure it is judged on, and which tail is bad.

    Attributes:
        reason: The reject code and flag name; the config's threshold is ``reject_<reason>``.
        metric: One of :data:`METRICS`.
        side: ``low``, ``high`` or ``both`` tails of the robust z-score.
        log: Judge the logarithm (heavy-tailed measures: blur, aspect ratio).
    """

    reason: str
    metric: str
    side: str
    log: bool = False


OUTLIERS = (
    Outlier("dark", "brightness", "low"),
    Outlier("overexposed", "brightness", "high"),
    Outlier("blurry", "blur", "low", log=True),
    Outlier("low_information", "entropy", "low"),
    Outlier("odd_aspect", "aspect_ratio", "both", log=True),
)


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of scipy's unnormalized DCT-II matrix of size ``n``: 2 cos(pi k (2i+1) / 2n)."""
    k, i = np.arange(keep)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_rows(_HASH_SIDE, _LOW)
# The signs that turn a picture's low DCT frequencies into its mirror image's (see _hash_pairs).
_MIRROR = np.where(np.arange(_LOW) % 2, -1.0, 1.0)[None, :]


@dataclass(frozen=True)
class Measures:
    """What :func:`measure` finds in one image.

    Attributes:
        phash: 64-bit pHash.
        phash_mirror: pHash of the image mirrored left to right.
        metrics: The :data:`METRICS` values, float32.
    """

    phash: int
    phash_mirror: int
    metrics: np.ndarray


def _bits(low: np.ndarray) -> np.ndarray:
    """Per picture, the 64 bits of ``low > median(low)``, row-major, most significant first (imagehash's order).

    ``low``: ``N x 8 x 8``; returns ``N`` uint64.
    """
    flat = low.reshape(len(low), -1)
    half = flat.shape[1] // 2
    median = np.partition(flat, (half - 1, half), axis=1)[:, half - 1 : half + 1].mean(axis=1)  # np.median's
    packed = np.packbits(flat > median[:, None], axis=1)
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)


def _hash_pairs(pictures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pHash bits of ``N`` ``32 x 32`` pictures and of their mirror images, from one transform each.

    Reversing a row multiplies its DCT-II coefficient ``k`` by ``(-1)^k``, so the mirror
    image's low frequencies are the picture's with every odd column's sign flipped.
    """
    low = _DCT @ pictures @ _DCT.T
    both = _bits(np.concatenate([low, low * _MIRROR]))
    return both[: len(low)], both[len(low) :]


def phash_pair(picture: Image.Image) -> tuple[int, int]:
    """pHash of ``picture`` and of its mirror image, as 64-bit integers (``imagehash.phash``'s bits)."""
    small = np.asarray(picture.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS), np.float64)
    phash, mirror = _hash_pairs(small[None])
    return int(phash[0]), int(mirror[0])


_LEVELS = np.arange(256, dtype=np.float64)
_SQUARES = _LEVELS**2

# The shortest side a reduced decode may hand measure(): twice the thumbnail's, so every thumbnail
# pixel averages at least 2 x 2 decoded ones and the reduced IDCT's own errors mostly cancel (at
# 64, blur drifted to x0.61-1.45 of the whole decode's; docs/benchmarks.md). Clean's workers decode
# a JPEG kept as it is at the smallest DCT scale that keeps both sides at least this long
# (imgpipe.data.images.validate_and_normalize, ``reduce_to``).
MEASURE_SIDE = 2 * THUMB_SIDE


def _halve(grey: np.ndarray) -> np.ndarray:
    """``Image.reduce(2)`` of even-sided ``L`` pictures (the last two axes): each 2 x 2 block's mean, rounded half up."""
    g = grey if grey.dtype == np.int32 else grey.astype(np.int32)
    rows = g[..., 0::2, :] + g[..., 1::2, :]
    return ((rows[..., 0::2] + rows[..., 1::2] + 2) >> 2).astype(np.uint8)


def _thumbnail(pixels: np.ndarray, extent: tuple[float, float] | None) -> np.ndarray:
    """The ``THUMB_SIDE``-square grey uint8 thumbnail of ``H x W`` or ``H x W x C`` uint8 pixels (C = 1 or 3).

    Pillow's antialiased ``resize((THUMB_SIDE, THUMB_SIDE), BILINEAR)`` (a triangle filter
    as wide as the reduction) of the ``extent`` the image covers, then ``convert("L")``.
    A filter that weighs every pixel by its distance, where a box cuts at hard edges, keeps
    the thumbnail of a resized, mirrored or differently decoded copy close to the
    original's (docs/benchmarks.md, "What they find"). A picture over three times the
    thumbnail's side is first box-reduced by a whole factor (``reducing_gap=3``: within 3
    grey levels of the direct resize, a quarter of its time on a 12-megapixel picture).
    """
    img = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    box = None if extent is None else (0.0, 0.0, *extent)
    thumb = img.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(thumb if thumb.mode == "L" else thumb.convert("L"))


def measure(pixels: np.ndarray, extent: tuple[float, float] | None = None) -> Measures:
    """The quality measures and perceptual hashes of a decoded image, ``H x W`` or ``H x W x C`` uint8 (C = 1 or 3).

    Every measure is taken on one :data:`THUMB_SIDE`-square grey thumbnail, an antialiased
    reduction of the whole image (:func:`_thumbnail`), so the measures of one scene compare
    across sizes and do not depend on which pixels a sample happens to hit. ``pixels`` may
    be the image itself or its grey decoded at a reduced DCT scale with at least
    :data:`MEASURE_SIDE` pixels a side (what clean's workers hand it): the measures are
    nearly the same either way (``tests/clean/test_quality.py`` bounds the difference), and
    the reduced decode costs a third of the full one. Blur is measured at the thumbnail's
    scale, as cleanvision measures it on a 64-pixel picture: it finds heavy blur, not a
    soft focus that only shows at full size. The hashes are pHash's DCT and median rule on
    the thumbnail reduced 2 x 2 to 32 x 32 (:func:`phash_pair` is ``imagehash.phash``
    exactly, with its LANCZOS resize, for a picture given whole).

    Args:
        pixels: The decoded image, or its reduced decode.
        extent: ``(width, height)`` of the image in ``pixels``' units, where a reduced decode
            covers its last column and row only in part (libjpeg rounds each side of an
            ``n/8`` decode up: a 333-pixel side at 2/8 is 84 pixels, of which the image
            covers 83.25); the thumbnail and the aspect ratio are taken of it. ``None``: the
            whole of ``pixels``.

    Returns:
        Brightness (mean grey, 0..255), contrast (grey std), blur (variance of the
        4-neighbour Laplacian: low is blurry), entropy (bits of the grey histogram, 0..8),
        aspect ratio (width / height), and the two hashes.
    """
    grey = _thumbnail(pixels, extent)
    g = grey.astype(np.int32)
    # int64: a squared Laplacian summed over the thumbnail passes 2 ** 31 (a checkerboard: 4e9).
    lap = (4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).ravel().astype(np.int64)
    n = lap.size
    lap_mean = int(lap.sum()) / n
    p = np.bincount(grey.ravel(), minlength=256) / grey.size
    mean = float(p @ _LEVELS)
    std = math.sqrt(max(0.0, float(p @ _SQUARES) - mean * mean))
    p = p[p > 0]
    blur = max(0.0, int(lap @ lap) / n - lap_mean * lap_mean)
    aspect = pixels.shape[1] / pixels.shape[0] if extent is None else extent[0] / extent[1]
    metrics = np.array([mean, std, blur, -float(p @ np.log2(p)), aspect], dtype=np.float32)
    phash, mirror = _hash_pairs(_halve(grey).astype(np.float64)[None])
    return Measures(int(phash[0]), int(mirror[0]), metrics)


def robust_z(values: np.ndarray) -> np.ndarray:
    """Robust z-scores: distance from the median in units of the MAD scaled to a normal's std.

    Where more than half the values are equal (MAD 0), the mean absolute deviation stands
    in (scaled by 1.2533, as for a normal; Iglewicz and Hoaglin's modified z-score); where
    all are equal, every score is 0.
    """
    if not len(values):
        return np.zeros(0, np.float32)
    med = np.median(values)
    dev = np.abs(values - med)
    scale = 1.4826 * np.median(dev)
    if scale == 0:
        scale = 1.2533 * dev.mean()
    if scale == 0:
        return np.zeros(len(values), np.float32)
    return ((values - med) / scale).astype(np.float32)


@dataclass(frozen=True)
class Assessment:
    """The outcome of :func:`assess` for ``n`` images, as arrays.

    Attributes:
        reason: Per image, an index into ``reasons`` of its reject code, -1 when kept.
        reasons: ``blank``, then the :data:`OUTLIERS` reasons.
        z: Per image and outlier kind, the robust z-score (signed towards the bad tail:
            positive is worse).
        flagged: Per image and outlier kind, whether it is past ``flag_z``.
    """

    reason: np.ndarray
    reasons: tuple[str, ...]
    z: np.ndarray
    flagged: np.ndarray


def _bad_side_z(outlier: Outlier, values: np.ndarray) -> np.ndarray:
    z = robust_z(np.log(np.maximum(values, 1e-6)) if outlier.log else values)
    return {"low": -z, "high": z, "both": np.abs(z)}[outlier.side]


def assess(metrics: np.ndarray, blank_std: float, flag_z: float, reject_z: Mapping[str, float | None]) -> Assessment:
    """Flags and rejects the outliers among images, from their :data:`METRICS` rows.

    Precedence: ``blank`` first, then the :data:`OUTLIERS` in their order. The
    distribution is the images' own, blank ones included (a set that is half blank is
    still judged against itself).

    Args:
        metrics: ``n x len(METRICS)`` float32.
        blank_std: Grey std below which an image is ``blank``; 0 rejects none.
        flag_z: Robust z past which an image is flagged.
        reject_z: Robust z past which an image is rejected, by outlier reason; ``None`` keeps them.
    """
    n = len(metrics)
    reasons = (BLANK, *(o.reason for o in OUTLIERS))
    reason = np.full(n, -1, np.int8)
    z = np.zeros((n, len(OUTLIERS)), np.float32)
    reason[metrics[:, METRICS.index("contrast")] < blank_std] = 0
    for k, outlier in enumerate(OUTLIERS):
        z[:, k] = _bad_side_z(outlier, metrics[:, METRICS.index(outlier.metric)].astype(np.float64))
        limit = reject_z.get(outlier.reason)
        if limit is not None:
            reason[(reason < 0) & (z[:, k] > limit)] = k + 1
    return Assessment(reason, reasons, z, z > flag_z)


def histogram(values: np.ndarray, bins: int = 20, log: bool = False) -> dict[str, list[float] | list[int] | bool]:
    """Counts of ``values`` in ``bins`` equal bins between their min and max (of their log10 with ``log``)."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if log:
        finite = np.log10(np.maximum(finite, 1e-6))
    if not len(finite):
        return {"edges": [], "counts": [], "log10": log}
    counts, edges = np.histogram(finite, bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist(), "log10": log}
