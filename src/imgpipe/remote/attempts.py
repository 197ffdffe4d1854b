"""Attempts of a remote job: its id, which attempt to act on, whether its output is there.

A remote step (a Ray job, a RayJob, a TrainJob) is named after the run id and what it does,
so a retried task finds it again; a failed attempt is followed by ``<id>-a2``, ``<id>-a3``, ...

    base = job_id("resize", source, dest, cfg, resolve_run_id(run_id))
    attempt, latest = latest_attempt(get, base)
    action, attempt = choose_action(state, attempt, max_attempts, output_ready)   # submit, attach or done
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from imgpipe import contract
from imgpipe.config import config_record
from imgpipe.contract import StepReport

__all__ = ["RUN_ID_ENV", "resolve_run_id", "job_id", "attempt_id", "latest_attempt", "choose_action", "committed_report"]

RUN_ID_ENV = "IMGPIPE_RUN_ID"
T = TypeVar("T")


def resolve_run_id(run_id: str | None = None) -> str | None:
    """The run id that makes submissions idempotent: the argument, else ``$IMGPIPE_RUN_ID``.

    A Kubeflow pipeline passes its run's id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``) as
    ``--run-id``; it is the same for every retry of a task, which is the point.
    """
    value = run_id if run_id is not None else os.environ.get(RUN_ID_ENV, "")
    return value.strip() or None


def job_id(step: str, source: str, dest: str, cfg: Any, run_id: str | None) -> str:
    """The job's base id: deterministic for a run id, unique without one.

    The digest covers run id, step, source, destination and resolved config, so a
    retry finds its job while a changed config under the same run id does not.
    """
    if run_id is None:
        return f"imgpipe-{step}-{uuid.uuid4().hex[:16]}"
    key = json.dumps(
        {"run_id": run_id, "step": step, "source": source, "dest": dest, "config": config_record(cfg)},
        sort_keys=True,
    )
    return f"imgpipe-{step}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def attempt_id(base: str, attempt: int) -> str:
    """The id of attempt ``attempt`` (1-based): ``base``, then ``base-a2``, ``base-a3``, ..."""
    return base if attempt == 1 else f"{base}-a{attempt}"


def latest_attempt(get: Callable[[str], T | None], base: str) -> tuple[int, T | None]:
    """The number and object of a job's last attempt (``base``, ``base-a2``, ...), by reading each in turn with ``get``; ``(0, None)`` for none."""
    attempt, latest = 0, None
    while (obj := get(attempt_id(base, attempt + 1))) is not None:
        attempt, latest = attempt + 1, obj
    return attempt, latest


def choose_action(
    state: str | None, attempt: int, max_attempts: int, output_ready: Callable[[], bool], detail: str = ""
) -> tuple[Literal["submit", "attach", "done"], int]:
    """What to do about the latest attempt of a job, and which attempt that concerns.

    Args:
        state: The latest attempt's state: ``None`` (no job yet), ``active``,
            ``succeeded`` or ``failed``.
        attempt: That attempt's number (0 when there is none).
        max_attempts: Attempts allowed in all for one job id.
        output_ready: Whether the destination holds this job's committed output.
        detail: The latest attempt's error, for the message when no attempt is left.

    Raises:
        RuntimeError: When the latest attempt failed and none is left.
    """
    if state is None:
        return "submit", 1
    if state == "active":
        return "attach", attempt
    if state == "succeeded" and output_ready():
        return "done", attempt
    if attempt >= max_attempts:
        raise RuntimeError(
            f"attempt {attempt} of {max_attempts} {'succeeded but its output is gone' if state == 'succeeded' else 'failed'}"
            f"{': ' + detail if detail else ''}; no attempt left for this run id: fix the cause, "
            "then run with a new --run-id"
        )
    return "submit", attempt + 1


def committed_report(step: str, source: str, dest: str, cfg: Any) -> StepReport | None:
    """The report of ``dest`` if it holds this very job's committed output, else ``None``.

    "This job's" means the manifest's step, upstream source and config all match:
    another run that wrote ``dest`` since then does not count.
    """
    try:
        manifest = contract.read_manifest(dest, expect_step=step)
    except (ValueError, FileNotFoundError):
        return None
    if manifest.get("config") != config_record(cfg):
        return None
    if manifest.get("upstream", {}).get("source", source) != source:
        return None
    return StepReport.from_manifest(manifest)
