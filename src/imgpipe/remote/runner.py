"""The one lifecycle of a remote job, whatever runs it: find the attempts, create or attach, wait, check the output, clean up.

Google Cloud Pipeline Components' ``JobRemoteRunner`` keeps this loop once and lets each job
type add its own create and get calls; here a Ray job (the Jobs API), a KubeRay RayJob and a
Kubeflow Trainer TrainJob each implement :class:`RemoteJob` (a few methods) and call
:func:`run_remote`:

    report = run_remote(RayJobTarget(...), base=job_id(...), committed=lambda: committed_report(...), max_attempts=3)

A destination that already holds the job's committed output returns before anything is
created; an attempt that ends otherwise than succeeded after committing its output counts as done.
A running attempt is attached to, never started twice; a failed one is followed by a
new attempt up to ``max_attempts``; a succeeded one whose output is gone too. Once an attempt
succeeds and the output is verified, every attempt is cleaned up (where the target keeps any).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from imgpipe.contract import StepReport
from imgpipe.remote.attempts import attempt_id, choose_action, latest_attempt

__all__ = ["RemoteJob", "run_remote"]

log = logging.getLogger(__name__)


class RemoteJob(Protocol):
    """What one kind of remote job adds to :func:`run_remote`: its calls and its words."""

    def find(self, name: str) -> Any | None:
        """The attempt of that name, ``None`` if the target has none."""

    def state(self, obj: Any) -> tuple[str, str]:
        """``active``, ``succeeded`` or ``failed``, and a one-line description."""

    def submit(self, name: str, attempt: int, previous: Any | None, detail: str) -> Any:
        """Creates attempt ``name`` (or attaches to it when another submitter won the race); returns what to wait on."""

    def attach(self, name: str, obj: Any, detail: str) -> Any:
        """Says that the running attempt is attached to; returns what to wait on."""

    def wait(self, name: str, obj: Any) -> Any:
        """Waits until the attempt is terminal; returns it as it ended."""

    def done(self, name: str) -> None:
        """Says that a finished attempt's output is already there."""

    def failure(self, name: str, detail: str, final: Any) -> str:
        """The message of a failed attempt."""

    def no_output(self, name: str) -> str:
        """The message of a succeeded attempt whose output is not there."""

    def clean_up(self, names: list[str]) -> None:
        """Deletes the attempts of a job that succeeded (nothing, where the target keeps none)."""


def run_remote(job: RemoteJob, *, base: str, committed: Callable[[], StepReport | None], max_attempts: int) -> StepReport:
    """Runs ``job`` to a committed output: attempts ``base``, ``base-a2``, ... (see the module docstring).

    Raises:
        RuntimeError: If the attempt fails without committing the output (the target's message), no attempt is left, or
            a succeeded attempt's output is not there.
        TimeoutError: If the wait's deadline passes (the attempt keeps running; a retry attaches).
    """
    attempt, latest = latest_attempt(job.find, base)
    state, detail = job.state(latest) if latest is not None else (None, "")
    action, attempt = choose_action(state, attempt, max_attempts, lambda: committed() is not None, detail)
    name = attempt_id(base, attempt)
    every = [attempt_id(base, n) for n in range(1, attempt + 1)]
    if action == "done":
        job.done(name)
        job.clean_up(every)
        report = committed()
        assert report is not None  # checked by choose_action just now
        return report
    obj = job.submit(name, attempt, latest, detail) if action == "submit" else job.attach(name, latest, detail)
    final = job.wait(name, obj)
    state, detail = job.state(final)
    # The output decides, not the attempt's end: one that ended failed (or still runs) after its
    # output was committed did the work (a rank replaced after rank 0's commit cannot rejoin, and
    # waits for its peers until a deadline); a retry would find it done, so it is done now.
    report = committed()
    if report is None:
        raise RuntimeError(job.failure(name, detail, final) if state != "succeeded" else job.no_output(name))
    if state == "failed":
        log.warning("%s failed (%s) after its output was committed: the output counts, the attempt is removed", name, detail)
    elif state != "succeeded":
        log.info("%s still runs (%s) with its output committed: the output counts, the attempt is removed", name, detail)
    job.clean_up(every)
    return report
