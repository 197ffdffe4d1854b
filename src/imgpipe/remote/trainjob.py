"""Training across nodes as a Kubeflow Trainer ``TrainJob``.

    report = run_train_job(data, out, cfg, procs=4, run_id=run_id)   # cfg.nodes > 1

How it works in detail: docs/internals.md, "imgpipe.remote.trainjob".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from imgpipe import contract, storage
from imgpipe.config import check_range, config_to_dict
from imgpipe.contract import StepReport
from imgpipe.remote.attempts import attempt_id, job_id, resolve_run_id
from imgpipe.remote.kube import CustomObjects, ObjectTarget, current_namespace, field_at, load_api, run_metadata, status_code
from imgpipe.remote.payload import payload
from imgpipe.remote.runner import run_remote

__all__ = [
    "GROUP",
    "VERSION",
    "PLURAL",
    "RUNTIME",
    "MIN_TRAINER",
    "REQUIRED_FIELDS",
    "MAX_NODES_ENV",
    "DEFAULT_MAX_NODES",
    "IMAGE_ENV",
    "NODE_RESOURCES_ENV",
    "SHM_ENV",
    "POD_ENV",
    "ISTIO_ANNOTATIONS",
    "API_FORMS",
    "PATCH_MANAGER",
    "SECRET_ENV",
    "DEFAULT_ACTIVE_DEADLINE_S",
    "WAIT_SLACK_S",
    "TrainJobParams",
    "check_nodes",
    "build_trainjob",
    "node_resources",
    "trainjob_state",
    "wait_for_trainjob",
    "committed_train",
    "run_train_job",
]

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The PyTorch runtime Kubeflow Trainer ships (manifests/base/runtimes/torch_distributed.yaml at v2.2.1).
RUNTIME = "torch-distributed"
MIN_TRAINER = "2.1.0"
# How to install or upgrade Trainer (kubeflow/trainer CHANGELOG-2.1.md; docs/deploy.md, "Kubeflow Trainer").
INSTALL_HINT = (
    'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.2.1" '
    'and the same for overlays/runtimes (docs/deploy.md, "Kubeflow Trainer")'
)
# Fields of the v2.2 form that v2.1.0's CRD lacks, with the release that added each. The create
# asks for fieldValidation=Strict, so a CRD without them refuses the object (and the v2.1 form is
# used); an API server that prunes them anyway (one without strict validation) is caught after.
REQUIRED_FIELDS: dict[tuple[str, ...], str] = {("spec", "activeDeadlineSeconds"): "2.2.0", ("spec", "runtimePatches"): "2.2"}
MAX_NODES_ENV = "IMGPIPE_TRAIN_MAX_NODES"
# What a run may ask for unless the operator allows more: train_nodes is a run's parameter.
DEFAULT_MAX_NODES = 4
IMAGE_ENV = "IMGPIPE_GPU_IMAGE"
NODE_RESOURCES_ENV = "IMGPIPE_TRAINJOB_NODE_RESOURCES"
# Size of each node's memory-backed /dev/shm (a Kubernetes quantity), set at compile time
# from the train task's own; empty for none.
SHM_ENV = "IMGPIPE_TRAINJOB_SHM"
# Who owns imgpipe's entry in spec.runtimePatches (a list keyed by manager).
PATCH_MANAGER = "imgpipe.io/train"
# The node pods' scheduling and metadata, JSON (tolerations, nodeSelector, imagePullSecrets),
# set at compile time from the train task's own settings.
POD_ENV = "IMGPIPE_TRAINJOB_POD"
# Every imgpipe pod stays out of the mesh: torch's rendezvous (port 29500) and NCCL are not
# HTTP, and a profile's Istio policy would refuse them.
ISTIO_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}
# How a TrainJob patches its runtime's node pods: Trainer >= 2.2, then 2.1.
API_FORMS = ("runtimePatches", "podTemplateOverrides")
_POD_KEYS = frozenset({"tolerations", "nodeSelector", "imagePullSecrets"})
# The replicated job and container of Trainer's torch-distributed runtime
# (manifests/base/runtimes/torch_distributed.yaml at v2.2.1: both named "node").
_NODE = "node"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
# The Secret with the store's credentials (storage.SECRET_ENV keys), as every step's pod gets it.
SECRET_ENV = "IMGPIPE_CREDENTIALS_SECRET"
DEFAULT_ACTIVE_DEADLINE_S = 3 * 24 * 3600
WAIT_SLACK_S = 600.0
# The variables the torch runtime sets for torchrun; its webhook refuses a TrainJob that sets them.
_RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"})


def check_nodes(nodes: Any, max_nodes: int | None = None) -> int:
    """``nodes`` as a count between 1 and the operator's cap (``$IMGPIPE_TRAIN_MAX_NODES``, default 4).

    Raises:
        TypeError: If it is not an integer.
        ValueError: If it is below 1 or above the cap, naming the cap and how to raise it.
    """
    check_range("train nodes", nodes, integer=True)  # the type first, before the operator's cap is read
    if max_nodes is None:
        text = os.environ.get(MAX_NODES_ENV, "").strip()
        if text and not text.isdigit():
            raise ValueError(f"${MAX_NODES_ENV}={text!r}: expected a whole number of nodes")
        max_nodes = int(text) if text else DEFAULT_MAX_NODES
    check_range(
        "train nodes",
        nodes,
        1,
        max_nodes,
        integer=True,
        note=f"the operator raises the cap with ${MAX_NODES_ENV} on the train task, in the imgpipe-s3-config ConfigMap",
    )
    return nodes


@dataclass(frozen=True)
class TrainJobParams:
    """What is per run in a TrainJob.

    Attributes:
        name: The TrainJob's name (an attempt id).
        namespace: Where it goes.
        image: The gpu image with imgpipe.
        nodes: Training nodes.
        procs_per_node: Processes (GPUs) per node.
        args: torchrun's arguments (the module and its payload).
        env: Non-secret variables for every node (the storage settings).
        secret: The Secret holding the store's credentials (:data:`imgpipe.storage.SECRET_ENV`
            keys), or ``None`` (credentials from elsewhere: workload identity).
        resources: Requests and limits of one node (``{"requests": {...}, "limits": {...}}``).
        active_deadline_s: ``spec.activeDeadlineSeconds``.
        labels: Labels of the TrainJob.
        annotations: Annotations of the TrainJob.
        shm_size: Each node's memory-backed ``/dev/shm`` (a quantity such as ``16Gi``), or
            ``None`` for the container's default (64 MiB: too little for loader workers).
        pod: The node pods' ``tolerations``, ``nodeSelector`` and ``imagePullSecrets``.
        form: Which of :data:`API_FORMS` the cluster's Trainer takes.
    """

    name: str
    namespace: str
    image: str
    nodes: int
    procs_per_node: int
    args: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    secret: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    active_deadline_s: int = DEFAULT_ACTIVE_DEADLINE_S
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    pod: Mapping[str, Any] = field(default_factory=dict)
    form: str = API_FORMS[0]


def pod_settings(text: str | None = None) -> dict[str, Any]:
    """The node pods' settings from :data:`POD_ENV` (JSON; empty: none).

    Raises:
        ValueError: If it is not a JSON object of ``tolerations``, ``nodeSelector``, ``imagePullSecrets``.
    """
    text = os.environ.get(POD_ENV, "") if text is None else text
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"${POD_ENV} is not JSON: {exc}") from None
    if not isinstance(value, dict) or set(value) - _POD_KEYS:
        raise ValueError(f"${POD_ENV} must be a JSON object with only {sorted(_POD_KEYS)}, got {text!r}")
    return value


def _node_pod(params: TrainJobParams) -> dict[str, Any]:
    """What imgpipe adds to each node pod's spec: scheduling, pull secrets, ``/dev/shm``."""
    spec = {k: copy.deepcopy(v) for k, v in params.pod.items() if v}
    if params.shm_size:
        if not _QUANTITY.match(params.shm_size):
            raise ValueError(f"${SHM_ENV} must be a Kubernetes quantity such as 16Gi, got {params.shm_size!r}")
        spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": params.shm_size}}]
        spec["containers"] = [{"name": _NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    return spec


def node_patch(params: TrainJobParams) -> dict[str, Any]:
    """The ``spec`` entries that shape the node pods, in the form the cluster's Trainer takes.

    v2.2: one ``runtimePatches`` entry (``trainingRuntimeSpec.template.spec.replicatedJobs[]
    .template.spec.template``: pod metadata and spec); v2.1: one ``podTemplateOverrides``
    entry (``targetJobs``, ``metadata``, ``spec``). The CRDs of both are vendored in tests.
    """
    metadata = {"annotations": dict(ISTIO_ANNOTATIONS)}
    spec = _node_pod(params)
    if params.form == "podTemplateOverrides":
        return {"podTemplateOverrides": [{"targetJobs": [{"name": _NODE}], "metadata": metadata, "spec": spec}]}
    job = {"name": _NODE, "template": {"spec": {"template": {"metadata": metadata, "spec": spec}}}}
    return {"runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}]}


def build_trainjob(params: TrainJobParams) -> dict[str, Any]:
    """The TrainJob of one attempt.

    Raises:
        ValueError: For an image, node count or deadline the API would refuse, or an env name
            the torch runtime reserves.
    """
    if not params.image:
        raise ValueError(f"no image for the TrainJob's nodes: set ${IMAGE_ENV} (the imgpipe-gpu image)")
    if params.nodes < 1 or params.procs_per_node < 1 or params.active_deadline_s < 1:
        raise ValueError("nodes, processes per node and the active deadline must be >= 1")
    if params.form not in API_FORMS:
        raise ValueError(f"TrainJob form must be one of {API_FORMS}, got {params.form!r}")
    reserved = sorted(_RESERVED_ENV & set(params.env))
    if reserved:
        raise ValueError(f"the torch runtime sets {', '.join(reserved)} itself; they cannot be passed to a TrainJob")
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(params.env.items())]
    if params.secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": params.secret, "key": key}}} for key in storage.SECRET_ENV]
    trainer: dict[str, Any] = {
        "image": params.image,
        "command": ["torchrun"],
        "args": list(params.args),
        "env": env,
        "numNodes": params.nodes,
        "numProcPerNode": params.procs_per_node,
    }
    if params.resources:
        trainer["resourcesPerNode"] = copy.deepcopy(dict(params.resources))
    spec: dict[str, Any] = {
        "runtimeRef": {"name": RUNTIME, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
        "trainer": trainer,
        **node_patch(params),
    }
    if params.form == API_FORMS[0]:  # v2.1 has no deadline field; the wait's own deadline stands in
        spec["activeDeadlineSeconds"] = params.active_deadline_s
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": params.name,
            "namespace": params.namespace,
            "labels": dict(params.labels),
            "annotations": dict(params.annotations),
        },
        "spec": spec,
    }


def node_resources(procs: int, text: str | None = None) -> dict[str, Any]:
    """One node's requests and limits: ``$IMGPIPE_TRAINJOB_NODE_RESOURCES`` (JSON), as the pipeline compiled them.

    GPUs only where they name some (the compiled train task's own accelerator limit): a CPU
    build's nodes ask for none. ``procs`` is the processes per node, for the message.

    Raises:
        ValueError: If the JSON is not an object of ``requests``/``limits`` mappings.
    """
    text = os.environ.get(NODE_RESOURCES_ENV, "") if text is None else text
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"${NODE_RESOURCES_ENV} is not JSON: {exc}") from None
    if not isinstance(value, dict) or set(value) - {"requests", "limits"} or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f'${NODE_RESOURCES_ENV} must be {{"requests": {{...}}, "limits": {{...}}}}, got {text!r}')
    gpus = {k: v for k, v in (value.get("limits") or {}).items() if k.endswith("/gpu")}
    if gpus and any(int(str(v)) != procs for v in gpus.values()):
        raise ValueError(f"${NODE_RESOURCES_ENV} asks for {gpus} per node, but {procs} processes run on each")
    return value


