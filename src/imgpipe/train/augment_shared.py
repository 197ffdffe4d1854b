"""What the CPU recipe and the device's augmentation share, without torch: the normalization and the draws' constants.

:mod:`imgpipe.train.augment_cpu` runs in the loader's workers, which start without torch's
vision stack (torchvision): every value both paths use lives here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AFFINE_P",
    "COLOR_JITTER_P",
    "NOISE_STD",
    "JPEG_QUALITY",
    "Normalization",
    "IMAGENET",
    "channel_stats",
    "mean_uint8",
    "blur_kernel",
]

AFFINE_P = 0.5
COLOR_JITTER_P = 0.8
# Gaussian noise's std as a fraction of the pixel range (the CPU path draws one per image in
# this range; kornia's noise has one std, the range's middle), and the JPEG qualities drawn.
NOISE_STD = (0.02, 0.08)
JPEG_QUALITY = (40, 95)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the stored pixels scaled to ``[0, 1]``, as a model expects them.

    Three channels: RGB, or the colour space the resize ops stored (YCbCr, Lab); a grey
    model uses their averages (:func:`channel_stats`). The training run holds one
    (``TrainingRun.norm``): the starting weights' own (:func:`imgpipe.train.pretrained.normalization`,
    :func:`imgpipe.train.pretrained.recorded_normalization`), else the data's own train-split
    statistics (the resize manifest's, :func:`imgpipe.resize.statistics.split_moments`), else
    :data:`IMAGENET`; every consumer (:func:`imgpipe.train.augment.normalize`, :class:`imgpipe.train.augment.BatchAugment`, the CPU recipe's
    erasing fill, ``model.pt`` and ``model.json``) takes it from there.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={self.mean}, std={self.std}")

    @classmethod
    def of_channels(cls, mean: Sequence[float], std: Sequence[float]) -> Normalization:
        """From per-channel values of 3 channels, or of 1 (grey: repeated, so :func:`channel_stats` gives it back).

        Raises:
            ValueError: For another count, counts that differ, or a std that is not positive.
        """
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"need 1 or 3 means and as many stds, got mean={list(mean)}, std={list(std)}")
        repeat = 3 // len(mean)
        return cls(tuple(float(m) for m in mean) * repeat, tuple(float(s) for s in std) * repeat)  # type: ignore[arg-type]


# The ImageNet statistics of torchvision's references (and of most of its weights).
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def channel_stats(channels: int, norm: Normalization = IMAGENET) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization mean and std for 3 channels, or their averages for 1 (grey) channel.

    Raises:
        ValueError: For any other channel count.
    """
    if channels == 3:
        return tuple(norm.mean), tuple(norm.std)
    if channels == 1:
        return (sum(norm.mean) / 3,), (sum(norm.std) / 3,)
    raise ValueError(f"images must have 1 or 3 channels, got {channels}")


def mean_uint8(channels: int, norm: Normalization = IMAGENET) -> list[int]:
    """The mean as uint8 pixel values (a fill that normalizes to zero)."""
    return [round(m * 255) for m in channel_stats(channels, norm)[0]]


def blur_kernel(size: int) -> int:
    """The Gaussian blur's odd kernel side for images of ``size`` (a twentieth, at least 3)."""
    return max(3, (size // 20) | 1)
