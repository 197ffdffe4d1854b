"""Tier 2, Argo: the retraining CronWorkflow of k8s/argo fires on its schedule and its pod runs to completion.

The CronWorkflow is the dev overlay's, applied as docs/deploy.md says, with its image the
imgpipe-cpu image `make images IMAGE_KINDS=cpu` built (imported into the cluster's containerd).
Argo's real workflow-controller fires it; its pod runs `imgpipe submit` with the projected token
the API server issues. KFP's API server cannot be built here (docs/cluster.md), so the pod talks
to tests/kfp/fake_kfp.py, held to KFP's Swagger contract, behind the Service name the overlay
names (`ml-pipeline.kubeflow`); the fake authenticates each call with a real TokenReview and
authorizes it with a real SubjectAccessReview, as multi-user KFP does.
"""

from __future__ import annotations

import copy
import json
import time

import pytest

from tests import rbac
from tests.cluster.conftest import apply_docs, kubectl, kubectl_json, node_service, server_allows, settings, step_image
from tests.kfp import fake_kfp
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
    docs = _with_image(list(build("overlays/dev")), cpu_image)
    apply_docs([d for d in docs if _selected(ADMIN_SELECTOR, d)])
    apply_docs([d for d in docs if _selected(OWNER_SELECTOR, d)], f"--as={OWNER}")
    kubectl("delete", "workflows", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/cron-workflow={CRON}", "--wait=true")
    auth = _ApiServerAuth(api_client)
    node_ip = settings()["CLUSTER_NODE_IP"]
    with fake_kfp.serve("2.16.0", host=node_ip, multi_user=True, authorizer=auth, authenticate=auth.authenticate) as (url, fake):
        apply_docs(node_service("ml-pipeline", 8888, int(url.rsplit(":", 1)[1])))
        # Fire it: every minute, not suspended (the dev overlay ships it suspended).
        patch = {"spec": {"suspend": False, "schedules": ["* * * * *"], "startingDeadlineSeconds": 120}}
        kubectl("patch", "cronworkflow", CRON, "-n", NAMESPACE, "--type", "merge", "-p", json.dumps(patch))
        try:
            workflow = _wait_workflow(420)
        finally:
            kubectl("patch", "cronworkflow", CRON, "-n", NAMESPACE, "--type", "merge", "-p", json.dumps({"spec": {"suspend": True}}))
        name = workflow["metadata"]["name"]
        pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/workflow={name}")["items"]
        logs = "\n".join(kubectl("logs", p["metadata"]["name"], "-n", NAMESPACE, "-c", "main", check=False).stdout for p in pods)
        assert workflow["status"]["phase"] == "Succeeded", f"{workflow['status'].get('message')}\n{logs[-3000:]}"
        account = rbac.service_account(NAMESPACE, "imgpipe-retrain")
        assert fake.runs and fake.runs[-1]["display_name"] == name, "the run is named for the workflow"
        assert fake.reviews and all(r.namespace == NAMESPACE for r in fake.reviews)
        users = {auth.authenticate(r.headers.get("authorization", "").removeprefix("Bearer ")) for r in fake.posted("/runs")}
        assert users == {account}, users
