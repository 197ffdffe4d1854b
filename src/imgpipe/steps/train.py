"""The train step: a committed resize output in, a trained classifier and its report out.

``train(data, out, cfg)`` streams the resize output's ``train`` split through
:class:`imgpipe.train.loader.ImageLoader`, augments it in the loader's CPU workers
(albumentations, :mod:`imgpipe.train.augment_cpu`) or on the device (kornia,
:mod:`imgpipe.train.augment`), and trains a torchvision model (:mod:`imgpipe.train.models`) with
AdamW, a per-step cosine schedule after a linear warmup, soft-target cross-entropy
(MixUp/CutMix, label smoothing), gradient clipping, and bf16 autocast plus
channels-last on CUDA. It evaluates (:mod:`imgpipe.train.evaluation`) on ``val`` after every
epoch and on ``test`` at the end (optionally with flip test-time augmentation).

Transfer learning: ``pretrained`` starts from torchvision weights, read from an
object-storage cache that the first run fills (:mod:`imgpipe.train.pretrained`; every rank
reads it); the classifier head is replaced for the data's classes, and the weights' own
mean and std normalize every batch (``TrainingRun.norm``, also written to ``model.pt``).
``freeze_fraction`` trains the head alone for a fraction of the epochs, then
``unfreeze_stages`` stages add the backbone's blocks from its end (decided per epoch, so a
resume at any epoch does the same; :mod:`imgpipe.train.schedule`); each part warms up on its
own when it joins, at ``backbone_lr_mult`` of the head's learning rate.

Distributed: under ``torchrun --nproc-per-node N`` (or any launcher that sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``) the step joins a process group
(NCCL on CUDA, gloo on CPU), wraps the model in DDP and gives every rank disjoint
shards; all ranks take the same number of steps per epoch. Only rank 0 writes.

Outputs in ``out`` (all through :mod:`imgpipe.storage`, each object atomic)::

    checkpoint.pt          every epoch: model, optimizer, scheduler, epoch, loader
                           position, per-rank RNG states, config, metric history
    model.pt               {"model": state dict, "config", "labels", "image_size", ...}
    metrics.json           per epoch: train/val loss, accuracy, macro-F1, per-class
                           recall, images/s, data-wait fraction; test (and TTA) metrics
    curves.png, confusion_matrix.png, augmentations.png
    report.html            the figures and tables in one page (report.html_report)
    config.yaml            the resolved config
    manifest.json          step "train": images seen per split, files, metrics
    _SUCCESS               written last

The output is a model, not a dataset, so :class:`~imgpipe.contract.OutputWriter` does
not fit (its ``begin`` deletes the prefix, which would take ``checkpoint.pt`` with it on
``--resume``, and its accounting counts table rows). The step keeps the same protocol by
hand: ``_SUCCESS`` is removed first, files are written, then the manifest (same keys as
every step's, ``inputs == outputs`` images, nothing rejected) and ``_SUCCESS`` last, so
``contract.read_manifest(out, expect_step="train")`` works on it.

Reproducibility: model initialization is seeded from ``seed``; data order from
``seed + epoch (+ rank, + worker)``; per-sample augmentation from ``seed + epoch +
sample``; batch-level randomness (GPU augmentation, MixUp/CutMix) from ``seed + epoch +
rank + step``. With ``deterministic`` on, an interrupted run resumed from its last
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from imgpipe import contract, storage
from imgpipe.config import config_to_dict, config_to_yaml
from imgpipe.contract import FileEntry, StepReport
from imgpipe.report import training as report

# The settings are torch-free (imgpipe.train.config) so the pipeline compiles without torch.
from imgpipe.resize.spec import CROP_FRACTION, MODEL_COLOR_SPACES, color_space
from imgpipe.resize.statistics import split_moments
from imgpipe.train import pretrained
from imgpipe.train.augment import (
    IMAGENET,
    BatchAugment,
    MixupCutmix,
    Normalization,
    build_batch_eval_transform,
    channel_stats,
    normalize,
    soft_target_cross_entropy,
    step_generator,
    step_seed,
)
from imgpipe.train.augment_cpu import (
    SampleTransform,
    build_crop_transform,
    build_eval_transform,
    build_train_transform,
)
from imgpipe.train.card import read_card
from imgpipe.train.checkpoint import CHECKPOINT, resume, save_checkpoint
from imgpipe.train.config import TrainConfig, default_weights_cache
from imgpipe.train.distributed import (
    DistInfo,
    all_reduce,
    barrier,
    determinism,
    init_distributed,
    resolve_device,
)
from imgpipe.train.evaluation import EvalResult, evaluate
from imgpipe.train.export import export_onnx, export_torchscript, model_card
from imgpipe.train.loader import ImageLoader, decode_jpeg_batch, read_rows, read_samples
from imgpipe.train.models import (
    backbone_blocks,
    build_model,
    head_parameter_names,
    load_weights,
    resolve_weights,
    set_trainable,
)
from imgpipe.train.optim import TrainGroup, build_optimizer, build_scheduler, param_groups
from imgpipe.train.partition import (
    SplitInfo,
    describe_split,
    read_labels,
    read_split_labels,
    sample_seed,
    split_names,
)
from imgpipe.train.predictions import confused_pairs, predictions_table, worst_per_class
from imgpipe.train.recipes import Resolution, tta_flip_dims
from imgpipe.train.recipes import resolve as resolve_recipe
from imgpipe.train.run import TrainingRun
from imgpipe.train.schedule import UnfreezePlan, effective_lr, unfreeze_plan
from imgpipe.train.selection import EMA_PREFIX

__all__ = [
    "MODEL",
    "METRICS",
    "TrainReport",
    "train_one_epoch",
    "train",
]

log = logging.getLogger(__name__)

MODEL = contract.MODEL
METRICS = contract.METRICS
REPORT = contract.REPORT
PREDICTIONS = contract.PREDICTIONS
MODEL_CARD, MODEL_ONNX, MODEL_TORCHSCRIPT = contract.MODEL_CARD, contract.MODEL_ONNX, contract.MODEL_TORCHSCRIPT
_AUG_SAMPLES, _AUG_VERSIONS = 6, 4


# ----------------------------------------------------------------------------------------
# Configuration.


@dataclass
class TrainReport(StepReport):
    """What the train step did; the manifest is this report plus config and provenance.

    Attributes:
        epochs_run: Epochs trained by this invocation (fewer than ``epochs`` on resume).
        metrics: Final validation (and test) figures, as in ``metrics.json``.
        model_uri: Where ``model.pt`` was written.
    """

    epochs_run: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    model_uri: str = ""

    def summary(self) -> str:
        """One line for logs and the CLI."""
        m = self.metrics
        parts = [f"train: {self.epochs_run} epoch(s)"]
        if m.get("val_accuracy") is not None:
            parts.append(f"val acc {m['val_accuracy']:.3f}, macro-F1 {m['val_macro_f1']:.3f}")
        if m.get("test_accuracy") is not None:
            parts.append(f"test acc {m['test_accuracy']:.3f}")
        return ", ".join(parts) + f" in {self.seconds:.1f}s -> {self.dest}"


# ----------------------------------------------------------------------------------------
# The run's pieces.


def _aug_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.aug_device == "gpu" or (cfg.aug_device == "auto" and device.type == "cuda")


def _optional_split(data: str, split: str, manifest: Mapping[str, Any]) -> SplitInfo | None:
    if split not in split_names(data, manifest):
        log.warning("train: %s has no %s split; skipping its evaluation", data, split)
        return None
    return describe_split(data, split, manifest)


def _eval_transform(info: SplitInfo, size: int) -> SampleTransform:
    """The evaluation view: a whole picture's centre ``size``, as ``short-side-crop`` stores it; else resize + crop."""
    resize_to = round(size / CROP_FRACTION) if info.whole else None
    return build_eval_transform(size, info.channels, resize_to=resize_to)


