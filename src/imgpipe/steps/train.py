"""The train step: a committed resize output in, a trained classifier and its report out.

    report = train("s3://b/run/resize", "s3://b/run/train", TrainConfig(model="resnet18", epochs=10))

How it works in detail: docs/internals/train.md, "imgpipe.steps.train".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from imgpipe import contract, resources, storage

# The settings are torch-free (imgpipe.train.config) so the pipeline compiles without torch.
from imgpipe.train.assembly import (
    build_run,
    ddp,
    eval_loader,
)
from imgpipe.train.augment import (
    build_batch_eval_transform,
    normalize,
    soft_target_cross_entropy,
    step_generator,
    step_seed,
)
from imgpipe.train.checkpoint import checkpoint_due, finish_write, restart, resume, save_checkpoint
from imgpipe.train.config import TrainConfig
from imgpipe.train.distributed import (
    all_reduce,
    determinism,
    init_distributed,
)
from imgpipe.train.divergence import Divergence, DivergenceGuard, TrainingDiverged
from imgpipe.train.evaluation import EvalResult, evaluate
from imgpipe.train.loader import ImageLoader
from imgpipe.train.models import (
    set_trainable,
)
from imgpipe.train.norm_stats import norm_layers, recompute
from imgpipe.train.optim import clip_gradients
from imgpipe.train.outputs import (
    check_locations,
    start_output,
)
from imgpipe.train.partition import SplitInfo
from imgpipe.train.recipes import tta_flip_dims
from imgpipe.train.rows import decode_jpeg_batch
from imgpipe.train.run import TrainingRun
from imgpipe.train.selection import EMA_PREFIX
from imgpipe.train.summary import TrainReport, finish, val_keys

__all__ = [
    "train_one_epoch",
    "train",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Configuration.


# ----------------------------------------------------------------------------------------
# The run's pieces.


def _to_device(run: TrainingRun, batch: Mapping[str, Any]) -> torch.Tensor:
    images = batch["image"]
    if isinstance(images, list):  # JPEG bytes left for the GPU decoder
        return decode_jpeg_batch(images, run.channels, run.device)
    return images.to(run.device, non_blocking=True)


def _prepare_train_batch(run: TrainingRun, batch: Mapping[str, Any], epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The step's batch on the device, augmented and mixed: images, soft targets and whether it was mixed."""
    images = _to_device(run, batch)
    labels = batch["label"].to(run.device, non_blocking=True)
    if run.gpu_augment is not None:
        x = run.gpu_augment(images, step_seed(run.cfg.seed, epoch, run.ctx.rank, step))
    else:
        x = normalize(images, run.channels, run.channels_last, run.norm)
    x, targets, mixed = run.mixer.mix(x, labels, step_generator(run.cfg.seed, epoch, run.ctx.rank, step))
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, targets, mixed


# ----------------------------------------------------------------------------------------
# Training and evaluation.


# Steps between two looks at the losses (one copy from the device, and an all-reduce under DDP).
_WATCH_EVERY = 16


def _batch_kind(mixed_ranks: int, world_size: int) -> str:
    """The divergence guard's name for a step's batches: mixed on every rank, on none, or on some."""
    if mixed_ranks == 0:
        return "unmixed"
    return "mixed" if mixed_ranks == world_size else f"mixed on {mixed_ranks} of {world_size} ranks"


def _watch(run: TrainingRun, losses: torch.Tensor, mixed: list[bool], lrs: list[float], start: int, stop: int, epoch: int) -> Divergence | None:
    """Feeds the losses of steps ``[start, stop)`` (their mean over the ranks) to the divergence guard.

    When only some batches are mixed (``mixup_prob`` between 0 and 1), each step's kind goes
    with its loss: the guard watches mixed and unmixed batches apart (imgpipe.train.divergence).
    """
    world = run.ctx.world_size
    varies = run.mixer.enabled and 0.0 < run.mixer.prob < 1.0
    chunk = losses[start:stop]
    if varies:
        chunk = torch.stack([chunk, torch.tensor(mixed[start:stop], dtype=chunk.dtype, device=chunk.device)])
    if world > 1:
        chunk = chunk.clone()
        dist.all_reduce(chunk)
    rows = chunk.cpu().tolist()
    values, kinds = (rows[0], [_batch_kind(round(k), world) for k in rows[1]]) if varies else (rows, None)
    assert run.guard is not None
    for offset, value in enumerate(values):  # one step at a time, so the event names its step's learning rate
        kind = None if kinds is None else [kinds[offset]]
        event = run.guard.update([value / world], first_step=start + offset, epoch=epoch, lr=lrs[start + offset], kinds=kind)
        if event is not None:
            return event
    return None


