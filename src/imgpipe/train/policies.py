"""The augmentation policies as torchvision ``transforms.v2`` defines them, for both devices, without torch.

RandAugment, TrivialAugmentWide and AutoAugment(ImageNet): their operations, magnitude
bins and signs (:func:`magnitude_table`), and one sampler (:func:`draw`) that turns a
``numpy.random.Generator`` into the operations one image gets. The CPU path
(:mod:`imgpipe.train.policy_cpu`) and the GPU path (:mod:`imgpipe.train.policy_gpu`) both
draw here and only differ in how they apply an operation; the tests hold both to
torchvision's own functional ops. A domain's limits (:class:`PolicyLimits`: operations
excluded, a magnitude cap) apply on both paths alike.

Call ``draw(PolicySpec(policy="randaugment", n=2, m=9, size=224), rng)`` for one image's
``[(op, magnitude), ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "POLICY_NAMES",
    "RANDAUGMENT_OPS",
    "AUTOAUGMENT_OPS",
    "ALL_OPS",
    "SIGNED_OPS",
    "IMAGENET_POLICY",
    "MAX_M",
    "MAX_N",
    "PolicyLimits",
    "PolicySpec",
    "check_limits",
    "magnitude_table",
    "draw",
]

PolicyName = Literal["randaugment", "trivialaugment", "autoaugment"]
POLICY_NAMES: tuple[str, ...] = ("randaugment", "trivialaugment", "autoaugment")
# RandAugment's and TrivialAugmentWide's operations, in torchvision's order.
RANDAUGMENT_OPS: tuple[str, ...] = (
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
AUTOAUGMENT_OPS: tuple[str, ...] = (*RANDAUGMENT_OPS[1:], "Invert")
ALL_OPS: tuple[str, ...] = (*RANDAUGMENT_OPS, "Invert")
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"})
# RandAugment's magnitude M is a bin of 31 (0..30); N operations per image. N above 4 stacks
# more than any published recipe uses; N 0 is "no policy", which is policy basic.
MAX_M = 30
MAX_N = 4
_BINS = {"randaugment": 31, "trivialaugment": 31, "autoaugment": 10}

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


@dataclass(frozen=True)
class PolicyLimits:
    """What a domain allows of a policy: operations left out, and no operation stronger than RandAugment at ``max_m``.

    Attributes:
        exclude: Operations never applied (names of :data:`ALL_OPS`).
        max_m: Magnitude cap on RandAugment's scale (0..30; 30: none). Under it every
            operation of every policy is at most as strong as RandAugment's at bin
            ``max_m``: RandAugment's M is lowered to it, TrivialAugmentWide's and
            AutoAugment's magnitudes are clipped to it.
    """

    exclude: tuple[str, ...] = ()
    max_m: int = MAX_M


def check_limits(policy: str, limits: PolicyLimits) -> None:
    """Refuses limits that name unknown operations, or leave ``policy`` nothing to apply.

    Raises:
        ValueError: Naming the domain's exclusions and the policy.
    """
    unknown = sorted(set(limits.exclude) - set(ALL_OPS))
    if unknown:
        raise ValueError(f"policy_exclude names unknown operation(s) {unknown}; operations: {', '.join(ALL_OPS)}")
    if isinstance(limits.max_m, bool) or not isinstance(limits.max_m, int) or not 0 <= limits.max_m <= MAX_M:
        raise ValueError(f"policy_max_m must be an integer in [0, {MAX_M}] (RandAugment's bins), got {limits.max_m!r}")
    if policy in POLICY_NAMES:
        left = _allowed(policy, limits) - {"Identity"}
        if not left:
            raise ValueError(
                f"policy {policy} with policy_exclude {list(limits.exclude)} leaves no operation to apply; "
                "use policy basic (no policy) for this domain, or exclude fewer operations"
            )


def _allowed(policy: str, limits: PolicyLimits) -> set[str]:
    ops = {op for sub in IMAGENET_POLICY for op, _, _ in sub} if policy == "autoaugment" else set(RANDAUGMENT_OPS)
    return ops - set(limits.exclude)


def magnitude_table(policy: str, op: str, size: int) -> np.ndarray | None:
    """The magnitude of each bin of ``op`` under ``policy`` for ``size x size`` images, as torchvision computes it.

    ``None`` for operations without a magnitude. Posterize's entries are bits, Solarize's
    thresholds as fractions of the range (pixels at or above it are inverted).
    """
    bins = _BINS[policy]
    wide = policy == "trivialaugment"
    if op in ("ShearX", "ShearY"):
        return np.linspace(0.0, 0.99 if wide else 0.3, bins, dtype=np.float32)
    if op in ("TranslateX", "TranslateY"):
        return np.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * size, bins, dtype=np.float32)
    if op == "Rotate":
        return np.linspace(0.0, 135.0 if wide else 30.0, bins, dtype=np.float32)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return np.linspace(0.0, 0.99 if wide else 0.9, bins, dtype=np.float32)
    if op == "Posterize":
        return np.round(8 - np.arange(bins) / ((bins - 1) / (6 if wide else 4))).astype(np.int64)
    if op == "Solarize":
        return np.linspace(1.0, 0.0, bins, dtype=np.float32)
    return None


@dataclass(frozen=True)
class PolicySpec:
    """One policy as an image gets it.

    Attributes:
        policy: ``randaugment``, ``trivialaugment`` or ``autoaugment``.
        n: RandAugment's operations per image.
        m: RandAugment's magnitude bin (0..30).
        size: Side of the (square) images, for translations.
        limits: The domain's :class:`PolicyLimits`.
    """

    policy: str
    n: int = 2
    m: int = 9
    size: int = 224
    limits: PolicyLimits = PolicyLimits()

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        check_limits(self.policy, self.limits)
        object.__setattr__(self, "_ops", tuple(op for op in RANDAUGMENT_OPS if op not in self.limits.exclude))
        object.__setattr__(self, "_caps", {op: _cap(op, self.limits.max_m, self.size) for op in ALL_OPS})
        object.__setattr__(self, "_tables", {op: magnitude_table(self.policy, op, self.size) for op in ALL_OPS})


def _cap(op: str, max_m: int, size: int) -> float | None:
    """The strongest magnitude of ``op`` allowed under ``max_m``: RandAugment's at that bin."""
    table = magnitude_table("randaugment", op, size)
    return None if table is None or max_m >= MAX_M else float(table[max_m])


