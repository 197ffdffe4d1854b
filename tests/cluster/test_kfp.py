"""Tier 3: imgpipe through Kubeflow Pipelines' own backend, built from its source (cluster/kfp.sh).

The API server, driver, launcher, persistence agent, ScheduledWorkflow controller, MLMD and the
database are upstream's code at KFP 2.17.0 (the SDK's pin), installed by KFP's own multi-user
kustomization; the profile namespace gets what KFP's profile controller's own sync code attaches
(tests/cluster/kfp_backend.py). Every call goes as a user's would: ``imgpipe submit`` and
``imgpipe schedule`` with a token the API server issued to an account of the profile, which KFP
checks with its own TokenReview and SubjectAccessReview.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from imgpipe.data.synth import SynthConfig
from imgpipe.remote import rayjob_spec
from tests.cluster.conftest import (
    ROOT,
    apply_docs,
    assert_ranks_crossed_nodes,
    assert_ray_crossed_nodes,
    kubectl,
    kubectl_json,
    object_store,
    placements,
    settings,
    step_image,
)
from tests.cluster.kfp_backend import api_server, enable_profile, token
from tests.cluster.test_kuberay import _small
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = pytest.mark.cluster
V2 = "/apis/v2beta1"
# A 2-core node: every task small enough that the run's pods, KubeRay's and Trainer's fit beside the backend.
SMALL_TASK = ("100m", "1", "512Mi", "3Gi")
RUN_TIMEOUT_S = 1500


@pytest.fixture(scope="module")
def kfp(dev_overlay):  # noqa: F811
    host = api_server()
    enable_profile(NAMESPACE)
    return host


def _imgpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "imgpipe"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def small_options(**fields: object):
    """The main pipeline's options for this 2-core node: small requests, train on CPU, images as built here."""
    from imgpipe.pipelines import PipelineOptions
    from imgpipe.pipelines.options import Resources

    options = PipelineOptions(gpu=None, **fields)
    return dataclasses.replace(options, resources={step: Resources(*SMALL_TASK) for step in options.resources})


def _small_package(path: Path, *, caching: bool = False) -> Path:
    """The pipeline compiled with :func:`small_options`."""
    from imgpipe.pipelines import compile_pipeline

    return compile_pipeline(path, small_options(caching=caching))


# The sample run the tier-3 tests submit (over ``generate``'s archive below a data root).
SMALL_RUN = {"annotations_uri": "", "epochs": "1", "image_size": "64", "model": "resnet18", "train_nodes": "1", "batch_size": "16"}


