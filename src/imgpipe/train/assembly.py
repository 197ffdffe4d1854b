"""How the train step assembles a run: loaders, transforms, normalization, the model, its schedule and recipe.

    run = build_run(data, out, cfg, ctx, manifest)   # a TrainingRun the step's loop drives

Everything here is decided once per run from the config, the resize output's manifest and the
machine (:class:`imgpipe.train.run.TrainingRun` holds the result); :mod:`imgpipe.steps.train`
fits, validates and commits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from imgpipe import storage
from imgpipe.resize.spec import CROP_FRACTION, MODEL_COLOR_SPACES, color_space
from imgpipe.resize.statistics import split_moments
from imgpipe.train import pretrained
from imgpipe.train.augment import (
    IMAGENET,
    BatchAugment,
    MixupCutmix,
    Normalization,
)
from imgpipe.train.augment_cpu import (
    SampleTransform,
    build_crop_transform,
    build_eval_transform,
    build_train_transform,
)
from imgpipe.train.config import TrainConfig, default_weights_cache
from imgpipe.train.distributed import (
    DistInfo,
    resolve_device,
)
from imgpipe.train.divergence import DivergenceGuard
from imgpipe.train.loader import ImageLoader
from imgpipe.train.loader_config import LoaderConfig, augments_on_device, cores_per_rank
from imgpipe.train.models import (
    backbone_blocks,
    build_model,
    head_parameter_names,
    load_weights,
    resolve_weights,
)
from imgpipe.train.optim import TrainGroup, build_optimizer, build_scheduler, param_groups
from imgpipe.train.partition import (
    SplitInfo,
    describe_split,
    read_labels,
    read_split_labels,
    split_names,
)
from imgpipe.train.recipes import Resolution
from imgpipe.train.recipes import resolve as resolve_recipe
from imgpipe.train.run import TrainingRun
from imgpipe.train.schedule import UnfreezePlan, effective_lr, unfreeze_plan

__all__ = [
    "aug_on_device",
    "optional_split",
    "eval_transform",
    "eval_loader",
    "train_transform",
    "weights_cache_for",
    "check_color_space",
    "normalization_for",
    "initial_model",
    "build_run",
    "ddp",
    "train_loader_config",
    "describe_plan",
    "class_counts",
    "check_classes",
    "recipe_for",
    "ema_model",
    "class_weights",
]

log = logging.getLogger(__name__)


def aug_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """``cfg.aug_device`` settled for ``device`` and this rank's cores (:func:`imgpipe.train.loader_config.augments_on_device`)."""
    return augments_on_device(cfg.aug_device, device.type, cores_per_rank())


def optional_split(data: str, split: str, manifest: Mapping[str, Any]) -> SplitInfo | None:
    if split not in split_names(data, manifest):
        log.warning("train: %s has no %s split; skipping its evaluation", data, split)
        return None
    return describe_split(data, split, manifest)


def eval_transform(info: SplitInfo, size: int) -> SampleTransform:
    """The evaluation view: a whole picture's centre ``size``, as ``short-side-crop`` stores it; else resize + crop."""
    resize_to = round(size / CROP_FRACTION) if info.whole else None
    return build_eval_transform(size, info.channels, resize_to=resize_to)


def eval_loader(
    cfg: TrainConfig,
    info: SplitInfo,
    size: int,
    decode: str,
    ctx: DistInfo,
    persistent: bool,
    engine: str | None = None,
    batch_size: int | None = None,
) -> ImageLoader:
    """Evaluation order; the resize/centre-crop runs in the workers unless the device decodes.

    ``engine``: the workers' engine where it is not ``cfg``'s (a run's resolved ``cfg`` records
    its training loader's, which the GPU rule of ``resolve_engine`` may have made processes).
    ``batch_size``: where it is not the evaluations' (``cfg.evaluation_batch``).
    """
    on_device = info.format == "jpeg" and decode == "cuda" and not info.whole
    identity = not info.whole and (info.height, info.width) == (size, size)
    settings = cfg.loader(shuffle=False, persistent=persistent)
    if engine is not None:
        settings = dataclasses.replace(settings, engine=engine)
    if batch_size is not None:
        settings = dataclasses.replace(settings, batch_size=batch_size)
    return ImageLoader(
        info,
        settings,
        transform=None if identity or on_device else eval_transform(info, size),
        decode_device="cpu" if info.whole else decode,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )


def train_transform(cfg: TrainConfig, info: SplitInfo, size: int, on_device: bool, norm: Normalization) -> SampleTransform | None:
    """The workers' share of the recipe: all of it on CPU; on the device, only the crop of whole pictures."""
    if not on_device:
        return build_train_transform(cfg.augment, size, info.channels, norm)
    return build_crop_transform(cfg.augment, size, info.channels) if info.whole else None


def weights_cache_for(cfg: TrainConfig, out: str) -> str | None:
    """Where pretrained weights are cached: ``cfg.weights_cache``, else ``weights/`` beside ``out``."""
    if cfg.weights_cache:
        return storage.normalize_uri(cfg.weights_cache)
    return default_weights_cache(out) if cfg.pretrained else None


