"""Connecting to Kubeflow Pipelines: the endpoint and this process's credentials, and who they name.

    client = connect("http://ml-pipeline.kubeflow:8888", namespace="team-a")

Credentials: ``$KF_PIPELINES_TOKEN``, else the projected service-account token at
``$KF_PIPELINES_SA_TOKEN_PATH`` (what a pod running the retraining submitter mounts).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["TOKEN_ENV", "HOST_ENV", "SA_TOKEN_PATH_ENV", "connect", "caller"]

TOKEN_ENV = "KF_PIPELINES_TOKEN"
HOST_ENV = "KF_PIPELINES_ENDPOINT"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"


def connect(host: str | None = None, *, namespace: str | None = None, existing_token: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (default ``$KF_PIPELINES_ENDPOINT``) with this process's credentials.

    Raises:
        ValueError: If there is no host.
    """
    host = host or os.environ.get(HOST_ENV)
    if not host:
        raise ValueError(f"no KFP endpoint: pass --host URL or set ${HOST_ENV} (e.g. http://ml-pipeline.kubeflow:8888)")
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    token = existing_token or os.environ.get(TOKEN_ENV) or None
    credentials = None
    sa_path = os.environ.get(SA_TOKEN_PATH_ENV)
    if token is None and sa_path and Path(sa_path).is_file():
        credentials = ServiceAccountTokenVolumeCredentials(sa_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
        return kfp.Client(
            host=host,
            namespace=namespace or "kubeflow",
            existing_token=token,
            credentials=credentials,
        )


def _token_subject(token: str) -> str | None:
    """The ``sub`` claim of a JWT (unverified: it only names the caller in a message)."""
    try:
        payload = token.strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    return claims.get("sub") if isinstance(claims, dict) else None


def caller() -> str | None:
    """Who this process calls KFP as: the subject of its token (``connect``'s sources), if it tells."""
    token = os.environ.get(TOKEN_ENV)
    path = os.environ.get(SA_TOKEN_PATH_ENV)
    if not token and path and Path(path).is_file():
        token = Path(path).read_text()
    return _token_subject(token) if token else None
