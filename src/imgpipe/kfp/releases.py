"""Which Kubeflow Pipelines imgpipe runs on: the server's own version, read before anything is uploaded.

    healthz = server_healthz(client)      # what the API server says of itself (tag_name, multi_user)
    check_release(healthz)                # one line naming the release, what it lacks and the upgrade

``imgpipe submit`` and ``imgpipe schedule`` call both first (:func:`imgpipe.kfp.client.submit`):
a server below :data:`KFP_FLOOR` is refused before a pipeline, an experiment or a run is made.
docs/deploy/versions.md, "Versions", says why the floor is where it is.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["KFP_FLOOR", "KUBEFLOW_RELEASES", "NEEDS", "server_healthz", "release_name", "check_release"]

log = logging.getLogger(__name__)

# What imgpipe needs of the API server and its driver, and the first KFP release that has it.
NEEDS = (
    (
        (2, 15, 0),
        "optional Secret and ConfigMap environment variables (kubeflow/pipelines#12216): older drivers keep each one "
        "required, so a task whose optional Secret is absent (the Ray token's, the S3 settings') never starts",
    ),
)
KFP_FLOOR = ".".join(map(str, max(version for version, _ in NEEDS)))
# The KFP each Kubeflow release ships (kubeflow/manifests at tags v1.10.2, v1.11.0 and 26.03,
# applications/pipeline/upstream/base/pipeline/kustomization.yaml): to name a server's release.
KUBEFLOW_RELEASES = {(2, 5, 0): "Kubeflow v1.10", (2, 15, 0): "Kubeflow v1.11", (2, 16, 0): "Kubeflow 26.03"}
_TAG = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def server_healthz(client: Any) -> dict[str, Any]:
    """The API server's ``/apis/v2beta1/healthz`` answer as it writes it.

    The API server's handler (``backend/src/apiserver/main.go``, 2.5.0 to 2.17.0) writes
    ``commit_sha``, ``tag_name`` and ``multi_user`` (and ``pipeline_store`` from 2.15.0); kfp's
    generated model keeps only the last two, so the body is read as it came.
    """
    from imgpipe.kfp.refusals import call

    response = call("read the server's version", "get", "healthz", None, client._healthz_api.healthz_service_get_healthz, _preload_content=False)
    body = json.loads(response.data or b"{}")
    return body if isinstance(body, dict) else {}


def _version(tag: str) -> tuple[int, int, int] | None:
    match = _TAG.fullmatch(tag.strip().split("-")[0].split("+")[0]) if tag else None
    return tuple(int(g) for g in match.groups()) if match else None  # type: ignore[return-value]


def release_name(version: tuple[int, int, int]) -> str:
    """``KFP 2.5.0 (Kubeflow v1.10's)``, or ``KFP 2.6.1`` for a release no Kubeflow ships."""
    shown = ".".join(map(str, version))
    kubeflow = KUBEFLOW_RELEASES.get(version)
    return f"Kubeflow Pipelines {shown}" + (f" ({kubeflow}'s)" if kubeflow else "")


def check_release(healthz: Mapping[str, Any]) -> str:
    """The server's version (its ``tag_name``), once it is one imgpipe runs on.

    A tag that is no release (a build from a branch: ``dev``, ``master``) is let through with a
    warning: what it lacks cannot be told.

    Raises:
        RuntimeError: In one line naming the server's release, the first feature it lacks and
            the upgrade that adds it.
    """
    tag = str(healthz.get("tag_name") or "")
    version = _version(tag)
    if version is None:
        log.warning("Kubeflow Pipelines reports version %r, no release: imgpipe needs %s or later and cannot check this one", tag, KFP_FLOOR)
        return tag
    for first, feature in NEEDS:
        if version < first:
            upgrade = next((f"{name} (KFP {'.'.join(map(str, v))})" for v, name in sorted(KUBEFLOW_RELEASES.items()) if v >= first), "")
            raise RuntimeError(
                f"{release_name(version)} cannot run imgpipe: it lacks {feature}. That came in Kubeflow Pipelines "
                f'{".".join(map(str, first))}: upgrade to {upgrade or "it"} or later (docs/deploy/versions.md, "Versions")'
            )
    return tag