def _eval_loader(cfg: TrainConfig, info: SplitInfo, size: int, decode: str, ctx: DistInfo, persistent: bool) -> ImageLoader:
    """Evaluation order; the resize/centre-crop runs in the workers unless the device decodes."""
    on_device = info.format == "jpeg" and decode == "cuda" and not info.whole
    identity = not info.whole and (info.height, info.width) == (size, size)
    return ImageLoader(
        info,
        cfg.loader(shuffle=False, persistent=persistent),
        transform=None if identity or on_device else _eval_transform(info, size),
        decode_device="cpu" if info.whole else decode,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )


def _train_transform(cfg: TrainConfig, info: SplitInfo, size: int, on_device: bool, norm: Normalization) -> SampleTransform | None:
    """The workers' share of the recipe: all of it on CPU; on the device, only the crop of whole pictures."""
    if not on_device:
        return build_train_transform(cfg.augment, size, info.channels, norm)
    return build_crop_transform(cfg.augment, size, info.channels) if info.whole else None


def _weights_cache(cfg: TrainConfig, out: str) -> str | None:
    """Where pretrained weights are cached: ``cfg.weights_cache``, else ``weights/`` beside ``out``."""
    if cfg.weights_cache:
        return storage.normalize_uri(cfg.weights_cache)
    return default_weights_cache(out) if cfg.pretrained else None


def _check_color_space(cfg: TrainConfig, ops: list[str]) -> None:
    """Refuses pretrained weights, trained on RGB photos, for pixels a resize op stored in another colour space."""
    space = color_space(ops)
    if cfg.pretrained and space not in MODEL_COLOR_SPACES:
        converting = [op for op in ops if color_space([op]) not in MODEL_COLOR_SPACES]
        raise ValueError(
            f"pretrained={cfg.pretrained!r} ({cfg.model}) expects RGB images, but the resize op(s) "
            f"{', '.join(converting)} stored {space}: train from scratch (no pretrained), or re-run resize without "
            f"{' and '.join(converting)}"
        )


def _normalization(cfg: TrainConfig, manifest: Mapping[str, Any]) -> Normalization:
    """The run's mean and std: the starting weights' own, else the data's train split's, else ImageNet's.

    Pretrained weights keep theirs; ``weights`` keep what their ``model.pt`` records
    (ImageNet's for a bare state dict); a model trained from scratch takes the mean and std
    resize recorded for the ``train`` split, in the colour space it stored.

    Raises:
        ValueError: If pretrained weights would get pixels stored in a colour space other than RGB or grey.
    """
    _check_color_space(cfg, list((manifest.get("extra") or {}).get("ops") or ()))
    if cfg.pretrained:
        return pretrained.normalization(resolve_weights(cfg.model, cfg.pretrained))
    if cfg.weights:
        recorded = pretrained.recorded_normalization(cfg.weights)
        if recorded is None:
            log.info("train: %s records no mean and std; normalizing with ImageNet's", cfg.weights)
        return recorded or IMAGENET
    moments = split_moments(manifest, "train")
    if moments is None:
        log.warning(
            "train: the resize output records no statistics (older than them); normalizing with ImageNet's "
            "mean and std, not the data's own: re-run resize to record them"
        )
        return IMAGENET
    return Normalization.of_channels(*moments)


