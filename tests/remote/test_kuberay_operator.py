"""KubeRay's operator around a RayJob, faked: statuses that end the wait, deadlines, the cluster's template, the submitter's log, old CRDs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from imgpipe.remote import kube, kuberay, rayjob_spec
from tests.remote.fake_kuberay import (
    HEAD_EVICTED,
    K8S,
    SUCCESS,
    VALIDATION_FAILED,
    FakeCluster,
    FakeCustomObjects,
    full_run,
    params,
    run,
    validate,
)

pytestmark = pytest.mark.usefixtures("fakes_authorize_with_the_rendered_role")

# ------------------------------------------------------------------ no hang, no orphans, the cluster's template


def test_validation_failed_is_a_failure_with_its_message_not_a_hang(run_args):
    api = FakeCluster(script=[("Initializing", "")], final=VALIDATION_FAILED)
    with pytest.raises(RuntimeError, match=r"ValidationFailed.*preRunningDeadlineSeconds must be a positive integer"):
        run(api, run_args)
    state, text = kuberay.rayjob_state({"status": dict(zip(("jobDeploymentStatus", "jobStatus", "reason", "message"), VALIDATION_FAILED))})
    assert state == "failed" and "reason=ValidationFailed" in text


def test_an_evicted_head_ends_the_wait_with_the_operators_reason(run_args):
    api = FakeCluster(script=[("Initializing", ""), ("Running", "RUNNING")], final=HEAD_EVICTED)
    with pytest.raises(RuntimeError, match=r"reason=SubmissionFailed.*backoff limit"):
        run(api, run_args)


def test_every_wait_has_a_deadline_from_the_rayjobs_own_deadlines(run_args):
    spec = run_args["template"]["spec"]
    expected = spec["activeDeadlineSeconds"] + spec["preRunningDeadlineSeconds"] + rayjob_spec.WAIT_SLACK_S
    assert rayjob_spec.wait_deadline_s(run_args["template"]) == expected
    bare = copy.deepcopy(run_args["template"])
    del bare["spec"]["activeDeadlineSeconds"], bare["spec"]["preRunningDeadlineSeconds"]
    body = rayjob_spec.build_rayjob(bare, params())
    assert body["spec"]["activeDeadlineSeconds"] == rayjob_spec.DEFAULT_ACTIVE_DEADLINE_S, "a template without deadlines gets ours"
    assert body["spec"]["preRunningDeadlineSeconds"] == rayjob_spec.DEFAULT_PRE_RUNNING_DEADLINE_S
    api = FakeCluster(script=[("Initializing", "")] * 1000)
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(TimeoutError, match="keeps running"):
        run(api, run_args, poll_s=600, sleep=sleep, clock=lambda: now[0])
    assert expected <= now[0] < expected + 600


def test_rayjobs_carry_run_and_step_labels_and_are_deleted_once_done(run_args, validators):
    api = FakeCluster(script=[("Running", "RUNNING"), ("Complete", "FAILED")])
    with pytest.raises(RuntimeError):
        run(api, run_args, max_attempts=2)
    labels = api.bodies[run_args["base"]]["metadata"]["labels"]
    assert labels[kube.RUN_ID_LABEL] == "run-7" and labels[kube.STEP_LABEL] == "resize"
    assert api.deleted == [], "a failed RayJob stays for kubectl describe/logs"
    api.script = SUCCESS
    report, _ = run(api, run_args, max_attempts=2)
    assert report.step == "resize"
    assert sorted(api.deleted) == sorted([run_args["base"], run_args["base"] + "-a2"]), "every attempt goes once one succeeded"
    validate(validators, {k: v for k, v in rayjob_spec.build_rayjob(run_args["template"], params()).items()})


def test_a_retry_after_the_output_is_committed_does_nothing(run_args):
    api = FakeCluster()
    report, _ = run(api, run_args)
    calls_before = len(api.created)
    api.objects.clear()  # the RayJob is gone (deleted on success, or by a person): the output decides
    again, printed = run(api, run_args)
    assert again == report and len(api.created) == calls_before and printed == ""


def test_the_template_a_cluster_admin_edits_is_the_one_used(run_args):
    edited = copy.deepcopy(run_args["template"])
    worker = edited["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["tolerations"] = [{"key": "pool", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}]
    worker["containers"][0]["resources"] = {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}}
    edited["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}
    api = FakeCluster(template=edited)
    found, source = kuberay.cluster_template(api, "ml", "resize")
    assert source == "RayJob ml/imgpipe-resize"
    assert "kubectl.kubernetes.io/last-applied-configuration" not in (found["metadata"].get("annotations") or {})
    run(api, {**run_args, "template": None})
    (made,) = api.bodies.values()
    assert made["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"] == worker["tolerations"]
    body = rayjob_spec.build_rayjob(found, params())
    got = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert got["tolerations"] == worker["tolerations"] and got["containers"][0]["resources"] == worker["containers"][0]["resources"]
    missing, source = kuberay.cluster_template(FakeCluster(), "ml", "resize")
    assert source.startswith("packaged") and missing["kind"] == "RayJob"


def test_the_submitters_log_lines_reach_the_step_log(run_args):
    api = FakeCluster(logs=["resize: 1000/5000 images", "resize: 5000/5000 images"])
    _, printed = run(api, run_args)
    assert "resize: 1000/5000 images" in printed and "resize: 5000/5000 images" in printed
    assert printed.count("resize: 1000/5000 images") == 1, "each log line once"


# ------------------------------------------------------------------ an operator whose CRD prunes the fields imgpipe needs


# What each older KubeRay's RayJob CRD lacks of the fields imgpipe sets (ray-project/kuberay
# ray-operator/config/crd/bases/ray.io_rayjobs.yaml at each tag: submitterConfig from v1.2.0,
# rayClusterSpec.authOptions from v1.5.1, preRunningDeadlineSeconds from v1.6.0). v1.3.2 is the
# KubeRay of Kubeflow's own install (kubeflow/manifests 26.03 experimental/ray).
OLD_CRDS = {
    "v1.1.1": [("spec", "preRunningDeadlineSeconds"), ("spec", "rayClusterSpec", "authOptions"), ("spec", "submitterConfig")],
    "v1.3.2": [("spec", "preRunningDeadlineSeconds"), ("spec", "rayClusterSpec", "authOptions")],
    "v1.5.0": [("spec", "preRunningDeadlineSeconds"), ("spec", "rayClusterSpec", "authOptions")],
    "v1.5.2": [("spec", "preRunningDeadlineSeconds")],
}


@pytest.fixture(scope="module")
def rayjob_schema(schemas_dir: Path) -> dict:
    """The v1 openAPIV3Schema of KubeRay v1.7's RayJob CRD."""
    crd = yaml.load((schemas_dir / "kuberay-v1.7-ray.io_rayjobs.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def old_crd_schema(schema: dict, release: str) -> dict:
    """``schema`` without the properties ``release``'s CRD does not have yet."""
    out = copy.deepcopy(schema)
    for path in OLD_CRDS[release]:
        node = out
        for key in path[:-1]:
            node = node["properties"][key]
        del node["properties"][path[-1]]
    return out


def test_the_fake_prunes_like_an_old_crd_and_keeps_everything_on_a_current_one(run_args, rayjob_schema):
    body = rayjob_spec.build_rayjob(run_args["template"], params())
    current = FakeCustomObjects(schema=rayjob_schema).create_namespaced_custom_object("ray.io", "v1", "ml", "rayjobs", body)
    assert {k: v for k, v in current.items() if k != "status"} == body, "KubeRay v1.7's CRD lists every field imgpipe sets"
    old = FakeCustomObjects(schema=old_crd_schema(rayjob_schema, "v1.3.2")).create_namespaced_custom_object("ray.io", "v1", "ml", "rayjobs", body)
    assert "preRunningDeadlineSeconds" not in old["spec"] and "authOptions" not in old["spec"]["rayClusterSpec"]
    assert old["spec"]["submitterConfig"] == body["spec"]["submitterConfig"] and old["metadata"] == body["metadata"]
    assert kuberay.dropped_fields(body, old) == ["spec.preRunningDeadlineSeconds", "spec.rayClusterSpec.authOptions"]
    assert kuberay.dropped_fields(body, current) == []


@pytest.mark.parametrize("release", sorted(OLD_CRDS))
def test_an_operator_older_than_the_floor_fails_the_step_and_its_rayjob_goes(release, run_args, rayjob_schema):
    api = FakeCluster(template=run_args["template"])
    api.schema = old_crd_schema(rayjob_schema, release)
    with pytest.raises(RuntimeError) as caught:
        full_run(api, run_args)
    message = str(caught.value)
    assert f"KubeRay >= {kuberay.MIN_KUBERAY}" in message and "\n" not in message
    for path in OLD_CRDS[release]:
        assert ".".join(path) in message, path
    assert "the RayJob was deleted" in message
    assert api.created == api.deleted == [run_args["base"]], "created, found pruned, deleted before any wait"
    assert ("ml", run_args["base"]) not in api.objects
    assert api.objects[("ml", "imgpipe-resize")]["spec"]["suspend"] is True, "the template stays"


def test_the_applied_by_label_of_the_template_stays_off_each_runs_rayjob(run_args):
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    assert template["metadata"]["labels"][rayjob_spec.APPLIED_BY_LABEL] == "cluster-admin"
    job = rayjob_spec.build_rayjob(template, params())
    assert rayjob_spec.APPLIED_BY_LABEL not in job["metadata"]["labels"], "a run's RayJob is no admin's manifest (kubectl apply -l ... --prune)"
