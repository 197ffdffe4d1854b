"""Kubeflow v1.10.2's KFP (2.5.0), the real API server built from its source (cluster/kfp-old.sh):
what its users see when they submit or schedule imgpipe, before anything is made on it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.conftest import lib, settings
from tests.cluster.test_kfp import _imgpipe

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def old_kfp() -> tuple[str, str]:
    if not (Path(settings()["CLUSTER_STATE"]) / "run" / "kfp-old.pid").exists():
        pytest.skip("Kubeflow v1.10's KFP API server is not running: make cluster-build GROUPS=kfp-old, then make cluster-up")
    return f"http://{settings()['CLUSTER_NODE_IP']}:{lib('echo $KFP_OLD_PORT')}", lib("echo $KFP_OLD_VERSION")


def _query(version: str, sql: str) -> int:
    """One number from the old server's own database (in the cluster's MariaDB, through the mysql pod)."""
    import base64

    from tests.cluster.conftest import kubectl, kubectl_json

    secret = kubectl_json("-n", "kubeflow", "get", "secret", "mysql-secret")["data"]
    user, password = (base64.b64decode(secret.get(k, "")).decode() for k in ("username", "password"))
    db = "mlpipeline_kfp" + version.replace(".", "")
    login = ["-h", "127.0.0.1", "-u", user, *([f"-p{password}"] if password else [])]
    out = kubectl("-n", "kubeflow", "exec", "deploy/mysql", "--", "mysql", *login, "-N", "-D", db, "-e", sql).stdout
    return int(out.split()[-1])


def test_the_server_is_kubeflow_v1_10s_own(old_kfp):
    url, version = old_kfp
    with urllib.request.urlopen(f"{url}/apis/v2beta1/healthz", timeout=10) as answer:
        healthz = json.load(answer)
    assert healthz["tag_name"] == version == "2.5.0"
    assert "pipeline_store" not in healthz, "2.5.0's handler writes commit_sha, tag_name and multi_user only"
    tables = "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema=DATABASE() AND table_name IN ('pipelines','experiments','jobs')"
    assert _query(version, tables) == 3, "it initialized its own database in the cluster's MariaDB"


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_imgpipe_is_refused_in_one_line_before_anything_is_made(old_kfp, command, tmp_path):
    url, version = old_kfp
    package = tmp_path / "imgpipe.yaml"
    assert _imgpipe("compile", str(package)).returncode == 0
    args = [command, "--host", url, "--package", str(package), "--param", "data_root=s3://mlpipeline/imgpipe"]
    if command == "schedule":
        args += ["--cron", "0 0 3 * * *", "--name", "imgpipe-nightly"]
    proc = _imgpipe(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"imgpipe {command}: error: Kubeflow Pipelines 2.5.0 (Kubeflow v1.10's) cannot run imgpipe: it lacks optional Secret")
    assert "upgrade to Kubeflow v1.11 (KFP 2.15.0) or later" in lines[0]
    assert _query(version, "SELECT COUNT(*) FROM pipelines") == 0, "nothing was uploaded"
    assert _query(version, "SELECT COUNT(*) FROM jobs") == 0, "no recurring run was made"