def train_one_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """Trains one epoch; returns train loss, images/s and data-wait fraction (over all ranks).

    The data-wait fraction is the time the loop spent blocked on the loader divided by
    the epoch's wall time. On CUDA the CPU runs ahead of the GPU, so time the GPU needs
    shows up as compute, and time the loader is late shows up as waiting.

    Every few steps the losses go to the divergence guard (:mod:`imgpipe.train.divergence`);
    when it calls the run diverged, the epoch stops there and the record holds the
    :class:`~imgpipe.train.divergence.Divergence` under ``"divergence"``.
    """
    run.model.train()
    if run.unfreeze.starts:
        # Per epoch, from the epoch alone: a run resumed at any epoch freezes as the uninterrupted one.
        trainable = run.trainable(epoch)
        set_trainable(run.module, trainable if trainable is not None else frozenset(n for n, _ in run.module.named_parameters()))
        if run.ctx.world_size > 1 and (epoch == run.start_epoch or run.unfreeze.stage(epoch) != run.unfreeze.stage(epoch - 1)):
            # DDP registers its reducer over the parameters that require gradients when it wraps;
            # after a stage change it wraps again (ranks hold the same weights; it broadcasts rank 0's).
            run.model = torch.compile(ddp(run.module, run.device)) if run.cfg.compile else ddp(run.module, run.device)
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
    losses = torch.zeros(steps, dtype=torch.float32, device=run.device)
    mixed = [False] * steps
    lrs = [0.0] * steps
    watched, event = first, None
    try:
        for step in range(first, steps):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"train loader ended after {step} of {steps} planned steps in epoch {epoch}")
            waited += time.perf_counter() - tick
            x, targets, mixed[step] = _prepare_train_batch(run, batch, epoch, step)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
                logits = run.model(x)
            loss = soft_target_cross_entropy(logits, targets, run.class_weights)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run.cfg.grad_clip > 0:
                clip_gradients(run.model, run.cfg.grad_clip)
            lrs[step] = run.optimizer.param_groups[0]["lr"]
            run.optimizer.step()
            run.scheduler.step()
            if run.ema is not None and step % run.cfg.ema_steps == 0:
                run.ema.update_parameters(run.module)
                if sum(run.steps_per_epoch[:epoch]) + step < run.warmup_steps:  # during the warmup the average restarts: torchvision's rule
                    run.ema.n_averaged.fill_(0)
            losses[step] = loss.detach()
            loss_sum += loss.detach().double() * len(targets)
            seen += len(targets)
            progress.update()
            checkpoint_due = every and (step + 1) % every == 0 and step + 1 < steps
            if checkpoint_due or step + 1 - watched >= _WATCH_EVERY or step + 1 == steps:
                event, watched = _watch(run, losses, mixed, lrs, watched, step + 1, epoch), step + 1
                if event is not None:
                    break
            if checkpoint_due and not run.guard.worrying:  # type: ignore[union-attr] # never a checkpoint of a loss on its way up
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
        # This rank's rows refused before decoding, by reason (imgpipe.train.rows.refuse_row).
        "loader_rejected": dict(run.train_loader.rejected),
        # What the row cache holds after the epoch (bounded by its budget, not by the split).
        **({"loader_cache_bytes": cached} if (cached := run.train_loader.cached_bytes) is not None else {}),
        **({"divergence": event} if event is not None else {}),
    }


