"""The optimizer and learning-rate schedule of the train step.

Call ``build_optimizer(model, lr, weight_decay, groups)`` with the parameter groups of
:func:`param_groups` (head and backbone blocks, each with the step it starts training at),
then ``build_scheduler(optimizer, warmup_steps, total_steps)``: every group follows
:func:`imgpipe.train.schedule.lr_factor` from its own start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imgpipe.train.schedule import UnfreezePlan, lr_factor

__all__ = ["TrainGroup", "param_groups", "fused_adamw", "build_optimizer", "build_scheduler", "clip_gradients", "scale_lr"]


@dataclass(frozen=True)
class TrainGroup:
    """Parameters that start training together at one learning-rate multiplier.

    Attributes:
        name: ``head``, or ``backbone`` with the stage (``backbone-1``: the last block).
        names: Parameter names (as in ``named_parameters``).
        lr_mult: Multiplier of the run's peak LR (``backbone_lr_mult`` for the backbone).
        start_step: Optimizer step it starts training at (0, or when its stage unfreezes).
    """

    name: str
    names: frozenset[str]
    lr_mult: float
    start_step: int


def param_groups(
    head: frozenset[str],
    blocks: Sequence[frozenset[str]],
    plan: UnfreezePlan,
    steps_per_epoch: Sequence[int],
    backbone_lr_mult: float,
) -> list[TrainGroup]:
    """The head, and the backbone's blocks grouped by the stage that unfreezes them (:func:`imgpipe.train.schedule.unfreeze_plan`)."""

    def first_step(epoch: int) -> int:
        return int(sum(steps_per_epoch[:epoch]))

    by_stage: dict[int, set[str]] = {}
    for position, block in enumerate(reversed(blocks), start=1):
        stage = plan.stage_of_block(position) if plan.starts else 0
        by_stage.setdefault(stage, set()).update(block)
    groups = [TrainGroup("head", frozenset(head), 1.0, 0)]
    for stage in sorted(by_stage):
        start = first_step(plan.starts[stage]) if plan.starts else 0
        groups.append(TrainGroup(f"backbone-{stage}", frozenset(by_stage[stage]), backbone_lr_mult, start))
    return groups


# The devices whose fused AdamW kernel imgpipe uses. On the CPU the fused kernel steps a ResNet-18 in
# a few milliseconds where the per-parameter loop takes over 100 (torch's default there: no foreach).
FUSED_DEVICES = ("cuda", "cpu")


def fused_adamw(model: nn.Module) -> bool:
    """Whether AdamW may use its fused kernel: every parameter a floating-point tensor on one CUDA device or the CPU."""
    params = list(model.parameters())
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES and all(p.is_floating_point() for p in params)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scales ``model``'s gradients to a total norm of at most ``max_norm``; returns the norm before.

    ``torch.nn.utils.clip_grad_norm_`` with its multi-tensor kernels asked for: torch's default
    uses them on CUDA only, and on the CPU a ResNet-18's gradients take ~23 ms in its
    per-tensor loop against ~4 ms (a tenth of a 32 px step of 64 images).
    """
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, groups: Sequence[TrainGroup]) -> torch.optim.Optimizer:
    """AdamW over ``groups``, weight decay on weights only (not on norm parameters and biases).

    Every parameter is included, also one frozen now (``requires_grad`` off): AdamW skips a
    parameter without a gradient, and its group's schedule starts when it unfreezes.
    ``param_groups[0]`` is the head's decayed weights, at the peak LR. Fused (:func:`fused_adamw`).
    """
    owner = {n: g for g in groups for n in g.names}
    split: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        group = owner.get(name, groups[0])
        split.setdefault((group.name, p.ndim > 1), []).append(p)
    by_name = {g.name: g for g in groups}
    order = sorted(split, key=lambda k: ([g.name for g in groups].index(k[0]), not k[1]))
    return torch.optim.AdamW(
        [
            {
                "params": split[key],
                "name": key[0],
                "lr": lr * by_name[key[0]].lr_mult,
                "weight_decay": weight_decay if key[1] else 0.0,
                "start_step": by_name[key[0]].start_step,
            }
            for key in order
        ],
        lr=lr,
        fused=fused_adamw(model) or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of :func:`imgpipe.train.schedule.lr_factor`, each group from its own ``start_step``."""

    def from_step(start: int) -> Callable[[int], float]:
        return lambda step: lr_factor(step, warmup_steps, total_steps, start)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [from_step(int(g.get("start_step", 0))) for g in optimizer.param_groups])


def scale_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float], scale: float) -> None:
    """Every group's peak learning rate set to ``scale`` times ``base_lrs`` (its configured one), from the current step on.

    The scheduler keeps the scaled peaks (``base_lrs`` in its state, so a checkpoint after
    this resumes with them), and each group's learning rate is that of the current step at once.
    """
    scheduler.base_lrs = [b * scale for b in base_lrs]
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]  # what get_last_lr() reports
