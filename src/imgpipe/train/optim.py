"""The optimizer and learning-rate schedule of the train step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from imgpipe.train.config import TrainConfig

__all__ = ["lr_factor", "build_optimizer", "build_scheduler"]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step``: linear warmup, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, head: frozenset[str] = frozenset()
) -> torch.optim.Optimizer:
    """AdamW with weight decay on weights only (not on norm parameters and biases).

    With ``head`` (:func:`imgpipe.train.models.head_parameter_names`) the backbone's groups
    start at ``cfg.lr * cfg.backbone_lr_mult`` and the head's at ``cfg.lr``; the
    schedule multiplies every group's own initial LR by the same factor. Groups, in
    order (empty ones left out): head decay, head no decay, backbone decay, backbone
    no decay; ``param_groups[0]`` runs at the peak LR. Without ``head`` every
    parameter runs at ``cfg.lr``. Every parameter is included,
    also one frozen now (``requires_grad`` off): freezing is per epoch
    (:func:`imgpipe.train.models.set_backbone_frozen`), and AdamW skips a parameter
    without a gradient.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {
        ("head", True): [], ("head", False): [], ("backbone", True): [], ("backbone", False): [],
    }  # fmt: skip
    for name, p in model.named_parameters():
        groups[("head" if name in head or not head else "backbone", p.ndim > 1)].append(p)
    lr = {"head": cfg.lr, "backbone": cfg.lr * cfg.backbone_lr_mult}
    return torch.optim.AdamW(
        [
            {"params": params, "name": part, "lr": lr[part], "weight_decay": cfg.weight_decay if decay else 0.0}
            for (part, decay), params in groups.items()
            if params
        ],
        lr=cfg.lr,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step warmup + cosine schedule (:func:`lr_factor`), one factor for every parameter group."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
