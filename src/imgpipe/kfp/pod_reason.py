"""A failed KFP step's own reason: the line its pod's log ends with, read through the Kubernetes API.

KFP 2.17's API reports a step whose container failed with no error at all
(:func:`imgpipe.kfp.run_end.run_failure`). The reason is at the end of the step pod's log:
imgpipe's one line (``FileNotFoundError: download source ... does not exist``) or, when KFP
itself failed around the step, its launcher's (``failed to pre-publish Pod info to ML
Metadata: ... connection refused`` while MLMD is down). Where this process may read pod logs
(a kubeconfig, or an in-cluster account granted ``pods/log``), ``imgpipe submit --wait`` quotes
that line; where it may not, it says where the log is, as before.

    last_line(log)                                   # the reason in a log, "" if none
    failed_pod_reason("team-a", "imgpipe-xtdk9")     # the newest failed pod's, "" if unreadable
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["WORKFLOW_LABEL", "MAX_REASON", "last_line", "failed_pod_reason"]

log = logging.getLogger(__name__)

# The label Argo puts on every pod of a workflow.
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
# glog's prefix on the launcher's lines: "F1128 01:20:43.397147      16 main.go:59] ".
_GLOG = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.-]+:\d+\] ")
# Argo's executor wrapper: 'time="..." level=info msg="sub-process exited" ...'.
_ARGO = re.compile(r'^time="[^"]*" level=')
# What the launcher and the wrapper add after a command that failed: an exit status, no reason.
_EXIT_ONLY = re.compile(r"(^Error: |: )exit status \d+$")
# The longest reason a one-line failure message quotes (the API's error or a pod's log line).
MAX_REASON = 300


def last_line(text: str) -> str:
    """The last line of a step pod's log that says why: the launcher's and Argo's wrapping skipped.

    A glog line that names a reason (not just an exit status) is the launcher's own failure and
    is kept, without its prefix; imgpipe's one line is the line before the launcher's.
    """
    for raw in reversed(text.splitlines()):
        line = raw.strip()
        if not line or _ARGO.match(line):
            continue
        bare = _GLOG.sub("", line)
        if _EXIT_ONLY.search(bare):
            continue
        if bare != line and not bare.startswith("failed to execute component"):
            continue  # the launcher's progress (uploads, publish), not a reason
        return bare[:MAX_REASON]
    return ""


def failed_pod_reason(namespace: str, workflow: str, core: Any | None = None) -> str:
    """The reason the newest failed pod of ``workflow`` gives at the end of its ``main`` log.

    Returns ``""`` when it cannot be read (no credentials, no ``pods/log`` grant, the pod gone):
    the caller then says where the log is.
    """
    if not namespace or not workflow:
        return ""
    try:
        if core is None:
            from imgpipe.remote import kube

            core = kube.load_core_api()
        pods = core.list_namespaced_pod(namespace, label_selector=f"{WORKFLOW_LABEL}={workflow}").items
        failed = sorted((p for p in pods if (p.status.phase or "") == "Failed"), key=lambda p: p.metadata.creation_timestamp)
        if not failed:
            return ""
        text = core.read_namespaced_pod_log(failed[-1].metadata.name, namespace, container="main", tail_lines=60)
    except Exception as exc:  # a reason is a courtesy: without one the message says where the log is
        log.debug("the failed step's log could not be read: %s", exc)
        return ""
    return last_line(text or "")
