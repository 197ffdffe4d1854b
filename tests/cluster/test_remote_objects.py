"""The objects imgpipe's remote steps create, sent by imgpipe's own code to the real API server as the run's account.

The RayJob (k8s/ray's template through rayjob_spec) and the TrainJob (remote/trainjob.py,
which tries Trainer 2.2's form and falls back to 2.1's) are created with the token the API
server issues to the overlay's ``imgpipe-pipeline`` account, so the Roles of k8s/base are what
allows them; an account without those Roles gets imgpipe's one-line refusal.
"""

from __future__ import annotations

import uuid

import pytest

from imgpipe.remote import kuberay, rayjob_spec, trainjob, trainjob_spec
from tests.cluster.conftest import apply_docs, kubectl, settings
from tests.manifests import build
from tests.test_manifests_security import ADMIN_SELECTOR, OWNER, OWNER_SELECTOR, _selected

pytestmark = pytest.mark.cluster
NAMESPACE = "imgpipe-dev"


@pytest.fixture(scope="module")
def dev_overlay(profiles):
    docs = list(build("overlays/dev"))
    apply_docs([d for d in docs if _selected(ADMIN_SELECTOR, d)])
    apply_docs([d for d in docs if _selected(OWNER_SELECTOR, d)], f"--as={OWNER}")
    return docs


def _api_as(account: str):
    """A ``CustomObjectsApi`` that authenticates with a token the API server issues to ``account``.

    An hour, as a pod's projected token lives (where its kubelet renews it, the client rereads the
    file): longer than any test's run. A 10-minute token expired under a drain test's wait (401).
    """
    from kubernetes import client

    token = kubectl("create", "token", account, "-n", NAMESPACE, "--duration=1h").stdout.strip()
    cfg = client.Configuration()
    cfg.host = "https://127.0.0.1:6443"
    cfg.ssl_ca_cert = f"{settings()['CLUSTER_STATE']}/pki/ca.crt"
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.CustomObjectsApi(client.ApiClient(cfg))


def _rayjob() -> dict:
    template = rayjob_spec.load_template(rayjob_spec.template_path("resize"))
    params = rayjob_spec.RayJobParams(
        name=f"imgpipe-check-{uuid.uuid4().hex[:8]}",
        namespace=NAMESPACE,
        entrypoint="python -m imgpipe.remote resize '{}'",
        image="ghcr.io/imgpipe/imgpipe-ray:dev",
        max_workers=1,
        labels={"imgpipe.dev/step": "resize"},
    )
    return rayjob_spec.build_rayjob(template, params)


def test_the_rayjob_imgpipe_builds_is_created_as_sent_by_the_pipelines_account(dev_overlay):
    api = _api_as("imgpipe-pipeline")
    body = _rayjob()
    returned, created = kuberay.rayjobs(api).create_or_attach(body)
    try:
        assert created
        assert kuberay.dropped_fields(body, returned) == [], "the KubeRay CRD pruned a field imgpipe relies on"
        assert returned["spec"]["preRunningDeadlineSeconds"] == body["spec"]["preRunningDeadlineSeconds"]
    finally:
        assert kuberay.rayjobs(api).delete(NAMESPACE, body["metadata"]["name"])


def test_the_trainjob_falls_back_to_trainer_2_1s_form_on_its_crd(dev_overlay):
    s = settings()
    api = _api_as("imgpipe-pipeline")
    params = trainjob_spec.TrainJobParams(
        name=f"imgpipe-check-{uuid.uuid4().hex[:8]}",
        namespace=NAMESPACE,
        image="ghcr.io/imgpipe/imgpipe-gpu:dev",
        nodes=2,
        procs_per_node=1,
        args=["-m", "imgpipe.remote", "train", "{}"],
        shm_size="1Gi",
    )
    sent, returned, created, used = trainjob._create_in_form(api, params)
    try:
        assert created
        expected = trainjob_spec.API_FORMS[1] if s["TRAINER_VERSION"].startswith("v2.1") else trainjob_spec.API_FORMS[0]
        assert used.form == expected, f"Trainer {s['TRAINER_VERSION']}'s CRD took {used.form}"
        trainjob._refuse_pruned(api, sent, returned)  # raises if the CRD dropped a field imgpipe relies on
    finally:
        assert trainjob.trainjobs(api).delete(NAMESPACE, params.name)


def test_an_account_without_the_role_gets_one_line_naming_it_and_the_role(dev_overlay):
    kubectl("create", "serviceaccount", "no-rights", "-n", NAMESPACE, check=False)
    api = _api_as("no-rights")
    with pytest.raises(RuntimeError) as refused:
        kuberay.rayjobs(api).create_or_attach(_rayjob())
    message = str(refused.value)
    assert "\n" not in message
    assert f"service account {NAMESPACE}/no-rights may not create rayjobs.ray.io in namespace {NAMESPACE}" in message, message
    assert "k8s/base/role-rayjobs.yaml" in message