def check_color_space(cfg: TrainConfig, ops: list[str]) -> None:
    """Refuses pretrained weights, trained on RGB photos, for pixels a resize op stored in another colour space."""
    space = color_space(ops)
    if cfg.pretrained and space not in MODEL_COLOR_SPACES:
        converting = [op for op in ops if color_space([op]) not in MODEL_COLOR_SPACES]
        raise ValueError(
            f"pretrained={cfg.pretrained!r} ({cfg.model}) expects RGB images, but the resize op(s) "
            f"{', '.join(converting)} stored {space}: train from scratch (no pretrained), or re-run resize without "
            f"{' and '.join(converting)}"
        )


def normalization_for(cfg: TrainConfig, manifest: Mapping[str, Any]) -> Normalization:
    """The run's mean and std: the starting weights' own, else the data's train split's, else ImageNet's.

    Pretrained weights keep theirs; ``weights`` keep what their ``model.pt`` records
    (ImageNet's for a bare state dict); a model trained from scratch takes the mean and std
    resize recorded for the ``train`` split, in the colour space it stored.

    Raises:
        ValueError: If pretrained weights would get pixels stored in a colour space other than RGB or grey.
    """
    check_color_space(cfg, list((manifest.get("extra") or {}).get("ops") or ()))
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


def initial_model(cfg: TrainConfig, num_classes: int, channels: int, size: int, ctx: DistInfo) -> nn.Module:
    """The seeded model with its starting weights: ``weights``, or ``pretrained`` through the cache (every rank calls it)."""
    torch.manual_seed(cfg.seed)  # the explicit seed of model initialization
    module = build_model(cfg.model, num_classes, channels, drop_path=cfg.drop_path)
    if cfg.weights:
        load_weights(module, cfg.weights)
    if cfg.pretrained:
        assert cfg.weights_cache is not None, "resolved by build_run"
        weights = resolve_weights(cfg.model, cfg.pretrained)
        pretrained.load_pretrained(module, cfg.model, weights, cfg.weights_cache, ctx)
        advice = pretrained.size_advice(cfg.model, weights, size)
        if advice and ctx.is_main:
            log.warning("train: %s", advice)
    return module


