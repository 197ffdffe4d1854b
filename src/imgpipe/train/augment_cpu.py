"""The CPU augmentation path: albumentations on ``H x W x C`` uint8 numpy arrays, one sample at a time.

The loader's workers run it on the arrays the shards hold (``np.frombuffer`` of a raw
row, or a decoded JPEG), with no PIL round trip and no tensor per sample; they stack
the outputs into one ``N x H x W x C`` uint8 batch, which the training loop normalizes
in one step (:func:`imgpipe.train.augment.normalize`). :class:`imgpipe.train.augment.BatchAugment`
runs the same recipe with kornia on whole batches on the device (the GPU path).

* :func:`build_train_transform`: the training recipe. Input of any size ``H x W x C``
  (``C`` = 1 or 3), output ``size x size x C``.
* :func:`build_eval_transform`: shorter side to ``size``, centre crop; deterministic.

Both return a :class:`SampleTransform`, called as ``transform(image, seed)``.

Randomness. A sample's augmentation depends only on its seed, which the loader derives
from ``(seed, epoch, index of the sample in the split)``
(:func:`imgpipe.train.partition.sample_seed`): not on the rank or worker that draws it, and
the same after a resume. Every operation of the albumentations ``Compose`` draws from
one ``random.Random`` and one ``numpy.random.Generator`` owned by the transform
(``Compose.set_random_state``, once); before each sample both are reset in place from
its seed (``Random.seed``, the PCG64 state of ``PCG64(seed)``), so nothing carries over
from one sample to the next, and no global generator (``random``, ``numpy.random``,
torch) is read or changed. Measured per sample on this project's 2-core machine, with
the recipe itself taking 0.5-0.9 ms at 224 px:

* reset in place (used): 12 us;
* a fresh ``default_rng(seed)`` and ``Random(seed)`` handed to ``set_random_state``:
  21 us (the same draws; the hand-over walks all ~70 nested operations);
* ``Compose.set_random_seed(seed)`` (what ``Compose(seed=...)`` does): 450 us, and
  wrong for this use: it gives every operation its own generators seeded with the
  same value, so their draws coincide (the flip, the affine and the colour jitter fire
  together).

The recipe, in order (``AugmentConfig``; probabilities as in the torchvision recipe):

===============================  ===============================================================
torchvision (previous CPU path)  albumentations (here)
===============================  ===============================================================
RandomResizedCrop(size, scale,   ``RandomResizedCrop((size, size), scale, ratio=(3/4, 4/3),
antialias)                       INTER_LINEAR, area_for_downscale="image")``: INTER_AREA when
                                 shrinking (the antialiased resize), bilinear when enlarging
RandomHorizontalFlip (hflip)     ``HorizontalFlip(p=0.5)``
RandomVerticalFlip (vflip)       ``VerticalFlip(p=0.5)``
(rot90; none in torchvision)     ``RandomRotate90()``: 0, 90, 180 or 270 degrees, uniformly
RandomApply(RandomAffine(r,      ``Affine(rotate=(-r, r), translate_percent=(-0.05, 0.05),
translate=(.05, .05),            scale=(0.95, 1.05), keep_ratio=True, INTER_NEAREST, fill 0,
scale=(.95, 1.05)), p=0.5)       p=0.5)``
policy                           see the policy table below
RandomApply(ColorJitter(cj, cj,  ``ColorJitter(cj, cj, cj, hue, p=0.8)`` (the same factors
cj, hue), p=0.8)                 and random order; saturation and hue skip one-channel
                                 images, as in torchvision)
RandomGrayscale(grayscale_p)     ``ToGray(num_output_channels=3, "weighted_average",
                                 p=grayscale_p)`` (ITU-R 601 weights); 3-channel images only
RandomApply(GaussianBlur(k,      ``GaussianBlur(blur_limit=(k, k), sigma_limit=(0.1, 2.0),
(0.1, 2)), p=blur_p)             p=blur_p)``, ``k = _blur_kernel(size)``
GaussianNoise (noise_p; v2)      ``GaussNoise(std_range=NOISE_STD, p=noise_p)``, std drawn per image
JPEG (jpeg_p; v2)                ``ImageCompression("jpeg", quality_range=JPEG_QUALITY, p=jpeg_p)``
RandomErasing(random_erasing,    ``Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill=mean,
value=mean)                      p=random_erasing)``, mean = ``_mean_uint8`` (0 once normalized)
===============================  ===============================================================

Policy ``basic`` is the recipe without a policy; ``none`` is :func:`build_eval_transform`.

The policies' operations. torchvision's magnitudes come from ``_AUGMENTATION_SPACE``
in ``torchvision/transforms/v2/_auto_augment.py``; ``m`` below is the magnitude
(RandAugment: bin ``M`` of 31, ``m = max * M / 30``; AutoAugment: bin ``b`` of 10,
``m = max * b / 9``; TrivialAugmentWide (TAW): a bin drawn uniformly from 31). Signed
operations take ``+m`` or ``-m`` with probability 1/2 each, written ``+-m``. Geometric
operations fill with 0 and use nearest-neighbour sampling, as torchvision's policies do.

=============  =========================  =========================================================
torchvision    magnitude range            albumentations
=============  =========================  =========================================================
Identity       --                         ``NoOp``
ShearX, Y      +-[0, 0.3] (TAW 0.99),     ``Affine(shear={"x" or "y": atan(m) in degrees})``, about
               as tan(angle)              the centre (torchvision: about the top-left corner, i.e.
                                          plus a translation)
TranslateX, Y  +-[0, 150/331 * width or   ``Affine(translate_px={"x" or "y": int(m)})``, the width
               height] px (TAW 32 px)     and height being ``size`` (after the crop)
Rotate         +-[0, 30] deg (TAW 135)    ``Affine(rotate=m)``
Brightness     +-[0, 0.9] (TAW 0.99)      ``ColorJitter(brightness=1 + m)``, the other factors 1
Color          +-[0, 0.9] (TAW 0.99)      ``ColorJitter(saturation=1 + m)``
Contrast       +-[0, 0.9] (TAW 0.99)      ``ColorJitter(contrast=1 + m)``
Sharpness      +-[0, 0.9] (TAW 0.99),     ``m > 0``: ``Sharpen(alpha=m / 13, lightness=1,
               factor 1 + m               method="kernel")``, which is exactly ``img + m/13 *
                                          Laplacian``, torchvision's factor ``1 + m``. ``m < 0``:
                                          :class:`Soften` (blend towards the 3x3 smoothing filter
                                          ``[[1,1,1],[1,5,1],[1,1,1]] / 13``; no library op
                                          softens this way). Borders are reflected (torchvision
                                          keeps the 1-pixel border as it was)
Posterize      8 - round(bin / 7.5) bits  ``Posterize(num_bits=bits)`` (8 bits: ``NoOp``)
               (AutoAugment bin / 2.25;
               TAW bin / 5: 8..2 bits)
Solarize       threshold 255 x [1, 0]     ``Solarize(threshold_range=(t, t))``, t in [0, 1]:
                                          pixels >= 255 t are inverted
AutoContrast   --                         ``AutoContrast(method="pil")`` (per-channel min-max)
Equalize       --                         ``Equalize(mode="pil", by_channels=True)``
Invert         -- (AutoAugment only)      ``InvertImg``
=============  =========================  =========================================================

How each policy draws:

* ``randaugment`` (``RandAugment(num_ops=N, magnitude=M)``): ``RandomOrder(14 ops, n=N,
  replace=True)``, i.e. N operations drawn uniformly with replacement and applied in
  the order drawn, each at its fixed magnitude for ``M`` with a random sign
  (``OneOf([op(+m), op(-m)])``): the same distribution of operations, order and signs
  as torchvision's.
* ``trivialaugment`` (``TrivialAugmentWide``): ``OneOf(14 ops)`` uniformly, each with
  its magnitude drawn uniformly over the signed range in the table (continuous here:
  torchvision draws one of 31 evenly spaced bins; translations are whole pixels in
  [-32, 32]; Posterize draws 2-8 bits uniformly, where torchvision's bins give 2 and
  8 bits half the weight of the others; shear is uniform in the angle rather than in
  its tangent, the same up to 45 degrees).
* ``autoaugment`` (``AutoAugment(AutoAugmentPolicy.IMAGENET)``): ``OneOf`` of the 25
  ImageNet sub-policies, each a ``Sequential`` of its two operations with their own
  probabilities and magnitudes (bins of 10), signed as above: the same table as
  torchvision's, entry for entry (:data:`IMAGENET_POLICY`).
"""

