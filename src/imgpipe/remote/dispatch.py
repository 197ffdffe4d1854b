"""Where a step runs, decided above the steps: here, a Ray cluster's Jobs API, a KubeRay RayJob, every GPU of the pod.

A step function (:mod:`imgpipe.steps`) does its work where it is called. The CLI and the
Kubeflow components call :func:`run_step` instead, which reads the step's target from its
config (``ray_address`` for resize, checked by :func:`imgpipe.remote.targets.check_allowed`)
and either calls the step function here or hands the run to a remote runner
(:mod:`imgpipe.remote.ray_jobs`, :mod:`imgpipe.remote.kuberay`), which starts
``python -m imgpipe.remote STEP PAYLOAD`` (:mod:`imgpipe.remote.job`) on the cluster. A new
remote-capable step is a ``ray_target`` in its :mod:`imgpipe.step_table` entry; a new kind of target is one
branch of :func:`run_step` and its runner module. Training goes through :func:`run_train`,
which starts one process per GPU of the pod (:mod:`imgpipe.remote.ranks`), or a Kubeflow
Trainer TrainJob across nodes (:mod:`imgpipe.remote.trainjob`).
"""

from __future__ import annotations

from typing import Any

from imgpipe.contract import StepReport
from imgpipe.remote.targets import RemoteTarget, check_allowed
from imgpipe.step_table import Step, steps_where

__all__ = ["remote_steps", "PLACEMENTS", "remote_step", "target_of", "run_step", "check_placement", "run_train"]


def remote_steps() -> dict[str, Step]:
    """The steps that may run on a Ray cluster (their ``ray_target`` names it), by name."""
    return steps_where(lambda s: s.ray_target is not None)


def remote_step(step: str) -> Step:
    """The registry entry of a step that may run remotely.

    Raises:
        ValueError: For a step that cannot run remotely, naming the ones that can.
    """
    steps = remote_steps()
    if step not in steps:
        raise ValueError(f"step {step!r} cannot run remotely; remote-capable steps: {', '.join(sorted(steps))}")
    return steps[step]


def target_of(step: str, cfg: Any) -> RemoteTarget:
    """Where ``cfg`` says ``step`` runs; a cluster nobody configured is refused (``ValueError``)."""
    return check_allowed(getattr(cfg, remote_step(step).ray_target))


def run_step(step: str, source: str, dest: str, cfg: Any, *, run_id: str | None = None) -> StepReport:
    """Runs ``step`` where its config says: here, as a Ray job, or as a KubeRay RayJob.

    Args:
        step: A name in :func:`remote_steps`.
        source: The step's input prefix.
        dest: Its output prefix.
        cfg: Its resolved config.
        run_id: The idempotency key of a remote job (default ``$IMGPIPE_RUN_ID``): a
            retried task re-attaches to its job instead of starting a second one.

    Returns:
        The step's report, from its committed output.
    """
    target = target_of(step, cfg)
    if target.mode == "jobs":
        from imgpipe.remote import ray_jobs

        return ray_jobs.run_step_job(step, source, dest, cfg, address=target.address, run_id=run_id)
    if target.mode == "kuberay":
        from imgpipe.remote import kuberay

        return kuberay.run_step_rayjob(step, source, dest, cfg, namespace=target.namespace, run_id=run_id)
    return remote_step(step).run()(source, dest, cfg)


# Where the pipeline compiled a train task to run (the train component's ``placement``): in
# its pod, with its GPUs, or as the small poller of a TrainJob, without any. "" is either.
PLACEMENTS = ("", "pod", "trainjob")


def check_placement(cfg: Any, placement: str) -> None:
    """Refuses a train config whose node count is not what the task was compiled for.

    The pipeline picks the train task by its ``train_nodes`` parameter (a pod with GPUs for
    1, a poller without any for more); a ``step_config`` that sets ``nodes`` otherwise would
    make the poller train on its CPU or the GPU pod wait on a TrainJob.

    Raises:
        ValueError: Naming both counts and the parameter to set.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if (placement == "pod" and cfg.nodes != 1) or (placement == "trainjob" and cfg.nodes == 1):
        where = "in its pod (train_nodes 1)" if placement == "pod" else "as a TrainJob (train_nodes above 1)"
        raise ValueError(
            f"this train task was compiled to run {where}, but its config asks for {cfg.nodes} node(s): the "
            "train_nodes run parameter decides this (a sweep's or audit's branch always trains in its pod), "
            "not step_config's train.nodes"
        )


def run_train(data: str, out: str, cfg: Any, *, procs: int | None = None, run_id: str | None = None, placement: str = "") -> StepReport:
    """Runs the train step where its config and the pipeline place it.

    ``cfg.nodes`` 1: on every GPU of this pod, one process each (:mod:`imgpipe.remote.ranks`).
    More: as a Kubeflow Trainer TrainJob of that many nodes, each with ``procs`` processes
    (:mod:`imgpipe.remote.trainjob`).

    Args:
        data: The committed resize output.
        out: The train output prefix.
        cfg: The resolved train config.
        procs: Processes (one per GPU) per node; default ``$IMGPIPE_TRAIN_PROCS``, set at
            compile time, else 1.
        run_id: The idempotency key of a TrainJob (default ``$IMGPIPE_RUN_ID``).
        placement: Where the pipeline compiled the task to run (:func:`check_placement`).

    Returns:
        The train report (rank 0's).

    Raises:
        ValueError: For a node or process count out of range (the operator's cap included),
            or one the task was not compiled for.
    """
    from imgpipe.remote import ranks

    check_placement(cfg, placement)
    procs = ranks.procs_from_env() if procs is None else ranks.check_procs(procs)
    if cfg.nodes > 1:
        from imgpipe.remote import trainjob, trainjob_spec

        trainjob_spec.check_nodes(cfg.nodes)
        return trainjob.run_train_job(data, out, cfg, procs=procs, run_id=run_id)
    return ranks.launch(data, out, cfg, procs)
