"""Augmentation on the device, normalization, batch mixing, and the soft-target loss.

    batch = BatchAugment(cfg, size, channels, ...)(images, seed)   # uint8 B x C x H x W in, normalized float out, on the device

How it works in detail: docs/internals/train.md, "imgpipe.train.augment".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

# The recipe's settings are torch-free (imgpipe.train.config); re-exported here.
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
)
from imgpipe.train.policies import POLICY_NAMES, PolicyLimits, PolicySpec
from imgpipe.train.policy_gpu import apply_policy

__all__ = [
    "IMAGENET",
    "JPEG_QUALITY",
    "NOISE_STD",
    "Normalization",
    "channel_stats",
    "build_batch_eval_transform",
    "normalize",
    "BatchAugment",
    "MixupCutmix",
    "one_hot_targets",
    "soft_target_cross_entropy",
    "step_seed",
    "step_generator",
]


def build_batch_eval_transform(size: int) -> v2.Compose:
    """The evaluation resize on ``B x C x H x W`` tensors (on the device): shorter side to ``size``, centre crop.

    For batches decoded or augmented on the device (the GPU path); the loader's workers
    use :func:`imgpipe.train.augment_cpu.build_eval_transform`. No randomness. At the data's own
    size (the resize step's ``short-side-crop``) it is the identity.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def _standardize(x: torch.Tensor, channels: int, norm: Normalization) -> torch.Tensor:
    mean, std = channel_stats(channels, norm)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def normalize(images: torch.Tensor, channels: int, channels_last: bool = False, norm: Normalization = IMAGENET) -> torch.Tensor:
    """uint8 ``B x C x H x W`` (any device) to float32 normalized by ``norm``, optionally channels-last.

    One fused multiply-add, ``x * (1 / (255 std)) - mean / std``: the uint8-to-float
    conversion and a single pass, which matters when this runs on a CPU.
    """
    mean, std = channel_stats(channels, norm)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(1, -1, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = images.to(torch.float32, memory_format=fmt)
    return out.mul_(scale).add_(bias)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Runs a block on the global generators seeded with ``seed``, restoring them afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


class BatchAugment(nn.Module):
    """The training recipe on a whole batch on the device: uint8 in, normalized float out.

    kornia draws the crop, flips, affine, colour jitter, blur, noise, JPEG and erasing per
    sample; the policy is torchvision's (:mod:`imgpipe.train.policy_gpu`: each sample draws
    its operations, torchvision's functional ops apply them per group). Every call is
    seeded explicitly (``seed``) and leaves the global generators as it found them.

    Args:
        cfg: The recipe.
        size: Output side.
        channels: 1 or 3. For one channel, the colour jitter and JPEG run on a 3-channel
            copy that is converted back to grey; the policy takes one channel as it is.
        crop: Start with the RandomResizedCrop; off when the batch arrives cropped
            (whole-picture rows, cropped per sample in the loader workers).
        norm: The mean and std the output is normalized with.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        size: int,
        channels: int,
        crop: bool = True,
        norm: Normalization = IMAGENET,
    ) -> None:
        super().__init__()
        import kornia.augmentation as K

        channel_stats(channels)
        self.cfg, self.size, self.channels, self.norm = cfg, size, channels, norm
        self.eval_transform = build_batch_eval_transform(size)
        # crop=False: the workers took each sample's RandomResizedCrop (whole-picture rows).
        # "resample": one batched warp for every sample's boxes. kornia's default ("slice") crops and
        # interpolates sample by sample, some twenty small ops each, and on a GPU the augmentation
        # waits on those launches, not on pixels. Same boxes, the same bilinear pixels (tested).
        geometric: list[nn.Module] = [K.RandomResizedCrop((size, size), scale=cfg.crop_scale, cropping_mode="resample")] if crop else []
        if cfg.hflip:
            geometric.append(K.RandomHorizontalFlip())
        if cfg.vflip:
            geometric.append(K.RandomVerticalFlip())
        if cfg.rot90:  # exact quarter turns of the square crop: nearest neighbour moves pixels only
            geometric.append(K.RandomRotation90(times=(0, 3), resample="nearest", p=1.0))
        if cfg.rotation > 0:
            geometric.append(K.RandomAffine(cfg.rotation, translate=(0.05, 0.05), scale=(0.95, 1.05), p=AFFINE_P))
        self.geometric = nn.Sequential(*geometric)
        # torchvision's policies with the domain's limits, drawn as on the CPU path (imgpipe.train.policies).
        limits = PolicyLimits(tuple(cfg.policy_exclude), cfg.policy_max_m)
        self.policy = PolicySpec(cfg.policy, cfg.randaugment_n, cfg.randaugment_m, size, limits) if cfg.policy in POLICY_NAMES else None
        color: list[nn.Module] = []
        if cfg.color_jitter > 0:
            cj = cfg.color_jitter
            color.append(K.ColorJitter(cj, cj, cj, cfg.hue, p=COLOR_JITTER_P))
        if cfg.grayscale_p > 0 and channels == 3:
            color.append(K.RandomGrayscale(p=cfg.grayscale_p))
        self.color = nn.Sequential(*color)
        k = blur_kernel(size)
        self.blur = K.RandomGaussianBlur((k, k), (0.1, 2.0), p=cfg.blur_p) if cfg.blur_p > 0 else None
        mid_std = sum(NOISE_STD) / 2
        self.noise = K.RandomGaussianNoise(std=mid_std, p=cfg.noise_p) if cfg.noise_p > 0 else None
        self.jpeg = K.RandomJPEG(jpeg_quality=tuple(map(float, JPEG_QUALITY)), p=cfg.jpeg_p) if cfg.jpeg_p > 0 else None
        self.erasing = K.RandomErasing(p=cfg.random_erasing, value=0.0) if cfg.random_erasing > 0 else None

    def _as_rgb(self, fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 3:
            return fn(x)
        rgb = fn(x.expand(-1, 3, -1, -1))
        return (rgb * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)

    def _apply_policy(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The policy on uint8 pixels, as torchvision's kernels take them; per-sample draws from ``seed``."""
        assert self.policy is not None
        pixels = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        out = apply_policy(pixels, self.policy, np.random.default_rng([seed, 2]))
        return out.float().div_(255.0)

    def forward(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """Augments a ``B x C x H x W`` uint8 batch into ``B x C x size x size`` normalized float32."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected a B x C x H x W uint8 batch, got {images.dtype} {tuple(images.shape)}")
        if self.cfg.policy == "none":
            return normalize(self.eval_transform(images), self.channels, norm=self.norm)
        with _seeded(seed, images.device):
            x = self.geometric(images.float() / 255.0)
            if self.policy is not None:
                x = self._apply_policy(x, seed)
            if len(self.color):
                x = self._as_rgb(self.color, x).clamp(0, 1)
            if self.blur is not None:
                x = self.blur(x)
            if self.noise is not None:
                x = self.noise(x).clamp(0, 1)
            if self.jpeg is not None:  # kornia's JPEG codes YCbCr: a grey batch goes through as RGB
                x = self._as_rgb(self.jpeg, x).clamp(0, 1)
            x = _standardize(x, self.channels, self.norm)
            if self.erasing is not None:
                x = self.erasing(x)
        return x


def step_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """A seed for one training step's batch-level randomness (GPU augmentation, MixUp/CutMix)."""
    return int(np.random.SeedSequence([seed, epoch, rank, step, 1]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The explicit generator of one training step on one rank: ``seed + epoch + rank + step``."""
    return np.random.default_rng([seed, epoch, rank, step])


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets ``(1 - smoothing) * one_hot + smoothing / num_classes``; each row sums to 1."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy against soft targets (rows summing to 1), computed in float32.

    With ``class_weights`` (one per class) each class's share of a target counts that much;
    for one-hot targets that is ``CrossEntropyLoss(weight=..., reduction="sum")`` over the
    batch size (not over the summed weights, so a batch of rare classes weighs more), and it
    extends to MixUp/CutMix and smoothed targets.
    """
    if class_weights is not None:
        targets = targets * class_weights.to(targets.device, targets.dtype)
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class MixupCutmix:
    """MixUp or CutMix on a batch, with soft targets and label smoothing.

    With both alphas positive, each batch uses CutMix or MixUp with probability
    ``switch_prob``/``1 - switch_prob`` (timm's scheme); with ``prob`` below 1 a batch is
    mixed at all only with that probability (timm ``data/mixup.py`` ``Mixup(prob=...)``,
    its train.py ``--mixup-prob``). The partner of sample ``i`` is
    sample ``i - 1`` (the batch rolled by one, as in torchvision v2). With both alphas 0
    the images pass unchanged and the targets are the smoothed one-hot labels.

    Args:
        num_classes: Classes of the targets.
        mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 disables MixUp.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 disables CutMix.
        label_smoothing: Smoothing applied to both mixed labels.
        switch_prob: Probability of CutMix when both are enabled.
        prob: Probability that a batch is mixed at all; the others keep their images
            and get the smoothed one-hot targets.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup and cutmix alphas must be >= 0 (0 disables)")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.label_smoothing = label_smoothing
        self.switch_prob = switch_prob
        self.prob = prob
        one_hot_targets(torch.zeros(1, dtype=torch.int64), num_classes, label_smoothing)  # validates smoothing

    @property
    def enabled(self) -> bool:
        """Whether any mixing happens."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixed ``B x C x H x W`` float batch and ``B x num_classes`` targets."""
        images, targets, _ = self.mix(images, labels, rng)
        return images, targets

    def mix(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """As calling it, and whether this batch was mixed (its loss is of another level: imgpipe.train.divergence)."""
        targets = one_hot_targets(labels, self.num_classes, self.label_smoothing)
        if not self.enabled or len(labels) < 2:
            return images, targets, False
        # Drawn only when it can matter, so prob=1 keeps the random stream (and results) of before.
        if self.prob < 1.0 and rng.random() >= self.prob:
            return images, targets, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = images.roll(1, 0)
        if use_cutmix:
            images, lam = self._cutmix(images, partner, lam, rng)
        else:
            images = images * lam + partner * (1.0 - lam)
        return images, targets * lam + targets.roll(1, 0) * (1.0 - lam), True

    @staticmethod
    def _cutmix(images: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        """Pastes a box of area ~``1 - lam`` from the partner; returns the exact kept fraction."""
        h, w = images.shape[-2:]
        ratio = np.sqrt(1.0 - lam)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        bh, bw = int(h * ratio), int(w * ratio)
        y0, y1 = np.clip([cy - bh // 2, cy + bh // 2], 0, h)
        x0, x1 = np.clip([cx - bw // 2, cx + bw // 2], 0, w)
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        return mixed, 1.0 - float((y1 - y0) * (x1 - x0)) / float(h * w)