def _prepare_eval_batch(run: TrainingRun, loader: ImageLoader, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    images = _to_device(run, batch)
    if loader.decode_on_device and images.shape[-2:] != (run.image_size, run.image_size):
        images = build_batch_eval_transform(run.image_size)(images)
    return normalize(images, run.channels, run.channels_last, run.norm), batch["label"].to(run.device, non_blocking=True)


def _eval_batches(run: TrainingRun, loader: ImageLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
    """``loader``'s split in evaluation order: normalized images on the device, labels, row indexes; its workers' iterator closed at the end."""
    loader.set_epoch(0)
    rows = iter(loader)
    try:
        for batch in rows:
            yield (*_prepare_eval_batch(run, loader, batch), batch["index"])
    finally:
        rows.close()  # type: ignore[attr-defined]


def _run_eval_loader(run: TrainingRun, info: SplitInfo, persistent: bool, batch_size: int | None = None) -> ImageLoader:
    """An evaluation-order loader of ``info``'s split, decoding where the training loader does (``batch_size``: :func:`eval_loader`'s)."""
    decode = "cuda" if run.train_loader.decode_on_device else "cpu"
    return eval_loader(run.cfg, info, run.image_size, decode, run.ctx, persistent, engine=run.eval_engine, batch_size=batch_size)


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
        for images, labels, index in _eval_batches(run, loader):
            yield (images, labels, index) if keep_rows else (images, labels)

    return evaluate(model or run.module, batches, len(run.labels), run.device, amp=run.eval_amp, tta_flips=tta_flips, ctx=run.ctx)


# ----------------------------------------------------------------------------------------
# Outputs.


# ----------------------------------------------------------------------------------------
# The step.


def _recompute_norm_stats(run: TrainingRun) -> int:
    """``precise_bn``: the training batch-norm layers' statistics (the model's, its EMA's) from train images in the evaluation view.

    Returns the images measured on this rank (0: off, or no batch-norm layer trains).
    """
    names = [name for name, _ in norm_layers(run.module)]  # right after an epoch: the layers that trained
    if not run.cfg.precise_bn or not names:
        return 0
    if run.stats_loader is None:
        # In the training's batches: the statistics average batches like those the layers trained on.
        run.stats_loader = _run_eval_loader(run, run.train_info, run.cfg.persistent_workers, batch_size=run.cfg.batch_size)
    images = -(-run.cfg.precise_bn // run.ctx.world_size)
    seen = 0
    for module in (run.module, *((run.ema.module,) if run.ema is not None else ())):
        source = _eval_batches(run, run.stats_loader)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.eval_amp):  # as evaluation runs
            seen = recompute(module, (x for x, _, _ in source), images, run.ctx, names=names)
        source.close()
    return seen


def _validate(run: TrainingRun, epoch: int, record: dict[str, Any]) -> None:
    """Validates the model (and its EMA) after ``epoch`` into ``record``; keeps the weights if they are the best yet."""
    assert run.val_loader is not None
    with run.timed("precise_bn"):  # a part of the validation's time
        measured = _recompute_norm_stats(run)
    if measured:
        record["precise_bn_images"] = measured
    # With its rows: the kept epoch's are predictions.parquet's val rows (no second pass at the end).
    val = _evaluate_split(run, run.val_loader, keep_rows=True)
    record.update(val_keys(val, run.labels))
    event = DivergenceGuard.validation(val.loss, epoch=epoch, step=run.steps_per_epoch[epoch] - 1, lr=run.scheduler.get_last_lr()[0])
    if event is not None:  # weights (or the norms' statistics) blown up: nothing of this epoch is kept
        record["divergence"] = event
        return
    ema_val = None
    if run.ema is not None:
        ema_val = _evaluate_split(run, run.val_loader, model=run.ema.module, keep_rows=True)
        record.update({EMA_PREFIX + k: v for k, v in val_keys(ema_val, run.labels).items() if k != "val_per_class_recall"})
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
    the kept weights, which the test split, ``model.pt`` and the export use. The last
    checkpoint is written before this returns or raises.
    """
    try:
        ran = _epochs(run)
    except BaseException:
        finish_write(run, quiet=True)  # what was checkpointed before the error is on storage
        raise
    with run.timed("checkpoints"):
        finish_write(run)
    if run.best_state is not None:
        run.module.load_state_dict(run.best_state)
    elif ran and run.val_loader is None:  # no validation: the last weights ship, with their statistics measured
        with run.evaluation_layout():
            _recompute_norm_stats(run)
    return ran


def _epochs(run: TrainingRun) -> int:
    """The epochs of :func:`_fit`; returns how many ran."""
    ran, epoch = 0, run.start_epoch
    if run.cfg.divergence_restarts and epoch == 0 and not run.start_step:
        save_checkpoint(run, -1)  # the start: what a divergence in the first epoch restarts from
    while epoch < run.cfg.epochs:
        if run.selection.stopped_at is not None:  # resumed after early stopping
            break
        started = time.perf_counter()
        with run.timed("steps"):
            record: dict[str, Any] = {"epoch": epoch, **train_one_epoch(run, epoch)}
        if run.val_loader is not None and "divergence" not in record:
            with run.timed("validation"), run.evaluation_layout():
                _validate(run, epoch, record)
        record["seconds"] = round(time.perf_counter() - started, 3)
        # Wall-clock time at the epoch's end (validation included), and since the step began: time to accuracy.
        record["ended_at"] = round(time.time(), 3)
        record["elapsed_s"] = round(record["ended_at"] - run.started_at, 3)
        event = record.pop("divergence", None)
        if event is not None and _after_divergence(run, event):
            epoch = run.start_epoch  # restarted from the last checkpoint, the learning rate halved
            continue
        if event is not None:
            record["diverged"] = event.to_dict()
        run.history.append(record)
        ran += 1
        if event is not None:
            break
        stop = run.selection.should_stop(run.cfg.patience)
        if stop is not None:
            run.selection.stop(epoch, stop)
        if run.guard is not None and run.guard.worrying:
            log.warning("train: no checkpoint after epoch %d: the loss is above %.4g, on its way to divergence", epoch + 1, run.guard.limit())
        elif checkpoint_due(run, last=run.selection.stopped_at is not None or epoch + 1 >= run.cfg.epochs):
            with run.timed("checkpoints"):
                save_checkpoint(run, epoch)
        if run.ctx.is_main:
            log.info("train: %s", {k: v for k, v in record.items() if not isinstance(v, dict)})
        if run.selection.stopped_at is not None:
            log.info("train: %s", run.selection.stop_message(run.cfg.patience))
            break
        epoch += 1
    return ran


def _after_divergence(run: TrainingRun, event: Divergence) -> bool:
    """Restarts ``run`` from its last checkpoint with the learning rate halved, if restarts are left (True); else marks it diverged."""
    record = run.divergence
    if run.ctx.is_main:
        log.warning("train: diverged in epoch %d at step %d (lr %.4g): %s", event.epoch + 1, event.step + 1, event.lr, event.detail)
    if record.restarts < run.cfg.divergence_restarts:
        record.lr_scale /= 2
        record.events.append({**event.to_dict(), "action": "restarted", "lr_scale": record.lr_scale})
        record.events[-1]["from_epoch"] = restart(run, record.lr_scale)
        if run.ctx.is_main:
            log.warning(
                "train: restart %d of %d: from the checkpoint before epoch %d, every learning rate x %g",
                record.restarts,
                run.cfg.divergence_restarts,
                run.start_epoch + 1,
                record.lr_scale,
            )
        return True
    record.events.append({**event.to_dict(), "action": "stopped"})
    record.diverged = True
    return False


def _final_evaluations(run: TrainingRun) -> tuple[dict[str, Any], dict[str, EvalResult]]:
    """The kept weights on test (and with flip TTA), and per-image rows of val (their validation's) and test.

    Returns:
        ``metrics.json``'s ``test`` / ``test_tta``, and the evaluations with rows by split.
    """
    with_rows: dict[str, EvalResult] = {}
    if run.val_loader is not None:
        # The kept weights' own validation, rows and all, unless it came from a checkpoint (no rows kept).
        kept = run.best_val if run.best_val is not None and run.best_val.rows is not None else None
        with_rows["val"] = kept or _evaluate_split(run, run.val_loader, keep_rows=True)
    if run.test_info is None:
        return {}, with_rows
    loader = _run_eval_loader(run, run.test_info, persistent=False)
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
        TrainingDiverged: If the run stopped diverged and ``cfg.diverged_fails``; raised
            after its output is committed, marked diverged.
    """
    cfg = cfg or TrainConfig()
    data, out = storage.normalize_uri(data), storage.normalize_uri(out)
    check_locations(data, out)
    resources.use_system_allocator()
    upstream_manifest = contract.read_manifest(data, expect_step="resize")
    started, started_at = time.monotonic(), time.time()
    ctx = init_distributed(cfg.device)
    try:
        with determinism(cfg.deterministic):
            run = build_run(data, out, cfg, ctx, upstream_manifest)
            run.started_at = started_at
            run.attempt = start_output(out, cfg, ctx)
            if cfg.resume:
                resume(run)
            run.phase_s["setup"] = time.monotonic() - started
            epochs_run = _fit(run)
            with run.timed("final_evaluation"), run.evaluation_layout():
                tests, with_rows = _final_evaluations(run)
            report = finish(run, epochs_run, run.best_val, tests, with_rows, upstream_manifest, time.monotonic() - started)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()
    if run.divergence.diverged and cfg.diverged_fails:
        raise TrainingDiverged(
            f"train {run.divergence.summary()}. The output is committed at {out}, marked diverged (metrics.json, "
            "report.html, model.json) and is never promoted. Lower lr (or lr_base), raise warmup_fraction or batch_size, "
            "or set divergence_restarts=N to restart from the last checkpoint with the learning rate halved"
        )
    return report