from __future__ import annotations

import math
import os
import random as _random
from collections.abc import Sequence
from typing import Any

# albumentations asks PyPI for a newer version when it is imported: a pod (or a test in the
# loopback-only namespace) must not send traffic anywhere, nor wait for a timeout at start.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402 - after the setting above
import cv2
import numpy as np

from imgpipe.train.augment import (
    _AFFINE_P,
    _COLOR_JITTER_P,
    IMAGENET,
    JPEG_QUALITY,
    NOISE_STD,
    Normalization,
    _blur_kernel,
    _mean_uint8,
    channel_stats,
)
from imgpipe.train.config import AugmentConfig

__all__ = [
    "IMAGENET_POLICY",
    "SampleTransform",
    "Soften",
    "build_train_transform",
    "build_crop_transform",
    "build_eval_transform",
    "randaugment_ops",
    "trivialaugment_ops",
    "autoaugment_imagenet",
]


# torchvision's AutoAugmentPolicy.IMAGENET: 25 sub-policies of (op, probability, magnitude bin of 10).
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


# ----------------------------------------------------------------------------------------
# The one operation albumentations lacks.


class Soften(A.ImageOnlyTransform):
    """torchvision's ``adjust_sharpness`` with a factor in [0, 1]: blends towards a 3x3 smoothing.

    ``out = factor * img + (1 - factor) * smooth(img)``, with PIL's SMOOTH kernel
    ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``, as one ``cv2.filter2D`` pass. (Factors
    above 1 sharpen, which :class:`albumentations.Sharpen` does exactly.)

    Args:
        factor: Range the factor is drawn from, uniformly; within [0, 1].
        p: Probability of applying.
    """

    _SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    _IDENTITY = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)

    def __init__(self, factor: tuple[float, float] = (0.1, 1.0), p: float = 1.0) -> None:
        super().__init__(p=p)
        lo, hi = factor
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"Soften factor must satisfy 0 <= min <= max <= 1, got {factor}")
        self.factor = (float(lo), float(hi))

    def get_params(self) -> dict[str, Any]:
        return {"factor": self.py_random.uniform(*self.factor)}

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        kernel = factor * self._IDENTITY + (1.0 - factor) * self._SMOOTH
        return cv2.filter2D(img, -1, kernel).reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("factor",)


