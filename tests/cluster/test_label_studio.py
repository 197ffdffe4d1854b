"""Label Studio on the cluster (k8s/label-studio): the Component's Deployment, its admin and token from
the Secret, reached over its Service by ``imgpipe review publish`` as a pod in the namespace would.

The image is PyPI's label-studio built here (``bash cluster/images.sh build label-studio``; a cluster
with a registry runs heartexlabs'). This node has no storage provisioner, so the test gives the pod
an emptyDir where the Component asks for a volume claim.
"""

from __future__ import annotations

import base64
import copy
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from imgpipe import storage
from tests.cluster.conftest import CLUSTER, kubectl, kubectl_json, lib, object_store, settings
from tests.cluster.test_kfp import RUN_TIMEOUT_S, kfp, step_images  # noqa: F401 - the fixtures
from tests.cluster.test_kfp_sweep_audit import _submit, audit_package, sample  # noqa: F401 - the fixture
from tests.cluster.test_remote_objects import dev_overlay  # noqa: F401 - the fixture
from tests.manifests import K8S, _build
from tests.steps.test_audit import audited  # noqa: F401 - the fixture: a real two-fold audit

pytestmark = pytest.mark.cluster
NAMESPACE = "imgpipe-dev"


def _docs(ref: str, token: str) -> list[dict]:
    docs = copy.deepcopy(_build(K8S / "label-studio")[0])  # the Component as tests/test_manifests.py checks it
    out = []
    for doc in docs:
        doc["metadata"]["namespace"] = NAMESPACE
        if doc["kind"] == "PersistentVolumeClaim":
            continue  # no provisioner on this node
        if doc["kind"] == "Secret":
            # The template's url stays: the one Label Studio a run's publish-review task may send the token to.
            doc["stringData"] |= {"username": "reviewer@example.com", "password": secrets.token_urlsafe(12), "token": token}
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            pod["volumes"] = [{"name": "data", "emptyDir": {}}]
            pod["containers"][0].update(image=ref, imagePullPolicy="IfNotPresent")
        out.append(doc)
    return out


@pytest.fixture(scope="module")
def label_studio():
    ref = lib("image_ref label-studio")
    archive = Path(lib("echo $CLUSTER_CACHE")) / "images" / (ref.replace("/", "_").replace(":", "_") + ".tar")
    if not archive.exists():
        pytest.skip(f"no {ref}: bash cluster/images.sh build label-studio, then make test-cluster")
    steps = [["import", "label-studio"]] + ([["share", ref]] if int(settings()["NODES"]) > 1 else [])
    for step in steps:
        done = subprocess.run(["bash", str(CLUSTER / "images.sh"), *step], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"cluster/images.sh {' '.join(step)} failed: {done.stderr.strip()[-800:]}"
    token = secrets.token_hex(20)
    docs = _docs(ref, token)
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    try:
        kubectl("-n", NAMESPACE, "rollout", "status", "deployment/label-studio", "--timeout=600s")
        ip = kubectl_json("-n", NAMESPACE, "get", "service", "label-studio")["spec"]["clusterIP"]
        yield f"http://{ip}:8080", token
    finally:
        kubectl("delete", "-f", "-", "--wait=false", input=yaml.safe_dump_all(docs), check=False)


def test_the_secrets_token_reaches_label_studio_over_its_service_and_publish_fills_the_project(label_studio, audited, tmp_path):  # noqa: F811
    from imgpipe.review.client import LabelStudio, LabelStudioError
    from imgpipe.review.loop import publish

    url, token = label_studio
    secret = kubectl_json("-n", NAMESPACE, "get", "secret", "imgpipe-label-studio")["data"]
    assert base64.b64decode(secret["token"]).decode() == token, "the token imgpipe sends is the Secret's"
    with object_store(tmp_path, NAMESPACE):
        images = f"s3://mlpipeline/private/{NAMESPACE}/label-review-{os.urandom(3).hex()}"
        deadline = time.monotonic() + 120
        while True:  # the readiness probe answers before the first request is served under load
            try:
                done = publish(audited["dest"], LabelStudio(url, token), top=4, images=images)
                break
            except LabelStudioError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(5)
    assert (done.suspects, done.added) == (4, 4)
    assert len(LabelStudio(url, token).tasks(done.project)) == 4
    with pytest.raises(LabelStudioError, match="HTTP 401"):
        LabelStudio(url, "0" * 40).tasks(done.project)


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)  # a whole audit run on KFP
def test_an_audit_runs_publish_review_pod_reaches_label_studio_with_the_secrets_token(label_studio, kfp, step_images, sample, tmp_path):  # noqa: F811
    """The audit pipeline on KFP with ``review_url``: its publish-review pod reads the token and the
    allowed URL from the Secret, reaches Label Studio over the Service's DNS name and fills the project."""

    from imgpipe.review.client import LabelStudio
    from imgpipe.review.loop import IMAGES_DIR, _read_audit, audit_classes, project_title

    url, token = label_studio
    allowed = base64.b64decode(kubectl_json("-n", NAMESPACE, "get", "secret", "imgpipe-label-studio")["data"]["url"]).decode()
    package = audit_package(tmp_path / "audit.yaml")
    run_id, out = _submit(kfp, package, sample, folds="2", review_url=allowed, review_top="4")
    with object_store(tmp_path, NAMESPACE):
        audit = f"{sample}/runs/{run_id}/audit"
        manifest, rows = _read_audit(audit)
        suspects = min(4, sum(1 for r in rows if r.get("is_issue")))
        pictures = [o.uri for o in storage.list_objects(storage.join(f"{sample}/runs/{run_id}", IMAGES_DIR)) if o.uri.endswith(".png")]
        title = project_title(audit_classes(manifest))
    assert len(pictures) == suspects, (pictures, suspects, out[-1500:])
    ls = LabelStudio(url, token)
    mine = [t for t in ls.tasks(ls.find_project(title)) if f"/runs/{run_id}/{IMAGES_DIR}/" in str(t["data"].get("image", ""))]
    assert len(mine) == suspects, (len(mine), suspects, out[-1500:])
    print(f"audit run {run_id}: publish-review put {suspects} suspect(s) in {title!r} from its pod")
