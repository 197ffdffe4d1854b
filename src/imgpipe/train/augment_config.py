"""The augmentation recipe of a training run, without torch: which policy, at what strength, which transforms.

:class:`AugmentConfig` is what the CPU and GPU augmentation paths build from
(:mod:`imgpipe.train.augment`, :mod:`imgpipe.train.augment_cpu`);
:class:`imgpipe.train.config.TrainConfig` holds its fields and rebuilds it (``augment``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from imgpipe.config import check_numbers, check_range
from imgpipe.train.policies import MAX_M, MAX_N, PolicyLimits, check_limits
from imgpipe.train.recipes import BASE

__all__ = ["POLICIES", "Policy", "AugmentConfig", "check_policy"]

Policy = Literal["randaugment", "trivialaugment", "autoaugment", "basic", "none"]
POLICIES: tuple[str, ...] = get_args(Policy)


def check_policy(n: int, m: int, policy: str, limits: PolicyLimits) -> None:
    """RandAugment's N and M within what the CPU and GPU paths and torchvision all take, and usable limits.

    Raises:
        ValueError: Naming the field and its range, or the policy a domain leaves empty.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValueError(f"randaugment_n must be an integer in [1, {MAX_N}], got {n!r} (for no policy use aug_policy basic)")
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_M:
        raise ValueError(f"randaugment_m must be an integer in [0, {MAX_M}] (torchvision's magnitude bins), got {m!r}")
    check_limits(policy, limits)


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation recipe (shared by the CPU and GPU paths).

    Attributes:
        policy: ``randaugment``, ``trivialaugment``, ``autoaugment``, ``basic`` (no
            policy) or ``none`` (no augmentation).
        hflip: Random horizontal flips; turn off where mirroring changes the class
            (text, digits, some medical images).
        vflip: Random vertical flips (overhead and microscope images, which have no "up").
        rot90: Random quarter turns (0, 90, 180 or 270 degrees), for the same images.
        randaugment_n: RandAugment operations per image, 1-4 (no policy: ``basic``).
        randaugment_m: RandAugment magnitude bin, 0-30 (torchvision's 31 bins).
        policy_exclude: Policy operations never applied (the domain's; names of
            :data:`imgpipe.train.policies.ALL_OPS`).
        policy_max_m: No policy operation stronger than RandAugment's at this bin (0-30;
            30: no cap), on every policy (:class:`imgpipe.train.policies.PolicyLimits`).
        color_jitter: Brightness/contrast/saturation strength, applied with probability
            0.8 (with ``hue``); 0 disables.
        hue: Hue shift range of the colour jitter, as a fraction of the colour circle
            (0-0.5); 0 keeps hues, for data where colour is the label.
        noise_p: Probability of additive Gaussian noise (std 2-8% of the range), as from a sensor.
        jpeg_p: Probability of re-encoding as a JPEG of quality 40-95, as web images are.
        grayscale_p: Probability of converting a colour image to grey (kept 3-channel).
        blur_p: Probability of a Gaussian blur (sigma 0.1-2, kernel ~5% of the side).
        rotation: Maximum rotation in degrees of the affine (with +-5% translation and
            scale), applied with probability 0.5; 0 disables.
        random_erasing: Probability of erasing a random rectangle (filled with the
            mean colour, i.e. 0 after normalization).
        crop_scale: Area range of RandomResizedCrop, as fractions of the image.
    """

    policy: Policy = BASE["aug_policy"]
    hflip: bool = BASE["hflip"]
    vflip: bool = BASE["vflip"]
    rot90: bool = BASE["rot90"]
    randaugment_n: int = BASE["randaugment_n"]
    randaugment_m: int = BASE["randaugment_m"]
    policy_exclude: tuple[str, ...] = BASE["policy_exclude"]
    policy_max_m: int = BASE["policy_max_m"]
    color_jitter: float = 0.0  # off under the default policy, as a resolved TrainConfig has it (timm)
    hue: float = BASE["hue"]
    noise_p: float = BASE["noise_p"]
    jpeg_p: float = BASE["jpeg_p"]
    grayscale_p: float = 0.02
    blur_p: float = 0.1
    rotation: float = BASE["rotation"]
    random_erasing: float = 0.25
    crop_scale: tuple[float, float] = (0.08, 1.0)

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        check_policy(self.randaugment_n, self.randaugment_m, self.policy, PolicyLimits(tuple(self.policy_exclude), self.policy_max_m))
        for name in ("grayscale_p", "blur_p", "random_erasing", "noise_p", "jpeg_p"):
            check_range(name, getattr(self, name), 0, 1, note="a probability")
        check_range("color_jitter", self.color_jitter, 0, 1, note="a strength; 0 disables")
        check_range("rotation", self.rotation, 0, 180, note="degrees; 0 disables")
        check_range("hue", self.hue, 0, 0.5, note="a fraction of the colour circle; 0 keeps hues")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
