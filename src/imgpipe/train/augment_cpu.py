"""The CPU augmentation path: albumentations on ``H x W x C`` uint8 numpy arrays, one sample at a time.

The loader's workers run it on the arrays the shards hold and stack the outputs into one
uint8 batch, which the training loop normalizes in one step (:func:`imgpipe.train.augment.normalize`);
:class:`imgpipe.train.augment.BatchAugment` runs the same recipe on whole batches on the
device. The policies (RandAugment, TrivialAugmentWide, AutoAugment) are torchvision's,
drawn by :mod:`imgpipe.train.policies` and applied by :mod:`imgpipe.train.policy_cpu`;
docs/architecture.md maps every other step of the recipe to its torchvision counterpart.

* :func:`build_train_transform`: the training recipe, any ``H x W x C`` in, ``size x size x C`` out.
* :func:`build_eval_transform`: shorter side to ``size``, centre crop; deterministic.

Both return a :class:`SampleTransform`, called as ``transform(image, seed)``: a sample's
augmentation depends on its seed alone (derived from ``(seed, epoch, index)`` by
:func:`imgpipe.train.partition.sample_seed`), never on a global generator.
"""

from __future__ import annotations

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

from imgpipe.resize.warp import shrink
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.augment_shared import (
    AFFINE_P,
    COLOR_JITTER_P,
    IMAGENET,
    JPEG_QUALITY,
    NOISE_STD,
    Normalization,
    blur_kernel,
    channel_stats,
    mean_uint8,
)
from imgpipe.train.policies import POLICY_NAMES, PolicyLimits, PolicySpec
from imgpipe.train.policy_cpu import PolicyTransform

__all__ = [
    "SampleTransform",
    "build_train_transform",
    "build_crop_transform",
    "build_eval_transform",
]


def _policy(cfg: AugmentConfig, size: int) -> PolicyTransform | None:
    """The recipe's policy, drawn as :mod:`imgpipe.train.policies` defines it (torchvision's), with the domain's limits."""
    if cfg.policy not in POLICY_NAMES:
        return None
    limits = PolicyLimits(tuple(cfg.policy_exclude), cfg.policy_max_m)
    return PolicyTransform(PolicySpec(cfg.policy, cfg.randaugment_n, cfg.randaugment_m, size, limits), p=1.0)


# ----------------------------------------------------------------------------------------
# The transforms.


# A JPEG row is decoded at the smallest DCT scale that keeps the crop's box at least this many
# times the output (issue 50), so a box of 2.3 times the output or more decodes at 7/8 or less;
# the resize after it shrinks by 2 or more, which smooths what the DCT's scaling leaves
# (tests/train/test_reduced_decode.py: within 3.5 grey levels of torchvision's full decode).
KEEP_FOR_RESIZE = 2.0


def _filled(slot: np.ndarray, image: np.ndarray) -> np.ndarray:
    np.copyto(slot, image)
    return slot


