"""Training recipes by dataset size and augmentation settings by domain, without torch.

The notes' advice, as settings a run can name instead of a dozen fields:

* ``recipe`` (:data:`SIZE_RECIPES`): how hard to regularize, by how much data there is:
  ``small`` (under :data:`SMALL_BELOW` training images per class: a mild policy, no CutMix,
  label smoothing, a linear probe before the backbone unfreezes, more epochs), ``medium``
  (thousands of images) and ``large`` (:data:`LARGE_FROM_IMAGES` images or more, or
  :data:`LARGE_FROM_PER_CLASS` per class: the DeiT/timm ImageNet recipe's MixUp 0.8, CutMix 1.0,
  drop-path). ``auto`` picks one from the train split's images per class (:func:`pick_recipe`);
  ``none`` is imgpipe's base settings (:data:`BASE`), as before recipes existed.
* ``domain`` (:data:`DOMAINS`): which transformations keep the label, flips and the
  policy's operations alike: no mirror or shear for text, conservative and
  orientation-preserving for medical images, vertical flips for satellite images (quarter
  turns only when asked), no colour-changing operation for products, where colour is often
  the label. Test-time augmentation uses only the flips the domain allows.

Every field a recipe or a domain sets is ``None`` ("unset") in :class:`imgpipe.train.config.TrainConfig`
until :func:`resolve` fills it: the user's value wins field by field, then the domain's, then
the size recipe's, then :data:`BASE`. The train step resolves once it knows the train split's
class counts, runs the resolved config, writes it as ``config.yaml`` (with ``recipe`` set to the
recipe chosen), and records the :class:`Resolution` (which recipe and why, which field came
from where) in ``metrics.json`` and the report.

The tables follow torchvision's and timm's published recipes where the notes give no number:
DeiT / timm ImageNet training (RandAugment m9, MixUp 0.8, CutMix 1.0, smoothing 0.1, drop path
0.1, weight decay 0.05) for ``large``; milder magnitudes and mixing, a linear probe first, and a
stronger weight decay for small data, where a pretrained backbone is the main regularizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np

# A TrainConfig (imgpipe.train.config imports this module, so it is not named here).
C = TypeVar("C")

__all__ = [
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
    "LARGE_FROM_PER_CLASS",
    "LARGE_FROM_IMAGES",
    "Resolution",
    "pick_recipe",
    "resolve",
    "tta_flip_dims",
]

Recipe = Literal["none", "auto", "small", "medium", "large"]
RECIPES: tuple[str, ...] = get_args(Recipe)
Domain = Literal["natural", "text", "medical", "satellite", "product"]
DOMAIN_NAMES: tuple[str, ...] = get_args(Domain)

# The notes' size classes: "under 50 images per class", "thousands", "hundreds of thousands".
SMALL_BELOW = 50
LARGE_FROM_PER_CLASS = 1000
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
    "label_smoothing": 0.0,
    "weight_decay": 0.05,
    # None: the model's own stochastic depth (torchvision: 0.1 for ConvNeXt, 0.2 for
    # EfficientNet, Swin and MaxViT), as before recipes existed; it may stay None resolved.
    "drop_path": None,
    "freeze_backbone_epochs": 0,
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

SIZE_RECIPES: dict[str, dict[str, Any]] = {
    # Few images: the pretrained backbone is the regularizer. A linear probe first keeps a
    # random head from wrecking its features; mild policy magnitudes, MixUp only on half the
    # batches and no CutMix (a box of another class is a large share of a tiny class).
    "small": {
        "epochs": 30, "aug_policy": "randaugment", "randaugment_n": 2, "randaugment_m": 5,
        "mixup": 0.2, "cutmix": 0.0, "mixup_prob": 0.5, "label_smoothing": 0.1,
        "weight_decay": 0.1, "drop_path": 0.0, "freeze_backbone_epochs": 5,
    },
    # Thousands of images: the standard recipe with moderate mixing and a short probe.
    "medium": {
        "epochs": 50, "aug_policy": "randaugment", "randaugment_n": 2, "randaugment_m": 9,
        "mixup": 0.2, "cutmix": 1.0, "mixup_prob": 0.5, "label_smoothing": 0.1,
        "weight_decay": 0.05, "drop_path": 0.1, "freeze_backbone_epochs": 1,
    },
    # Hundreds of thousands: DeiT / timm's ImageNet settings; the data regularizes enough
    # that the whole network trains from the first step.
    "large": {
        "epochs": 100, "aug_policy": "randaugment", "randaugment_n": 2, "randaugment_m": 9,
        "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "label_smoothing": 0.1,
        "weight_decay": 0.05, "drop_path": 0.1, "freeze_backbone_epochs": 0,
    },
}  # fmt: skip

# Each domain's flips and colour settings, and what it allows of a policy: the operations it
# excludes and a magnitude cap (no operation stronger than RandAugment at policy_max_m), which
# the CPU and GPU paths honour alike (imgpipe.train.policies). The notes' words, per domain:
DOMAINS: dict[str, dict[str, Any]] = {
    "natural": {},
    # "Text: no flips, small rotations, contrast and noise": a mirrored or sheared letter is
    # another letter (or none); tone changes only, rotations of a few degrees (5 at m 5).
    "text": {
        "hflip": False, "vflip": False, "rot90": False, "rotation": 5.0,
        "policy_exclude": ("ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Solarize", "Posterize", "Invert"),
        "policy_max_m": 5,
    },
    # "Medical: orientation kept, conservative strength": no flips, turns or shear (laterality
    # and orientation carry meaning), intensity measured: no inversion, no colour, a low cap.
    "medical": {
        "hflip": False, "vflip": False, "rot90": False, "rotation": 5.0, "color_jitter": 0.1, "hue": 0.0,
        "noise_p": 0.1,
        "policy_exclude": ("Rotate", "ShearX", "ShearY", "Color", "Solarize", "Posterize", "Invert", "Equalize"),
        "policy_max_m": 5,
    },
    # "Satellite: flips on; geographic rotation can change meaning", so quarter turns stay
    # off unless asked; per-band brightness consistent: nothing that changes bands apart
    # (per-channel equalize or autocontrast, saturation, solarize, inversion).
    "satellite": {
        "hflip": True, "vflip": True, "rot90": False, "rotation": 10.0, "hue": 0.02,
        "policy_exclude": ("Color", "Equalize", "AutoContrast", "Solarize", "Invert"),
    },
    # "Product: no hue/colour-changing ops": colour is often the label (the red or the blue
    # shirt); geometry, brightness, contrast and sharpness only. Web photos are JPEGs of every quality.
    "product": {
        "hflip": True, "vflip": False, "rot90": False, "color_jitter": 0.1, "hue": 0.0, "jpeg_p": 0.2,
        "policy_exclude": ("Color", "Solarize", "Invert", "Posterize", "Equalize", "AutoContrast"),
    },
}  # fmt: skip

RECIPE_FIELDS: tuple[str, ...] = tuple(SIZE_RECIPES["small"])
# Fields whose base value is None ("the model's own"): set or not, a config is resolved.
MAY_STAY_UNSET: tuple[str, ...] = ("drop_path",)
DOMAIN_FIELDS: tuple[str, ...] = (
    "hflip", "vflip", "rot90", "rotation", "color_jitter", "hue", "noise_p", "jpeg_p", "policy_exclude", "policy_max_m",
)  # fmt: skip


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
    class does not make a dataset small); ``large`` needs :data:`LARGE_FROM_IMAGES` images in
    all or :data:`LARGE_FROM_PER_CLASS` per class.

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
    if total >= LARGE_FROM_IMAGES or per_class >= LARGE_FROM_PER_CLASS:
        return "large", f"auto: {seen}: at least {LARGE_FROM_IMAGES} images or {LARGE_FROM_PER_CLASS} per class"
    return "medium", f"auto: {seen}: between the small and the large recipe"


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
    if size_values.get("freeze_backbone_epochs") and not (c.pretrained or c.weights):
        # A linear probe needs features worth probing: a random backbone has none.
        size_values["freeze_backbone_epochs"] = 0
        reason += "; no linear probe first: the backbone starts untrained"
    domain_values = DOMAINS[c.domain]
    filled: dict[str, Any] = {}
    for name in (*RECIPE_FIELDS, *DOMAIN_FIELDS):
        if getattr(c, name) is None:
            filled[name] = domain_values.get(name, size_values.get(name, BASE[name]))
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


