"""Tier 3's parts the tests share: the real KFP API server's address, a profile as KFP's profile
controller makes it (its own sync code from the source tree), and tokens a user's account sends.
"""

from __future__ import annotations

import base64
import importlib.util
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import CLUSTER, apply_docs, kfp_store_keys, kubectl, kubectl_json

PIPELINES_AUDIENCE = "pipelines.kubeflow.org"
SYNC = "manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py"


@cache
def kfp_tree() -> Path:
    out = subprocess.run(["bash", "-c", f". {CLUSTER / 'lib.sh'}; kfp_tree"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no KFP source in the cluster's cache")
    return Path(out.stdout.strip())


def api_server() -> str:
    """``http://<ml-pipeline's address>:8888``, or a skip saying how to bring tier 3 up."""
    if kfp_store_keys() is None or kubectl("get", "deployment", "ml-pipeline", "-n", "kubeflow", check=False).returncode != 0:
        pytest.skip("KFP's backend is not running: make cluster-build KFP_SOURCE=<a clone of kubeflow/pipelines>, then make cluster-up")
    ip = kubectl_json("get", "service", "ml-pipeline", "-n", "kubeflow")["spec"]["clusterIP"]
    return f"http://{ip}:8888"


def token(account: str, namespace: str, audience: str = PIPELINES_AUDIENCE) -> str:
    """A token the API server issues to ``namespace``'s ``account`` for KFP (what a pod's projected token is)."""
    return kubectl("create", "token", account, "-n", namespace, f"--audience={audience}", "--duration=1h").stdout.strip()


def _sync_module() -> Any:
    """KFP's profile controller's own ``sync.py``, loaded from the pinned source tree."""
    spec = importlib.util.spec_from_file_location("kfp_profile_sync", kfp_tree() / SYNC)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KFP_VERSION", "unused")  # read at import by get_settings_from_env's callers only
        spec.loader.exec_module(module)
    return module


def profile_attachments(namespace: str) -> list[dict]:
    """What KFP's profile controller attaches to a profile namespace, computed by its own ``sync``.

    The namespace's ``mlpipeline-minio-artifact`` Secret is given as already attached (the
    controller then keeps it rather than minting keys through SeaweedFS's IAM API): it holds
    the object store's keys.
    """
    keys = kfp_store_keys()
    assert keys is not None
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mlpipeline-minio-artifact", "namespace": namespace},
        "data": {
            "accesskey": base64.b64encode(keys["AWS_ACCESS_KEY_ID"].encode()).decode(),
            "secretkey": base64.b64encode(keys["AWS_SECRET_ACCESS_KEY"].encode()).decode(),
        },
    }
    module = _sync_module()
    server = module.server_factory(
        frontend_image="unused",
        frontend_tag="unused",
        disable_istio_sidecar=True,
        artifacts_proxy_enabled="false",
        artifact_retention_days=-1,
        url="127.0.0.1",
        controller_port=0,
    )
    try:
        controller = server.RequestHandlerClass.__new__(server.RequestHandlerClass)
        parent = kubectl_json("get", "namespace", namespace)
        attached = {
            "Secret.v1": {f"{namespace}/mlpipeline-minio-artifact": secret},
            "ConfigMap.v1": {},
            "Deployment.apps/v1": {},
            "Service.v1": {},
        }
        desired = controller.sync(parent, attached)
    finally:
        server.server_close()
    return desired["attachments"]


def enable_profile(namespace: str) -> None:
    """Labels ``namespace`` as a Profile does for KFP and applies the profile controller's attachments."""
    kubectl("label", "namespace", namespace, "pipelines.kubeflow.org/enabled=true", "--overwrite")
    docs = profile_attachments(namespace)
    assert {d["metadata"]["name"] for d in docs} >= {"kfp-launcher", "metadata-grpc-configmap", "artifact-repositories", "mlpipeline-minio-artifact"}
    apply_docs(docs)