def _initial_model(cfg: TrainConfig, num_classes: int, channels: int, size: int, ctx: DistInfo) -> nn.Module:
    """The seeded model with its starting weights: ``weights``, or ``pretrained`` through the cache (every rank calls it)."""
    torch.manual_seed(cfg.seed)  # the explicit seed of model initialization
    module = build_model(cfg.model, num_classes, channels, drop_path=cfg.drop_path)
    if cfg.weights:
        load_weights(module, cfg.weights)
    if cfg.pretrained:
        assert cfg.weights_cache is not None, "resolved by _build_run"
        weights = resolve_weights(cfg.model, cfg.pretrained)
        pretrained.load_pretrained(module, cfg.model, weights, cfg.weights_cache, ctx)
        advice = pretrained.size_advice(cfg.model, weights, size)
        if advice and ctx.is_main:
            log.warning("train: %s", advice)
    return module


def _build_run(data: str, out: str, cfg: TrainConfig, ctx: DistInfo, manifest: Mapping[str, Any]) -> TrainingRun:
    """Everything a run holds, from ``data`` and its manifest (read once, by :func:`train`)."""
    cfg = dataclasses.replace(cfg, weights_cache=_weights_cache(cfg, out))
    device = resolve_device(cfg.device, ctx.local_rank)
    labels = read_labels(data, manifest)
    train_info = describe_split(data, "train", manifest)
    # Read once: recipe auto and balanced class weights both count the train split's labels.
    counts = _class_counts(train_info, len(labels)) if cfg.recipe == "auto" or cfg.class_weights != "none" else None
    cfg, recipe = _resolve_recipe(cfg, counts, ctx)
    size = cfg.image_size or train_info.size
    channels = train_info.channels
    on_device = _aug_on_device(cfg, device)
    norm = _normalization(cfg, manifest)
    # Whole pictures are cropped in the workers, so they decode there too.
    decode = "cuda" if on_device and device.type == "cuda" else "cpu"
    train_loader = ImageLoader(
        train_info,
        cfg.loader(shuffle=True),
        transform=_train_transform(cfg, train_info, size, on_device, norm),
        decode_device="cpu" if train_info.whole else decode,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    val_info = _optional_split(data, "val", manifest)
    val_loader = _eval_loader(cfg, val_info, size, decode, ctx, cfg.persistent_workers) if val_info else None
    steps = []
    for epoch in range(cfg.epochs):
        train_loader.set_epoch(epoch)
        steps.append(min(train_loader.epoch_batches(), cfg.max_steps_per_epoch or 1 << 62))
    train_loader.set_epoch(0)
    if min(steps) < 1:
        raise ValueError(
            f"train split has {train_info.num_samples} images: too few for one batch of {cfg.batch_size} per worker "
            f"and rank ({train_loader.parts} worker partition(s) x {ctx.world_size} rank(s)); lower batch_size or num_workers"
        )
    module = _initial_model(cfg, len(labels), channels, size, ctx)
    head = head_parameter_names(module, len(labels))
    module.to(device)
    if device.type == "cuda" and cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    model: nn.Module = module
    plan = unfreeze_plan(cfg.epochs, cfg.freeze_fraction, cfg.unfreeze_stages)
    if ctx.world_size > 1:
        # With an unfreeze plan, every epoch whose trainable set changes wraps the model anew
        # (train_one_epoch), so DDP only ever reduces the parameters that train.
        model = _ddp(module, device)
    if cfg.compile:
        model = torch.compile(model)
    learning_rate = effective_lr(cfg.lr, cfg.lr_base, cfg.lr_base_size, cfg.batch_size, ctx.world_size)
    groups = param_groups(head, backbone_blocks(module, head), plan, steps, cfg.backbone_lr_mult)
    optimizer = build_optimizer(module, learning_rate.lr, cfg.weight_decay, groups)
    warmup = round(cfg.warmup_fraction * sum(steps))
    scheduler = build_scheduler(optimizer, warmup, sum(steps))
    if ctx.is_main:
        log.info("train: peak learning rate %s; %s", learning_rate.rule, _describe_plan(plan, groups, cfg.epochs))
    # The config as run (what config.yaml and the checkpoint record): the values "auto"
    # and "from the data" settled to, fixed here once rather than written back later.
    resolved = dataclasses.replace(
        cfg,
        image_size=size,
        num_workers=train_loader.num_workers,
        pin_memory=torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory,
        aug_device="gpu" if on_device else "cpu",
    )
    return TrainingRun(
        data=data,
        out=out,
        cfg=resolved,
        ctx=ctx,
        device=device,
        labels=labels,
        train_info=train_info,
        val_info=val_info,
        test_info=_optional_split(data, "test", manifest),
        image_size=size,
        channels=channels,
        gpu_augment=(BatchAugment(cfg.augment, size, channels, crop=not train_info.whole, norm=norm).to(device) if on_device else None),
        model=model,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        mixer=MixupCutmix(len(labels), cfg.mixup, cfg.cutmix, cfg.label_smoothing, switch_prob=cfg.mixup_switch_prob, prob=cfg.mixup_prob),
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps,
        norm=norm,
        head=head,
        ema=_ema_model(module, cfg, ctx.world_size),
        class_weights=_class_weights(cfg, train_info, len(labels), device, counts),
        recipe=recipe,
        learning_rate=learning_rate,
        unfreeze=plan,
        groups=groups,
        warmup_steps=warmup,
    )


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DDP over the parameters that train now (``requires_grad``): none unused, no search for them."""
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _describe_plan(plan: UnfreezePlan, groups: list[TrainGroup], epochs: int) -> str:
    """One line for the log: which epochs train the head alone, and when each part of the backbone joins."""
    if not plan.starts:
        return f"every parameter trains from the first of {epochs} epochs"
    joins = ", ".join(
        f"{g.name} ({len(g.names)} tensors) from epoch {plan.starts[min(int(g.name.split('-')[1]), plan.stages - 1)] + 1}"
        for g in groups
        if g.name != "head"
    )
    return f"the head alone in epochs 1-{plan.starts[1]} of {epochs}, then {joins}, each with its own warmup"


def _class_counts(info: SplitInfo, classes: int) -> np.ndarray:
    """Images per class of a split, from its ``label`` column (one small read per file)."""
    return np.bincount(read_split_labels(info), minlength=classes)


def _resolve_recipe(cfg: TrainConfig, counts: np.ndarray | None, ctx: DistInfo) -> tuple[TrainConfig, Resolution]:
    """``cfg`` with its recipe and domain fields filled (:mod:`imgpipe.train.recipes`); says which and why.

    ``recipe: auto`` sizes the recipe by the train split's images per class (``counts``);
    every rank reads the same files, so every rank resolves alike.
    """
    resolved, recipe = resolve_recipe(cfg, counts)
    if ctx.is_main:
        log.info("train: %s", recipe.summary())
    return resolved, recipe


def _ema_model(module: nn.Module, cfg: TrainConfig, world_size: int) -> torch.optim.swa_utils.AveragedModel | None:
    """The moving average of ``module``'s weights and buffers (``ema_decay`` > 0), else ``None``.

    As torchvision's references do it (references/classification/train.py, ``--model-ema``):
    updated every ``ema_steps`` optimizer steps with a decay adjusted by
    ``ranks x batch_size x ema_steps / epochs``, so that the averaging horizon, counted in
    images, stays the same when the batch, the ranks or the update interval change.
    """
    if not cfg.ema_decay:
        return None
    alpha = min(1.0, (1.0 - cfg.ema_decay) * world_size * cfg.batch_size * cfg.ema_steps / cfg.epochs)
    avg = torch.optim.swa_utils.get_ema_multi_avg_fn(1.0 - alpha)
    return torch.optim.swa_utils.AveragedModel(module, multi_avg_fn=avg, use_buffers=True)


def _class_weights(cfg: TrainConfig, info: SplitInfo, classes: int, device: torch.device, counts: np.ndarray | None = None) -> torch.Tensor | None:
    """``N / (classes x n_c)`` per class of the train split (``class_weights: balanced``); ``None`` otherwise.

    A class absent from the train split gets weight 0 (it has no loss to weigh). ``counts``
    are the split's images per class when the caller has read them (:func:`_class_counts`).
    """
    if cfg.class_weights == "none":
        return None
    counts = (_class_counts(info, classes) if counts is None else counts).astype(np.float64)
    present = counts > 0
    weights = np.zeros(classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _to_device(run: TrainingRun, batch: Mapping[str, Any]) -> torch.Tensor:
    images = batch["image"]
    if isinstance(images, list):  # JPEG bytes left for the GPU decoder
        return decode_jpeg_batch(images, run.channels, run.device)
    return images.to(run.device, non_blocking=True)


def _prepare_train_batch(run: TrainingRun, batch: Mapping[str, Any], epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = _to_device(run, batch)
    labels = batch["label"].to(run.device, non_blocking=True)
    if run.gpu_augment is not None:
        x = run.gpu_augment(images, step_seed(run.cfg.seed, epoch, run.ctx.rank, step))
    else:
        x = normalize(images, run.channels, run.channels_last, run.norm)
    x, targets = run.mixer(x, labels, step_generator(run.cfg.seed, epoch, run.ctx.rank, step))
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, targets


# ----------------------------------------------------------------------------------------
# Training and evaluation.


def train_one_epoch(run: TrainingRun, epoch: int) -> dict[str, float]:
    """Trains one epoch; returns train loss, images/s and data-wait fraction (over all ranks).

    The data-wait fraction is the time the loop spent blocked on the loader divided by
    the epoch's wall time. On CUDA the CPU runs ahead of the GPU, so time the GPU needs
    shows up as compute, and time the loader is late shows up as waiting.
    """
    run.model.train()
    if run.unfreeze.starts:
        # Per epoch, from the epoch alone: a run resumed at any epoch freezes as the uninterrupted one.
        trainable = run.trainable(epoch)
        set_trainable(run.module, trainable if trainable is not None else frozenset(n for n, _ in run.module.named_parameters()))
        if run.ctx.world_size > 1 and (epoch == run.start_epoch or run.unfreeze.stage(epoch) != run.unfreeze.stage(epoch - 1)):
            # DDP registers its reducer over the parameters that require gradients when it wraps;
            # after a stage change it wraps again (ranks hold the same weights; it broadcasts rank 0's).
            run.model = torch.compile(_ddp(run.module, run.device)) if run.cfg.compile else _ddp(run.module, run.device)
    # A resume mid-epoch: the loader holds the rest of this epoch (resume set it); the steps go on from there.
    first = run.start_step if epoch == run.start_epoch else 0
    if not first:
        run.train_loader.set_epoch(epoch)
    steps = run.steps_per_epoch[epoch]
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    seen, waited = 0, 0.0
    started = tick = time.perf_counter()
    batches = iter(run.train_loader)
    progress = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", disable=not run.ctx.is_main, mininterval=5)
    every = run.cfg.checkpoint_every_steps
    try:
        for step in range(first, steps):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"train loader ended after {step} of {steps} planned steps in epoch {epoch}")
            waited += time.perf_counter() - tick
            x, targets = _prepare_train_batch(run, batch, epoch, step)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
                logits = run.model(x)
            loss = soft_target_cross_entropy(logits, targets, run.class_weights)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run.cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
            run.optimizer.step()
            run.scheduler.step()
            if run.ema is not None and step % run.cfg.ema_steps == 0:
                run.ema.update_parameters(run.module)
                if sum(run.steps_per_epoch[:epoch]) + step < run.warmup_steps:  # during the warmup the average restarts: torchvision's rule
                    run.ema.n_averaged.fill_(0)
            loss_sum += loss.detach().double() * len(targets)
            seen += len(targets)
            progress.update()
            if every and (step + 1) % every == 0 and step + 1 < steps:
                save_checkpoint(run, epoch, step=step + 1)  # every rank: it gathers their RNG states
            tick = time.perf_counter()
    finally:
        progress.close()
        batches.close()  # type: ignore[attr-defined]
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    elapsed = time.perf_counter() - started
    total_loss, total_seen, wait_fraction = all_reduce([loss_sum.item(), float(seen), waited / max(elapsed, 1e-9)], run.device, run.ctx)
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "train_images": int(total_seen),
        "images_per_s": total_seen / max(elapsed, 1e-9),
        "data_wait_fraction": wait_fraction / run.ctx.world_size,
        "lr": run.scheduler.get_last_lr()[0],
    }


def _prepare_eval_batch(run: TrainingRun, loader: ImageLoader, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    images = _to_device(run, batch)
    if loader.decode_on_device and images.shape[-2:] != (run.image_size, run.image_size):
        images = build_batch_eval_transform(run.image_size)(images)
    return normalize(images, run.channels, run.channels_last, run.norm), batch["label"].to(run.device, non_blocking=True)


def _evaluate_split(
    run: TrainingRun,
    loader: ImageLoader,
    tta_flips: tuple[int, ...] = (),
    model: nn.Module | None = None,
    keep_rows: bool = False,
) -> EvalResult:
    """:func:`imgpipe.train.evaluation.evaluate` of ``model`` (``run.module``) over ``loader``'s split.

    With ``keep_rows`` the result keeps every image's probabilities and loss, by its row index.
    """

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        loader.set_epoch(0)
        for batch in loader:
            images, labels = _prepare_eval_batch(run, loader, batch)
            yield (images, labels, batch["index"]) if keep_rows else (images, labels)

    return evaluate(model or run.module, batches, len(run.labels), run.device, amp=run.amp, tta_flips=tta_flips, ctx=run.ctx)


# ----------------------------------------------------------------------------------------
# Outputs.


def _to_display(images: torch.Tensor, channels: int, norm: Normalization) -> list[np.ndarray]:
    """Normalized (by ``norm``) or uint8 ``B x C x H x W`` to ``H x W x C`` uint8 arrays."""
    if images.dtype != torch.uint8:
        mean, std = channel_stats(channels, norm)
        x = images.float().cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return [img.permute(1, 2, 0).contiguous().cpu().numpy() for img in images]


def _augmentation_grid(run: TrainingRun) -> bytes:
    """Samples of the training split, as evaluated and as the training recipe augments them."""
    samples = read_samples(run.train_info, _AUG_SAMPLES)
    eval_tf = _eval_transform(run.train_info, run.image_size)
    originals = [eval_tf(s, 0) for s in samples]
    cpu_tf = _train_transform(run.cfg, run.train_info, run.image_size, run.gpu_augment is not None, run.norm)
    versions: list[list[np.ndarray]] = [[] for _ in samples]
    for v in range(_AUG_VERSIONS):
        # As the loader does in epoch v, with the sample's position as its index.
        seeds = [sample_seed(run.cfg.seed, v, i) for i in range(len(samples))]
        if run.gpu_augment is not None:
            cropped = [cpu_tf(s, seed) for s, seed in zip(samples, seeds)] if cpu_tf is not None else samples
            batch = torch.from_numpy(np.stack(cropped)).permute(0, 3, 1, 2).to(run.device)
            augmented = _to_display(run.gpu_augment(batch, step_seed(run.cfg.seed, v, 0, 0)), run.channels, run.norm)
        else:
            assert cpu_tf is not None
            augmented = [cpu_tf(s, seed) for s, seed in zip(samples, seeds)]
        for i, img in enumerate(augmented):
            versions[i].append(img)
    return report.augmentations_png(originals, versions)


def _write(run: TrainingRun, name: str, data: bytes, files: list[FileEntry]) -> None:
    files.append(contract.write_entry(run.out, name, data))


def _predictions(run: TrainingRun, with_rows: Mapping[str, EvalResult]) -> pa.Table | None:
    """``predictions.parquet``: every val and test image's prediction (:mod:`imgpipe.train.predictions`)."""
    infos = {"val": run.val_info, "test": run.test_info}
    tables = [
        predictions_table(split, infos[split], result.rows, run.labels, probs=run.cfg.predictions_probs)  # type: ignore[arg-type]
        for split, result in with_rows.items()
        if result.rows is not None and infos.get(split) is not None
    ]
    return pa.concat_tables(tables) if tables else None


def _review_figures(run: TrainingRun, table: pa.Table, metrics: dict[str, Any]) -> dict[str, bytes]:
    """The worst-loss images per class and the most-confused class pairs (test, else val), for people to look at."""
    split = "test" if "test" in table.column("split").to_pylist() else "val"
    info = run.test_info if split == "test" else run.val_info
    rows = table.filter(pc.equal(table.column("split"), split))
    if info is None or rows.num_rows == 0:
        return {}
    view = _eval_transform(info, run.image_size)
    worst = worst_per_class(rows)
    pairs = confused_pairs(rows)
    metrics["confused_pairs"] = [{**p, "split": split, "examples": [e["path"] for e in p["examples"]]} for p in pairs]
    wanted = [r["index"] for r in worst] + [e["index"] for p in pairs for e in p["examples"]]
    images = dict(zip(wanted, (view(img, 0) for img in read_rows(info, wanted))))
    figures = {}
    by_class: dict[str, list[tuple[np.ndarray, str]]] = {}
    for r in worst:
        caption = f"predicted {r['predicted_name']}\np={r['confidence']:.2f}, loss {r['loss']:.2f}"
        by_class.setdefault(r["label_name"], []).append((images[r["index"]], caption))
    if by_class:
        figures["worst_loss.png"] = report.gallery_png([(f"true {name}", imgs) for name, imgs in by_class.items()])
    if pairs:
        figures["confused_pairs.png"] = report.gallery_png(
            [
                (f"{p['true']} as {p['predicted']} ({p['count']})", [(images[e["index"]], f"loss {e['loss']:.2f}") for e in p["examples"]])
                for p in pairs
            ]
        )
    return figures


def _exports(run: TrainingRun) -> tuple[dict[str, bytes], dict[str, str]]:
    """The kept weights as ONNX and TorchScript; an export that fails is reported, not fatal.

    Training is the expensive part: a model whose ops one exporter does not support still
    commits, with the reason in ``model.json`` (``export_failures``) and the log.
    """
    exported, failures = {}, {}
    for name, export in ((MODEL_ONNX, export_onnx), (MODEL_TORCHSCRIPT, export_torchscript)):
        try:
            exported[name] = export(run.module, run.image_size, run.channels)
        except Exception as exc:  # noqa: BLE001 - reported in model.json; the weights are in model.pt
            failures[name] = f"{type(exc).__name__}: {exc}"[:1000]
            log.warning("train: exporting %s failed: %s", name, failures[name])
    return exported, failures


def _present(name: str, exported: Mapping[str, bytes]) -> str | None:
    return name if name in exported else None


def _card_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The kept weights' validation and the test metrics, as scalars (model.json)."""
    out: dict[str, Any] = {"val": dict(metrics.get("kept") or {})}
    for split in ("test", "test_tta"):
        if metrics.get(split):
            out[split] = {k: v for k, v in metrics[split].items() if not isinstance(v, (Mapping, list))}
    return out


def _write_outputs(run: TrainingRun, metrics: dict[str, Any], last_val: EvalResult | None, with_rows: Mapping[str, EvalResult]) -> list[FileEntry]:
    files: list[FileEntry] = []
    predictions = _predictions(run, with_rows)
    review = _review_figures(run, predictions, metrics) if predictions is not None else {}
    if predictions is not None:
        _write(run, PREDICTIONS, contract.table_to_parquet_bytes(predictions), files)
    model_state = {k: v.detach().cpu() for k, v in run.module.state_dict().items()}
    mean, std = channel_stats(run.channels, run.norm)
    payload = {
        "model": model_state,
        "model_name": run.cfg.model,
        "labels": run.labels,
        "image_size": run.image_size,
        "channels": run.channels,
        "mean": list(mean),
        "std": list(std),
        "config": config_to_dict(run.cfg),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    _write(run, MODEL, buf.getvalue(), files)
    exported, failures = _exports(run)
    for name, data in exported.items():
        _write(run, name, data, files)
    card = model_card(
        architecture=run.cfg.model,
        classes=run.labels,
        size=run.image_size,
        channels=run.channels,
        mean=mean,
        std=std,
        recipe=config_to_dict(run.cfg),
        metrics=_card_metrics(metrics),
        selection=metrics["selection"],
        data=run.data,
        files={"onnx": _present(MODEL_ONNX, exported), "torchscript": _present(MODEL_TORCHSCRIPT, exported), "state_dict": MODEL},
        failures=failures,
    )
    _write(run, MODEL_CARD, json.dumps(card, indent=2).encode(), files)
    _write(run, METRICS, json.dumps(metrics, indent=2).encode(), files)
    figures = {"curves.png": report.curves_png(metrics["epochs"])}
    if last_val is not None:
        figures["confusion_matrix.png"] = report.confusion_matrix_png(last_val.confusion, run.labels)
    figures["augmentations.png"] = _augmentation_grid(run)
    figures.update(review)
    for name, png in figures.items():
        _write(run, name, png, files)
    _write(run, REPORT, report.html_report(metrics, figures).encode(), files)
    _write(run, contract.CONFIG, config_to_yaml(run.cfg).encode(), files)
    return sorted(files, key=lambda f: f.name)


def _commit(run: TrainingRun, train_report: TrainReport, upstream: Mapping[str, Any]) -> None:
    """Manifest, then ``_SUCCESS``: the same protocol (and keys) as every step's output."""
    manifest = contract.manifest_body(train_report, run.cfg, upstream)
    contract.publish(run.out, "train", run.attempt, manifest)


def _start_output(out: str, cfg: TrainConfig, ctx: DistInfo) -> str:
    """Claims ``out`` for train (``contract.claim``): ``_SUCCESS`` first; the rest unless resuming.

    Returns:
        The attempt id on the main rank (which commits), ``""`` on the others.
    """
    attempt = ""
    if ctx.is_main:
        attempt = contract.claim(out, "train", keep=(CHECKPOINT,) if cfg.resume else ())
    barrier(ctx)
    return attempt


def _check_locations(data: str, out: str) -> None:
    a, b = data.rstrip("/") + "/", out.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise ValueError(f"train: out ({out}) must not be, contain or lie inside data ({data}); it is replaced")


# ----------------------------------------------------------------------------------------
# The step.


def _val_keys(val: EvalResult, labels: list[str]) -> dict[str, Any]:
    """A validation as the per-epoch record's ``val_*`` keys."""
    v = val.to_dict(labels)
    return {
        "val_loss": v["loss"],
        "val_accuracy": v["accuracy"],
        "val_macro_f1": v["macro_f1"],
        "val_pr_auc": v["pr_auc"],
        "val_per_class_recall": v["per_class_recall"],
        "val_images": v["images"],
    }


def _validate(run: TrainingRun, epoch: int, record: dict[str, Any]) -> None:
    """Validates the model (and its EMA) after ``epoch`` into ``record``; keeps the weights if they are the best yet."""
    assert run.val_loader is not None
    val = _evaluate_split(run, run.val_loader)
    record.update(_val_keys(val, run.labels))
    ema_val = None
    if run.ema is not None:
        ema_val = _evaluate_split(run, run.val_loader, model=run.ema.module)
        record.update({EMA_PREFIX + k: v for k, v in _val_keys(ema_val, run.labels).items() if k != "val_per_class_recall"})
    run.selection.fix_keys([sum(row) for row in val.confusion])
    chosen = run.selection.consider(epoch, record)
    if chosen is not None:
        source = run.module if chosen == "model" else run.ema.module  # type: ignore[union-attr]
        run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in source.state_dict().items()}
        run.best_val = val if chosen == "model" else ema_val


def _fit(run: TrainingRun) -> int:
    """Trains from ``run.start_epoch`` until the last epoch or early stopping; returns epochs run.

    After each epoch the validation decides whether these weights (or their EMA) are the
    best yet (:class:`imgpipe.train.selection.Selection`); at the end ``run.module`` holds
    the kept weights, which the test split, ``model.pt`` and the export use.
    """
    ran = 0
    for epoch in range(run.start_epoch, run.cfg.epochs):
        if run.selection.stopped_at is not None:  # resumed after early stopping
            break
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, **train_one_epoch(run, epoch)}
        if run.val_loader is not None:
            _validate(run, epoch, record)
        record["seconds"] = round(time.perf_counter() - started, 3)
        run.history.append(record)
        ran += 1
        if run.selection.should_stop(run.cfg.patience):
            run.selection.stopped_at = epoch
        save_checkpoint(run, epoch)
        if run.ctx.is_main:
            log.info("train: %s", {k: v for k, v in record.items() if not isinstance(v, dict)})
        if run.selection.stopped_at is not None:
            log.info("train: no better %s for %d epochs: stopping after epoch %d", run.selection.keys[0], run.cfg.patience, epoch + 1)
            break
    if run.best_state is not None:
        run.module.load_state_dict(run.best_state)
    return ran