def _placed(result: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """A pipeline's ``H x W x C`` result, in ``out`` where one is given."""
    if result.ndim == 2:  # an OpenCV kernel dropped the channel axis of a one-channel image
        result = result[..., None]
    if out is not None and not np.shares_memory(result, out):
        np.copyto(out, result)
        return out
    return result


def _flipped(image: np.ndarray, *, in_place: bool) -> np.ndarray:
    """``image`` mirrored left to right: in place where it is a slot of ours, else a new array."""
    flipped = cv2.flip(image, 1, dst=image) if in_place else cv2.flip(image, 1)  # in place: 5 us at 224 px, numpy's copy 180
    return flipped[..., None] if flipped.ndim == 2 else flipped


class SampleTransform:
    """One sample's transform: ``H x W x C`` uint8 in (any ``H x W``), ``size x size x C`` uint8 out.

    Called as ``transform(image, seed)``, or ``transform(image, seed, out=slot)`` to write
    the result into ``slot`` (a batch's row). Random transforms draw only from generators
    made from ``seed`` for this call; deterministic ones ignore it. Picklable (workers
    started by spawn or forkserver receive a copy).

    A pipeline that starts with a ``RandomResizedCrop`` (and a ``HorizontalFlip``) runs those
    two natively: albumentations' own crop parameters from the same draws, then one resize
    straight into ``out`` and an in-place flip, without albumentations' per-call bookkeeping;
    the rest of the pipeline, if any, runs as albumentations runs it. A crop no larger than
    the output is albumentations' own pixels, bit for bit; a larger one is shrunk by
    :func:`imgpipe.resize.warp.shrink` where albumentations calls ``cv2.INTER_AREA``, which
    at the non-integer ratios of random crops costs 2 to 4 times as much and is no closer to
    torchvision's ``resized_crop(antialias=True)`` (``tests/train/test_augment.py``,
    ``tests/resize/test_shrink.py``).

    Attributes:
        pipeline: The ``albumentations.Compose`` it runs.
        size: Output side.
        channels: Channels in and out (1 or 3; ``None``: either).
        random: Whether the output depends on the seed.
    """

    fills_out = True  # the loader may pass out= (a batch's row)

    def __init__(self, ops: Sequence[A.BasicTransform | A.BaseCompose], size: int, channels: int | None, *, random: bool) -> None:
        if channels is not None:
            channel_stats(channels)  # validates the channel count
        ops = list(ops)
        self.pipeline = A.Compose(ops, p=1.0, is_check_shapes=False)
        self.size, self.channels, self.random = size, channels, random
        crop = ops[0] if ops and type(ops[0]) is A.RandomResizedCrop else None
        flip = ops[1] if crop is not None and len(ops) > 1 and type(ops[1]) is A.HorizontalFlip else None
        self._crop, self._flip = crop, flip
        rest = ops[(crop is not None) + (flip is not None) :]
        self._rest = A.Compose(rest, p=1.0, is_check_shapes=False) if crop is not None and rest else None
        # The evaluation view (shorter side to a size, centre crop): where the shorter side is
        # that size already, the output is the centre box of the image, which a JPEG decodes alone.
        centred = [type(op) for op in ops] == [A.SmallestMaxSize, A.CenterCrop]
        self._centre = (ops[0].max_size, ops[1].height, ops[1].width) if centred else None
        self._link_generators()

    def _link_generators(self) -> None:
        """Gives every operation the same two generators, which :meth:`__call__` resets per sample."""
        self._np_rng = np.random.Generator(np.random.PCG64(0))
        self._py_rng = _random.Random(0)
        self.pipeline.set_random_state(self._np_rng, self._py_rng)
        if self._rest is not None:
            self._rest.set_random_state(self._np_rng, self._py_rng)

    def _head_params(self, shape: tuple[int, ...]) -> tuple[tuple[int, int, int, int], bool]:
        """The leading crop's box ``(x1, y1, x2, y2)`` and whether to flip, drawn as albumentations draws them, from the shape alone."""
        crop, flip, rng = self._crop, self._flip, self._py_rng
        rng.random()  # Compose's own draw: it makes one even at p=1 (need_to_run)
        box = crop.get_params_dependent_on_data({"shape": shape}, {})["crop_coords"]
        flipped = flip is not None and flip.p > 0 and (flip.p >= 1 or rng.random() < flip.p)
        return box, flipped

    def _head(self, region: np.ndarray, out: np.ndarray | None, flipped: bool) -> np.ndarray:
        """``region`` (the crop's pixels) resized to the output side, into ``out`` where it can, then flipped."""
        crop = self._crop
        h, w = crop.size
        slot = out if out is not None and self._rest is None and out.shape == (h, w, region.shape[2]) else None
        if region.shape[:2] == (h, w):  # albumentations keeps a crop of the right size as it is
            result = region if slot is None else _filled(slot, region)
        elif region.shape[0] > h or region.shape[1] > w:
            result = shrink(region, (w, h), dst=slot)  # where albumentations' cv2.INTER_AREA (module docstring)
        else:
            result = cv2.resize(region, (w, h), dst=slot, interpolation=crop.interpolation)
            if result.ndim == 2:  # OpenCV drops the channel axis of a one-channel image
                result = result[..., None]
        if flipped:
            result = _flipped(result, in_place=result is not region)  # a buffer of ours (the row, or the resize's)
        return result

    def _native_head(self, image: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """The leading crop (and flip) with albumentations' draws, in albumentations' order."""
        (x1, y1, x2, y2), flipped = self._head_params(image.shape)
        return self._head(image[y1:y2, x1:x2], out, flipped)

    @property
    def crops_first(self) -> bool:
        """It starts with a crop (a RandomResizedCrop run natively, or the evaluation view's centre crop): :meth:`from_jpeg` decodes for it."""
        return self._crop is not None or self._centre is not None

    def _centre_box(self, shape: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
        """The evaluation view's output as a box of the image (albumentations' centre), where no resize comes before it; else None."""
        max_size, crop_h, crop_w = self._centre  # type: ignore[misc]
        height, width = shape[:2]
        if min(height, width) != max_size or crop_h > height or crop_w > width:
            return None
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return left, top, left + crop_w, top + crop_h

    def from_jpeg(self, data: np.ndarray, shape: tuple[int, int, int], seed: int, out: np.ndarray | None = None) -> np.ndarray:
        """``transform(decode(data), seed, out)``, the JPEG decoded only as large as the crop needs.

        The crop's box is drawn from the shape alone (``shape``: the row's, which its header
        was checked against); the JPEG is decoded at the smallest of libjpeg-turbo's DCT
        scales (``n/8``) that keeps the box :data:`KEEP_FOR_RESIZE` times the output, and the
        box is cut from that (:func:`imgpipe.train.rows.decode_jpeg_for_box`); where no scale
        below 1 does, at full size: the pixels of :meth:`__call__` exactly. The evaluation view
        decodes only its centre box where the shorter side is its size already (the pixels of
        :meth:`__call__` exactly), else the whole picture.

        Raises:
            ValueError: For bytes the decoder refuses (a corrupt or truncated JPEG).
        """
        from imgpipe.data.jpeg_region import decode_box
        from imgpipe.train.rows import decode_jpeg_for_box

        if self._crop is None:
            if self._centre is None:
                raise TypeError("from_jpeg needs a transform that starts with a RandomResizedCrop, or the evaluation view")
            box = self._centre_box(shape)
            if box is None:  # a resize comes first: it needs the whole picture
                return self(decode_box(data, shape, (0, 0, shape[1], shape[0])), seed, out)
            return _placed(decode_box(data, shape, box), out)
        self._reseed(seed)
        box, flipped = self._head_params(shape)
        region = decode_jpeg_for_box(data, shape, box, self._crop.size, KEEP_FOR_RESIZE)
        result = self._head(region, out, flipped)
        return self._finish(result, out)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._link_generators()  # a copy (spawned worker) must not rely on pickle keeping them shared

    def __call__(self, image: np.ndarray, seed: int, out: np.ndarray | None = None) -> np.ndarray:
        expected = (1, 3) if self.channels is None else (self.channels,)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in expected:
            raise TypeError(f"expected an H x W x {' or '.join(map(str, expected))} uint8 array, got {image.dtype} {tuple(image.shape)}")
        self._reseed(seed)
        if self._crop is not None:
            return self._finish(self._native_head(image, out), out)
        return _placed(self.pipeline(image=image)["image"], out)

    def _reseed(self, seed: int) -> None:
        if self.random:
            # Reset in place: the state depends on this seed alone (as fresh generators would).
            self._py_rng.seed(seed)
            if self._crop is None or self._rest is not None:  # the native head draws from the Python generator alone
                self._np_rng.bit_generator.state = np.random.PCG64(seed).state

    def _finish(self, result: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """The rest of the pipeline after the native head, and the result in ``out``."""
        if self._rest is not None:
            result = self._rest(image=result, force_apply=True)["image"]  # force_apply: no second Compose draw
        return _placed(result, out)

    def __repr__(self) -> str:
        return f"SampleTransform(size={self.size}, channels={self.channels}, random={self.random}, {self.pipeline!r})"


def _train_ops(cfg: AugmentConfig, size: int, channels: int, norm: Normalization = IMAGENET) -> list[A.BasicTransform | A.BaseCompose]:
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
                p=AFFINE_P,
            )
        )
    policy = _policy(cfg, size)
    if policy is not None:
        ops.append(policy)
    if cfg.color_jitter > 0:
        cj = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=cfg.hue, p=COLOR_JITTER_P))
    if cfg.grayscale_p > 0 and channels == 3:
        ops.append(A.ToGray(num_output_channels=3, method="weighted_average", p=cfg.grayscale_p))
    if cfg.blur_p > 0:
        k = blur_kernel(size)
        ops.append(A.GaussianBlur(blur_limit=(k, k), sigma_limit=(0.1, 2.0), p=cfg.blur_p))
    if cfg.noise_p > 0:
        ops.append(A.GaussNoise(std_range=NOISE_STD, p=cfg.noise_p))
    if cfg.jpeg_p > 0:
        ops.append(A.ImageCompression(compression_type="jpeg", quality_range=JPEG_QUALITY, p=cfg.jpeg_p))
    if cfg.random_erasing > 0:
        ops.append(A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill=tuple(mean_uint8(channels, norm)), p=cfg.random_erasing))
    return ops


def build_train_transform(cfg: AugmentConfig, size: int, channels: int, norm: Normalization = IMAGENET) -> SampleTransform:
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
