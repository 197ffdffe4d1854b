"""A node drained mid-run (``kubectl drain``): the node of a training rank, and of Ray's worker (or head).

What a cluster admin does before a node's maintenance, while imgpipe's remote work runs there: the
run recovers (imgpipe's next attempt, or the operator's replacement pod) or fails with its reason
in one line; either way nothing is half committed, and a rerun succeeds. Only on a cluster of more
than one node (``make cluster-up NODES=3``): the drained node is a worker, never the control node
that holds the cluster's own servers, and it is uncordoned whatever happens.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from imgpipe import contract
from imgpipe.data.synth import SynthConfig
from imgpipe.remote import kuberay, trainjob
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.resize import resize
from imgpipe.train.config import TrainConfig
from tests.cluster.conftest import cleaned_data, kubectl, kubectl_json, settings, step_image
from tests.cluster.test_kuberay import _small
from tests.cluster.test_remote_objects import (
    NAMESPACE,
    _api_as,
    dev_overlay,  # noqa: F401 - the fixture
)
from tests.cluster.test_trainer import NODE

# Each remote job's own bound (the TrainJob's active deadline, the RayJob's timeout). pytest's bound
# is above the drained run's and its rerun's, so that a slow run ends on their deadlines with their
# messages: the first pods on a worker unpack the 6.8 GB gpu image there, minutes on two cores
# (kubeflow-1.11, 2026-11-30: pytest's default 600 s ended the training rank's drain mid-recovery).
JOB_DEADLINE_S = 1200
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2 * JOB_DEADLINE_S + 600)]
CONTROL_NODE = "imgpipe-node"


@pytest.fixture(autouse=True)
def _several_nodes():
    if int(settings()["NODES"]) < 2:
        pytest.skip("a drain needs another node to go to: make cluster-up NODES=3")


def _running_on_a_worker(selector: str) -> str | None:
    """The worker node (not the control node) where a Running pod matching ``selector`` is, if any."""
    for pod in kubectl_json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"]:
        node = pod["spec"].get("nodeName")
        if pod["status"].get("phase") == "Running" and node and node != CONTROL_NODE:
            return node
    return None


def _drain_when_running(selectors: tuple[str, ...], work: threading.Thread, timeout_s: float = 900) -> str:
    """Drains the worker node of the first Running pod matching a selector (in their order), once there is one; returns it."""
    deadline = time.monotonic() + timeout_s
    while work.is_alive() and time.monotonic() < deadline:
        node = next((n for n in map(_running_on_a_worker, selectors) if n), None)
        if node:
            drained = kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--timeout=180s", check=False)
            assert drained.returncode == 0, drained.stderr[-1000:]
            return node
        time.sleep(1)
    pytest.fail(f"no pod matching {selectors} ran on a worker node while the work ran (it {'ended' if not work.is_alive() else 'timed out'})")


def _drained_mid_run(call: Callable[[], Any], selectors: tuple[str, ...], out: str) -> tuple[str, dict[str, Any]]:
    """Runs ``call`` in a thread, drains a node under it, waits for its end (the node uncordoned whatever happens).

    Returns:
        ``recovered`` (committed) or ``failed`` (one line, nothing committed), and the call's result.
    """
    work, result = _in_thread(call)
    node = None
    try:
        node = _drain_when_running(selectors, work)
        work.join(JOB_DEADLINE_S + 300)
        assert not work.is_alive(), "the run ended within its deadline"
        outcome = _outcome(result, out)
        print(f"drained {node} under {selectors}: the run {outcome}; {str(result.get('error', ''))[:300]}")
    finally:
        if node:
            kubectl("uncordon", node)
    return outcome, result


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = call()
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _outcome(result: dict[str, Any], out: str) -> str:
    """``recovered`` (committed) or ``failed`` (one line, nothing committed)."""
    if "report" in result:
        assert contract.is_committed(out)
        return "recovered"
    line = str(result["error"])
    assert "\n" not in line.strip() and line.strip(), f"a failure says why in one line: {line!r}"
    assert not contract.is_committed(out), "a failed run commits nothing"
    return "failed"


def test_draining_the_node_of_a_training_rank_mid_run(dev_overlay, tmp_path):  # noqa: F811
    image = step_image("gpu")
    with cleaned_data(tmp_path, NAMESPACE, f"drain-train-{uuid.uuid4().hex[:6]}", SynthConfig(classes=3, per_class=12, seed=7)) as (root, cl):
        rs = resize(cl.dest, f"{root}/resize", ResizeConfig(size=32, executor="pool"))
        # Long enough to be drained while it trains (about 80 s; 60 epochs, 16 s, ended before the drain once
        # the workers held the image unpacked: kubeflow-1.11, 2026-11-30); every epoch (no early stop on this easy set).
        cfg = TrainConfig(model="tiny_cnn", epochs=300, batch_size=4, num_workers=0, device="cpu", nodes=2, patience=0)
        out = f"{root}/train"

        def train(stream: io.StringIO) -> Any:
            return trainjob.run_train_job(
                rs.dest, out, cfg, procs=1, namespace=NAMESPACE, run_id=f"drain-{uuid.uuid4().hex[:8]}", api=_api_as("imgpipe-pipeline"),
                image=image, resources=NODE, secret="imgpipe-s3-credentials", active_deadline_s=JOB_DEADLINE_S, poll_s=5, stream=stream,
            )  # fmt: skip

        outcome, _ = _drained_mid_run(lambda: train(io.StringIO()), ("jobset.sigs.k8s.io/jobset-name",), out)
        if outcome == "failed":
            again = train(io.StringIO())
            assert contract.is_committed(out) and again.outputs > 0, "a rerun after the drain trains and commits"
        manifest = contract.read_manifest(out, expect_step="train")
        assert manifest["extra"]["world_size"] == 2


def test_draining_the_node_of_rays_worker_mid_run(dev_overlay, tmp_path):  # noqa: F811
    image = step_image("ray")
    template = next(d for d in dev_overlay if d["kind"] == "RayJob")
    with cleaned_data(tmp_path, NAMESPACE, f"drain-ray-{uuid.uuid4().hex[:6]}", SynthConfig(classes=3, per_class=40, seed=8)) as (root, cl):
        out = f"{root}/resize"

        def run(stream: io.StringIO) -> Any:
            return kuberay.run_step_rayjob(
                "resize", cl.dest, out, ResizeConfig(size=32, ray_address="kuberay"), namespace=NAMESPACE,
                run_id=f"drain-{uuid.uuid4().hex[:8]}", api=_api_as("imgpipe-pipeline"), core_api=kuberay.NO_LOGS,
                template=_small(template, image), image=image, max_workers=1, timeout_s=JOB_DEADLINE_S, poll_s=5, out=stream,
            )  # fmt: skip

        # Ray's worker; where it runs on the control node (never drained), Ray's head, a harsher fault.
        outcome, result = _drained_mid_run(lambda: run(io.StringIO()), ("ray.io/node-type=worker", "ray.io/node-type=head"), out)
        report = result.get("report") if outcome == "recovered" else run(io.StringIO())
        assert contract.is_committed(out)
        assert report.inputs == cl.outputs and report.outputs + report.rejected == report.inputs, "every image in the output or the rejects"
