"""The train step: a committed resize output in, a trained classifier and its report out.

    report = train("s3://b/run/resize", "s3://b/run/train", TrainConfig(model="resnet18", epochs=10))

How it works in detail: docs/internals.md, "imgpipe.steps.train".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from imgpipe import contract, storage
from imgpipe.contract import StepReport

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
from imgpipe.train.checkpoint import resume, save_checkpoint
from imgpipe.train.config import TrainConfig
from imgpipe.train.distributed import (
    all_reduce,
    barrier,
    determinism,
    init_distributed,
)
from imgpipe.train.evaluation import EvalResult, evaluate
from imgpipe.train.loader import ImageLoader
from imgpipe.train.models import (
    set_trainable,
)
from imgpipe.train.outputs import (
    check_locations,
    commit,
    start_output,
    write_outputs,
)
from imgpipe.train.recipes import tta_flip_dims
from imgpipe.train.rows import decode_jpeg_batch
from imgpipe.train.run import TrainingRun
from imgpipe.train.selection import EMA_PREFIX

__all__ = [
    "TrainReport",
    "train_one_epoch",
    "train",
]

log = logging.getLogger(__name__)


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
        # This rank's rows refused before decoding, by reason (imgpipe.train.rows.refuse_row).
        "loader_rejected": dict(run.train_loader.rejected),
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
    loader = eval_loader(run.cfg, run.test_info, run.image_size, decode, run.ctx, persistent=False)
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
    check_locations(data, out)
    upstream_manifest = contract.read_manifest(data, expect_step="resize")
    started = time.monotonic()
    ctx = init_distributed(cfg.device)
    try:
        with determinism(cfg.deterministic):
            run = build_run(data, out, cfg, ctx, upstream_manifest)
            run.attempt = start_output(out, cfg, ctx)
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
    files = write_outputs(run, metrics, last_val, with_rows) if run.ctx.is_main else []
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
        model_uri=storage.join(run.out, contract.MODEL),
    )
    if run.ctx.is_main:
        upstream = {"source": run.data, "step": "resize", "outputs": upstream_manifest.get("outputs")}
        commit(run, train_report, upstream)
    barrier(run.ctx)
    return train_report


# ----------------------------------------------------------------------------------------
# A trained model on another split (the promotion gate, audits).
