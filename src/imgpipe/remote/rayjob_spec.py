"""The RayJob a step runs as: a template (packaged, or the cluster's) filled in with one run's step.

    rayjob = build_rayjob(load_template(template_path("resize")), RayJobParams(name=..., namespace=..., ...))

No Kubernetes calls here: :mod:`imgpipe.remote.kuberay` submits what this builds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "GROUP",
    "VERSION",
    "PLURAL",
    "IMAGE_PLACEHOLDER",
    "IMAGE_ENV",
    "MAX_WORKERS_ENV",
    "TEMPLATE_ENV",
    "WAIT_SLACK_S",
    "DEFAULT_ACTIVE_DEADLINE_S",
    "DEFAULT_PRE_RUNNING_DEADLINE_S",
    "APPLIED_BY_LABEL",
    "RayJobParams",
    "wait_deadline_s",
    "template_path",
    "load_template",
    "build_rayjob",
    "sized_for_autoscaling",
]

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
IMAGE_PLACEHOLDER = "imgpipe-ray"
IMAGE_ENV = "IMGPIPE_RAY_IMAGE"
MAX_WORKERS_ENV = "IMGPIPE_KUBERAY_MAX_WORKERS"
TEMPLATE_ENV = "IMGPIPE_RAYJOB_TEMPLATE"
_MANAGED = {"app.kubernetes.io/managed-by": "imgpipe"}
# Beyond the RayJob's own deadlines: the operator's reconcile period and the submitter's
# grace periods (JobDeploymentStatusTransitionGracePeriod, 300 s in v1.6.0) before it
# writes a terminal status.
WAIT_SLACK_S = 600
DEFAULT_ACTIVE_DEADLINE_S = 6 * 3600
DEFAULT_PRE_RUNNING_DEADLINE_S = 1800
# Metadata the API server owns or kubectl adds; not part of a template.
SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink", "ownerReferences")
# Says who applies a manifest (k8s/: a cluster admin applies the objects that carry it);
# a template's label, not a run's, so build_rayjob leaves it off each run's RayJob.
APPLIED_BY_LABEL = "imgpipe.dev/applied-by"
# Package data: src/imgpipe/manifests/rayjob-<step>.yaml are relative symlinks to
# k8s/ray/ (the one copy; kustomize reads it there), built into the wheel as files.
_MANIFESTS = "manifests"


@dataclass(frozen=True)
class RayJobParams:
    """What differs between runs of one RayJob template.

    Attributes:
        name: The RayJob's name (a DNS label; the job id).
        namespace: Where it is created.
        entrypoint: The shell command the job runs.
        image: The Ray image with imgpipe; replaces the ``imgpipe-ray`` placeholder.
        min_workers: The worker group's ``minReplicas`` (template's when ``None``).
        max_workers: The worker group's ``maxReplicas`` (template's when ``None``).
        worker_group: Which worker group the counts apply to.
        env_vars: Added to the job's runtime env (non-secret settings only: the
            RayJob spec is readable by anyone who may list RayJobs).
        annotations: Added to the RayJob's metadata (the full run id goes here).
        labels: Added to the RayJob's metadata (run id and step, as label values).
        pull_secrets: Image pull secrets added to every pod (head, workers, submitter).
    """

    name: str
    namespace: str
    entrypoint: str
    image: str | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    worker_group: str = "cpu"
    env_vars: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    pull_secrets: tuple[str, ...] = ()


def wait_deadline_s(rayjob: Mapping[str, Any]) -> float:
    """How long a wait for ``rayjob`` may take: its deadlines plus :data:`WAIT_SLACK_S`."""
    spec = rayjob.get("spec") or {}
    active = spec.get("activeDeadlineSeconds") or DEFAULT_ACTIVE_DEADLINE_S
    pre_running = spec.get("preRunningDeadlineSeconds") or DEFAULT_PRE_RUNNING_DEADLINE_S
    return float(active + pre_running + WAIT_SLACK_S)


def template_path(step: str) -> Path:
    """The RayJob template of ``step``: ``$IMGPIPE_RAYJOB_TEMPLATE``, else the packaged one.

    The packaged template is ``imgpipe/manifests/rayjob-<step>.yaml``, the same file as
    ``k8s/ray/rayjob-<step>.yaml``; an installed imgpipe (a wheel, the images) has it
    without a checkout.
    """
    env = os.environ.get(TEMPLATE_ENV)
    if env:
        return Path(env)
    # imgpipe is a regular package on the file system, so the resource is a real path.
    return Path(str(resources.files("imgpipe") / _MANIFESTS / f"rayjob-{step}.yaml"))


def load_template(path: str | Path) -> dict[str, Any]:
    """Reads a RayJob template (one YAML document).

    Raises:
        ValueError: If the file is missing or does not hold a ``ray.io/v1`` RayJob.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"RayJob template {p} does not exist: set {TEMPLATE_ENV} to a copy of k8s/ray/rayjob-<step>.yaml "
            "(imgpipe packages one per step that runs as a RayJob, in imgpipe/manifests/)"
        )
    doc = yaml.safe_load(p.read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "RayJob" or doc.get("apiVersion") != f"{GROUP}/{VERSION}":
        raise ValueError(f"{p} is not a {GROUP}/{VERSION} RayJob")
    return doc


def _pod_specs(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of a RayJob: head, each worker group, the submitter (those the template has)."""
    cluster = spec.get("rayClusterSpec") or {}
    templates = [cluster.get("headGroupSpec", {}).get("template", {})]
    templates += [g.get("template", {}) for g in cluster.get("workerGroupSpecs", [])]
    templates.append(spec.get("submitterPodTemplate") or {})
    return [t["spec"] for t in templates if isinstance(t.get("spec"), dict)]


def _containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in _pod_specs(spec) for c in pod.get("containers", [])]


def _is_placeholder(image: str) -> bool:
    return image == IMAGE_PLACEHOLDER or image.startswith(IMAGE_PLACEHOLDER + ":")


def _worker_group(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    groups = spec.get("rayClusterSpec", {}).get("workerGroupSpecs", [])
    for group in groups:
        if group.get("groupName") == name:
            return group
    raise ValueError(f"the RayJob template has no worker group {name!r} (has {[g.get('groupName') for g in groups]})")


def build_rayjob(template: Mapping[str, Any], params: RayJobParams) -> dict[str, Any]:
    """A RayJob for one run: a copy of ``template`` with ``params`` applied, unsuspended.

    Raises:
        ValueError: If a container keeps the image placeholder and ``params.image`` is
            unset, or the worker counts are inconsistent.
    """
    body = copy.deepcopy(dict(template))
    meta = body.setdefault("metadata", {})
    meta["name"] = params.name
    meta["namespace"] = params.namespace
    meta["annotations"] = {**(meta.get("annotations") or {}), **params.annotations}
    template_labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != APPLIED_BY_LABEL}
    meta["labels"] = {**template_labels, **_MANAGED, **params.labels}
    spec = body.setdefault("spec", {})
    spec["entrypoint"] = params.entrypoint
    spec["suspend"] = False
    # The operator enforces these; a wait derives its own deadline from them.
    spec.setdefault("activeDeadlineSeconds", DEFAULT_ACTIVE_DEADLINE_S)
    spec.setdefault("preRunningDeadlineSeconds", DEFAULT_PRE_RUNNING_DEADLINE_S)
    if params.env_vars:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **params.env_vars}
        spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=True)
    for pod in _pod_specs(spec):
        have = [s.get("name") for s in pod.get("imagePullSecrets") or []]
        pod["imagePullSecrets"] = [*(pod.get("imagePullSecrets") or []), *({"name": n} for n in params.pull_secrets if n not in have)]
        if not pod["imagePullSecrets"]:
            del pod["imagePullSecrets"]
    for container in _containers(spec):
        if _is_placeholder(container.get("image", "")):
            if not params.image:
                raise ValueError(
                    f"the RayJob template's image is the placeholder {IMAGE_PLACEHOLDER!r}: set {IMAGE_ENV} "
                    "to the Ray image that has imgpipe installed"
                )
            container["image"] = params.image
    if params.min_workers is not None or params.max_workers is not None:
        group = _worker_group(spec, params.worker_group)
        low = group.get("minReplicas", 0) if params.min_workers is None else params.min_workers
        high = group.get("maxReplicas", low) if params.max_workers is None else params.max_workers
        if not 0 <= low <= high:
            raise ValueError(f"worker counts must satisfy 0 <= min <= max, got min={low} max={high}")
        group["minReplicas"], group["maxReplicas"] = low, high
        group["replicas"] = min(max(group.get("replicas", low), low), high)
    return body


def _cpus(quantity: Any) -> float | None:
    """A Kubernetes CPU quantity (``4``, ``"4"``, ``"500m"``) in CPUs."""
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def _worker_cpus(template: Mapping[str, Any], group_name: str) -> float | None:
    """Ray CPUs of one worker of ``group_name``: its ``num-cpus``, else its container's CPU limit."""
    try:
        group = _worker_group(template.get("spec", {}), group_name)
    except ValueError:
        return None
    if "num-cpus" in (group.get("rayStartParams") or {}):
        return _cpus(group["rayStartParams"]["num-cpus"])
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    limit = containers[0].get("resources", {}).get("limits", {}).get("cpu") if containers else None
    return None if limit is None else _cpus(limit)


def sized_for_autoscaling(cfg: Any, template: Mapping[str, Any], params_max: int | None, group: str) -> Any:
    """Sets a ``concurrency`` of 0 ("the cluster's CPUs") from the worker group's maximum.

    An autoscaling cluster starts with no workers, so "the CPUs at start" would be
    zero and the step would run one task at a time; the group's maximum is what it
    can grow to: one task per CPU it will have, as locally.
    """
    if getattr(cfg, "concurrency", None) != 0:
        return cfg
    try:
        high = params_max if params_max is not None else _worker_group(template.get("spec", {}), group).get("maxReplicas")
    except ValueError:
        return cfg
    cpus = _worker_cpus(template, group)
    if not high or not cpus:
        return cfg
    return dataclasses.replace(cfg, concurrency=max(1, math.floor(high * cpus)))
