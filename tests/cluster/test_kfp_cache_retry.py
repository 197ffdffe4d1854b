"""Tier 3: KFP's own cache and Argo's retry of a killed step, on imgpipe runs (cluster/kfp.sh).

Three runs of the same small pipeline with the same parameters, as ``imgpipe submit`` makes them:
two from a package compiled with caching (the second is served from KFP's cache, but for
promote, which moves ``latest.json``), one from a package without it (nothing is a hit), whose
train process is killed after its first checkpoint: the task's retry policy starts it again,
it resumes from that checkpoint and the run succeeds.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from imgpipe import contract, storage
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.stepio import artifacts as ka
from imgpipe.train.checkpoint import CHECKPOINT
from tests.cluster.conftest import kubectl, kubectl_json, object_store
from tests.cluster.kfp_backend import token
from tests.cluster.test_kfp import RUN_TIMEOUT_S, _get, _imgpipe, _small_package, kfp, step_images  # noqa: F401 - fixtures
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = pytest.mark.cluster
DATA_TASKS = ("download", "clean", "resize", "train")
EPOCHS = 6


def _submit(kfp: str, package, params: dict[str, str], owner: str, *, wait: bool) -> str:  # noqa: F811
    args = [f"--param={k}={v}" for k, v in params.items()]
    waiting = ["--wait", "--timeout", str(RUN_TIMEOUT_S)] if wait else []
    proc = _imgpipe(
        "submit", "--host", kfp, "--namespace", NAMESPACE, "--package", str(package), *args, *waiting,
        env={"KF_PIPELINES_TOKEN": owner}, timeout=RUN_TIMEOUT_S + 60,
    )  # fmt: skip
    pods = "" if proc.returncode == 0 else kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{pods}"
    return next(line.rsplit("/", 1)[-1] for line in proc.stdout.splitlines() if "/#/runs/details/" in line)


def _succeeded(kfp: str, run_id: str, owner: str) -> None:  # noqa: F811
    details = _get(kfp, f"/runs/{run_id}", bearer=owner).json()
    assert details["state"] == "SUCCEEDED", details.get("state")


def small_run(name: str, epochs: int) -> tuple[str, dict[str, str]]:
    """A data root in the profile's prefix with a small generated set, and the parameters of a run on it (inside object_store)."""
    root = f"s3://mlpipeline/private/{NAMESPACE}/{name}-{uuid.uuid4().hex[:8]}"
    generate(f"{root}/synth", SynthConfig(classes=3, per_class=24, seed=0, min_side=64, max_side=160), progress=False)
    params = {
        "data_root": root,
        "source_uri": f"{root}/synth/images.tar.gz",
        "annotations_uri": "",
        "epochs": str(epochs),
        "image_size": "64",
        "model": "resnet18",
        "batch_size": "16",
        "ray_address": "",  # resize in its pod
        "train_nodes": "1",  # train in its pod, on CPU (the package drops GPU scheduling)
    }
    return root, params


def _executors(run_id: str) -> dict[str, str]:
    """What each task's executor did in the run's Argo Workflow: ``ran``, or ``cached``.

    A cache hit is the driver's: KFP's v2 API reports the task SUCCEEDED either way, and the
    executor's node is skipped (its ``when`` is the driver's cached decision), so no pod runs.
    """
    done: dict[str, str] = {}
    for node in _workflow(run_id)["status"]["nodes"].values():
        parts = node["name"].split(".")
        if parts[-1] != "executor":
            continue
        task = re.sub(r"-\d+$", "", parts[-2])
        done.setdefault(task, "")
        done[task] = "cached" if node["phase"] == "Skipped" else ("ran" if node["phase"] == "Succeeded" else node["phase"])
    return done


def _workflow(run_id: str) -> dict:
    items = kubectl_json("get", "workflows", "-n", NAMESPACE, "-l", f"pipeline/runid={run_id}")["items"]
    assert len(items) == 1, [w["metadata"]["name"] for w in items]
    return items[0]


def _train_pods(workflow: str) -> list[dict]:
    """The pods of the run's train task that run the step (not its driver)."""
    pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/workflow={workflow}")["items"]
    found = []
    for pod in pods:
        node = pod["metadata"].get("annotations", {}).get("workflows.argoproj.io/node-name", "")
        if ".train" in node and "driver" not in node and any(c["name"] == "main" for c in pod["spec"]["containers"]):
            found.append(pod)
    return found


