"""KubeRay: create-or-attach and wait against a fake ``CustomObjectsApi`` (no cluster here), then the RBAC those calls need."""

from __future__ import annotations

import io

import pytest
import yaml

from imgpipe import contract
from imgpipe.remote import dispatch, kuberay, rayjob_spec
from tests import rbac
from tests.conftest import ROOT
from tests.remote.fake_kuberay import HEAD_EVICTED, FakeCluster, FakeCustomObjects, Recording, full_run, params, run, validate

pytestmark = pytest.mark.usefixtures("fakes_authorize_with_the_rendered_role")

# ------------------------------------------------------------------ create-or-attach and wait, on a fake API


def test_create_wait_succeed_then_a_retry_returns_without_creating(run_args, validators):
    api = FakeCustomObjects()
    report, printed = run(api, run_args)
    assert api.created == [run_args["base"]]
    created = api.bodies[run_args["base"]]
    validate(validators, created)
    assert created["spec"]["entrypoint"] == run_args["entrypoint"]
    assert "jobDeploymentStatus=Initializing" in printed and "jobStatus=SUCCEEDED" in printed
    assert report.step == "resize" and contract.read_manifest(run_args["dest"])["config"]["concurrency"] == 32

    again, _ = run(api, run_args)
    assert api.created == [run_args["base"]] and again == report


def test_409_attaches_to_the_rayjob_another_submitter_created(run_args):
    api = FakeCustomObjects()
    body = rayjob_spec.build_rayjob(run_args["template"], params(name="imgpipe-resize-x", entrypoint=run_args["entrypoint"]))
    first, created = kuberay.rayjobs(api).create_or_attach(body)
    again, created_again = kuberay.rayjobs(api).create_or_attach(body)
    assert (created, created_again) == (True, False) and api.created == ["imgpipe-resize-x"]
    assert again["metadata"]["name"] == "imgpipe-resize-x"


def test_attaches_to_a_running_rayjob_instead_of_creating(run_args):
    api = FakeCustomObjects()
    api.put("ml", run_args["base"], "Running", "RUNNING", entrypoint=run_args["entrypoint"])
    api.objects[("ml", run_args["base"])]["_steps"] = [("Running", "RUNNING")] * 2 + [("Complete", "SUCCEEDED")]
    report, printed = run(api, run_args)
    assert api.created == [] and report.step == "resize"
    assert printed.count("jobStatus=RUNNING") == 1, "each status change is printed once"


def test_failed_rayjob_raises_with_its_message_and_a_retry_makes_a_new_attempt(run_args):
    api = FakeCustomObjects(script=[("Running", "RUNNING"), ("Complete", "FAILED")], message="exit code 2: not a committed step output")
    with pytest.raises(RuntimeError, match=r"jobDeploymentStatus=Complete jobStatus=FAILED reason=AppFailed message=exit code 2"):
        run(api, run_args, max_attempts=2)
    assert api.created == [run_args["base"]]
    with pytest.raises(RuntimeError, match="FAILED"):
        run(api, run_args, max_attempts=2)
    assert api.created == [run_args["base"], run_args["base"] + "-a2"]
    with pytest.raises(RuntimeError, match="no attempt left"):
        run(api, run_args, max_attempts=2)
    assert len(api.created) == 2


def test_deployment_failure_is_terminal_too():
    state, text = kuberay.rayjob_state(
        {"status": {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "activeDeadlineSeconds passed"}}
    )
    assert state == "failed" and "reason=DeadlineExceeded" in text
    assert kuberay.rayjob_state({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}})[0] == "failed"
    assert kuberay.rayjob_state({"status": {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}})[0] == "active"
    assert kuberay.rayjob_state({})[0] == "active"


def test_wait_times_out_on_a_fake_clock():
    api = FakeCustomObjects(script=[("Initializing", "")] * 100)
    api.create_namespaced_custom_object("ray.io", "v1", "ml", "rayjobs", {"metadata": {"name": "j"}, "spec": {}})
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(TimeoutError, match="not finished after 30s"):
        kuberay.wait_for_rayjob(api, "ml", "j", timeout_s=30, poll_s=10, out=io.StringIO(), sleep=sleep, clock=lambda: now[0])
    assert now[0] == 30


def test_a_deleted_rayjob_fails_the_wait():
    with pytest.raises(RuntimeError, match="was deleted"):
        kuberay.wait_for_rayjob(FakeCustomObjects(), "ml", "gone", out=io.StringIO())


