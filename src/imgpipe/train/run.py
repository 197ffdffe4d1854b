"""The state of one training run, which the training loop and the checkpoints share."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from imgpipe.train.augment import IMAGENET, BatchAugment, MixupCutmix, Normalization
from imgpipe.train.config import TrainConfig
from imgpipe.train.distributed import DistInfo
from imgpipe.train.divergence import DivergenceGuard, DivergenceRecord
from imgpipe.train.loader import ImageLoader
from imgpipe.train.optim import TrainGroup
from imgpipe.train.partition import SplitInfo
from imgpipe.train.recipes import Resolution
from imgpipe.train.schedule import LearningRate, UnfreezePlan
from imgpipe.train.selection import Selection

__all__ = ["TrainingRun", "cpu_bf16"]


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast is then faster, not emulated.

    Measured on such a CPU (2 cores, resnet18 at 64 px, batch 64, forward, backward and
    AdamW): 0.25 s a step under bf16 autocast against 0.35 s in float32 (docs/benchmarks.md).
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass
class TrainingRun:
    """Everything one training run holds (settings, data, model, optimizer, loaders, history).

    Built inside :func:`imgpipe.steps.train.train`; ``train_one_epoch`` and
    :func:`imgpipe.train.checkpoint.save_checkpoint`
    take it so they stay short and testable.

    Attributes:
        cfg: The resolved config (image size, workers and augmentation device filled in).
        ctx: This process's rank and world size.
        gpu_augment: The batched augmentation when it runs on the device, else ``None``
            (the loader's workers augment).
        model: What the training step calls (the DDP wrapper under DDP).
        module: The bare model (evaluation, checkpoints, ``model.pt``).
        steps_per_epoch: Planned optimizer steps of each epoch (same on every rank).
        eval_engine: The evaluation loaders' engine: ``loader_engine`` as set, where ``auto``
            is threads whatever the training loader's became (``cfg`` records that one).
        history: One metrics record per finished epoch.
        start_epoch: First epoch this invocation trains (after a resume, the next one).
        attempt: The output claim's attempt id (main rank), for the commit.
        norm: The mean and std every batch is normalized with (the pretrained weights'
            own, else ImageNet's); the one place train reads them from.
        head: Names of the classifier head's parameters (the rest is the backbone).
        ema: The exponential moving average of ``module`` (``ema_decay`` > 0), else ``None``.
        selection: Which epoch's weights are kept so far, and the epochs since they improved.
        best_state: Those weights (on the CPU), ``None`` until a validation has run.
        best_val: Their validation.
        class_weights: Per-class loss weights (``class_weights: balanced``), else ``None``.
        recipe: How the recipe and domain fields of ``cfg`` were settled.
        learning_rate: The peak learning rate and how it was reached (``lr_base`` scaled to the global batch).
        unfreeze: Which epochs train the head alone and which parts of the backbone.
        groups: The optimizer's parameter groups: the head and the backbone blocks by stage.
        warmup_steps: Steps of the learning-rate warmup (and of each late group's own).
        base_lrs: Each parameter group's peak learning rate as configured (before any
            restart after a divergence scaled them).
        guard: The divergence rule watching the training loss (:mod:`imgpipe.train.divergence`).
        divergence: The divergences seen and what was done about them.
        started_at: Unix time the step started (each epoch's ``elapsed_s`` counts from it).
        checkpointed_at: ``time.monotonic()`` of the last checkpoint (or of the run's start), for
            ``checkpoint_every_s``.
        resumed_from: The epoch a ``--resume`` continued at (0: none).
        stats_loader: The train split in the evaluation view, for ``precise_bn`` (made at the first validation).
        phase_s: Seconds spent in each phase of the step so far (:meth:`timed`): where a run's
            time goes (``bench/steps/train_phases.py``), recorded in the manifest.
    """

    data: str
    out: str
    cfg: TrainConfig
    ctx: DistInfo
    device: torch.device
    labels: list[str]
    train_info: SplitInfo
    val_info: SplitInfo | None
    test_info: SplitInfo | None
    image_size: int
    channels: int
    gpu_augment: BatchAugment | None
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mixer: MixupCutmix
    train_loader: ImageLoader
    val_loader: ImageLoader | None
    steps_per_epoch: list[int]
    eval_engine: str = "threads"
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    start_step: int = 0
    attempt: str = ""
    norm: Normalization = IMAGENET
    head: frozenset[str] = frozenset()
    ema: torch.optim.swa_utils.AveragedModel | None = None
    selection: Selection = field(default_factory=Selection)
    best_state: dict[str, torch.Tensor] | None = None
    best_val: Any = None
    class_weights: torch.Tensor | None = None
    recipe: Resolution | None = None
    learning_rate: LearningRate | None = None
    unfreeze: UnfreezePlan = field(default_factory=lambda: UnfreezePlan(()))
    groups: list[TrainGroup] = field(default_factory=list)
    warmup_steps: int = 0
    base_lrs: list[float] = field(default_factory=list)
    guard: DivergenceGuard | None = None
    divergence: DivergenceRecord = field(default_factory=DivergenceRecord)
    started_at: float = 0.0
    checkpointed_at: float = field(default_factory=time.monotonic)
    resumed_from: int = 0
    # The checkpoint being written in the background (imgpipe.train.checkpoint.finish_write waits for it).
    checkpoint_write: Future | None = None
    stats_loader: ImageLoader | None = None
    phase_s: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the seconds the block takes to ``phase_s[phase]`` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[phase] = self.phase_s.get(phase, 0.0) + time.perf_counter() - started

    def trainable(self, epoch: int) -> frozenset[str] | None:
        """The parameters that train in ``epoch`` (the head and the unfrozen blocks), ``None`` for all."""
        if not self.unfreeze.starts or self.unfreeze.stage(epoch) is None:
            return None
        first = sum(self.steps_per_epoch[:epoch])
        return frozenset().union(*(g.names for g in self.groups if g.start_step <= first))

    @property
    def amp(self) -> bool:
        """bf16 autocast of the training steps: on CUDA, and on a CPU that computes bf16 natively (:func:`cpu_bf16`)."""
        return self.cfg.amp and (self.device.type == "cuda" or (self.device.type == "cpu" and cpu_bf16()))

    @property
    def eval_amp(self) -> bool:
        """bf16 autocast of evaluations: CUDA only, so that a CPU's test predictions are float32, as the export computes.

        They may still differ from the export's in the last bits: a CPU evaluates with
        channels-last weights (:meth:`evaluation_layout`), the export's are contiguous.
        """
        return self.cfg.amp and self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        """Channels-last memory format is on (CUDA only)."""
        return self.cfg.channels_last and self.device.type == "cuda"

    @contextlib.contextmanager
    def evaluation_layout(self) -> Iterator[None]:
        """On a CPU, the model's and its EMA's weights channels-last for the block, the training's layout back after.

        A CPU's forward pass is faster with channels-last weights (15-40 % for the
        convolutional models measured, the same for the others), its training step is not
        (docs/benchmarks/runs/2026-11-28-eval-layout.md). So the evaluations (precise BN,
        validation, test) take it, and the steps keep the layout they train fastest in. On CUDA the weights are channels-last throughout
        (:attr:`channels_last`); with ``channels_last`` off, nothing changes. The values
        stay the same (only their order in memory changes); a convolution's sums may round
        in another order.
        """
        if not self.cfg.channels_last or self.device.type != "cpu":
            yield
            return
        modules = [self.module, *((self.ema.module,) if self.ema is not None else ())]
        for module in modules:
            module.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            for module in modules:
                module.to(memory_format=torch.contiguous_format)