def trainjob_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``active``, ``succeeded`` or ``failed``, and a one-line description of the status.

    ``Complete`` or ``Failed`` true is terminal (the controller copies them from the JobSet,
    with its reason and message); anything else is still going.
    """
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, Mapping)}
    for kind, state in (("Failed", "failed"), ("Complete", "succeeded")):
        cond = conditions.get(kind)
        if cond and str(cond.get("status")) == "True":
            return state, " ".join(p for p in (kind, cond.get("reason") or "", cond.get("message") or "") if p)
    shown = [f"{k}={c.get('status')}" + (f" ({c.get('reason')})" if c.get("reason") else "") for k, c in sorted(conditions.items())]
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    shown += [f"{j.get('name')}: active={j.get('active', 0)} ready={j.get('ready', 0)} failed={j.get('failed', 0)}" for j in jobs]
    return "active", "; ".join(shown) or "no conditions yet"


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
) -> dict[str, Any]:
    """Polls the TrainJob until ``Complete`` or ``Failed``; prints each status change.

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
    contract.check_disjoint(out, [data], "train")
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
                self.objects.api, self.namespace, name, timeout_s=limit, poll_s=self.poll_s, out=self.stream, sleep=self.sleep, clock=self.clock
            )
        except TimeoutError:
            if obj is not None and field_at(obj, ("spec", "activeDeadlineSeconds")) is None:
                self.objects.delete(self.namespace, name)  # Trainer 2.1 has no deadline of its own: the wait's ends it
            raise

    def done(self, name: str) -> None:
        log.info("train: %s already holds this job's committed output", self.out)

    def failure(self, name: str, detail: str, final: Any) -> str:
        return f"TrainJob {self.namespace}/{name} failed: {detail}; it stays for a look (kubectl describe trainjob -n {self.namespace} {name})"

    def no_output(self, name: str) -> str:
        return f"TrainJob {self.namespace}/{name} succeeded but {self.out} does not hold its committed output"
