"""The TrainJob a multi-node train runs as: the object, its node pods and its status.

    body = build_trainjob(TrainJobParams(name=..., namespace=..., image=..., nodes=2, procs_per_node=4, args=[...]))
    state, text = trainjob_state(obj)   # "active", "succeeded" or "failed"

No Kubernetes calls here: :mod:`imgpipe.remote.trainjob` submits what this builds and waits for it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imgpipe import storage
from imgpipe.config import check_range

__all__ = [
    "GROUP",
    "VERSION",
    "PLURAL",
    "KIND",
    "RUNTIME",
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
    "TrainJobParams",
    "check_nodes",
    "pod_settings",
    "node_patch",
    "build_trainjob",
    "node_resources",
    "trainjob_state",
]

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The PyTorch runtime Kubeflow Trainer ships (manifests/base/runtimes/torch_distributed.yaml at v2.2.1).
RUNTIME = "torch-distributed"
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


# The label JobSet puts on every pod of the JobSet the TrainJob makes (named as the TrainJob).
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"


def _spread(params: TrainJobParams) -> dict[str, Any]:
    """Each node pod where no other of the run's is, where the cluster has room: nodes, not processes.

    Preferred, not required: a one-node cluster still trains (both ranks on it), and a node's
    GPUs (a resource each pod requests) place them anyway where that is the bound.
    """
    term = {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {JOBSET_LABEL: params.name}}}
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}}


def _node_pod(params: TrainJobParams) -> dict[str, Any]:
    """What imgpipe adds to each node pod's spec: scheduling, pull secrets, ``/dev/shm``."""
    spec = {k: copy.deepcopy(v) for k, v in params.pod.items() if v}
    if params.nodes > 1:
        spec["affinity"] = _spread(params)
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