def submit_run(host: str, package: Path, root: str, **params: str | None) -> tuple[str, str]:
    """``imgpipe submit --wait`` of ``package`` over ``root``'s sample as the profile's editor, to the end.

    Returns the run's id and what imgpipe printed; a run that did not succeed fails the test with
    imgpipe's output and the namespace's pods. A parameter given as ``None`` is left out (one of
    :data:`SMALL_RUN` that ``package``'s pipeline does not take)."""
    given = {"data_root": root, "source_uri": f"{root}/synth/images.tar.gz", **SMALL_RUN, **params}
    params = {k: v for k, v in given.items() if v is not None}
    args = [f"--param={k}={v}" for k, v in params.items()]
    submit = ["submit", "--host", host, "--namespace", NAMESPACE, "--package", str(package), *args, "--wait", "--timeout", str(RUN_TIMEOUT_S)]
    proc = _imgpipe(*submit, env={"KF_PIPELINES_TOKEN": token("default-editor", NAMESPACE)}, timeout=RUN_TIMEOUT_S + 60)
    if proc.returncode != 0:
        pods = kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
        pytest.fail(f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{pods}")
    return next(line.rsplit("/", 1)[-1] for line in proc.stdout.splitlines() if "/#/runs/details/" in line), proc.stdout


def _rayjob_template(image: str) -> None:
    """The namespace's RayJob template (the overlay's suspended ``imgpipe-resize``, which the resize task reads
    before its packaged copy) sized for this 2-core node, as an operator of a small cluster would."""
    template = _small(rayjob_spec.load_template(rayjob_spec.template_path("resize")), image)
    # Beside KFP's backend a worker of 500m does not fit (1,550m of 2,000 are asked for already).
    for group in template["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            container["resources"]["requests"]["cpu"] = "400m"
    template["metadata"] = {"name": "imgpipe-resize", "namespace": NAMESPACE, "labels": template.get("metadata", {}).get("labels", {})}
    template["spec"]["suspend"] = True
    apply_docs([template])


def _get(host: str, path: str, bearer: str | None = None, **params: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return requests.get(f"{host}{V2}{path}", headers=headers, params=params, timeout=30)


def test_the_api_server_is_kfps_own_and_refuses_as_multi_user_kfp_does(kfp):
    health = _get(kfp, "/healthz")
    assert health.status_code == 200, health.text
    assert health.json().get("multi_user") is True, health.json()
    # No identity: KFP's own refusal.
    anonymous = _get(kfp, "/experiments", namespace=NAMESPACE)
    assert anonymous.status_code in (401, 403), anonymous.text
    # An account of another namespace: KFP's SubjectAccessReview says no.
    kubectl("create", "serviceaccount", "outsider", "-n", "default", check=False)
    outsider = token("outsider", "default")
    denied = _get(kfp, "/experiments", bearer=outsider, namespace=NAMESPACE)
    assert denied.status_code == 403, denied.text
    # The profile's editor may.
    allowed = _get(kfp, "/experiments", bearer=token("default-editor", NAMESPACE), namespace=NAMESPACE)
    assert allowed.status_code == 200, allowed.text


def test_an_account_outside_the_profile_gets_imgpipes_one_line_refusal(kfp, tmp_path):
    package = _small_package(tmp_path / "imgpipe.yaml")
    env = {"KF_PIPELINES_TOKEN": token("outsider", "default")}
    proc = _imgpipe("submit", "--host", kfp, "--namespace", NAMESPACE, "--package", str(package), "--param", "data_root=s3://mlpipeline/x", env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "403" in last or "denied" in last.lower() or "forbidden" in last.lower(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_parameter_the_api_server_rejects_is_one_line_naming_it(kfp, tmp_path, monkeypatch):
    """imgpipe checks a run's parameters against its package first; what the server itself rejects
    (a parameter the version on the server does not take) comes back as the server's words, on one line."""
    from imgpipe.kfp import client as kc
    from imgpipe.kfp.refusals import call

    monkeypatch.setenv("KF_PIPELINES_TOKEN", token("default-editor", NAMESPACE))
    package = _small_package(tmp_path / "imgpipe.yaml")
    target = kc.Target(host=kfp, namespace=NAMESPACE).resolved()
    client, typed, pipeline_id, version_id, version, experiment_id, namespace = kc._prepare(
        target, ["data_root=s3://mlpipeline/x"], package, False, None, None, str(tmp_path)
    )
    with pytest.raises(RuntimeError) as caught:
        call(f"start a run of {version}", "create", "runs", namespace, client.run_pipeline, experiment_id=experiment_id,
             job_name="rejected", params={**typed, "no_such_parameter": 1}, pipeline_id=pipeline_id, version_id=version_id,
             service_account=target.service_account)  # fmt: skip
    line = str(caught.value)
    assert "\n" not in line and "HTTP 400" in line and "no_such_parameter" in line, line


@pytest.fixture(scope="module")
def step_images() -> dict[str, str]:
    return {kind: step_image(kind) for kind in ("cpu", "ray", "gpu")}


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)  # the run's own bound, not pytest's default
def test_imgpipe_submit_runs_the_pipeline_end_to_end_on_kfp(kfp, step_images, tmp_path):
    from imgpipe.data.synth import generate

    _rayjob_template(step_images["ray"])
    package = _small_package(tmp_path / "imgpipe.yaml")
    with object_store(tmp_path, NAMESPACE), placements(NAMESPACE) as pods:
        root = f"s3://mlpipeline/private/{NAMESPACE}/kfp-{uuid.uuid4().hex[:8]}"
        generate(f"{root}/synth", SynthConfig(classes=3, per_class=24, seed=0, min_side=64, max_side=160), progress=False)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        started = time.monotonic()
        run_id, out = submit_run(kfp, package, root, train_nodes="2")
        print(f"run succeeded in {time.monotonic() - started:.0f} s\n{out[-1500:]}")
        # The RayJob and the TrainJob ran from inside the run (imgpipe deletes each once it has ended:
        # the operators' events for them remain).
        events = kubectl_json("get", "events", "-n", NAMESPACE)["items"]
        made = {(e["involvedObject"]["kind"], e["involvedObject"]["name"]) for e in events if e["metadata"]["creationTimestamp"] >= since}
        assert any(kind == "RayJob" and name.startswith("imgpipe-resize-") for kind, name in made), sorted(made)
        assert any(kind == "JobSet" and name.startswith("imgpipe-train-") for kind, name in made), sorted(made)
        # What the UI shows of the run, read as it reads it: the steps' HTML reports in the pipeline
        # root (the launcher uploaded them to the object store), and the run's steps in KFP's API.
        from imgpipe import storage

        pipeline_root = f"s3://mlpipeline/private-artifacts/{NAMESPACE}/v2/artifacts/imgpipe/{run_id}"
        reports = [o.uri for o in storage.list_objects(pipeline_root) if o.uri.rsplit("/", 1)[-1].startswith("report")]
        steps_with_pages = {uri.split(f"{run_id}/", 1)[1].split("/", 1)[0].rsplit("-", 1)[0] for uri in reports}
        assert steps_with_pages >= {"download", "clean", "resize", "promote"}, reports
        for uri in reports:
            page = storage.read_bytes(uri).decode().lower()
            step = uri.split(f"{run_id}/", 1)[1].split("/", 1)[0]
            assert "<html" in page and ("reject" in page or step not in ("download", "clean")), uri
        details = _get(kfp, f"/runs/{run_id}", bearer=token("default-editor", NAMESPACE)).json()
        assert details["state"] == "SUCCEEDED", details.get("state")
        # KFP names a task in a dsl.If branch with its branch's number (resize-2).
        steps = {re.sub(r"-\d+$", "", t["display_name"]) for t in details["run_details"]["task_details"] if t.get("state") == "SUCCEEDED"}
        assert {"download", "clean", "resize", "promote"} <= steps, steps
        _assert_counts_reconcile(root, run_id)
    if int(settings()["NODES"]) > 1:  # the run's remote work crossed nodes
        assert_ray_crossed_nodes(pods)
        assert_ranks_crossed_nodes(pods)


def _assert_counts_reconcile(root: str, run_id: str) -> None:
    """Every image the run downloaded is in clean's output or its rejects, and every clean output in resize's.

    Read from the steps' committed manifests under the run's data root (a prefix of this test's own):
    the run's id names them, or with caching their inputs (imgpipe.stepio.artifacts.task_prefix).
    """
    from imgpipe import contract, storage

    manifests: dict[str, dict] = {}
    for obj in storage.list_objects(f"{root}/runs/"):
        if obj.uri.endswith("/" + contract.MANIFEST):
            manifest = contract.read_manifest(obj.uri[: -len("/" + contract.MANIFEST)])
            assert manifest["step"] not in manifests, f"one {manifest['step']} output per run, found another at {obj.uri}"
            manifests[manifest["step"]] = manifest
    assert {"download", "clean", "resize"} <= set(manifests), (run_id, sorted(manifests))
    manifests = {k: manifests[k] for k in ("download", "clean", "resize")}
    for step, m in manifests.items():
        assert m["inputs"] == m["outputs"] + m["rejected"], (step, m["inputs"], m["outputs"], m["rejected"])
    assert manifests["clean"]["inputs"] == manifests["download"]["outputs"] and manifests["resize"]["inputs"] == manifests["clean"]["outputs"]


def test_imgpipe_schedule_makes_a_recurring_run_the_scheduledworkflow_controller_fires(kfp, tmp_path):
    """KFP's own ScheduledWorkflow controller starts the run; the run itself is not this test's (it is
    ended once it exists): a source that does not exist, so it could not hold the node for long."""
    package = _small_package(tmp_path / "imgpipe.yaml")
    owner = token("default-editor", NAMESPACE)
    name = f"sched-{uuid.uuid4().hex[:6]}"
    params = [f"--param=data_root=s3://mlpipeline/private/{NAMESPACE}/{name}", "--param=source_uri=s3://mlpipeline/none.tar.gz"]
    env = {"KF_PIPELINES_TOKEN": owner}
    where = ["--host", kfp, "--namespace", NAMESPACE, "--package", str(package)]
    made = _imgpipe("schedule", *where, "--cron", "0 * * * * *", "--name", name, *params, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    listed = _get(kfp, "/recurringruns", bearer=owner, namespace=NAMESPACE).json().get("recurringRuns", [])
    recurring = [r for r in listed if r["display_name"] == name]
    assert len(recurring) == 1, recurring
    rr = recurring[0]
    try:
        assert rr["status"] == "ENABLED" and rr["trigger"]["cron_schedule"]["cron"] == "0 * * * * *", rr
        deadline = time.monotonic() + 150
        runs: list[dict] = []
        while time.monotonic() < deadline and not runs:
            # Newest first: the experiment holds every earlier test run (a page holds the oldest otherwise).
            answer = _get(kfp, "/runs", bearer=owner, namespace=NAMESPACE, experiment_id=rr["experiment_id"], sort_by="created_at desc")
            runs = [r for r in answer.json().get("runs", []) if r.get("recurring_run_id") == rr["recurring_run_id"]]
            time.sleep(3)
        assert runs, f"the ScheduledWorkflow controller started no run of {name} in 150 s"
        swf = kubectl_json("get", "scheduledworkflows", "-n", NAMESPACE)["items"]
        assert any(s["metadata"]["name"].startswith(name) or s["spec"].get("pipelineName") for s in swf), swf
    finally:
        requests.delete(f"{kfp}{V2}/recurringruns/{rr['recurring_run_id']}", headers={"Authorization": f"Bearer {owner}"}, timeout=30)
        for run in runs:
            requests.post(f"{kfp}{V2}/runs/{run['run_id']}:terminate", headers={"Authorization": f"Bearer {owner}"}, timeout=30)
