"""Where a step may run: the execution targets a ``ray_address`` names, and which are allowed.

Low in the house (no step, no Ray, no Kubernetes client): configs validate their address
with it, and :mod:`imgpipe.remote.dispatch` picks the runner from it.

Addresses (:func:`parse_address`):

* ``""``, ``auto``, ``ray://host:10001``, ``host:6379``: local, in this process (a Ray the
  step starts, or joins).
* ``http://head:8265`` / ``https://...``: the cluster's Jobs API (its dashboard port).
* ``kuberay`` or ``kuberay://NAMESPACE``: a KubeRay ``RayJob`` that brings its own cluster.

A ``ray_address`` is a pipeline parameter, so untrusted: :func:`check_allowed` lets only
``""``, KubeRay and the clusters an operator configured (:data:`CLUSTERS_ENV`) through.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

__all__ = ["CLUSTERS_ENV", "Mode", "RemoteTarget", "allowed_clusters", "check_allowed", "parse_address"]

# The Ray clusters a step may use besides its own local Ray and KubeRay: comma-separated
# addresses, set by whoever runs the pods (the imgpipe-s3-config ConfigMap), never by a
# pipeline parameter. A ray_address is a pipeline parameter: whoever starts a run chooses
# it, and the address a step talks to receives its job (and the Ray token).
CLUSTERS_ENV = "IMGPIPE_RAY_CLUSTERS"

# RFC 1123 label: what a Kubernetes namespace may be called.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

Mode = Literal["local", "jobs", "kuberay"]


@dataclass(frozen=True)
class RemoteTarget:
    """Where a step runs, parsed from ``ray_address``.

    Attributes:
        mode: ``local`` (this process), ``jobs`` (a Jobs API) or ``kuberay`` (a RayJob).
        address: The Jobs API URL (``jobs``) or the Ray address (``local``).
        namespace: The RayJob's namespace (``kuberay``); ``None`` means the current one.
    """

    mode: Mode
    address: str = ""
    namespace: str | None = None


def _canonical(address: str) -> str:
    text = address.strip().rstrip("/")
    parsed = urlparse(text)
    if parsed.scheme and parsed.netloc:
        return f"{parsed.scheme.lower()}://{parsed.netloc.lower()}{parsed.path}"
    return text.lower()


def allowed_clusters(environ: Any = None) -> list[str]:
    """The cluster addresses :data:`CLUSTERS_ENV` configures (canonical form)."""
    environ = os.environ if environ is None else environ
    return [_canonical(a) for a in environ.get(CLUSTERS_ENV, "").split(",") if a.strip()]


def check_allowed(ray_address: str, environ: Any = None) -> RemoteTarget:
    """Parses ``ray_address`` and refuses a cluster that is not configured.

    Accepted: ``""`` (a Ray of this pod), ``kuberay`` / ``kuberay://NAMESPACE`` (a RayJob
    the pod's own RBAC allows), and addresses listed in ``$IMGPIPE_RAY_CLUSTERS``. Anything
    else (``ray://`` anywhere, ``http://attacker:8265``, ``auto``) would receive the step's
    job, its settings and the Ray token.

    Raises:
        ValueError: Naming the address and how to allow it.
    """
    target = parse_address(ray_address)
    if target.mode == "kuberay" or (target.mode == "local" and not target.address):
        return target
    allowed = allowed_clusters(environ)
    if _canonical(target.address) not in allowed:
        raise ValueError(
            f'ray_address {ray_address!r} is not a configured Ray cluster: use "" (Ray in this pod), '
            f"kuberay[://NAMESPACE], or one of ${CLUSTERS_ENV} ({', '.join(allowed) or 'none set'}); a cluster "
            f"is added by whoever runs the pods (the imgpipe-s3-config ConfigMap), never by a run's parameters"
        )
    return target


def parse_address(ray_address: str) -> RemoteTarget:
    """Parses a step's ``ray_address`` (see the module docstring for the forms).

    Raises:
        ValueError: For an http(s) address without a host, or a bad namespace.
    """
    text = ray_address.strip()
    if text.startswith(("http://", "https://")):
        host = text.split("://", 1)[1].split("/", 1)[0]
        if not host:
            raise ValueError(f"ray_address {ray_address!r} has no host; expected e.g. http://raycluster-head-svc:8265")
        return RemoteTarget("jobs", text.rstrip("/"))
    if text == "kuberay" or text.startswith("kuberay://"):
        namespace = text[len("kuberay://") :].strip("/") if text != "kuberay" else ""
        if namespace and not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"ray_address {ray_address!r}: {namespace!r} is not a Kubernetes namespace name (lower-case letters, digits and '-', at most 63)"
            )
        return RemoteTarget("kuberay", namespace=namespace or None)
    return RemoteTarget("local", text)