def _kept(run: TrainingRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics.json``'s ``selection`` (which weights, and why) and ``kept`` (their validation keys)."""
    trained = len(run.history)
    if run.best_val is None:
        last = run.history[-1]["epoch"] if run.history else run.cfg.epochs - 1
        reason = "no validation split: the last epoch's weights"
        return {"epoch": last, "weights": "model", "reason": reason, "epochs_trained": trained}, {}
    kept = {k: v for k, v in _val_keys(run.best_val, run.labels).items() if k != "val_per_class_recall"}
    return run.selection.summary(run.cfg.patience, run.cfg.epochs, trained), kept


def _final_evaluations(run: TrainingRun) -> tuple[dict[str, Any], dict[str, EvalResult]]:
    """The kept weights on test (and with flip TTA), and per-image rows of val and test.

    Returns:
        ``metrics.json``'s ``test`` / ``test_tta``, and the evaluations with rows by split.
    """
    with_rows: dict[str, EvalResult] = {}
    if run.val_loader is not None:
        with_rows["val"] = _evaluate_split(run, run.val_loader, keep_rows=True)
    if run.test_info is None:
        return {}, with_rows
    decode = "cuda" if run.train_loader.decode_on_device else "cpu"
    loader = _eval_loader(run.cfg, run.test_info, run.image_size, decode, run.ctx, persistent=False)
    with_rows["test"] = _evaluate_split(run, loader, keep_rows=True)
    out = {"test": with_rows["test"].to_dict(run.labels)}
    flips = tta_flip_dims(bool(run.cfg.hflip), bool(run.cfg.vflip))
    if run.cfg.tta_flip and flips:
        out["test_tta"] = {**_evaluate_split(run, loader, tta_flips=flips).to_dict(run.labels), "flips": list(flips)}
    elif run.cfg.tta_flip and run.ctx.is_main:
        log.warning("train: tta_flip is on, but the %s domain trains with no flip, so no view is tested but the image", run.cfg.domain)
    return out, with_rows


def train(data: str, out: str, cfg: TrainConfig | None = None) -> TrainReport:
    """Trains a classifier on a committed resize output and commits it to ``out``.

    Args:
        data: Prefix of a committed resize output (``file://``, ``s3://`` or a path).
        out: Output prefix; replaced unless ``cfg.resume`` continues a run there.
        cfg: Step settings; defaults when omitted.

    Returns:
        The report (also the body of ``manifest.json``); the same on every rank.

    Raises:
        UncommittedOutputError: If ``data`` is not committed.
        ValueError: If ``data`` is not a resize output or has no ``train`` split, the
            settings do not fit it, or a resume checkpoint is incompatible.
    """
    cfg = cfg or TrainConfig()
    data, out = storage.normalize_uri(data), storage.normalize_uri(out)
    _check_locations(data, out)
    upstream_manifest = contract.read_manifest(data, expect_step="resize")
    started = time.monotonic()
    ctx = init_distributed(cfg.device)
    try:
        with determinism(cfg.deterministic):
            run = _build_run(data, out, cfg, ctx, upstream_manifest)
            run.attempt = _start_output(out, cfg, ctx)
            if cfg.resume:
                resume(run)
            epochs_run = _fit(run)
            tests, with_rows = _final_evaluations(run)
            return _finish(run, epochs_run, run.best_val, tests, with_rows, upstream_manifest, time.monotonic() - started)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _finish(
    run: TrainingRun,
    epochs_run: int,
    last_val: EvalResult | None,
    tests: Mapping[str, Any],
    with_rows: Mapping[str, EvalResult],
    upstream_manifest: Mapping[str, Any],
    seconds: float,
) -> TrainReport:
    last = run.history[-1]
    seen = {"train": int(last.get("train_images", 0))}
    if last_val is not None:
        seen["val"] = last_val.images
    if "test" in tests:
        seen["test"] = int(tests["test"]["images"])
    selection, kept = _kept(run)
    metrics = {
        "epochs": run.history,
        **tests,
        "labels": run.labels,
        "images_seen": seen,
        "selection": selection,
        "kept": kept,
        "recipe": run.recipe.to_dict() if run.recipe else None,
        "learning_rate": {
            **(run.learning_rate.to_dict() if run.learning_rate else {}),
            "warmup_steps": run.warmup_steps,
            "unfreeze_epochs": list(run.unfreeze.starts),
        },
    }
    if last_val is not None:
        metrics["val_confusion"] = last_val.confusion
    final = {
        "val_accuracy": last_val.accuracy if last_val else None,
        "val_macro_f1": last_val.macro_f1 if last_val else None,
        "val_pr_auc": last_val.pr_auc if last_val else None,
        "val_loss": last_val.loss if last_val else None,
        "test_accuracy": tests["test"]["accuracy"] if "test" in tests else None,
        "test_tta_accuracy": tests["test_tta"]["accuracy"] if "test_tta" in tests else None,
        "train_loss": last.get("train_loss"),
    }
    files = _write_outputs(run, metrics, last_val, with_rows) if run.ctx.is_main else []
    # The rows of the dataset it was given: a partial last batch is dropped each epoch,
    # but a different one every epoch, so no row is lost; what was seen is in extra.
    total = int(upstream_manifest.get("outputs", sum(seen.values())))
    train_report = TrainReport(
        step="train",
        dest=run.out,
        inputs=total,
        outputs=total,
        rejected=0,
        files=files,
        seconds=round(seconds, 3),
        extra={
            "images_seen": seen,
            "epochs": run.cfg.epochs,
            "model": run.cfg.model,
            "num_classes": len(run.labels),
            "image_size": run.image_size,
            "channels": run.channels,
            "world_size": run.ctx.world_size,
            "device": str(run.device),
            "resumed_from_epoch": run.start_epoch if run.start_epoch else None,
            "kept": {k: selection[k] for k in ("epoch", "weights", "reason")},
            "recipe": run.recipe.summary() if run.recipe else None,
        },
        epochs_run=epochs_run,
        metrics=final,
        model_uri=storage.join(run.out, MODEL),
    )
    if run.ctx.is_main:
        upstream = {"source": run.data, "step": "resize", "outputs": upstream_manifest.get("outputs")}
        _commit(run, train_report, upstream)
    barrier(run.ctx)
    return train_report


# ----------------------------------------------------------------------------------------
# A trained model on another split (the promotion gate, audits).


def load_saved_model(prefix: str, classes: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The kept weights of a train output as a module in evaluation mode, with its card.

    Raises:
        ValueError: If ``prefix`` has no ``model.json`` or was trained on other ``classes``.
    """
    card = read_card(prefix, classes)
    payload = torch.load(io.BytesIO(storage.read_bytes(storage.join(prefix, MODEL))), map_location="cpu", weights_only=True)
    module = build_model(card["architecture"], card["num_classes"], card["input"]["channels"])
    module.load_state_dict(payload["model"])
    return module.eval(), card


def evaluate_saved(prefix: str, data: str, split: str = "test", device: str = "auto", batch_size: int = 64) -> EvalResult:
    """Evaluates the model of a train output on ``split`` of a resize output, as its own run evaluated.

    The images get the evaluation view at the model's own input size and the model's own
    normalization (from its ``model.json``), whatever size the data was made for.

    Raises:
        ValueError: If the model was trained on other classes or channels than ``data`` has,
            or ``data`` has no such split.
    """
    manifest = contract.read_manifest(data, expect_step="resize")
    labels = read_labels(data, manifest)
    module, card = load_saved_model(prefix, labels)
    if split not in split_names(data, manifest):
        raise ValueError(f"{data} has no {split} split")
    info = describe_split(data, split, manifest)
    channels, size = int(card["input"]["channels"]), int(card["input"]["size"])
    if info.channels != channels:
        raise ValueError(f"{prefix} takes {channels}-channel images; the {split} split of {data} has {info.channels}")
    ctx = DistInfo()
    target = resolve_device(device, 0)
    module.to(target)
    norm = Normalization(tuple(card["input"]["mean"] * (3 // channels)), tuple(card["input"]["std"] * (3 // channels)))  # type: ignore[arg-type]
    cfg = TrainConfig(model=card["architecture"], batch_size=batch_size, num_workers=0, device=device, persistent_workers=False)
    loader = _eval_loader(cfg, info, size, "cpu", ctx, persistent=False)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        loader.set_epoch(0)
        for batch in loader:
            images = batch["image"].to(target)
            if images.shape[-2:] != (size, size):
                images = build_batch_eval_transform(size)(images)
            yield normalize(images, channels, False, norm), batch["label"].to(target), batch["index"]

    return evaluate(module, batches, len(labels), target, ctx=ctx)
