"""Tier 2, Argo: the retraining CronWorkflow of k8s/argo fires on its schedule and its pod runs to completion.

The CronWorkflow is the dev overlay's, applied as docs/deploy.md says, with its image the
imgpipe-cpu image `make images IMAGE_KINDS=cpu` built (imported into the cluster's containerd).
Argo's real workflow-controller fires it; its pod runs `imgpipe submit` with the projected token
the API server issues, against KFP's own API server (tier 3, cluster/kfp.sh) behind the Service
name the overlay names (`ml-pipeline.kubeflow`), which authenticates each call with a TokenReview
and authorizes it with a SubjectAccessReview, as multi-user KFP does.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable

import pytest
import requests

from tests import rbac
from tests.cluster.conftest import apply_docs, kubectl, kubectl_json, server_allows, step_image
from tests.cluster.kfp_backend import api_server, enable_profile, token
from tests.manifests import build
from tests.test_manifests_security import ADMIN_SELECTOR, OWNER, OWNER_SELECTOR, _selected

pytestmark = pytest.mark.cluster
NAMESPACE = "imgpipe-dev"
CRON = "imgpipe-retrain"


@pytest.fixture(scope="module")
def cpu_image() -> str:
    return step_image("cpu")


class _ApiServerAuth:
    """KFP's multi-user checks, made against the real API server: TokenReview, then SubjectAccessReview."""

    def __init__(self, api_client) -> None:
        from kubernetes import client

        self.auth = client.AuthenticationV1Api(api_client)
        self.api_client = api_client
        self.client = client

    def authenticate(self, token: str) -> str | None:
        c = self.client
        review = c.V1TokenReview(spec=c.V1TokenReviewSpec(token=token, audiences=["pipelines.kubeflow.org"]))
        status = self.auth.create_token_review(review).status
        return status.user.username if status.authenticated else None

    def allows(self, user: str, request: rbac.Request) -> bool:
        return server_allows(self.api_client, user, request)


def _with_image(docs: list[dict], image: str) -> list[dict]:
    out = copy.deepcopy(docs)
    for doc in out:
        if doc["kind"] == "CronWorkflow":
            for template in doc["spec"]["workflowSpec"]["templates"]:
                if "container" in template and template["container"]["image"].endswith("imgpipe-cpu:dev"):
                    template["container"]["image"] = image
                    template["container"]["imagePullPolicy"] = "IfNotPresent"
    return out


def _wait_workflow(deadline_s: float) -> dict:
    label = f"workflows.argoproj.io/cron-workflow={CRON}"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        items = kubectl_json("get", "workflows", "-n", NAMESPACE, "-l", label)["items"]
        done = [w for w in items if w.get("status", {}).get("phase") in ("Succeeded", "Failed", "Error")]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError(f"no finished Workflow of {CRON} in {deadline_s} s: {json.dumps(items)[:1500]}")


def test_the_retraining_cronworkflow_fires_and_its_pod_submits_a_run(profiles, cpu_image, api_client):
    host = api_server()  # tier 3: KFP's own API server behind ml-pipeline.kubeflow
    docs = _with_image(list(build("overlays/dev")), cpu_image)
    apply_docs([d for d in docs if _selected(ADMIN_SELECTOR, d)])
    apply_docs([d for d in docs if _selected(OWNER_SELECTOR, d)], f"--as={OWNER}")
    enable_profile(NAMESPACE)
    kubectl("delete", "workflows", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/cron-workflow={CRON}", "--wait=true")
    owner = token("default-editor", NAMESPACE)
    # Fire it: every minute, not suspended (the dev overlay ships it suspended); once is enough.
    patch = {"spec": {"suspend": False, "schedules": ["* * * * *"], "startingDeadlineSeconds": 120}}
    kubectl("patch", "cronworkflow", CRON, "-n", NAMESPACE, "--type", "merge", "-p", json.dumps(patch))
    try:
        name = _wait(420, "the CronWorkflow's first Workflow", lambda: _workflow_names())[0]
    finally:
        kubectl("patch", "cronworkflow", CRON, "-n", NAMESPACE, "--type", "merge", "-p", json.dumps({"spec": {"suspend": True}}))
    # Its pod submits to KFP's own API server: the run is in KFP's database, named for the workflow.
    run = _wait(300, f"a KFP run named {name}", lambda: _kfp_runs(host, owner, name))[0]
    experiment = requests.get(f"{host}/apis/v2beta1/experiments/{run['experiment_id']}", headers=_bearer(owner), timeout=30).json()
    assert experiment.get("namespace") == NAMESPACE, experiment
    # The run is the pipeline's full size, more than this node has: end it, and the submitter,
    # which waits for it (--wait), ends with the run's state as its one-line reason.
    answer = requests.post(f"{host}/apis/v2beta1/runs/{run['run_id']}:terminate", headers=_bearer(owner), timeout=30)
    assert answer.status_code == 200, answer.text
    workflow = _wait_workflow(300)
    pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/workflow={name}")["items"]
    logs = "\n".join(kubectl("logs", p["metadata"]["name"], "-n", NAMESPACE, "-c", "main", check=False).stdout for p in pods)
    assert workflow["status"]["phase"] == "Failed", f"{workflow['status']}\n{logs[-3000:]}"
    # imgpipe's own last line (Argo's executor adds its own after it).
    last = [line for line in logs.splitlines() if line.startswith("imgpipe submit:")][-1]
    assert f"run {run['run_id']} ended" in last, logs[-2000:]


def _workflow_names() -> list[str]:
    items = kubectl_json("get", "workflows", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/cron-workflow={CRON}")["items"]
    return [w["metadata"]["name"] for w in items]


def _wait(seconds: float, what: str, found: Callable[[], list]) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if got := found():
            return got
        time.sleep(2)
    raise AssertionError(f"no {what} in {seconds} s")


def _bearer(token_: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_}"}


def _kfp_runs(host: str, bearer: str, display_name: str) -> list[dict]:
    query = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": display_name}]})
    answer = requests.get(f"{host}/apis/v2beta1/runs", headers=_bearer(bearer), params={"namespace": NAMESPACE, "filter": query}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json().get("runs", [])
