"""Training on every GPU of a pod: one process per GPU, started by torch's elastic launch.

The train step (:func:`imgpipe.steps.train.train`) already trains data-parallel wherever a
launcher describes a process group (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``): each rank reads disjoint rows, DDP keeps the replicas equal, and rank 0
alone writes. :func:`launch` is that launcher inside one pod: ``procs`` processes on
this machine through :func:`torch.distributed.launcher.api.elastic_launch` (what
``torchrun --standalone --nproc-per-node N`` runs), a rendezvous on a free loopback port,
no restarts (a failed rank fails the task; kfp's retry resumes from the checkpoint).

The count is fixed when the pipeline is compiled (``imgpipe compile --train-gpus N``): the
train task asks Kubernetes for N GPUs and carries ``IMGPIPE_TRAIN_PROCS=N``
(:data:`PROCS_ENV`), which the component reads here (:func:`procs_from_env`).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from imgpipe import storage
from imgpipe.config import config_from_dict, config_to_dict

__all__ = ["PROCS_ENV", "MAX_PROCS", "check_procs", "procs_from_env", "launch"]

log = logging.getLogger(__name__)

# The processes (one per GPU) the train task starts: set on the task at compile time.
PROCS_ENV = "IMGPIPE_TRAIN_PROCS"
# The most GPUs one pod may train on: the largest GPU nodes have 8 or 16.
MAX_PROCS = 16


def check_procs(value: Any, what: str = "train processes (GPUs per pod)") -> int:
    """``value`` as a count between 1 and :data:`MAX_PROCS`.

    Raises:
        TypeError: If it is not an integer.
        ValueError: If it is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if not 1 <= value <= MAX_PROCS:
        raise ValueError(f"{what} must be between 1 and {MAX_PROCS}, got {value}")
    return value


def procs_from_env() -> int:
    """The count :data:`PROCS_ENV` sets (1 when unset).

    Raises:
        ValueError: If it is not a whole number between 1 and :data:`MAX_PROCS`.
    """
    text = os.environ.get(PROCS_ENV, "").strip()
    if not text:
        return 1
    if not text.isdigit():
        raise ValueError(f"${PROCS_ENV}={text!r}: expected a whole number between 1 and {MAX_PROCS}")
    return check_procs(int(text), f"${PROCS_ENV}")


def _check_devices(procs: int, device: str) -> None:
    """Refuses more CUDA ranks than the pod has GPUs (each rank takes ``cuda:LOCAL_RANK``)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise ValueError(f"device {device!r} with {procs} processes, but CUDA is not available in this pod")
        return
    found = torch.cuda.device_count()
    if procs > found:
        raise ValueError(
            f"{procs} train processes need {procs} GPUs, but this pod sees {found}: compile with --train-gpus {found}, or give the task more GPUs"
        )


def _rank_main(data: str, out: str, cfg: dict[str, Any], settings: storage.Settings) -> dict[str, Any] | None:
    """One rank: the train step in a process group the launcher describes; rank 0 returns the report."""
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(storage.RedactingFilter())
    # Spawned ranks start bare: the launcher's endpoints (--s3-endpoint) come with them.
    storage.use_settings(settings)
    report = train(data, out, config_from_dict(TrainConfig, cfg))
    return report.to_dict() if int(os.environ.get("RANK", "0")) == 0 else None


def launch(data: str, out: str, cfg: Any, procs: int) -> Any:
    """Runs the train step on ``procs`` processes of this machine (one per GPU), or here for 1.

    Args:
        data: The committed resize output.
        out: The train output prefix.
        cfg: The resolved :class:`~imgpipe.train.config.TrainConfig`.
        procs: Ranks to start, 1 to :data:`MAX_PROCS`.

    Returns:
        The step's :class:`~imgpipe.train.summary.TrainReport` (rank 0's).

    Raises:
        ValueError: For a count out of range, or more CUDA ranks than GPUs.
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: If a rank fails.
    """
    from imgpipe.contract import FileEntry
    from imgpipe.steps.train import train
    from imgpipe.train.summary import TrainReport

    procs = check_procs(procs)
    if procs == 1:
        return train(data, out, cfg)
    _check_devices(procs, cfg.device)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=procs,
        run_id=f"imgpipe-train-{uuid.uuid4().hex[:8]}",
        # torchrun --standalone: a c10d store on a free port of this machine.
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    log.info("train: %d processes on this machine (%s)", procs, cfg.device)
    results = elastic_launch(config, _rank_main)(data, out, config_to_dict(cfg), storage.settings())
    report = dict(results[0])
    report["files"] = [FileEntry(**f) for f in report["files"]]
    return TrainReport(**report)
