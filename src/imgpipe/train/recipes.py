"""Training recipes by dataset size and augmentation settings by domain, without torch.

* ``recipe`` (:data:`SIZE_RECIPES`): note 004's recipes by data size, each value beside the
  note's words: ``small`` (under :data:`SMALL_BELOW` train images per class), ``medium``
  (thousands: :data:`MEDIUM_FROM_IMAGES` images in all) and ``large`` (:data:`LARGE_FROM_IMAGES`
  images in all). ``auto`` picks one
  from the train split (:func:`pick_recipe`); ``none`` is :data:`BASE`, as before recipes.
* a short run (:data:`SHORT_RUNS`): at most :data:`SHORT_RUN_UPTO` of its recipe's epochs, set
  explicitly, it gets a lighter version of the recipe where one was measured (``medium``).
* ``domain`` (:data:`DOMAINS`): which transformations keep the label, flips and the
  policy's operations alike; test-time augmentation uses only the flips the domain allows.

Every field a recipe or a domain sets is ``None`` ("unset") in :class:`imgpipe.train.config.TrainConfig`
until :func:`resolve` fills it: the user's value wins field by field, then the domain's, the
size recipe's, then :data:`BASE`. The train step resolves once it knows the train split's
class counts, writes the result as ``config.yaml`` and the :class:`Resolution` (which recipe,
why, which field came from where) to ``metrics.json`` and the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np

# A TrainConfig (imgpipe.train.config imports this module, so it is not named here).
C = TypeVar("C")

__all__ = [
    "without_effect",
    "Recipe",
    "Domain",
    "RECIPES",
    "DOMAIN_NAMES",
    "BASE",
    "SIZE_RECIPES",
    "DOMAINS",
    "RECIPE_FIELDS",
    "DOMAIN_FIELDS",
    "MAY_STAY_UNSET",
    "SMALL_BELOW",
    "MEDIUM_FROM_IMAGES",
    "LARGE_FROM_IMAGES",
    "SHORT_RUN_UPTO",
    "SHORT_RUNS",
    "Resolution",
    "pick_recipe",
    "resolve",
    "tta_flip_dims",
]

Recipe = Literal["none", "auto", "small", "medium", "large"]
RECIPES: tuple[str, ...] = get_args(Recipe)
Domain = Literal["natural", "text", "medical", "satellite", "product"]
DOMAIN_NAMES: tuple[str, ...] = get_args(Domain)

# The notes' size classes: "small data (< 50 per class)", "thousands", "hundreds of thousands"
# (of images in all: a 2-class set of 2,600 images is "thousands", not "large"). A set of at
# least 50 per class but under a thousand images in all is in neither of the first two; it gets
# the small recipe (milder mixing, early stopping), which won there in the model race
# (docs/benchmarks.md: LFW's 118 train images, 59 per class; the medium recipe lost).
SMALL_BELOW = 50
MEDIUM_FROM_IMAGES = 1_000
LARGE_FROM_IMAGES = 100_000

# imgpipe's settings when no recipe is named (recipe "none", domain "natural"): the values
# these fields had before recipes existed, so a config that names neither trains as before.
BASE: dict[str, Any] = {
    "epochs": 10,
    "aug_policy": "randaugment",
    "randaugment_n": 2,
    "randaugment_m": 9,
    "mixup": 0.2,
    "cutmix": 1.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "label_smoothing": 0.0,
    "weight_decay": 0.05,
    # None: the model's own stochastic depth (torchvision: 0.1 for ConvNeXt, 0.2 for
    # EfficientNet, Swin and MaxViT), as before recipes existed; it may stay None resolved.
    "drop_path": None,
    "crop_scale": (0.08, 1.0),
    "patience": 0,
    "freeze_fraction": 0.0,
    "unfreeze_stages": 1,
    "hflip": True,
    "vflip": False,
    "rot90": False,
    "rotation": 10.0,
    "color_jitter": 0.2,
    "hue": 0.05,
    "noise_p": 0.0,
    "jpeg_p": 0.0,
    # Every policy operation, at any strength (imgpipe.train.policies.PolicyLimits).
    "policy_exclude": (),
    "policy_max_m": 30,
}

# The notes' recipes (note 004), value by value; a value the notes do not give comes from
# timm's or torchvision's published recipes, marked so. Every recipe crops as the notes' code
# does: RandomResizedCrop(scale=(0.6, 1)).
SIZE_RECIPES: dict[str, dict[str, Any]] = {
    # "Small data (< 50 per class): strong geometry + colour TrivialAugmentWide, MixUp alpha=0.2
    # often, CutMix at a low probability, early stopping and fewer epochs, linear probe then
    # gradual unfreezing."
    "small": {
        "aug_policy": "trivialaugment",  # "strong geometry + colour TrivialAugmentWide"
        "randaugment_n": 2,
        "randaugment_m": 9,  # (inert under TrivialAugmentWide; a grid that switches policy finds them)
        "mixup": 0.2,
        "mixup_prob": 0.8,  # "MixUp alpha=0.2 often" (8 batches in 10 mixed)
        "cutmix": 1.0,
        "mixup_switch_prob": 0.2,  # "CutMix at a low probability" (1 mixed batch in 5; alpha timm's 1.0)
        "patience": 5,  # "early stopping"
        "epochs": 20,  # "fewer epochs" (than medium's 50)
        "freeze_fraction": 0.2,
        "unfreeze_stages": 2,  # "linear probe then gradual unfreezing": head, last block, all
        "label_smoothing": 0.1,  # (torchvision's references: 0.1)
        "weight_decay": 0.05,  # (timm/DeiT AdamW: 0.05)
        "drop_path": 0.0,  # (none: little data, a pretrained backbone regularizes)
        "crop_scale": (0.6, 1.0),  # the notes' RandomResizedCrop(scale=(0.6, 1))
    },
    # "Thousands: RandAugment N=2-3, M=7-12, MixUp 0.5 / CutMix 0.5, cosine + AMP + label smoothing 0.05."
    "medium": {
        "aug_policy": "randaugment",
        "randaugment_n": 2,
        "randaugment_m": 9,  # "N=2-3, M=7-12"
        "mixup": 0.5,
        "cutmix": 0.5,  # "MixUp 0.5 / CutMix 0.5" (alphas, as timm's --mixup/--cutmix)
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,  # (timm's defaults)
        "label_smoothing": 0.05,  # "label smoothing 0.05"
        "epochs": 50,  # (cosine + AMP are imgpipe's schedule and default)
        "patience": 10,  # (a safeguard at a fifth of the run)
        "freeze_fraction": 0.1,
        "unfreeze_stages": 1,  # (a short probe with pretrained weights)
        "weight_decay": 0.05,  # (timm/DeiT AdamW: 0.05)
        "drop_path": 0.1,  # (timm/DeiT: 0.1)
        "crop_scale": (0.6, 1.0),  # the notes' RandomResizedCrop(scale=(0.6, 1))
    },
    # "Hundreds of thousands: AutoAugment(ImageNet) + CutMix/MixUp, drop path, long training,
    # higher weight decay."
    "large": {
        "aug_policy": "autoaugment",  # "AutoAugment(ImageNet)"
        "randaugment_n": 2,
        "randaugment_m": 9,  # (inert under AutoAugment)
        "mixup": 0.8,
        "cutmix": 1.0,  # "+ CutMix/MixUp" (alphas: DeiT/timm's ImageNet 0.8, 1.0)
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,  # (timm's defaults)
        "label_smoothing": 0.0,  # no smoothing stacked on mixing (mixed targets are soft already)
        "drop_path": 0.2,  # "drop path" (timm's ImageNet recipes: 0.1-0.2)
        "epochs": 100,  # "long training"
        "patience": 0,  # (a long run trains every epoch)
        "weight_decay": 0.1,  # "higher weight decay" (than medium's 0.05)
        "freeze_fraction": 0.0,
        "unfreeze_stages": 1,  # (enough data to train everything from the first step)
        "crop_scale": (0.6, 1.0),  # the notes' RandomResizedCrop(scale=(0.6, 1))
    },
}

# A run of at most SHORT_RUN_UPTO of its recipe's epochs (10 of medium's 50) is short, and a
# short run regularizes less: what it adds early costs the accuracy the run has no epochs left to
# win back. timm's "ResNet strikes back" procedures do the same by schedule (A1, 600 epochs:
# MixUp 0.2; A2, 300 epochs: MixUp 0.1). Only what was measured: on the digits (1,075 train
# images, resnet18 from scratch, 10 epochs, CPU, seeds 0-2), half the batches mixed reached the
# simple reference recipe's best validation macro-F1 (0.889) in about three quarters of the
# recipe's time, and at the notes' lowest magnitude scored higher (test macro-F1 0.984 ± 0.007
# against 0.975 ± 0.008); docs/benchmarks/runs/2026-11-28-short-run-medium.md, issue 71 (make
# bench-race: 0.42x the simple recipe's time to its best, where the recipe took 0.55x).
SHORT_RUN_UPTO = 0.2
SHORT_RUNS: dict[str, dict[str, Any]] = {
    "medium": {
        "randaugment_m": 7,  # the notes' "M=7-12", at its low end
        "mixup_prob": 0.5,  # half the batches mixed (still "MixUp 0.5 / CutMix 0.5" when mixed)
    },
}

# Each domain's flips and colour settings, and what it allows of a policy: the operations it
# excludes and a magnitude cap (no operation stronger than RandAugment at policy_max_m), which
# the CPU and GPU paths honour alike (imgpipe.train.policies). The notes' words, per domain:
DOMAINS: dict[str, dict[str, Any]] = {
    "natural": {},
    # "Text: no flips, small rotations, contrast and noise": a mirrored or sheared letter is
    # another letter (or none); tone changes only, rotations of a few degrees (5 at m 5).
    "text": {
        "hflip": False,
        "vflip": False,
        "rot90": False,
        "rotation": 5.0,
        "policy_exclude": ("ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Solarize", "Posterize", "Invert"),
        "policy_max_m": 5,
    },
    # "Medical: orientation kept, conservative strength": no flips, turns or shear (laterality
    # and orientation carry meaning), intensity measured: no inversion, no colour, a low cap.
    "medical": {
        "hflip": False,
        "vflip": False,
        "rot90": False,
        "rotation": 5.0,
        "color_jitter": 0.1,
        "hue": 0.0,
        "noise_p": 0.1,
        "policy_exclude": ("Rotate", "ShearX", "ShearY", "Color", "Solarize", "Posterize", "Invert", "Equalize"),
        "policy_max_m": 5,
    },
    # "Satellite: flips on; geographic rotation can change meaning", so quarter turns stay
    # off unless asked; per-band brightness consistent: nothing that changes bands apart
    # (per-channel equalize or autocontrast, saturation, solarize, inversion).
    "satellite": {
        "hflip": True,
        "vflip": True,
        "rot90": False,
        "rotation": 10.0,
        "hue": 0.02,
        "policy_exclude": ("Color", "Equalize", "AutoContrast", "Solarize", "Invert"),
    },
    # "Product: no hue/colour-changing ops": colour is often the label (the red or the blue
    # shirt); geometry, brightness, contrast and sharpness only. Web photos are JPEGs of every quality.
    "product": {
        "hflip": True,
        "vflip": False,
        "rot90": False,
        "color_jitter": 0.1,
        "hue": 0.0,
        "jpeg_p": 0.2,
        "policy_exclude": ("Color", "Solarize", "Invert", "Posterize", "Equalize", "AutoContrast"),
    },
}

RECIPE_FIELDS: tuple[str, ...] = tuple(SIZE_RECIPES["small"])
# Fields whose base value is None ("the model's own"): set or not, a config is resolved.
MAY_STAY_UNSET: tuple[str, ...] = ("drop_path",)
DOMAIN_FIELDS: tuple[str, ...] = (
    "hflip",
    "vflip",
    "rot90",
    "rotation",
    "color_jitter",
    "hue",
    "noise_p",
    "jpeg_p",
    "policy_exclude",
    "policy_max_m",
)


@dataclass(frozen=True)
class Resolution:
    """How a run's recipe and domain were settled.

    Attributes:
        requested: The ``recipe`` the config named (``auto``, ``small``, ...).
        recipe: The recipe applied (``none``, ``small``, ``medium`` or ``large``).
        domain: The domain applied.
        reason: Why this recipe, in words (the train split's images per class for ``auto``).
        from_recipe: The fields the size recipe set, with their values.
        from_domain: The fields the domain set, with their values.
        explicit: The recipe and domain fields the config set itself (they won).
    """

    requested: str
    recipe: str
    domain: str
    reason: str
    from_recipe: dict[str, Any]
    from_domain: dict[str, Any]
    explicit: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (for ``metrics.json`` and the manifest)."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for the log and the report."""
        kept = f"; kept as set: {', '.join(self.explicit)}" if self.explicit else ""
        return f"recipe {self.recipe} ({self.reason}), domain {self.domain}{kept}"


def pick_recipe(class_counts: Sequence[int] | np.ndarray) -> tuple[str, str]:
    """The size recipe for a train split with ``class_counts`` images per class, and why.

    The median over the classes present decides between ``small`` and ``medium`` (one rare
    class does not make a dataset small), and ``medium`` needs :data:`MEDIUM_FROM_IMAGES`
    train images in all (the notes' "thousands"); ``large`` needs :data:`LARGE_FROM_IMAGES`
    (the notes' "hundreds of thousands"). Both are counts in all, never per class.

    Raises:
        ValueError: If no class has an image.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    present = counts[counts > 0]
    if present.size == 0:
        raise ValueError("recipe auto: the train split has no labelled images to size a recipe by")
    per_class, total = float(np.median(present)), int(present.sum())
    seen = f"{per_class:g} train images per class (median of {present.size} classes), {total} in all"
    if per_class < SMALL_BELOW:
        return "small", f"auto: {seen}: under {SMALL_BELOW} per class"
    if total < MEDIUM_FROM_IMAGES:
        return "small", f"auto: {seen}: under {MEDIUM_FROM_IMAGES:,} in all (not yet the notes' thousands)"
    if total >= LARGE_FROM_IMAGES:
        return "large", f"auto: {seen}: at least {LARGE_FROM_IMAGES} images in all"
    return "medium", f"auto: {seen}: the notes' thousands, below the large recipe"


def resolve(cfg: C, class_counts: Sequence[int] | np.ndarray | None = None) -> tuple[C, Resolution]:
    """Fills the unset recipe and domain fields of ``cfg``: its own values win, then the domain's, the recipe's, :data:`BASE`.

    Args:
        cfg: The config as given (recipe and domain fields ``None`` where unset).
        class_counts: Train images per class; needed for ``recipe: auto``.

    Returns:
        The resolved config (every such field set; ``recipe`` the one applied, so running
        it again gives the same run) and how it was resolved.

    Raises:
        ValueError: For ``auto`` without class counts.
    """
    c: Any = cfg
    if c.recipe == "auto":
        if class_counts is None:
            raise ValueError("recipe auto needs the train split's class counts to pick small, medium or large")
        recipe, reason = pick_recipe(class_counts)
    elif c.recipe == "none":
        recipe, reason = "none", "none named: imgpipe's base settings"
    else:
        recipe, reason = c.recipe, "named in the config"
    explicit = tuple(f for f in (*RECIPE_FIELDS, *DOMAIN_FIELDS) if getattr(c, f) is not None)
    size_values = dict(SIZE_RECIPES.get(recipe, {}))
    pretrained = bool(c.pretrained or c.weights)
    if size_values.get("freeze_fraction") and not pretrained:
        # A linear probe needs features worth probing: a random backbone has none.
        size_values["freeze_fraction"] = 0.0
        reason += "; no linear probe first: the backbone starts untrained"
    if (short := SHORT_RUNS.get(recipe)) and c.epochs is not None and c.epochs <= SHORT_RUN_UPTO * size_values["epochs"]:
        size_values.update(short)
        reason += f"; a short run ({c.epochs} of the recipe's {size_values['epochs']} epochs): " + ", ".join(f"{k} {v}" for k, v in short.items())
    domain_values = DOMAINS[c.domain]
    filled: dict[str, Any] = {}
    for name in (*RECIPE_FIELDS, *DOMAIN_FIELDS):
        if getattr(c, name) is None:
            filled[name] = domain_values.get(name, size_values.get(name, BASE[name]))
    policy = filled.get("aug_policy", c.aug_policy)
    if c.color_jitter is None and policy in ("randaugment", "trivialaugment", "autoaugment"):
        # timm turns colour jitter off under a policy: the policy has colour operations of its own.
        filled["color_jitter"] = 0.0
    if c.backbone_lr_mult is None:
        # Pretrained features move slowly (discriminative fine-tuning); a random backbone learns at the head's pace.
        filled["backbone_lr_mult"] = 0.1 if pretrained else 1.0
    resolution = Resolution(
        requested=c.recipe,
        recipe=recipe,
        domain=c.domain,
        reason=reason,
        from_recipe={k: v for k, v in size_values.items() if k not in explicit},
        from_domain={k: v for k, v in domain_values.items() if k not in explicit},
        explicit=explicit,
    )
    return dataclasses.replace(cfg, recipe=recipe, **filled), resolution  # type: ignore[arg-type]


def tta_flip_dims(hflip: bool, vflip: bool) -> tuple[int, ...]:
    """The image dimensions test-time augmentation flips: only those training flipped (the domain allows).

    ``-1`` is a horizontal flip of a ``B x C x H x W`` batch, ``-2`` a vertical one; none
    for text or medical images, where a mirror image is another image.
    """
    return (-1,) * hflip + (-2,) * vflip


# Settings that change nothing unless another setting turns their part on.
_AUGMENTS = ("hflip", "vflip", "rot90", "rotation", "color_jitter", "hue", "noise_p", "jpeg_p", "crop_scale", "policy_exclude", "policy_max_m")


def without_effect(values: Mapping[str, Any]) -> set[str]:
    """The settings among ``values`` (resolved, by :data:`BASE`'s names) that the others make inert.

    RandAugment's N and M without the RandAugment policy, a policy's limits with none, MixUp's
    probabilities with MixUp and CutMix off, hue without colour jitter, unfreezing stages without
    a frozen start, every augmentation under policy ``none``. A report shows only what took effect.
    """
    policy = values.get("aug_policy")
    inert: set[str] = set()
    if policy is not None and policy != "randaugment":
        inert |= {"randaugment_n", "randaugment_m"}
    if policy in ("basic", "none"):
        inert |= {"policy_exclude", "policy_max_m"}
    if policy == "none":
        inert |= set(_AUGMENTS)
    mixup, cutmix = values.get("mixup"), values.get("cutmix")
    if mixup is not None and cutmix is not None:
        if not mixup and not cutmix:
            inert |= {"mixup_prob", "mixup_switch_prob"}
        elif not (mixup and cutmix):
            inert.add("mixup_switch_prob")
    if "color_jitter" in values and not values["color_jitter"]:
        inert.add("hue")
    if "freeze_fraction" in values and not values["freeze_fraction"]:
        inert.add("unfreeze_stages")
    return inert & set(values)