# ----------------------------------------------------------------------------------------
# The policies' operations.


def _affine(**kwargs: Any) -> A.Affine:
    """An affine as the policies do it: nearest neighbour, black fill, always applied."""
    return A.Affine(interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0, **kwargs)


def _jitter(kind: str, lo: float, hi: float) -> A.ColorJitter:
    """ColorJitter on one factor (brightness, contrast or saturation) in [lo, hi]; the others 1."""
    factors: dict[str, Any] = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0)}
    factors[kind] = (lo, hi)
    return A.ColorJitter(**factors, hue=(0.0, 0.0), p=1.0)


def _shear(axis: str, degrees: tuple[float, float]) -> A.Affine:
    other = "y" if axis == "x" else "x"
    return _affine(shear={axis: degrees, other: (0.0, 0.0)})


def _translate(axis: str, pixels: tuple[int, int]) -> A.Affine:
    other = "y" if axis == "x" else "x"
    return _affine(translate_px={axis: pixels, other: (0, 0)})


def _sharpness(lo: float, hi: float) -> A.BasicTransform:
    """torchvision's Sharpness with the factor ``1 + m`` for m in [lo, hi] (both >= 0 or both <= 0)."""
    if lo >= 0:
        return A.Sharpen(alpha=(lo / 13, hi / 13), lightness=(1.0, 1.0), method="kernel", p=1.0)
    return Soften(factor=(1.0 + lo, 1.0 + hi), p=1.0)


