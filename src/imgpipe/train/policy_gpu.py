"""The policies on a whole batch on the device: torchvision's own ``transforms.v2.functional`` ops, per group of samples.

Each sample's operations come from :func:`imgpipe.train.policies.draw` (one seeded
``numpy.random.Generator`` per batch), as on the CPU path; the samples that drew the same
operation and magnitude in the same position go through one call of torchvision's
functional op on a uint8 ``B x C x H x W`` tensor, on whatever device holds it. So the
GPU path is torchvision's definition by construction, batched: at most one call per
distinct (operation, magnitude) in a position, not one per sample.

Call ``apply_policy(images_uint8, spec, rng)``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from imgpipe.train.policies import PolicySpec, draw

__all__ = ["apply_policy", "apply_op"]

_NEAREST = InterpolationMode.NEAREST


def apply_op(images: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One operation on uint8 ``[B x] C x H x W`` images, as torchvision's ``_AutoAugmentBase`` applies it."""
    if op == "Identity":
        return images
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        return F.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=_NEAREST, fill=None, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        return F.affine(images, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=_NEAREST, fill=None)
    if op == "Rotate":
        return F.rotate(images, angle=magnitude, interpolation=_NEAREST, fill=None)
    if op == "Brightness":
        return F.adjust_brightness(images, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return F.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return F.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return F.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return F.posterize(images, bits=int(magnitude))
    if op == "Solarize":
        return F.solarize(images, threshold=255.0 * magnitude)
    if op == "AutoContrast":
        return F.autocontrast(images)
    if op == "Equalize":
        return F.equalize(images)
    if op == "Invert":
        return F.invert(images)
    raise ValueError(f"unknown policy operation {op!r}")


def apply_policy(images: torch.Tensor, spec: PolicySpec, rng: np.random.Generator) -> torch.Tensor:
    """``spec`` on a uint8 ``B x C x H x W`` batch: each sample draws its own operations from ``rng``.

    Contrast, like torchvision's, takes each image's own mean (the op is called on a
    group, and torchvision's kernels reduce per image).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"expected a B x C x H x W uint8 batch, got {images.dtype} {tuple(images.shape)}")
    drawn = [draw(spec, rng) for _ in range(len(images))]
    out = images.clone()
    for position in range(max((len(d) for d in drawn), default=0)):
        groups: dict[tuple[str, float], list[int]] = defaultdict(list)
        for i, ops in enumerate(drawn):
            if position < len(ops) and ops[position][0] != "Identity":
                groups[ops[position]].append(i)
        for (op, magnitude), members in groups.items():
            index = torch.tensor(members, device=images.device)
            out[index] = apply_op(out.index_select(0, index), op, magnitude)
    return out
