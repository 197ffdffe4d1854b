"""Running a step as a KubeRay ``RayJob``: a job that brings its own Ray cluster.

    report = run_step_rayjob("resize", source, dest, cfg, namespace="team-a", run_id=run_id)

How it works in detail: docs/internals/remote.md, "imgpipe.remote.kuberay".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from imgpipe import commit, storage
from imgpipe.contract import StepReport
from imgpipe.remote.attempts import RUN_ID_ENV, attempt_id, committed_report, job_id, resolve_run_id
from imgpipe.remote.kube import (
    RUN_ID_LABEL,
    CustomObjects,
    ObjectTarget,
    current_namespace,
    field_at,
    forbidden_message,
    load_api,
    load_core_api,
    pull_secrets,
    run_metadata,
    status_code,
)
from imgpipe.remote.payload import step_entrypoint
from imgpipe.remote.rayjob_spec import (
    GROUP,
    IMAGE_ENV,
    MAX_WORKERS_ENV,
    PLURAL,
    SERVER_METADATA,
    VERSION,
    RayJobParams,
    build_rayjob,
    load_template,
    sized_for_autoscaling,
    template_path,
    wait_deadline_s,
)
from imgpipe.remote.runner import run_remote

__all__ = [
    "MIN_KUBERAY",
    "REQUIRED_FIELDS",
    "dropped_fields",
    "NO_LOGS",
    "cluster_template",
    "rayjob_state",
    "wait_for_rayjob",
    "SubmitterLog",
    "rayjobs",
    "run_step_rayjob",
]

log = logging.getLogger(__name__)

ROLE = "k8s/base/role-rayjobs.yaml"
NO_LOGS = object()  # core_api value that turns log tailing off
# The KubeRay floor (docs/deploy/versions.md, "Versions"), and the RayJob fields behind it with the
# release whose CRD first has each (ray-project/kuberay ray-operator/config/crd/bases/
# ray.io_rayjobs.yaml at those tags; Kubeflow's own KubeRay install, kubeflow/manifests
# 26.03 experimental/ray, is 1.3.2 and has only submitterConfig).
MIN_KUBERAY = "1.6"
REQUIRED_FIELDS: dict[tuple[str, ...], str] = {
    ("spec", "preRunningDeadlineSeconds"): "v1.6.0",
    ("spec", "rayClusterSpec", "authOptions"): "v1.5.1",
    ("spec", "submitterConfig"): "v1.2.0",
}
# ----------------------------------------------------------------------------------------
# The Kubernetes side.


def rayjobs(api: Any) -> CustomObjects:
    """The RayJobs of ``api``, their refusals naming :data:`ROLE`."""
    return CustomObjects(api, GROUP, VERSION, PLURAL, "RayJob", ROLE)


def dropped_fields(sent: Mapping[str, Any], returned: Mapping[str, Any]) -> list[str]:
    """The :data:`REQUIRED_FIELDS` that ``sent`` sets and the API server's copy lacks.

    The API server drops, without an error, every field the CRD's structural schema does
    not list (Kubernetes' custom resource field pruning), so on an older KubeRay's CRD they
    are gone from the object the create returns.
    """
    return [".".join(path) for path in REQUIRED_FIELDS if field_at(sent, path) is not None and field_at(returned, path) is None]


def _refuse_pruned(api: Any, sent: Mapping[str, Any], returned: Mapping[str, Any]) -> None:
    """Deletes the RayJob and raises if the cluster's CRD dropped a required field.

    The RayJob is this job's attempt (its name is the job id) whether this call created it
    or a retry of the task did (409): either way it must not run without the fields.

    Raises:
        RuntimeError: Naming the dropped fields, the release that added each and :data:`MIN_KUBERAY`.
    """
    dropped = dropped_fields(sent, returned)
    if not dropped:
        return
    namespace, name = sent["metadata"]["namespace"], sent["metadata"]["name"]
    deleted = rayjobs(api).delete(namespace, name)
    outcome = "the RayJob was deleted" if deleted else f"deleting it failed: kubectl delete rayjob -n {namespace} {name}"
    since = ", ".join(f"{field} since {REQUIRED_FIELDS[tuple(field.split('.'))]}" for field in dropped)
    raise RuntimeError(
        f"RayJob {namespace}/{name}: the cluster's RayJob CRD dropped {', '.join(dropped)} (the API server prunes "
        f"fields its schema lacks): imgpipe needs KubeRay >= {MIN_KUBERAY} ({since}; kubectl get crd rayjobs.ray.io "
        f"shows the installed schema); {outcome}"
    )


def rayjob_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``active``, ``succeeded`` or ``failed``, and a one-line description of the status.

    Terminal deployment states are ``Complete`` and ``Failed`` (KubeRay's
    ``IsJobDeploymentTerminal``); only ``Complete`` with job status ``SUCCEEDED`` is
    a success. ``ValidationFailed`` is not terminal to KubeRay, but the operator never
    requeues it (v1.5.0+): for a waiter it is a failure.
    """
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or ""
    parts = [f"jobDeploymentStatus={deployment}", f"jobStatus={job or '-'}"]
    parts += [f"{k}={status[k]}" for k in ("reason", "message") if status.get(k)]
    text = " ".join(parts)
    if deployment == "Complete" and job == "SUCCEEDED":
        return "succeeded", text
    if deployment in ("Complete", "Failed", "ValidationFailed"):
        return "failed", text
    return "active", text


def wait_for_rayjob(
    api: Any,
    namespace: str,
    name: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_poll: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Polls the RayJob until its deployment is terminal; prints each status change.

    Args:
        api: A ``CustomObjectsApi``.
        namespace: The RayJob's namespace.
        name: The RayJob's name.
        timeout_s: Give up after this long (:func:`wait_deadline_s` is what a step uses).
        poll_s: Status poll interval.
        out: Where status changes are printed.
        sleep: Waits between polls (a fake clock in tests).
        clock: The clock the deadline is on.
        on_poll: Called at every poll (copies the submitter's new log lines).

    Returns:
        The terminal object (success or failure: :func:`rayjob_state` tells).

    Raises:
        TimeoutError: After ``timeout_s`` (the RayJob keeps running; its own
            ``activeDeadlineSeconds`` bounds it).
        RuntimeError: If the RayJob is deleted meanwhile.
    """
    out = out or sys.stdout
    deadline = None if timeout_s is None else clock() + timeout_s
    last = ""
    while True:
        obj = rayjobs(api).get(namespace, name)
        if obj is None:
            raise RuntimeError(f"RayJob {namespace}/{name} was deleted while waiting for it")
        if on_poll is not None:
            on_poll()
        state, text = rayjob_state(obj)
        if text != last:
            out.write(f"rayjob {namespace}/{name}: {text}\n")
            out.flush()
            last = text
        if state != "active":
            return obj
        if deadline is not None and clock() >= deadline:
            raise TimeoutError(f"RayJob {namespace}/{name} not finished after {timeout_s:.0f}s ({text}); it keeps running")
        sleep(poll_s)


class SubmitterLog:
    """Copies the new lines of a RayJob's submitter pod log to ``out`` at each call.

    KubeRay (K8sJobMode) names the submitter Job after the RayJob; Kubernetes' Job
    controller labels its pods ``job-name=<job>``. A new pod (the Job retried the
    submission) starts from its first line.
    """

    def __init__(self, core_api: Any, namespace: str, name: str, out: TextIO) -> None:
        self.core_api, self.namespace, self.name, self.out = core_api, namespace, name, out
        self.pod: str | None = None
        self.shown = 0
        self.refused: set[str] = set()  # permissions already reported (once each)

    def __call__(self) -> None:
        call = ("list", "pods", f"list the pods of RayJob {self.namespace}/{self.name}'s submitter")
        try:
            pods = self.core_api.list_namespaced_pod(self.namespace, label_selector=f"job-name={self.name}").items
            if not pods:
                return
            pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp)).metadata.name
            if pod != self.pod:
                self.pod, self.shown = pod, 0
            call = ("get", "pods/log", f"read the log of pod {self.namespace}/{pod}")
            text = self.core_api.read_namespaced_pod_log(pod, self.namespace) or ""
        except Exception as exc:  # a pod still pending, RBAC without pods/log: logs are a courtesy
            verb, resource, doing = call
            if status_code(exc) == 403 and resource not in self.refused:
                self.refused.add(resource)
                log.warning("no submitter log in this step's log: %s", forbidden_message(exc, verb, resource, self.namespace, doing))
            else:
                log.debug("no log of RayJob %s/%s's submitter yet: %s", self.namespace, self.name, exc)
            return
        if len(text) > self.shown:
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


def cluster_template(api: Any, namespace: str, step: str) -> tuple[dict[str, Any], str]:
    """The RayJob template of ``step`` as applied to the cluster, else the packaged one.

    ``k8s/ray`` applies the template as the suspended RayJob ``imgpipe-<step>``; an
    overlay's or an admin's edits live there. Server-owned metadata, ``kubectl``'s
    annotations and the status are dropped.

    Returns:
        The template and where it came from (for the log).

    Raises:
        RuntimeError: If the API refuses the read (RBAC): a silent fallback would
            ignore the cluster's edits.
    """
    from kubernetes.client.exceptions import ApiException

    name = f"imgpipe-{step}"
    try:
        obj = rayjobs(api).get(namespace, name, doing=f"read the RayJob template {namespace}/{name}")
    except ApiException as exc:
        raise RuntimeError(
            f"cannot read the RayJob template {namespace}/{name} ({status_code(exc)} {exc.reason}): the pipeline's "
            "service account needs `get` on rayjobs.ray.io (k8s/base/role-rayjobs.yaml)"
        ) from exc
    if obj is None:
        path = template_path(step)
        return load_template(path), f"packaged {path} (no RayJob {namespace}/{name} in the cluster)"
    meta = obj.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith("kubectl.kubernetes.io/")}
    template = {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("status", "metadata")}
    template["metadata"] = {k: copy.deepcopy(v) for k, v in meta.items() if k not in SERVER_METADATA}
    template["metadata"]["annotations"] = annotations
    return template, f"RayJob {namespace}/{name}"


def run_step_rayjob(
    step: str,
    source: str,
    dest: str,
    cfg: Any,
    *,
    namespace: str | None = None,
    run_id: str | None = None,
    api: Any = None,
    core_api: Any = None,
    template: Mapping[str, Any] | None = None,
    image: str | None = None,
    max_workers: int | None = None,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    max_attempts: int = 3,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> StepReport:
    """Runs a step as a KubeRay RayJob and waits for it (see the module docstring).

    Args:
        step: The ``imgpipe`` sub-command (``resize``).
        source: Input prefix.
        dest: Output prefix.
        cfg: The step's resolved config; the job runs it with ``ray_address`` cleared
            (and a ``concurrency`` of 0 sized for the worker group's maximum).
        namespace: Where the RayJob goes (default: :func:`current_namespace`).
        run_id: Idempotency key (default ``$IMGPIPE_RUN_ID``).
        api: A ``CustomObjectsApi`` (default: :func:`load_api`).
        core_api: A ``CoreV1Api`` for the submitter's log (default: :func:`load_core_api`;
            :data:`NO_LOGS` turns it off).
        template: The RayJob template (default: :func:`cluster_template`).
        image: The Ray image (default ``$IMGPIPE_RAY_IMAGE``).
        max_workers: The worker group's maximum (default ``$IMGPIPE_KUBERAY_MAX_WORKERS``,
            else the template's).
        timeout_s: Give up waiting after this long (default: :func:`wait_deadline_s`).
        poll_s: Status poll interval.
        max_attempts: Attempts in all for one job id, across retries.
        out: Where status changes and the job's log are printed (default stdout).
        sleep: Waits between polls.
        clock: The clock of the deadline.

    Returns:
        The step report, read from the committed manifest at ``dest``.

    Raises:
        RuntimeError: If the RayJob fails (``ValidationFailed`` included), with its
            status, reason and message; if the cluster's CRD dropped a field of
            :data:`REQUIRED_FIELDS` (the RayJob is deleted); if RBAC refuses a RayJob
            call (403), naming the verb, resource, namespace and account.
        TimeoutError: If the deadline passes first (the RayJob keeps running).
    """
    source, dest = storage.normalize_uri(source), storage.normalize_uri(dest)
    commit.check_disjoint(dest, [source], step)
    namespace = namespace or current_namespace()
    api = api if api is not None else load_api()
    if template is None:
        template, origin = cluster_template(api, namespace, step)
        log.info("%s: RayJob template from %s", step, origin)
    image = image or os.environ.get(IMAGE_ENV) or None
    if max_workers is None and os.environ.get(MAX_WORKERS_ENV):
        max_workers = int(os.environ[MAX_WORKERS_ENV])
    job_cfg = sized_for_autoscaling(dataclasses.replace(cfg, ray_address=""), template, max_workers, "cpu")
    done = committed_report(step, source, dest, job_cfg)
    if done is not None:
        # A retried task whose first attempt finished after all: nothing to run, nothing to create.
        log.info("%s: %s already holds this job's committed output; not creating a RayJob", step, dest)
        return done
    run_id = resolve_run_id(run_id)
    if run_id is None:
        log.warning("%s: no run id (--run-id or $%s): a retry of this call cannot re-attach to its RayJob", step, RUN_ID_ENV)
    base = job_id(step, source, dest, job_cfg, run_id)
    target = _RayJobTarget(
        step,
        source,
        dest,
        job_cfg,
        rayjobs(api),
        namespace,
        template,
        image,
        max_workers,
        run_id or "",
        base,
        out or sys.stdout,
        core_api,
        timeout_s,
        poll_s,
        sleep,
        clock,
    )
    return run_remote(target, base=base, committed=lambda: committed_report(step, source, dest, job_cfg), max_attempts=max_attempts)


@dataclass
class _RayJobTarget(ObjectTarget):
    """A step as KubeRay RayJobs, for :func:`imgpipe.remote.runner.run_remote`."""

    step: str
    source: str
    dest: str
    cfg: Any
    objects: CustomObjects
    namespace: str
    template: Mapping[str, Any]
    image: str | None
    max_workers: int | None
    run_id: str
    base: str
    out: TextIO
    core_api: Any
    timeout_s: float | None
    poll_s: float
    sleep: Callable[[float], None]
    clock: Callable[[], float]

    def state(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        return rayjob_state(obj)

    def submit(self, name: str, attempt: int, previous: Any, detail: str) -> dict[str, Any]:
        if previous is not None:
            log.warning("%s: RayJob %s ended (%s); creating attempt %d", self.step, attempt_id(self.base, attempt - 1), detail, attempt)
        labels, annotations = run_metadata(self.run_id, self.base, self.step, attempt)
        params = RayJobParams(
            name=name,
            namespace=self.namespace,
            entrypoint=step_entrypoint(self.step, self.source, self.dest, self.cfg),
            image=self.image,
            max_workers=self.max_workers,
            env_vars=storage.settings_env(),
            labels=labels,
            annotations=annotations,
            pull_secrets=pull_secrets(),
        )
        sent = build_rayjob(self.template, params)
        body, created = self.objects.create_or_attach(sent)
        # Before any wait: a RayJob without its deadline or token must not run on. (A running
        # attempt attached to later was checked here by the try that created it.)
        _refuse_pruned(self.objects.api, sent, body)
        log.info(
            "%s: %s RayJob %s/%s (attempt %d); its log follows (kubectl logs -n %s -f job/%s)",
            self.step,
            "created" if created else "attached to",
            self.namespace,
            name,
            attempt,
            self.namespace,
            name,
        )
        return body

    def attach(self, name: str, obj: Any, detail: str) -> Any:
        log.info("%s: attaching to RayJob %s/%s (%s)", self.step, self.namespace, name, detail)
        return obj

    def wait(self, name: str, obj: Any) -> dict[str, Any]:
        core_api = self.core_api if self.core_api is not None else load_core_api()
        follow = None if core_api is NO_LOGS else SubmitterLog(core_api, self.namespace, name, self.out)
        limit = self.timeout_s if self.timeout_s is not None else wait_deadline_s(obj or self.template)
        return wait_for_rayjob(
            self.objects.api,
            self.namespace,
            name,
            timeout_s=limit,
            poll_s=self.poll_s,
            out=self.out,
            sleep=self.sleep,
            clock=self.clock,
            on_poll=follow,
        )

    def done(self, name: str) -> None:
        log.info("%s: RayJob %s/%s already succeeded and %s holds its output", self.step, self.namespace, name, self.dest)

    def failure(self, name: str, detail: str, final: Any) -> str:
        return (
            f"RayJob {self.namespace}/{name} for {self.step} {self.dest} failed: {detail}; it stays for a look "
            f"(kubectl describe rayjob -n {self.namespace} {name}; kubectl delete rayjobs -n {self.namespace} -l {RUN_ID_LABEL}=...)"
        )

    def no_output(self, name: str) -> str:
        return f"RayJob {self.namespace}/{name} succeeded but {self.dest} does not hold its committed output"