def test_kuberay_address_picks_the_namespace(run_args, monkeypatch):
    calls = {}

    def fake_run(step, source, dest, cfg, *, namespace, run_id):
        calls.update(step=step, namespace=namespace, run_id=run_id)
        return "report"

    monkeypatch.setattr(kuberay, "run_step_rayjob", fake_run)
    assert dispatch.run_step("resize", run_args["source"], run_args["dest"], run_args["cfg"], run_id="r") == "report"
    assert calls == {"step": "resize", "namespace": "ml", "run_id": "r"}


# ------------------------------------------------------------------ RBAC: every permission the code uses is needed

# The API calls imgpipe.remote.kuberay makes, as (resource, RBAC verb).
CALL_VERBS = {
    "create_namespaced_custom_object": ("rayjobs", "create"),
    "get_namespaced_custom_object": ("rayjobs", "get"),
    "delete_namespaced_custom_object": ("rayjobs", "delete"),
    "list_namespaced_pod": ("pods", "list"),
    "read_namespaced_pod_log": ("pods/log", "get"),
}


def test_the_role_grants_exactly_the_calls_the_code_makes(run_args):
    api = Recording(FakeCluster(logs=["resize: 1/1 images"], template=run_args["template"]))
    run(api, {**run_args, "template": None})  # template from the cluster, create, wait, logs, delete
    failing = Recording(FakeCluster(script=[("Running", "RUNNING")], final=HEAD_EVICTED, template=run_args["template"]))
    with pytest.raises(RuntimeError):
        run(failing, {**run_args, "dest": run_args["dest"] + "-again", "template": None})
    used = {CALL_VERBS[m] for m in api.calls | failing.calls if m in CALL_VERBS}
    assert not {m for m in api.calls | failing.calls if m.endswith(("_object", "_pod", "_log")) and m not in CALL_VERBS}
    role = yaml.safe_load((ROOT / "k8s" / "base" / "role-rayjobs.yaml").read_text())
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert used == granted, f"the Role grants {sorted(granted - used)} unused, lacks {sorted(used - granted)}"


@pytest.mark.parametrize(("resource", "verb"), sorted(set(CALL_VERBS.values())), ids=lambda v: v.replace("/", "-"))
def test_each_permission_the_code_uses_is_needed(resource, verb, run_args, base_rbac, caplog):
    """A Role without one of its verbs: the refused call surfaces as one line naming it.

    Creating and reading RayJobs fail the step; the submitter's log and the clean-up of
    finished attempts are courtesies, so their refusal is a warning and the step succeeds.
    """
    authorizer = rbac.Authorizer(rbac.without_verb(base_rbac, "imgpipe-rayjobs", resource, verb))
    api = FakeCluster(logs=["resize: 1/1 images"], template=run_args["template"], authorizer=authorizer)
    qualified = f"{resource}.ray.io" if resource == "rayjobs" else resource
    needed = f"service account ml/imgpipe-pipeline may not {verb} {qualified} in namespace ml"
    if (resource, verb) in (("rayjobs", "create"), ("rayjobs", "get")):
        with pytest.raises(RuntimeError) as caught:
            full_run(api, run_args)
        message = str(caught.value)
        assert needed in message and "403 Forbidden" in message and "k8s/base/role-rayjobs.yaml" in message
        assert "\n" not in message, "one line"
        assert api.created == [], "nothing runs"
        return
    with caplog.at_level("WARNING", logger="imgpipe.remote.kuberay"):
        report, printed = full_run(api, run_args)
    assert report.step == "resize"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if needed in w], warnings
    if resource in ("pods", "pods/log"):
        assert "resize: 1/1 images" not in printed
        assert sum(needed in w for w in warnings) == 1, "reported once, not at every poll"
    else:
        assert api.deleted == [] and api.objects, "the finished RayJob stays when its delete is refused"


def test_a_refusal_names_the_account_the_api_server_saw(run_args, tmp_path):
    """Bound to another account (default-editor), imgpipe's account has no RayJob rights at all."""
    docs = rbac.render(ROOT / "k8s" / "base", tmp_path / "rbac", namespace="ml")
    for doc in docs:
        if doc["kind"] == "RoleBinding" and doc["metadata"]["name"] == "imgpipe-rayjobs":
            doc["subjects"] = [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "ml"}]
    api = FakeCluster(authorizer=rbac.Authorizer(docs))
    with pytest.raises(
        RuntimeError,
        match=r"refused to read the RayJob template ml/imgpipe-resize \(403 Forbidden\): "
        r"service account ml/imgpipe-pipeline may not get rayjobs\.ray\.io in namespace ml",
    ):
        full_run(api, run_args)
