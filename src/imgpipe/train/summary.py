"""What a finished training run reports: ``metrics.json``'s body, the step report, and the commit.

    report = finish(run, epochs_run, run.best_val, tests, with_rows, upstream_manifest, seconds)

:func:`finish` gathers the run's history, the kept weights' validation and the test
metrics, how the recipe was settled, the learning rate, the divergence record and how
many images an epoch used into ``metrics.json``; writes the outputs
(:func:`imgpipe.train.outputs.write_outputs`) on the main rank, and commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imgpipe import contract, storage
from imgpipe.config import config_record
from imgpipe.contract import StepReport
from imgpipe.train.distributed import barrier
from imgpipe.train.evaluation import EvalResult
from imgpipe.train.outputs import commit, write_outputs
from imgpipe.train.run import TrainingRun

__all__ = ["TrainReport", "val_keys", "kept_weights", "epoch_images", "finish"]


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


def val_keys(val: EvalResult, labels: list[str]) -> dict[str, Any]:
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


def kept_weights(run: TrainingRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics.json``'s ``selection`` (which weights, and why) and ``kept`` (their validation keys)."""
    trained = len(run.history)
    if run.best_val is None:
        last = run.history[-1]["epoch"] if run.history else run.cfg.epochs - 1
        reason = "no validation split: the last epoch's weights"
        if run.divergence.diverged:
            reason = "diverged before any validation: the weights as they were when it diverged (not a model to use)"
        return {"epoch": last, "weights": "model", "reason": reason, "epochs_trained": trained}, {}
    kept = {k: v for k, v in val_keys(run.best_val, run.labels).items() if k != "val_per_class_recall"}
    return run.selection.summary(run.cfg.patience, run.cfg.epochs, trained), kept


def epoch_images(run: TrainingRun) -> dict[str, Any]:
    """How many of the train split's images one epoch trains on, and why the rest wait for another epoch."""
    split = run.train_info.num_samples
    used = min(split, run.steps_per_epoch[-1] * run.cfg.batch_size * run.ctx.world_size)
    if run.cfg.max_steps_per_epoch is not None and run.steps_per_epoch[-1] == run.cfg.max_steps_per_epoch:
        why = f"max_steps_per_epoch {run.cfg.max_steps_per_epoch}"
    elif run.train_loader.cfg.drop_last:
        why = f"only full batches of {run.cfg.batch_size} per rank ({run.ctx.world_size} rank(s)), a new shuffle each epoch"
    elif split % run.cfg.batch_size:
        why = f"every image, the last batch {split % run.cfg.batch_size} images"
    else:
        why = f"every image, in full batches of {run.cfg.batch_size}"
    return {"split": split, "per_epoch": used, "left_out": split - used, "why": why}


def finish(
    run: TrainingRun,
    epochs_run: int,
    last_val: EvalResult | None,
    tests: Mapping[str, Any],
    with_rows: Mapping[str, EvalResult],
    upstream_manifest: Mapping[str, Any],
    seconds: float,
) -> TrainReport:
    """Writes the run's outputs and ``metrics.json`` (main rank), commits them, and returns the step report (every rank).

    Args:
        run: The finished run (``run.module`` holds the kept weights).
        epochs_run: Epochs this invocation trained.
        last_val: The kept weights' validation, if any.
        tests: ``metrics.json``'s ``test`` (and ``test_tta``).
        with_rows: Evaluations with per-image rows, by split (``predictions.parquet``).
        upstream_manifest: The resize output's manifest.
        seconds: The step's duration.
    """
    last = run.history[-1]
    seen = {"train": int(last.get("train_images", 0))}
    if last_val is not None:
        seen["val"] = last_val.images
    if "test" in tests:
        seen["test"] = int(tests["test"]["images"])
    selection, kept = kept_weights(run)
    metrics = {
        "epochs": run.history,
        **tests,
        "labels": run.labels,
        "images_seen": seen,
        "selection": selection,
        "kept": kept,
        "recipe": run.recipe.to_dict() if run.recipe else None,
        # The config as run: the report's recipe table shows only the settings that took effect under it.
        "config": config_record(run.cfg),
        "diverged": run.divergence.diverged,
        "divergence": run.divergence.to_dict(),
        "epoch_images": epoch_images(run),
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
        "test_macro_f1": tests["test"]["macro_f1"] if "test" in tests else None,
        "test_tta_accuracy": tests["test_tta"]["accuracy"] if "test_tta" in tests else None,
        "train_loss": last.get("train_loss"),
    }
    with run.timed("outputs"):
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
            "resumed_from_epoch": run.resumed_from or None,
            "kept": {k: selection[k] for k in ("epoch", "weights", "reason")},
            "recipe": run.recipe.summary() if run.recipe else None,
            "diverged": run.divergence.diverged,
            "divergence": run.divergence.summary() or None,
            # Where the step's time went, by phase, up to the commit (bench/steps/train_phases.py draws it).
            "started_at": round(run.started_at, 3),
            "phase_s": {k: round(v, 3) for k, v in run.phase_s.items()},
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
