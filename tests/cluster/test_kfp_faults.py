"""Tier 3 faults: KFP's metadata server (MLMD) stopped in the middle of a run (cluster/kfp.sh).

The run must end FAILED with imgpipe naming what failed, nothing half-committed, and the same
run submitted again once MLMD is back must succeed.
"""

from __future__ import annotations

import time
import uuid

import pytest

from imgpipe import contract, storage
from imgpipe.kfp import artifacts as ka
from tests.cluster.conftest import kubectl, object_store, settings
from tests.cluster.kfp_backend import token
from tests.cluster.test_kfp import RUN_TIMEOUT_S, _get, _imgpipe, _small_package, kfp, step_images  # noqa: F401 - fixtures
from tests.cluster.test_kfp_cache_retry import _submit, _succeeded, _train_pods, _workflow, small_run
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = pytest.mark.cluster
MLMD = "deployment/metadata-grpc-deployment"


def _scale(replicas: int) -> None:
    kubectl("scale", MLMD, "-n", "kubeflow", f"--replicas={replicas}")
    if replicas:
        kubectl("rollout", "status", MLMD, "-n", "kubeflow", "--timeout=180s")


def _await_train_running(run_id: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items = kubectl("get", "workflows", "-n", NAMESPACE, "-l", f"pipeline/runid={run_id}", "-o", "name", check=False).stdout.split()
        if items and any(p["status"].get("phase") == "Running" for p in _train_pods(items[0].rsplit("/", 1)[-1])):
            return
        time.sleep(2)
    raise AssertionError(f"the train task of run {run_id} did not start in {timeout_s:.0f} s")


@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_mlmd_stopped_mid_run_fails_it_naming_what_failed_and_the_run_again_succeeds(kfp, step_images, tmp_path):  # noqa: F811
    owner = token("default-editor", NAMESPACE)
    package = _small_package(tmp_path / "imgpipe.yaml")
    with object_store(tmp_path, NAMESPACE):
        root, params = small_run("mlmd", 2)
        name = f"mlmd-down-{uuid.uuid4().hex[:6]}"
        args = [
            "--host",
            kfp,
            "--namespace",
            NAMESPACE,
            "--package",
            str(package),
            "--run-name",
            name,
            *(f"--param={k}={v}" for k, v in params.items()),
        ]
        started = _imgpipe("submit", *args, env={"KF_PIPELINES_TOKEN": owner})
        assert started.returncode == 0, started.stderr[-3000:]
        run_id = next(line.rsplit("/", 1)[-1] for line in started.stdout.splitlines() if "/#/runs/details/" in line)
        _await_train_running(run_id)
        _scale(0)
        try:
            # The same command attaches to the run by its name and waits for it to end.
            # As an operator with read access to the cluster runs it: the failed pod's last line is the reason.
            env = {"KF_PIPELINES_TOKEN": owner, "KUBECONFIG": f"{settings()['CLUSTER_STATE']}/admin.kubeconfig"}
            waited = _imgpipe("submit", *args, "--wait", "--timeout", str(RUN_TIMEOUT_S), env=env, timeout=RUN_TIMEOUT_S + 60)
        finally:
            _scale(1)
        last = (waited.stderr.strip().splitlines() or [""])[-1]
        print("imgpipe said:", last)
        assert waited.returncode != 0 and "Traceback" not in waited.stderr, waited.stderr[-3000:]
        assert f"run {run_id} ended FAILED" in last, last
        assert "metadata" in last.lower() or "mlmd" in last.lower(), f"the failure does not name MLMD: {last}"
        # Nothing half-written: each of the failed run's steps is committed whole or was never published.
        for step in ("download", "clean", "resize", "train"):
            prefix = ka.run_prefix(root, run_id, step)
            if contract.is_committed(prefix):
                contract.read_manifest(prefix, expect_step=step)
            else:
                assert not storage.exists(storage.join(prefix, contract.SUCCESS)), prefix
        again = _submit(kfp, package, params, owner, wait=True)
        _succeeded(kfp, again, owner)
        assert contract.is_committed(ka.run_prefix(root, again, "train")) and ka.read_latest(root)["run_id"] == again
        assert _workflow(again)["status"]["phase"] == "Succeeded"
