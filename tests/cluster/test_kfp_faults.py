"""Tier 3 faults in the middle of a run: KFP's metadata server (MLMD) stopped, its database stopped,
the node's kubelet stopped and started again (cluster/kfp.sh, cluster/kubelet.sh).

Each run must end either SUCCEEDED with its outputs committed once, or FAILED with imgpipe naming
what failed and nothing half-committed, and then the same run submitted again must succeed.
Which of the two it was is printed (docs/cluster.md records it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from imgpipe import contract, storage
from imgpipe.stepio import artifacts as ka
from tests.cluster.conftest import kubectl, object_store, settings
from tests.cluster.kfp_backend import token
from tests.cluster.test_kfp import RUN_TIMEOUT_S, _get, _imgpipe, _small_package, kfp, step_images  # noqa: F401 - fixtures
from tests.cluster.test_kfp_cache_retry import _submit, _succeeded, _train_pods, _workflow, small_run
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = pytest.mark.cluster
MLMD = "deployment/metadata-grpc-deployment"
DATABASE = "deployment/mysql"
KUBELET = Path(__file__).resolve().parents[2] / "cluster" / "kubelet.sh"


def _scale(replicas: int, deployment: str = MLMD) -> None:
    kubectl("scale", deployment, "-n", "kubeflow", f"--replicas={replicas}")
    if replicas:
        kubectl("rollout", "status", deployment, "-n", "kubeflow", "--timeout=300s")


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


def _node_ready() -> bool:
    got = kubectl("get", "nodes", "-o", "jsonpath={.items[0].status.conditions[?(@.type=='Ready')].status}", check=False)
    return got.stdout.strip() == "True"


def _until(what: str, ok, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ok():
            return time.monotonic() - t0
        time.sleep(2)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s")


def _run_through_a_fault(kfp, package, owner: str, label: str, fault, tmp_path: Path) -> None:  # noqa: F811
    """Starts a small run, waits for its train task, attaches ``imgpipe submit --wait`` to it, runs
    ``fault()`` (which ends with what it stopped running again) and then checks the outcome."""
    root, params = small_run(label, 2)
    name = f"{label}-{uuid.uuid4().hex[:6]}"
    args = ["--host", kfp, "--namespace", NAMESPACE, "--package", str(package), "--run-name", name, *(f"--param={k}={v}" for k, v in params.items())]
    env = {"KF_PIPELINES_TOKEN": owner, "KUBECONFIG": f"{settings()['CLUSTER_STATE']}/admin.kubeconfig"}
    started = _imgpipe("submit", *args, env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    run_id = next(line.rsplit("/", 1)[-1] for line in started.stdout.splitlines() if "/#/runs/details/" in line)
    _await_train_running(run_id)
    # The waiting submitter stays attached through the fault, as the retraining CronWorkflow's does.
    said = tmp_path / f"{label}.stderr"
    with said.open("w") as stderr:
        waiter = subprocess.Popen(
            [str(Path(sys.executable).parent / "imgpipe"), "submit", *args, "--wait", "--timeout", str(RUN_TIMEOUT_S)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env={**os.environ, **env},
        )
    try:
        # The fault comes once the submitter is waiting on the run, not while it uploads.
        _until("the submitter attached to its run", lambda: "attaching to it" in said.read_text() or waiter.poll() is not None, 300)
        fault()
        waiter.wait(timeout=RUN_TIMEOUT_S + 60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    err = said.read_text()
    last = (err.strip().splitlines() or [""])[-1]
    print(f"{label}: imgpipe submit --wait exited {waiter.returncode}; what it said while waiting:")
    print("\n".join(line for line in err.splitlines() if "Kubeflow Pipelines" in line or line.startswith("imgpipe")))
    assert "Traceback" not in err, err[-3000:]
    for step in ("download", "clean", "resize", "train"):
        prefix = ka.run_prefix(root, run_id, step)
        if contract.is_committed(prefix):
            contract.read_manifest(prefix, expect_step=step)  # whole, with every file it lists
        else:
            assert not storage.exists(storage.join(prefix, contract.SUCCESS)), prefix
    if waiter.returncode == 0:
        print(f"{label}: the run recovered and succeeded")
        assert contract.is_committed(ka.run_prefix(root, run_id, "train")) and ka.read_latest(root)["run_id"] == run_id
        return
    assert f"run {run_id} ended FAILED" in last or "could not say how run" in last, last
    print(f"{label}: the run failed; submitting it again")
    again = _submit(kfp, package, params, owner, wait=True)
    _succeeded(kfp, again, owner)
    assert ka.read_latest(root)["run_id"] == again


@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_the_database_stopped_mid_run_is_waited_out_or_named_and_nothing_is_lost(kfp, step_images, tmp_path):  # noqa: F811
    owner = token("default-editor", NAMESPACE)
    package = _small_package(tmp_path / "imgpipe.yaml")

    def stop_the_database() -> None:
        _scale(0, DATABASE)
        try:
            time.sleep(120)
        finally:
            _scale(1, DATABASE)

    with object_store(tmp_path, NAMESPACE):
        _run_through_a_fault(kfp, package, owner, "db-down", stop_the_database, tmp_path)


@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_the_kubelet_stopped_and_started_mid_run_loses_nothing(kfp, step_images, tmp_path):  # noqa: F811
    owner = token("default-editor", NAMESPACE)
    package = _small_package(tmp_path / "imgpipe.yaml")

    def restart_the_kubelet() -> None:
        subprocess.run([str(KUBELET), "stop"], check=True, timeout=60)
        try:
            away = _until("the node NotReady", lambda: not _node_ready(), 180)
            print(f"kubelet: the node was NotReady {away:.0f} s after its kubelet stopped")
            time.sleep(30)
        finally:
            subprocess.run([str(KUBELET), "start"], check=True, timeout=60)
        back = _until("the node Ready again", _node_ready, 180)
        print(f"kubelet: the node was Ready {back:.0f} s after its kubelet started")

    with object_store(tmp_path, NAMESPACE):
        _run_through_a_fault(kfp, package, owner, "kubelet-restart", restart_the_kubelet, tmp_path)