def build_run(data: str, out: str, cfg: TrainConfig, ctx: DistInfo, manifest: Mapping[str, Any]) -> TrainingRun:
    """Everything a run holds, from ``data`` and its manifest (read once, by :func:`train`)."""
    cfg = dataclasses.replace(cfg, weights_cache=weights_cache_for(cfg, out))
    device = resolve_device(cfg.device, ctx.local_rank)
    labels = read_labels(data, manifest)
    train_info = describe_split(data, "train", manifest)
    # Read once: the two-class check, recipe auto and balanced class weights all count the train split's labels.
    counts = class_counts(train_info, len(labels))
    check_classes(data, labels, counts)
    cfg, recipe = recipe_for(cfg, counts if cfg.recipe == "auto" or cfg.class_weights != "none" else None, ctx)
    size = cfg.image_size or train_info.size
    channels = train_info.channels
    on_device = aug_on_device(cfg, device)
    norm = normalization_for(cfg, manifest)
    # Whole pictures are cropped in the workers, so they decode there too.
    decode = "cuda" if on_device and device.type == "cuda" else "cpu"
    train_loader = ImageLoader(
        train_info,
        train_loader_config(cfg, train_info.num_samples, ctx.world_size, feeds_gpu_per_sample=device.type == "cuda" and not on_device),
        transform=train_transform(cfg, train_info, size, on_device, norm),
        decode_device="cpu" if train_info.whole else decode,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    val_info = optional_split(data, "val", manifest)
    val_loader = eval_loader(cfg, val_info, size, decode, ctx, cfg.persistent_workers) if val_info else None
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
    module = initial_model(cfg, len(labels), channels, size, ctx)
    head = head_parameter_names(module, len(labels))
    module.to(device)
    if device.type == "cuda" and cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    model: nn.Module = module
    plan = unfreeze_plan(cfg.epochs, cfg.freeze_fraction, cfg.unfreeze_stages)
    if ctx.world_size > 1:
        # With an unfreeze plan, every epoch whose trainable set changes wraps the model anew
        # (train_one_epoch), so DDP only ever reduces the parameters that train.
        model = ddp(module, device)
    if cfg.compile:
        model = torch.compile(model)
    learning_rate = effective_lr(cfg.lr, cfg.lr_base, cfg.lr_base_size, cfg.batch_size, ctx.world_size)
    groups = param_groups(head, backbone_blocks(module, head), plan, steps, cfg.backbone_lr_mult)
    optimizer = build_optimizer(module, learning_rate.lr, cfg.weight_decay, groups)
    warmup = round(cfg.warmup_fraction * sum(steps))
    scheduler = build_scheduler(optimizer, warmup, sum(steps))
    if ctx.is_main:
        log.info("train: peak learning rate %s; %s", learning_rate.rule, describe_plan(plan, groups, cfg.epochs))
    # The config as run (what config.yaml and the checkpoint record): the values "auto"
    # and "from the data" settled to, fixed here once rather than written back later.
    resolved = dataclasses.replace(
        cfg,
        image_size=size,
        num_workers=train_loader.num_workers,
        pin_memory=torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory,
        aug_device="gpu" if on_device else "cpu",
        loader_engine=train_loader.cfg.engine,
        loader_cache_gb=round(train_loader.cfg.cache_bytes / 2**30, 3),
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
        test_info=optional_split(data, "test", manifest),
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
        eval_engine=cfg.loader(shuffle=False).engine,
        steps_per_epoch=steps,
        norm=norm,
        head=head,
        ema=ema_model(module, cfg, ctx.world_size),
        class_weights=class_weights(cfg, train_info, len(labels), device, counts),
        recipe=recipe,
        learning_rate=learning_rate,
        unfreeze=plan,
        groups=groups,
        warmup_steps=warmup,
        base_lrs=list(scheduler.base_lrs),
        guard=DivergenceGuard(cfg.divergence_factor, cfg.divergence_steps, len(labels)),
    )


def train_loader_config(cfg: TrainConfig, samples: int, world_size: int, feeds_gpu_per_sample: bool = False) -> LoaderConfig:
    """The training loader's settings: one rank trains on every image every epoch, the last batch short.

    Several ranks read whole batches only (DDP needs the same step count on every rank, and
    torchvision's DistributedSampler pads instead); one rank keeps the last partial batch
    (``drop_last`` off) unless it would hold a single image, which BatchNorm cannot train on.
    ``feeds_gpu_per_sample``: the workers augment for a CUDA device (the engine then).
    """
    loader = cfg.loader(shuffle=True, feeds_gpu_per_sample=feeds_gpu_per_sample)
    if world_size == 1 and samples % cfg.batch_size != 1:
        return dataclasses.replace(loader, drop_last=False)
    return loader


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DDP over the parameters that train now (``requires_grad``): none unused, no search for them."""
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def describe_plan(plan: UnfreezePlan, groups: list[TrainGroup], epochs: int) -> str:
    """One line for the log: which epochs train the head alone, and when each part of the backbone joins."""
    if not plan.starts:
        return f"every parameter trains from the first of {epochs} epochs"
    joins = ", ".join(
        f"{g.name} ({len(g.names)} tensors) from epoch {plan.starts[min(int(g.name.split('-')[1]), plan.stages - 1)] + 1}"
        for g in groups
        if g.name != "head"
    )
    return f"the head alone in epochs 1-{plan.starts[1]} of {epochs}, then {joins}, each with its own warmup"


def class_counts(info: SplitInfo, classes: int) -> np.ndarray:
    """Images per class of a split, from its ``label`` column (one small read per file)."""
    return np.bincount(read_split_labels(info), minlength=classes)


def check_classes(data: str, labels: list[str], counts: np.ndarray) -> None:
    """Refuses, before anything is written, a model over fewer than two classes: it would answer one class whatever it sees.

    Raises:
        ValueError: If the data names fewer than two classes, or its train split has images of fewer than two.
    """
    present = [labels[i] for i in np.flatnonzero(counts[: len(labels)]).tolist()]
    if len(labels) >= 2 and len(present) >= 2:
        return
    shown = ", ".join(repr(name) for name in present[:8]) or "none"
    raise ValueError(
        f"{data} has training images of {len(present)} class(es) ({shown}) of the {len(labels)} it names: a classifier needs "
        "two classes at least, and train commits no model over one; clean a set with images of two classes or more"
    )


def recipe_for(cfg: TrainConfig, counts: np.ndarray | None, ctx: DistInfo) -> tuple[TrainConfig, Resolution]:
    """``cfg`` with its recipe and domain fields filled (:mod:`imgpipe.train.recipes`); says which and why.

    ``recipe: auto`` sizes the recipe by the train split's images per class (``counts``);
    every rank reads the same files, so every rank resolves alike.
    """
    resolved, recipe = resolve_recipe(cfg, counts)
    if ctx.is_main:
        log.info("train: %s", recipe.summary())
    return resolved, recipe


def ema_model(module: nn.Module, cfg: TrainConfig, world_size: int) -> torch.optim.swa_utils.AveragedModel | None:
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


def class_weights(cfg: TrainConfig, info: SplitInfo, classes: int, device: torch.device, counts: np.ndarray | None = None) -> torch.Tensor | None:
    """``N / (classes x n_c)`` per class of the train split (``class_weights: balanced``); ``None`` otherwise.

    A class absent from the train split gets weight 0 (it has no loss to weigh). ``counts``
    are the split's images per class when the caller has read them (:func:`class_counts`).
    """
    if cfg.class_weights == "none":
        return None
    counts = (class_counts(info, classes) if counts is None else counts).astype(np.float64)
    present = counts > 0
    weights = np.zeros(classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32, device=device)
