"""Training across nodes as a Kubeflow Trainer ``TrainJob``: create it, wait for it, read its output.

    report = run_train_job(data, out, cfg, procs=4, run_id=run_id)   # cfg.nodes > 1

The TrainJob object itself is built in :mod:`imgpipe.remote.trainjob_spec`.
How it works in detail: docs/internals/remote.md, "imgpipe.remote.trainjob".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from imgpipe import commit, contract, storage
from imgpipe.config import config_to_dict
from imgpipe.contract import StepReport
from imgpipe.remote.attempts import attempt_id, job_id, resolve_run_id
from imgpipe.remote.kube import CustomObjects, ObjectTarget, current_namespace, field_at, load_api, run_metadata, status_code
from imgpipe.remote.payload import payload
from imgpipe.remote.runner import run_remote
from imgpipe.remote.trainjob_spec import (
    API_FORMS,
    DEFAULT_ACTIVE_DEADLINE_S,
    GROUP,
    IMAGE_ENV,
    KIND,
    PLURAL,
    SECRET_ENV,
    SHM_ENV,
    VERSION,
    TrainJobParams,
    build_trainjob,
    check_nodes,
    node_resources,
    pod_settings,
    trainjob_state,
)

__all__ = [
    "MIN_TRAINER",
    "REQUIRED_FIELDS",
    "WAIT_SLACK_S",
    "wait_for_trainjob",
    "committed_train",
    "run_train_job",
]

log = logging.getLogger(__name__)

MIN_TRAINER = "2.1.0"
# How to install or upgrade Trainer (kubeflow/trainer CHANGELOG-2.1.md; docs/deploy/versions.md, "Kubeflow Trainer").
INSTALL_HINT = (
    'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.2.1" '
    'and the same for overlays/runtimes (docs/deploy/versions.md, "Kubeflow Trainer")'
)
# Fields of the v2.2 form that v2.1.0's CRD lacks, with the release that added each. The create
# asks for fieldValidation=Strict, so a CRD without them refuses the object (and the v2.1 form is
# used); an API server that prunes them anyway (one without strict validation) is caught after.
REQUIRED_FIELDS: dict[tuple[str, ...], str] = {("spec", "activeDeadlineSeconds"): "2.2.0", ("spec", "runtimePatches"): "2.2"}
WAIT_SLACK_S = 600.0


# The Role that grants what this module calls.
ROLE = "k8s/base/role-trainjobs.yaml"


class _UnknownFields(Exception):
    """The CRD lacks fields the TrainJob set (``fieldValidation=Strict``: 400, nothing created)."""


def _create_refused(exc: Exception, namespace: str, name: str) -> None:
    """A strict create's 400 (fields the CRD lacks: try the next form) and the schema's 422, as errors of their own."""
    if status_code(exc) == 400 and "unknown field" in str(getattr(exc, "body", "")):
        raise _UnknownFields(str(getattr(exc, "body", ""))) from None
    if status_code(exc) == 422:
        raise RuntimeError(f"the API server refused TrainJob {namespace}/{name}: {getattr(exc, 'body', exc)}") from None


def trainjobs(api: Any) -> CustomObjects:
    """The TrainJobs of ``api``: created with ``fieldValidation=Strict``, refusals naming :data:`ROLE`."""
    return CustomObjects(api, GROUP, VERSION, PLURAL, KIND, ROLE, field_validation="Strict", on_create_error=_create_refused)


def _create_in_form(api: Any, params: TrainJobParams) -> tuple[dict[str, Any], dict[str, Any], bool, TrainJobParams]:
    """Creates (or attaches to) the TrainJob in the first of :data:`API_FORMS` the cluster's CRD takes.

    Returns:
        ``(sent, returned, created, params)`` with ``params.form`` the form used.

    Raises:
        RuntimeError: If the CRD takes neither, naming the Trainer release needed and how to install it.
    """
    refused = []
    for form in API_FORMS:
        params = dataclasses.replace(params, form=form)
        sent = build_trainjob(params)
        try:
            returned, created = trainjobs(api).create_or_attach(sent)
            return sent, returned, created, params
        except _UnknownFields as exc:
            refused.append(f"{form}: {exc}"[:300])
            log.warning("train: the TrainJob CRD does not take spec.%s; trying the next Trainer API", form)
    raise RuntimeError(
        f"TrainJob {params.namespace}/{params.name}: the cluster's TrainJob CRD takes neither spec.runtimePatches "
        f"(Trainer >= 2.2) nor spec.podTemplateOverrides (Trainer 2.1): imgpipe needs Kubeflow Trainer >= {MIN_TRAINER}; "
        f"install it: {INSTALL_HINT} ({'; '.join(refused)})"
    )


def _refuse_pruned(api: Any, sent: Mapping[str, Any], returned: Mapping[str, Any]) -> None:
    """Deletes the TrainJob and raises if the cluster's CRD dropped a field imgpipe relies on."""
    dropped = [".".join(p) for p in REQUIRED_FIELDS if field_at(sent, p) is not None and field_at(returned, p) is None]
    if not dropped:
        return
    namespace, name = sent["metadata"]["namespace"], sent["metadata"]["name"]
    outcome = "the TrainJob was deleted" if trainjobs(api).delete(namespace, name) else f"delete it: kubectl delete trainjob -n {namespace} {name}"
    since = ", ".join(f"{f} since {REQUIRED_FIELDS[tuple(f.split('.'))]}" for f in dropped)
    raise RuntimeError(
        f"TrainJob {namespace}/{name}: the cluster's TrainJob CRD dropped {', '.join(dropped)} although it was asked to "
        f"refuse unknown fields (fieldValidation=Strict, Kubernetes >= 1.25): a Trainer older than {since}; upgrade: "
        f"{INSTALL_HINT}; {outcome}"
    )