def _posterize(lo: int, hi: int) -> A.BasicTransform:
    return A.NoOp(p=1.0) if lo == hi == 8 else A.Posterize(num_bits=(lo, hi), p=1.0)


def _fixed_op(name: str, m: float) -> A.BasicTransform:
    """One signed policy operation at magnitude ``m`` (its sign included; translations in pixels)."""
    if name == "ShearX" or name == "ShearY":
        d = math.degrees(math.atan(m))
        return _shear(name[-1].lower(), (d, d))
    if name == "TranslateX" or name == "TranslateY":
        return _translate(name[-1].lower(), (int(m), int(m)))
    if name == "Rotate":
        return _affine(rotate=(m, m))
    if name in ("Brightness", "Color", "Contrast"):
        kind = {"Brightness": "brightness", "Color": "saturation", "Contrast": "contrast"}[name]
        return _jitter(kind, 1.0 + m, 1.0 + m)
    if name == "Sharpness":
        return _sharpness(m, m)
    raise ValueError(f"{name} has no magnitude")


def _unsigned_op(name: str, magnitude: float = 0.0, p: float = 1.0) -> A.BasicTransform:
    """An operation without a sign: Posterize (``magnitude`` bits), Solarize (threshold in [0, 1]), the rest."""
    if name == "Identity":
        return A.NoOp(p=p)
    if name == "Posterize":
        op = _posterize(int(magnitude), int(magnitude))
        op.p = p
        return op
    if name == "Solarize":
        return A.Solarize(threshold_range=(magnitude, magnitude), p=p)
    if name == "AutoContrast":
        return A.AutoContrast(method="pil", p=p)
    if name == "Equalize":
        return A.Equalize(mode="pil", by_channels=True, p=p)
    if name == "Invert":
        return A.InvertImg(p=p)
    raise ValueError(f"unknown policy operation {name!r}")


def _signed(name: str, m: float, p: float = 1.0) -> A.BasicTransform | A.BaseCompose:
    """``op(+m)`` or ``op(-m)`` with probability 1/2 each (one op when m is 0), applied with probability p."""
    if m == 0:
        op = _fixed_op(name, 0.0)
        op.p = p
        return op
    return A.OneOf([_fixed_op(name, m), _fixed_op(name, -m)], p=p)


# torchvision's _AUGMENTATION_SPACE maxima of the signed operations (RandAugment, AutoAugment).
def _max_magnitude(name: str, size: int) -> float:
    return {
        "ShearX": 0.3,
        "ShearY": 0.3,
        "TranslateX": 150.0 / 331.0 * size,
        "TranslateY": 150.0 / 331.0 * size,
        "Rotate": 30.0,
        "Brightness": 0.9,
        "Color": 0.9,
        "Contrast": 0.9,
        "Sharpness": 0.9,
    }[name]


_SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")


def _op_at_bin(name: str, bin_: int | None, bins: int, size: int, p: float = 1.0) -> A.BasicTransform | A.BaseCompose:
    """An operation at magnitude bin ``bin_`` of ``bins`` (RandAugment: 31, AutoAugment: 10)."""
    if name in _SIGNED_OPS:
        assert bin_ is not None
        return _signed(name, _max_magnitude(name, size) * bin_ / (bins - 1), p)
    if name == "Posterize":
        assert bin_ is not None
        return _unsigned_op(name, int(round(8 - bin_ / ((bins - 1) / 4))), p)
    if name == "Solarize":
        assert bin_ is not None
        return _unsigned_op(name, 1.0 - bin_ / (bins - 1), p)
    return _unsigned_op(name, p=p)


_RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)


def randaugment_ops(magnitude: int, size: int) -> list[A.BasicTransform | A.BaseCompose]:
    """RandAugment's 14 operations at magnitude bin ``magnitude`` of 31, for ``size x size`` images."""
    return [_op_at_bin(name, magnitude, 31, size) for name in _RANDAUGMENT_OPS]


