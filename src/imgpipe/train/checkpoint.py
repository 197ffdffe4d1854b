"""Checkpoints of the train step: written atomically after each epoch, read back by ``--resume``.

A checkpoint is taken at once (its bytes, in memory) and written while training goes on, one
write at a time: the next checkpoint, a restart, the end of training or an error waits for
the last write first (:func:`finish_write`). When the kept weights are the ones just trained
(the epoch was the best yet), they are stored once, not twice.

A checkpoint holds the model, optimizer, scheduler, the loader's position (the start of
the next epoch), every rank's random state, the config and the history, and the weights
kept so far (the best epoch's, with their validation and the early-stopping count) and
the moving average of the weights: a resumed run continues as the uninterrupted one
would have, and keeps the same weights.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from imgpipe import storage
from imgpipe.config import config_record
from imgpipe.train.distributed import DistInfo, all_reduce
from imgpipe.train.divergence import DivergenceRecord
from imgpipe.train.evaluation import EvalResult
from imgpipe.train.models import error_line
from imgpipe.train.optim import scale_lr

if TYPE_CHECKING:
    from imgpipe.train.run import TrainingRun

__all__ = ["CHECKPOINT", "RESUME_FIXED", "checkpoint_due", "finish_write", "save_checkpoint", "load_checkpoint", "resume", "restart"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Fields that change what a checkpoint means; resuming with other values is refused
# (pretrained also picks the mean and std every batch is normalized with).
RESUME_FIXED = ("model", "batch_size", "seed", "image_size", "pretrained")
# The one thread checkpoints are written from (a write at a time; the process's, not a run's).
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgpipe-checkpoint")


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def _gather_rng(ctx: DistInfo) -> list[dict[str, Any]]:
    state = _rng_state()
    if ctx.world_size == 1:
        return [state]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _layout(run: TrainingRun) -> dict[str, int]:
    """What decides which rank and worker reads which samples, and how many steps an epoch has."""
    return {"world_size": run.ctx.world_size, "loader_parts": int(run.train_loader.parts), "batch_size": run.cfg.batch_size}


def checkpoint_due(run: TrainingRun, last: bool) -> bool:
    """Whether this epoch's end writes a checkpoint: the ``last`` one, or ``checkpoint_every_s`` since the one before.

    Every rank gets the same answer (a checkpoint is collective): one that is due on any rank is due on all.
    """
    every = run.cfg.checkpoint_every_s
    if last or not every:
        return True
    (due,) = all_reduce([float(time.monotonic() - run.checkpointed_at >= every)], run.device, run.ctx)
    return due > 0


def save_checkpoint(run: TrainingRun, epoch: int, step: int | None = None) -> None:
    """Takes ``checkpoint.pt`` after ``epoch``, or after ``step`` steps into it, and writes it atomically in the background.

    Rank 0 writes; every rank must call it (it gathers their random states). The bytes are
    taken before this returns, so training may change the weights at once.
    """
    rng = _gather_rng(run.ctx)  # collective: every rank takes part
    run.checkpointed_at = time.monotonic()
    if not run.ctx.is_main:
        return
    best = run.selection.best
    # The kept weights are the model's own when this epoch was the best yet: stored once.
    best_is_model = step is None and run.best_state is not None and best is not None and best.epoch == epoch and best.weights == "model"
    state = {
        "format": 1,
        # The last whole epoch; "step": steps already taken in the next one (a mid-epoch checkpoint).
        "epoch": epoch if step is None else epoch - 1,
        "step": step,
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        # Where a resumed run starts: epoch + 1 from its beginning, or the rest of this epoch.
        "loader": run.train_loader.state_at_start(epoch + 1) if step is None else run.train_loader.state_dict(),
        "rng": rng,
        "config": config_record(run.cfg),
        # How the epoch's samples were dealt: a resume with another layout would see others.
        "layout": _layout(run),
        "history": run.history,
        "labels": run.labels,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "best_state": None if best_is_model else run.best_state,
        "best_is_model": best_is_model,
        "best_val": run.best_val.summary_dict() if run.best_val is not None else None,
        "selection": run.selection.state_dict(),
        "guard": run.guard.state_dict() if run.guard is not None else None,
        "divergence": run.divergence.to_dict(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    finish_write(run)
    run.checkpoint_write = _WRITER.submit(storage.write_bytes, storage.join(run.out, CHECKPOINT), buf.getvalue())


def finish_write(run: TrainingRun, *, quiet: bool = False) -> None:
    """Waits for the checkpoint being written, if any; its error is raised (or, ``quiet``, logged)."""
    pending, run.checkpoint_write = run.checkpoint_write, None
    if pending is None:
        return
    try:
        pending.result()
    except Exception as exc:
        if not quiet:
            raise
        log.warning("train: the last checkpoint was not written: %s", error_line(exc))


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a pickle of objects (not weights-only), a truncated or foreign file
        raise ValueError(f"checkpoint {uri} cannot be resumed from: {error_line(exc)}") from None


def resume(run: TrainingRun) -> None:
    """Restores ``run`` from its output's checkpoint, if there is one (``--resume``).

    Raises:
        ValueError: If the checkpoint was trained with other :data:`RESUME_FIXED` settings, or
            another world size or loader layout (ranks, worker partitions).
    """
    uri = storage.join(run.out, CHECKPOINT)
    if not storage.exists(uri):
        log.info("train: --resume but no checkpoint at %s; starting from epoch 1", uri)
        return
    state = load_checkpoint(uri)
    saved = state["config"]
    current = config_record(run.cfg)
    fixed = {k: (saved.get(k), current[k]) for k in RESUME_FIXED if saved.get(k) != current[k]}
    if fixed:
        raise ValueError(
            f"cannot resume from {uri}: it was trained with "
            + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in fixed.items())
            + "; use the same values or write to a new output"
        )
    layout, now = state.get("layout"), _layout(run)
    if layout is not None and layout != now:
        differs = ", ".join(f"{k} {layout.get(k)} (now {now[k]})" for k in now if layout.get(k) != now[k])
        raise ValueError(
            f"cannot resume from {uri}: it was written with {differs}; the epoch's samples, their order per rank and "
            "worker, and the schedule's step count depend on them. Resume with the same ranks and num_workers, or "
            "write to a new output"
        )
    changed = sorted(k for k in current if k not in ("resume",) and saved.get(k) != current[k])
    if changed:
        log.warning("train: resuming with changed settings: %s", ", ".join(changed))
    _restore(run, state)
    run.divergence = DivergenceRecord.from_dict(state.get("divergence"))
    run.resumed_from = run.start_epoch
    log.info("train: resumed from %s after epoch %d%s", uri, run.start_epoch, f" and {run.start_step} steps of the next" if run.start_step else "")


def restart(run: TrainingRun, lr_scale: float) -> int:
    """Puts ``run`` back to its last checkpoint, every peak learning rate at ``lr_scale`` times the configured one.

    What a divergence restart does (``divergence_restarts``): the weights, optimizer, loader
    position, random state, history and kept weights of the checkpoint, the divergence record
    of now (it holds the divergence that made the restart). Returns the epoch it restarts at.

    Raises:
        FileNotFoundError: If the run has no checkpoint (the train step writes one at its start
            when restarts are on).
    """
    divergence = run.divergence
    finish_write(run)
    _restore(run, load_checkpoint(storage.join(run.out, CHECKPOINT)))
    run.divergence = divergence
    scale_lr(run.scheduler, run.base_lrs, lr_scale)
    return run.start_epoch


def _restore(run: TrainingRun, state: Mapping[str, Any]) -> None:
    """``run`` as ``state`` (a checkpoint) holds it; the divergence record aside (the caller's)."""
    run.module.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.train_loader.load_state_dict(state["loader"])
    rng = state["rng"]
    _set_rng_state(rng[run.ctx.rank] if len(rng) == run.ctx.world_size else rng[0])
    run.history = list(state["history"])
    run.start_epoch = int(state["epoch"]) + 1
    run.start_step = int(state.get("step") or 0)
    if state.get("ema") is not None and run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.best_state = {k: v.clone() for k, v in state["model"].items()} if state.get("best_is_model") else state.get("best_state")
    run.best_val = EvalResult(**state["best_val"]) if state.get("best_val") is not None else None
    if state.get("selection") is not None:
        run.selection.load_state_dict(state["selection"])
    if run.guard is not None:
        run.guard.load_state_dict(state.get("guard"))