def wait_for_trainjob(
    api: Any,
    namespace: str,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = 15.0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    committed: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Polls the TrainJob until ``Complete`` or ``Failed``, or until ``committed()`` while it runs; prints each status change.

    A node's pod replaced after rank 0 committed the output (a drained node) waits for peers that
    have ended: the TrainJob runs on until a deadline although its work is done. ``committed``
    (one read of the output's manifest a poll) ends the wait there.

    Raises:
        TimeoutError: After ``timeout_s`` (the TrainJob's own deadline bounds it).
        RuntimeError: If the TrainJob is deleted meanwhile.
    """
    out = out or sys.stdout
    deadline, last = clock() + timeout_s, ""
    while True:
        obj = trainjobs(api).get(namespace, name)
        if obj is None:
            raise RuntimeError(f"TrainJob {namespace}/{name} was deleted while the train task waited for it")
        state, text = trainjob_state(obj)
        if text != last:
            out.write(f"trainjob {namespace}/{name}: {text}\n")
            out.flush()
            last = text
        if state != "active":
            return obj
        if committed is not None and committed():
            out.write(f"trainjob {namespace}/{name}: its output is committed while it still runs; it is not waited for\n")
            out.flush()
            return obj
        if clock() >= deadline:
            raise TimeoutError(f"TrainJob {namespace}/{name} not finished after {timeout_s:.0f}s ({text}); it keeps running")
        sleep(poll_s)


# What "unset" means in a TrainConfig: the step settles these from the data and the machine
# (image size, loader workers, pinned memory, where augmentation runs, the weights cache).
_SETTLED_BY_THE_STEP = (None, "auto")


def committed_train(data: str, out: str, cfg: Any) -> StepReport | None:
    """The report of ``out`` if it holds the train output of ``cfg`` on ``data``, else ``None``.

    The manifest records the config as the step resolved it, so fields ``cfg`` leaves to
    the step (``None`` or ``auto``) are not compared; every field it sets must match.
    """
    try:
        manifest = contract.read_manifest(out, expect_step="train")
    except (ValueError, FileNotFoundError):
        return None
    if (manifest.get("upstream") or {}).get("source") != data:
        return None
    recorded = manifest.get("config") or {}
    wanted = {k: v for k, v in config_to_dict(cfg).items() if v not in _SETTLED_BY_THE_STEP}
    if any(recorded.get(k) != v for k, v in wanted.items()):
        return None
    return StepReport.from_manifest(manifest)


def run_train_job(
    data: str,
    out: str,
    cfg: Any,
    *,
    procs: int,
    namespace: str | None = None,
    run_id: str | None = None,
    api: Any = None,
    image: str | None = None,
    resources: Mapping[str, Any] | None = None,
    secret: str | None = None,
    active_deadline_s: int = DEFAULT_ACTIVE_DEADLINE_S,
    poll_s: float = 15.0,
    max_attempts: int = 3,
    stream: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> StepReport:
    """Trains on ``cfg.nodes`` nodes as a TrainJob and waits for it (see the module docstring).

    Args:
        data: The committed resize output.
        out: The train output prefix.
        cfg: The resolved train config (``nodes`` > 1); every rank runs it as it is.
        procs: Processes (GPUs) per node.
        namespace: Where the TrainJob goes (default: this pod's namespace).
        run_id: Idempotency key (default ``$IMGPIPE_RUN_ID``).
        api: A ``CustomObjectsApi`` (default: in-cluster credentials, then kubeconfig).
        image: The nodes' image (default ``$IMGPIPE_GPU_IMAGE``).
        resources: One node's requests and limits (default ``$IMGPIPE_TRAINJOB_NODE_RESOURCES``).
        secret: The Secret with the store's credentials (default ``$IMGPIPE_CREDENTIALS_SECRET``;
            none: the nodes' own credentials).
        active_deadline_s: ``spec.activeDeadlineSeconds``; the wait gives up
            :data:`WAIT_SLACK_S` after it.
        poll_s: Status poll interval.
        max_attempts: Attempts in all for one job id, across retries.
        stream: Where status changes are printed (default stdout).
        sleep: Waits between polls.
        clock: The clock of the deadline.

    Returns:
        The train report, read from the committed manifest at ``out``.

    Raises:
        RuntimeError: If the TrainJob fails (with the controller's reason and message), is
            deleted while waited for, is refused by RBAC (naming the permission) or by the API
            server, or if the cluster's CRD dropped a required field (it is then deleted).
        TimeoutError: If the deadline passes first.
    """
    data, out = storage.normalize_uri(data), storage.normalize_uri(out)
    commit.check_disjoint(out, [data], "train")
    check_nodes(cfg.nodes)
    done = committed_train(data, out, cfg)
    if done is not None:
        log.info("train: %s already holds this job's committed output; not creating a TrainJob", out)
        return done
    namespace = namespace or current_namespace()
    api = api if api is not None else load_api()
    run_id = resolve_run_id(run_id)
    base = job_id("train", data, out, cfg, run_id)
    target = _TrainJobTarget(
        data,
        out,
        cfg,
        procs,
        trainjobs(api),
        namespace,
        run_id or "",
        base,
        image,
        resources,
        secret,
        active_deadline_s,
        stream,
        poll_s,
        sleep,
        clock,
    )
    return run_remote(target, base=base, committed=lambda: committed_train(data, out, cfg), max_attempts=max_attempts)


@dataclass
class _TrainJobTarget(ObjectTarget):
    """Training across nodes as Kubeflow Trainer TrainJobs, for :func:`imgpipe.remote.runner.run_remote`."""

    data: str
    out: str
    cfg: Any
    procs: int
    objects: CustomObjects
    namespace: str
    run_id: str
    base: str
    image: str | None
    resources: Mapping[str, Any] | None
    secret: str | None
    active_deadline_s: int
    stream: TextIO | None
    poll_s: float
    sleep: Callable[[float], None]
    clock: Callable[[], float]

    def state(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        return trainjob_state(obj)

    def submit(self, name: str, attempt: int, previous: Any, detail: str) -> dict[str, Any]:
        if previous is not None:
            log.warning("train: TrainJob %s ended (%s); creating attempt %d", attempt_id(self.base, attempt - 1), detail, attempt)
        labels, annotations = run_metadata(self.run_id, self.base, "train", attempt)
        params = TrainJobParams(
            name=name,
            namespace=self.namespace,
            image=self.image or os.environ.get(IMAGE_ENV, ""),
            nodes=self.cfg.nodes,
            procs_per_node=self.procs,
            args=["-m", "imgpipe.remote", "train", payload(self.data, self.out, self.cfg)],
            env=storage.settings_env(),
            secret=self.secret if self.secret is not None else (os.environ.get(SECRET_ENV) or None),
            resources=self.resources if self.resources is not None else node_resources(self.procs),
            active_deadline_s=self.active_deadline_s,
            labels=labels,
            annotations=annotations,
            shm_size=os.environ.get(SHM_ENV) or None,
            pod=pod_settings(),
        )
        sent, body, created, params = _create_in_form(self.objects.api, params)
        _refuse_pruned(self.objects.api, sent, body)
        log.info(
            "train: %s TrainJob %s/%s (%d nodes x %d processes, attempt %d); kubectl get trainjob -n %s %s",
            "created" if created else "attached to",
            self.namespace,
            name,
            self.cfg.nodes,
            self.procs,
            attempt,
            self.namespace,
            name,
        )
        return body

    def attach(self, name: str, obj: Any, detail: str) -> Any:
        log.info("train: attaching to TrainJob %s/%s (%s)", self.namespace, name, detail)
        return obj

    def wait(self, name: str, obj: Any) -> dict[str, Any]:
        limit = self.active_deadline_s + WAIT_SLACK_S
        try:
            return wait_for_trainjob(
                self.objects.api, self.namespace, name, timeout_s=limit, poll_s=self.poll_s, out=self.stream, sleep=self.sleep, clock=self.clock,
                committed=self._committed,
            )  # fmt: skip
        except TimeoutError:
            if obj is not None and field_at(obj, ("spec", "activeDeadlineSeconds")) is None:
                self.objects.delete(self.namespace, name)  # Trainer 2.1 has no deadline of its own: the wait's ends it
            raise

    def _committed(self) -> bool:
        """Whether the output is committed yet; a failed read is a no (the wait goes on, and the runner reads again at its end)."""
        try:
            return committed_train(self.data, self.out, self.cfg) is not None
        except Exception as exc:  # noqa: BLE001 - a store's passing error must not end a wait the TrainJob's state decides
            log.debug("train: reading %s's manifest failed (%s); waiting on", self.out, exc)
            return False

    def done(self, name: str) -> None:
        log.info("train: %s already holds this job's committed output", self.out)

    def failure(self, name: str, detail: str, final: Any) -> str:
        return f"TrainJob {self.namespace}/{name} failed: {detail}; it stays for a look (kubectl describe trainjob -n {self.namespace} {name})"

    def no_output(self, name: str) -> str:
        return f"TrainJob {self.namespace}/{name} succeeded but {self.out} does not hold its committed output"
