"""How a KFP run ended, as `imgpipe submit --wait` tells it: waiting for its final state through KFP's
outages, and what failed in it, on one line.

    state = wait_for_run(client, run_id, timeout_s=3600, poll_s=30, namespace="team-a")
    if state != "SUCCEEDED":
        raise RuntimeError(f"run {run_id} ended {state}{run_failure(client.get_run(run_id), 'team-a')}")
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from imgpipe.kfp.pod_reason import MAX_REASON, WORKFLOW_LABEL, failed_pod_reason
from imgpipe.kfp.refusals import one_line, unavailable_message

__all__ = ["OUTAGE_S", "TERMINAL_STATES", "run_failure", "wait_for_run"]

log = logging.getLogger(__name__)
# How long `submit --wait` waits out KFP's API server answering 5xx or not at all before it gives up.
OUTAGE_S = 900.0
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"})


# KFP's task details (2.17) list Argo's nodes too: the DAG scaffolding around the steps, and the
# workflow itself (the pipeline's name and five characters).
_SCAFFOLD = re.compile(r"^(root|executor(\(\d+\))?|condition-(branches-)?\d+|for-loop-\d+(\(\d+\))?|imgpipe(-sweep|-audit)?-[a-z0-9]{5})$")


def run_failure(run: Any, namespace: str | None = None, pod_reason: Callable[[str, str], str] = failed_pod_reason) -> str:
    """What failed in a run, as KFP's API tells it: ``": TASK failed: REASON"``, or ``""``.

    The tasks named are the pipeline's steps that failed (not the DAG nodes around them); the
    reason is a task's own error, else the run's, first line only. KFP 2.17 fills neither for a
    step whose container failed: then the reason is the last line of the failed pod's log
    (``pod_reason(namespace, workflow)``, :mod:`imgpipe.kfp.pod_reason`) where this process may
    read it, else the message says where that log is.
    """
    tasks = list(getattr(getattr(run, "run_details", None), "task_details", None) or [])
    failed = [t for t in tasks if str(t.state or "").upper() == "FAILED" and not _SCAFFOLD.match(t.display_name or "")]
    reason = next((_headline(t.error) for t in failed if _headline(t.error)), "") or _headline(getattr(run, "error", None))
    if not failed:
        return f": {reason}" if reason else ""
    names = ", ".join(sorted({t.display_name or t.task_id for t in failed}))
    workflow = next(
        (t.display_name for t in tasks if t.display_name and _SCAFFOLD.match(t.display_name) and t.display_name.startswith("imgpipe")), ""
    )
    # Without a namespace (single-user KFP), the run's pods are in KFP's own.
    reason = reason or (pod_reason(namespace or "kubeflow", workflow) if workflow else "")
    if reason:
        return f": {names} failed: {reason}"
    where = f" (kubectl logs -l {WORKFLOW_LABEL}={workflow} -c main)" if workflow else ""
    return f": {names} failed; its own reason is the last line of its log, on the run's page in the KFP UI{where}"


def _headline(error: Any) -> str:
    message = getattr(error, "message", None) or ""
    return message.strip().splitlines()[0][:MAX_REASON] if message.strip() else ""


def wait_for_run(client: Any, run_id: str, timeout_s: float, poll_s: float, namespace: str | None = None, outage_s: float = OUTAGE_S) -> str:
    """The run's final state. KFP unavailable for a while (its database restarting, the API server's pod
    replaced) is waited out, the run goes on without it; unavailable for ``outage_s`` it raises, naming
    what the server said.
    """
    deadline = time.monotonic() + timeout_s
    down_since: float | None = None
    state = ""
    while True:
        try:
            state = str(client.get_run(run_id).state or "").upper()
            if down_since is not None:
                log.warning("Kubeflow Pipelines answers again after %.0f s; run %s is %s", time.monotonic() - down_since, run_id, state)
            down_since = None
        except Exception as exc:
            trouble = unavailable_message(exc)
            if trouble is None:
                said = one_line(exc, "get", "runs", namespace, f"read run {run_id}")
                if said is exc:
                    raise
                raise said from None
            now = time.monotonic()
            if down_since is None:
                down_since = now
                log.warning("Kubeflow Pipelines is unavailable (%s); waiting up to %.0f s for it", trouble, outage_s)
            elif now - down_since >= outage_s:
                raise RuntimeError(
                    f"Kubeflow Pipelines could not say how run {run_id} is for {now - down_since:.0f} s ({trouble}); "
                    "the run may still be going: `imgpipe submit --run-name NAME --wait` attaches to it again"
                ) from None
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {state or 'pending'} after {timeout_s:.0f}s")
        time.sleep(poll_s)
