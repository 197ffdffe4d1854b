"""When things happen in a training run, as fractions of it: the learning rate's size, warmup and the unfreeze stages.

Torch-free: the train step asks :func:`effective_lr` for the peak learning rate of the global
batch, :func:`unfreeze_plan` for the epoch each stage of the backbone starts training at,
and :func:`lr_factor` for a parameter group's multiplier at a step (the cosine schedule,
the global warmup, and a warmup of its own for a part of the backbone that unfreezes late).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LearningRate", "effective_lr", "UnfreezePlan", "unfreeze_plan", "lr_factor"]


@dataclass(frozen=True)
class LearningRate:
    """The peak learning rate a run uses, and how it was reached (for the log and ``metrics.json``)."""

    lr: float
    rule: str
    global_batch: int

    def to_dict(self) -> dict[str, float | int | str]:
        return {"lr": self.lr, "rule": self.rule, "global_batch": self.global_batch}


def effective_lr(lr: float | None, lr_base: float, lr_base_size: int, batch_size: int, world_size: int) -> LearningRate:
    """``lr`` when given; else ``lr_base`` scaled to the global batch by the square root, as timm does for AdamW.

    timm's ``train.py``: ``lr = lr_base * batch_ratio`` with ``batch_ratio = global_batch /
    lr_base_size``, square-rooted for Adam-type optimizers (linear for SGD). imgpipe trains
    with AdamW, so the square root.
    """
    global_batch = batch_size * world_size
    if lr is not None:
        return LearningRate(float(lr), f"lr {lr:g} as set (no scaling)", global_batch)
    ratio = global_batch / lr_base_size
    scaled = lr_base * math.sqrt(ratio)
    return LearningRate(scaled, f"lr_base {lr_base:g} x sqrt({global_batch} / {lr_base_size}) = {scaled:.4g}", global_batch)


@dataclass(frozen=True)
class UnfreezePlan:
    """Which part of the backbone trains in each epoch.

    Attributes:
        starts: Epoch each stage starts at: stage 0 is the head alone, stage ``k`` (1..S-1)
            adds the last ``k`` blocks of the backbone, stage ``S`` trains everything.
            Empty: everything trains from the first epoch.
    """

    starts: tuple[int, ...]

    @property
    def stages(self) -> int:
        return len(self.starts)

    def stage(self, epoch: int) -> int | None:
        """The stage of ``epoch``: ``0`` the head alone, ``k`` the last ``k`` blocks too, ``None`` everything."""
        if not self.starts:
            return None
        k = sum(1 for start in self.starts if start <= epoch) - 1
        return None if k == len(self.starts) - 1 else k

    def stage_of_block(self, position_from_end: int) -> int:
        """The stage from which the block ``position_from_end`` places before the head (1: the last) trains."""
        adding = len(self.starts) - 2  # stages that add one block each, before the one that adds the rest
        return position_from_end if position_from_end <= adding else len(self.starts) - 1

    def start_epoch_of_block(self, position_from_end: int) -> int:
        """The epoch from which that block trains (0 without a plan)."""
        return self.starts[self.stage_of_block(position_from_end)] if self.starts else 0


def unfreeze_plan(epochs: int, freeze_fraction: float, stages: int) -> UnfreezePlan:
    """The head trains alone for ``freeze_fraction`` of the epochs, then each of ``stages`` stages lasts as long.

    Stage ``k`` starts at epoch ``round(epochs x freeze_fraction x k)``; the last stage
    (everything) starts no later than the last epoch, so a short run (a sweep branch of a
    few epochs) still trains its whole network for at least one epoch. With
    ``freeze_fraction`` 0 nothing is frozen.
    """
    if freeze_fraction <= 0 or epochs < 2:
        return UnfreezePlan(())
    starts = [0] + [round(epochs * freeze_fraction * k) for k in range(1, stages + 1)]
    starts = [min(s, epochs - 1 - (stages - k)) if k else 0 for k, s in enumerate(starts)]
    # Each stage at least one epoch after the one before it (a short run squeezes them into the
    # epochs it has); stages that do not fit are merged into the last one.
    fixed = [0]
    for s in starts[1:]:
        fixed.append(max(s, fixed[-1] + 1))
    fixed = [s for s in fixed if s <= epochs - 1]
    return UnfreezePlan(tuple(fixed))


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_step: int = 0) -> float:
    """A group's multiplier of its peak LR at step ``step``: linear warmup, cosine to 0.

    ``start_step`` is the step the group starts training at (a backbone block that unfreezes
    late): before it the factor is 0, and from it the group warms up over ``warmup_steps``
    of its own (fresh AdamW moments must not meet the full LR), then follows the cosine.
    """
    if step < start_step:
        return 0.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0, step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress)) if step >= warmup_steps else 1.0
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    own = min(1.0, (step - start_step + 1) / warmup_steps) if warmup_steps > 0 and start_step > 0 else 1.0
    return cosine * warm * own