def _kill_after_first_checkpoint(run_id: str, checkpoint: str, timeout_s: float = 900) -> str:
    """Kills the train process (as the OOM killer would: SIGKILL) once its first checkpoint is written; returns the pod's name."""
    deadline = time.monotonic() + timeout_s
    workflow = ""
    while time.monotonic() < deadline:
        if not workflow:
            items = kubectl_json("get", "workflows", "-n", NAMESPACE, "-l", f"pipeline/runid={run_id}")["items"]
            workflow = items[0]["metadata"]["name"] if items else ""
        running = [p for p in _train_pods(workflow) if p["status"].get("phase") == "Running"] if workflow else []
        if running and storage.exists(checkpoint):
            name = running[0]["metadata"]["name"]
            # Every process of the container but its init (Argo's executor), which then reports the
            # step's exit as the kernel gave it: 137, a failure the retry policy retries.
            kubectl("exec", "-n", NAMESPACE, name, "-c", "main", "--", "/bin/sh", "-c", "kill -9 -1", check=False)
            return name
        time.sleep(1)
    raise AssertionError(f"the train task of run {run_id} wrote no {checkpoint} in {timeout_s:.0f} s (workflow {workflow or 'not found'})")


@pytest.mark.timeout(3 * RUN_TIMEOUT_S)  # three runs, one with a retry's backoff
def test_a_cached_build_is_served_from_kfps_cache_and_a_killed_train_step_is_retried(kfp, step_images, tmp_path):  # noqa: F811
    owner = token("default-editor", NAMESPACE)
    cached = _small_package(tmp_path / "cached.yaml", caching=True)
    uncached = _small_package(tmp_path / "uncached.yaml")
    with object_store(tmp_path, NAMESPACE):
        root, params = small_run("cache", EPOCHS)
        first = _submit(kfp, cached, params, owner, wait=True)
        _succeeded(kfp, first, owner)
        assert _executors(first) == {t: "ran" for t in (*DATA_TASKS, "verify-output", "promote")}, _executors(first)
        latest = ka.read_latest(root)
        assert latest["run_id"] == first

        second = _submit(kfp, cached, params, owner, wait=True)
        _succeeded(kfp, second, owner)
        done = _executors(second)
        assert done == {**{t: "cached" for t in DATA_TASKS}, "verify-output": "ran", "promote": "ran"}, done
        # Promote ran and committed its decision under this run; the model is the first run's output.
        assert contract.is_committed(ka.run_prefix(root, second, "promote"))
        assert re.search(r"/runs/in-[0-9a-f]{20}/train$", latest["prefixes"]["train"]), latest

        third = _submit(kfp, uncached, params, owner, wait=False)
        own_train = ka.run_prefix(root, third, "train")
        killed = _kill_after_first_checkpoint(third, storage.join(own_train, CHECKPOINT))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while _get(kfp, f"/runs/{third}", bearer=owner).json().get("state") not in ("SUCCEEDED", "FAILED", "CANCELED"):
            assert time.monotonic() < deadline, f"run {third} did not end in {RUN_TIMEOUT_S} s"
            time.sleep(5)
        _succeeded(kfp, third, owner)
        done = _executors(third)
        assert done == {t: "ran" for t in (*DATA_TASKS, "promote")}, f"caching off: nothing is a hit ({done})"
        # Argo ran the train step twice: the killed attempt failed with SIGKILL's status, the next succeeded.
        nodes = _workflow(third)["status"]["nodes"].values()
        train = [n for n in nodes if n.get("type") == "Pod" and ".train" in n.get("name", "") and "driver" not in n["name"]]
        attempts = sorted((n["phase"], n.get("message", "")) for n in train)
        assert [p for p, _ in attempts] == ["Failed", "Succeeded"], (killed, attempts)
        manifest = contract.read_manifest(own_train, expect_step="train")
        assert manifest["epochs_run"] < EPOCHS, f"the retry resumed from the checkpoint instead of starting over ({manifest['epochs_run']} epochs)"
        (retried,) = [p["metadata"]["name"] for p in _train_pods(_workflow(third)["metadata"]["name"]) if p["metadata"]["name"] != killed]
        log = kubectl("logs", "-n", NAMESPACE, retried, "-c", "main", check=False).stdout
        assert "train: resumed from" in log, log[-3000:]
        assert contract.is_committed(ka.run_prefix(root, third, "promote"))