def trivialaugment_ops() -> list[A.BasicTransform | A.BaseCompose]:
    """TrivialAugmentWide's 14 operations, each drawing its magnitude uniformly over the signed range."""
    shear = math.degrees(math.atan(0.99))
    return [
        A.NoOp(p=1.0),
        _shear("x", (-shear, shear)),
        _shear("y", (-shear, shear)),
        _translate("x", (-32, 32)),
        _translate("y", (-32, 32)),
        _affine(rotate=(-135.0, 135.0)),
        _jitter("brightness", 0.01, 1.99),
        _jitter("saturation", 0.01, 1.99),
        _jitter("contrast", 0.01, 1.99),
        A.OneOf([_sharpness(0.0, 0.99), _sharpness(-0.99, 0.0)], p=1.0),
        _posterize(2, 8),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.AutoContrast(method="pil", p=1.0),
        A.Equalize(mode="pil", by_channels=True, p=1.0),
    ]


def autoaugment_imagenet(size: int) -> A.OneOf:
    """AutoAugment's ImageNet policy: one of the 25 sub-policies of :data:`IMAGENET_POLICY`, uniformly."""
    return A.OneOf(
        [
            A.Sequential([_op_at_bin(name, bin_, 10, size, p) for name, p, bin_ in sub], p=1.0)
            for sub in IMAGENET_POLICY
        ],
        p=1.0,
    )


def _policy(cfg: AugmentConfig, size: int) -> A.BasicTransform | A.BaseCompose | None:
    if cfg.policy == "randaugment":
        if cfg.randaugment_n == 0:
            return None
        return A.RandomOrder(randaugment_ops(cfg.randaugment_m, size), n=cfg.randaugment_n, replace=True, p=1.0)
    if cfg.policy == "trivialaugment":
        return A.OneOf(trivialaugment_ops(), p=1.0)
    if cfg.policy == "autoaugment":
        return autoaugment_imagenet(size)
    return None


# ----------------------------------------------------------------------------------------
# The transforms.


class SampleTransform:
    """One sample's transform: ``H x W x C`` uint8 in (any ``H x W``), ``size x size x C`` uint8 out.

    Called as ``transform(image, seed)``. Random transforms draw only from generators
    made from ``seed`` for this call; deterministic ones ignore it. Picklable (workers
    started by spawn or forkserver receive a copy).

    Attributes:
        pipeline: The ``albumentations.Compose`` it runs.
        size: Output side.
        channels: Channels in and out (1 or 3; ``None``: either).
        random: Whether the output depends on the seed.
    """

    def __init__(
        self, ops: Sequence[A.BasicTransform | A.BaseCompose], size: int, channels: int | None, *, random: bool
    ) -> None:
        if channels is not None:
            channel_stats(channels)  # validates the channel count
        self.pipeline = A.Compose(list(ops), p=1.0, is_check_shapes=False)
        self.size, self.channels, self.random = size, channels, random
        self._link_generators()

    def _link_generators(self) -> None:
        """Gives every operation the same two generators, which :meth:`__call__` resets per sample."""
        self._np_rng = np.random.Generator(np.random.PCG64(0))
        self._py_rng = _random.Random(0)
        self.pipeline.set_random_state(self._np_rng, self._py_rng)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._link_generators()  # a copy (spawned worker) must not rely on pickle keeping them shared

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        expected = (1, 3) if self.channels is None else (self.channels,)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in expected:
            raise TypeError(
                f"expected an H x W x {' or '.join(map(str, expected))} uint8 array, "
                f"got {image.dtype} {tuple(image.shape)}"
            )
        if self.random:
            # Reset in place: the state depends on this seed alone (as fresh generators would).
            self._py_rng.seed(seed)
            self._np_rng.bit_generator.state = np.random.PCG64(seed).state
        out = self.pipeline(image=image)["image"]
        if out.ndim == 2:  # an OpenCV kernel dropped the channel axis of a one-channel image
            out = out[..., None]
        return out

    def __repr__(self) -> str:
        return f"SampleTransform(size={self.size}, channels={self.channels}, random={self.random}, {self.pipeline!r})"