def _clip(op: str, value: float, cap: float | None) -> float:
    if cap is None:
        return value
    if op == "Posterize":  # fewer bits is stronger
        return max(value, cap)
    if op == "Solarize":  # a lower threshold is stronger
        return max(value, cap)
    return min(value, cap)


def _signed(op: str, value: float, rng: np.random.Generator) -> float:
    # torchvision: `if signed and torch.rand(()) <= 0.5: magnitude *= -1`
    return -value if op in SIGNED_OPS and rng.random() <= 0.5 else value


def draw(spec: PolicySpec, rng: np.random.Generator) -> list[tuple[str, float]]:
    """The operations one image gets, in order, with their signed magnitudes.

    The distribution of torchvision's ``RandAugment(num_ops=n, magnitude=m)``,
    ``TrivialAugmentWide()`` and ``AutoAugment(IMAGENET)``: operations drawn uniformly (with
    replacement for RandAugment), a random sign for the signed ones, AutoAugment's
    sub-policy uniformly and each of its two operations with its own probability. An
    excluded operation is never drawn (RandAugment and TrivialAugmentWide draw among the
    others; AutoAugment skips it in its sub-policy). Magnitudes are clipped to the cap.
    """
    s: dict = spec.__dict__
    ops, caps, tables = s["_ops"], s["_caps"], s["_tables"]
    out: list[tuple[str, float]] = []
    if spec.policy == "autoaugment":
        sub = IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]
        for op, p, bin_ in sub:
            if op in spec.limits.exclude or not rng.random() <= p:
                continue
            table = tables[op]
            value = 0.0 if table is None else _clip(op, float(table[bin_]), caps[op])
            out.append((op, _signed(op, value, rng) if table is not None else value))
        return out
    for _ in range(spec.n if spec.policy == "randaugment" else 1):
        op = ops[int(rng.integers(len(ops)))]
        table = tables[op]
        if table is None:
            out.append((op, 0.0))
            continue
        bin_ = min(spec.m, spec.limits.max_m) if spec.policy == "randaugment" else int(rng.integers(len(table)))
        out.append((op, _signed(op, _clip(op, float(table[bin_]), caps[op]), rng)))
    return out


def ops_of(policy: str, limits: PolicyLimits = PolicyLimits()) -> Sequence[str]:
    """The operations ``policy`` can apply under ``limits`` (Identity included where it has one)."""
    return sorted(_allowed(policy, limits))