def _train_ops(
    cfg: AugmentConfig, size: int, channels: int, norm: Normalization = IMAGENET
) -> list[A.BasicTransform | A.BaseCompose]:
    ops: list[A.BasicTransform | A.BaseCompose] = [
        A.RandomResizedCrop(
            (size, size),
            scale=cfg.crop_scale,
            ratio=(3 / 4, 4 / 3),
            interpolation=cv2.INTER_LINEAR,
            area_for_downscale="image",
            p=1.0,
        )
    ]
    if cfg.hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if cfg.vflip:
        ops.append(A.VerticalFlip(p=0.5))
    if cfg.rot90:
        ops.append(A.RandomRotate90(p=1.0))  # k uniform in 0..3: a quarter of the images keep their orientation
    if cfg.rotation > 0:
        ops.append(
            A.Affine(
                rotate=(-cfg.rotation, cfg.rotation),
                translate_percent=(-0.05, 0.05),
                scale=(0.95, 1.05),
                keep_ratio=True,
                interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=_AFFINE_P,
            )
        )
    policy = _policy(cfg, size)
    if policy is not None:
        ops.append(policy)
    if cfg.color_jitter > 0:
        cj = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=cfg.hue, p=_COLOR_JITTER_P))
    if cfg.grayscale_p > 0 and channels == 3:
        ops.append(A.ToGray(num_output_channels=3, method="weighted_average", p=cfg.grayscale_p))
    if cfg.blur_p > 0:
        k = _blur_kernel(size)
        ops.append(A.GaussianBlur(blur_limit=(k, k), sigma_limit=(0.1, 2.0), p=cfg.blur_p))
    if cfg.noise_p > 0:
        ops.append(A.GaussNoise(std_range=NOISE_STD, p=cfg.noise_p))
    if cfg.jpeg_p > 0:
        ops.append(A.ImageCompression(compression_type="jpeg", quality_range=JPEG_QUALITY, p=cfg.jpeg_p))
    if cfg.random_erasing > 0:
        ops.append(
            A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill=tuple(_mean_uint8(channels, norm)), p=cfg.random_erasing)
        )
    return ops


def build_train_transform(
    cfg: AugmentConfig, size: int, channels: int, norm: Normalization = IMAGENET
) -> SampleTransform:
    """The training recipe (module docstring) for ``channels``-channel images, output ``size x size``.

    Policy ``none`` gives :func:`build_eval_transform`. ``norm`` is the normalization the
    batch gets later; random erasing fills with its mean, which normalizes to 0.

    Raises:
        ValueError: For a channel count other than 1 or 3, or ``size < 1``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if cfg.policy == "none":
        return build_eval_transform(size, channels)
    return SampleTransform(_train_ops(cfg, size, channels, norm), size, channels, random=True)


def build_crop_transform(cfg: AugmentConfig, size: int, channels: int) -> SampleTransform:
    """Only the recipe's RandomResizedCrop: any-size rows to ``size x size`` for the device to augment.

    For whole-picture rows (resize mode ``whole``) when augmentation runs on the GPU: the
    batch must be of one size before it is stacked, so the crop runs per sample in the
    workers and :class:`imgpipe.train.augment.BatchAugment` (``crop=False``) does the rest.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return SampleTransform(_train_ops(cfg, size, channels)[:1], size, channels, random=True)


def build_eval_transform(size: int, channels: int | None = None, resize_to: int | None = None) -> SampleTransform:
    """Shorter side to ``resize_to`` (default ``size``; INTER_AREA when shrinking), then the centre ``size x size``.

    No randomness. At the data's own size (the resize step's ``short-side-crop``) this is
    the identity. For whole pictures stored with their short side at ``size / 0.875`` (mode
    ``whole``), ``resize_to`` of that side gives the standard evaluation view, the centre
    ``size`` of it, the pixels ``short-side-crop`` would have stored.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    ops = [
        A.SmallestMaxSize(max_size=resize_to or size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0),
        A.CenterCrop(size, size, p=1.0),
    ]
    return SampleTransform(ops, size, channels, random=False)

