"""Training across nodes as a Kubeflow Trainer TrainJob: submit, attach, wait and retry against each Trainer, its RBAC, the compiled pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from imgpipe.kfp import package as kfp_package
from imgpipe.remote import dispatch, ranks, trainjob, trainjob_spec
from imgpipe.remote.attempts import attempt_id
from imgpipe.train.config import TrainConfig
from tests import rbac
from tests.conftest import ROOT
from tests.helpers import ir_dags
from tests.remote.fake_kuberay import Recording
from tests.remote.fake_trainer import COMPLETE, CRDS, FAILED, RUNNING, SUCCESS, WEBHOOK, FakeTrainer, run

# No test here checks the ONNX or TorchScript exports (tests/train/test_export.py does).
pytestmark = pytest.mark.usefixtures("no_exports")

# For a test that installs the CRDs it needs itself: the release of ``setup`` would only repeat it.
ONE_RELEASE = pytest.mark.parametrize("trainer_release", [next(iter(CRDS))])


@ONE_RELEASE
def test_on_trainer_2_1_the_strict_create_is_refused_and_nothing_but_the_2_1_form_is_created(setup, trainjob_schemas):
    api = FakeTrainer(trainjob_schemas["v2.1.0"], None, SUCCESS)
    report, _ = run(setup, api)
    (name,) = api.created
    assert "podTemplateOverrides" in api.sent[name]["spec"] and "runtimePatches" not in api.sent[name]["spec"]
    assert report.step == "train"


@ONE_RELEASE
def test_a_crd_with_neither_api_is_refused_in_one_line_naming_the_install_step(setup, trainjob_schemas):
    old = copy.deepcopy(trainjob_schemas["v2.1.0"])
    del old["properties"]["spec"]["properties"]["podTemplateOverrides"]
    api = FakeTrainer(old, None, SUCCESS)
    with pytest.raises(RuntimeError) as caught:
        run(setup, api)
    message = str(caught.value)
    assert "takes neither spec.runtimePatches" in message and "Kubeflow Trainer >= 2.1.0" in message
    assert "kubectl apply --server-side -k" in message and "\n" not in message and api.created == []


@ONE_RELEASE
def test_an_api_server_that_prunes_despite_strict_validation_is_caught_and_the_trainjob_deleted(setup, trainjob_schemas, monkeypatch):
    monkeypatch.setenv(trainjob_spec.SHM_ENV, "16Gi")
    old = copy.deepcopy(trainjob_schemas["v2.2.1"])
    del old["properties"]["spec"]["properties"]["runtimePatches"]
    api = FakeTrainer(old, None, SUCCESS)
    create = api.create_namespaced_custom_object
    api.create_namespaced_custom_object = lambda *a, field_validation=None: create(*a)  # ignores fieldValidation
    with pytest.raises(RuntimeError, match=r"dropped spec.runtimePatches although it was asked to refuse unknown fields"):
        run(setup, api)
    assert api.deleted == api.created and not api.objects


def test_a_retry_after_the_output_is_committed_creates_nothing(setup):
    run(setup, setup["fake"]())
    again = setup["fake"]()
    report, _ = run(setup, again)
    assert again.created == [] and report.step == "train"


def test_a_retry_attaches_to_the_running_trainjob_and_never_starts_a_second(setup, trainer_release):
    api = setup["fake"]()
    with pytest.raises(TimeoutError):  # the first attempt of the task gives up waiting (a pod restart, say)
        run(setup, api, active_deadline_s=1, clock=iter(range(0, 10**6, 10**4)).__next__)
    assert len(api.created) == 1
    report, _ = run(setup, api)  # the retried task
    if trainer_release >= "v2.2":
        assert len(api.created) == 1, "attached, not created again (the TrainJob's own deadline ends it)"
    else:
        assert len(api.created) == 2 and len(api.deleted) >= 1, "v2.1: the wait's deadline deleted the first; one at a time"
    assert report.step == "train"


def test_409_attaches_to_the_trainjob_another_submitter_created(setup, trainer_release):
    api = setup["fake"]()
    name = setup["base"]
    form = trainjob_spec.API_FORMS[0] if trainer_release >= "v2.2" else trainjob_spec.API_FORMS[1]
    body = trainjob_spec.build_trainjob(
        trainjob_spec.TrainJobParams(
            name=name, namespace="ml", image="reg/x:1", nodes=2, procs_per_node=4, args=["-m", "imgpipe.remote", "train", "{}"], form=form
        )
    )
    created, new = trainjob.trainjobs(api).create_or_attach(body)
    again, new_again = trainjob.trainjobs(api).create_or_attach(body)
    assert (new, new_again) == (True, False) and again["metadata"]["name"] == created["metadata"]["name"]


def test_a_failed_trainjob_fails_with_the_controllers_reason_and_a_retry_makes_a_new_attempt(setup):
    api = setup["fake"](script=[RUNNING, FAILED])
    with pytest.raises(RuntimeError) as caught:
        run(setup, api)
    message = str(caught.value)
    assert "FailedJobs" in message and "jobset failed due to one or more job failures" in message
    assert f"kubectl describe trainjob -n ml {setup['base']}" in message
    assert api.deleted == [] and len(api.objects) == 1, "a failed TrainJob stays for a look"
    api.script = SUCCESS
    report, _ = run(setup, api)
    assert api.created == [setup["base"], attempt_id(setup["base"], 2)]
    assert report.step == "train" and not api.objects, "both attempts deleted once one succeeded"


def test_a_trainjob_deleted_while_waited_for_fails_the_task(setup):
    api = setup["fake"](script=[RUNNING, RUNNING, RUNNING])
    real_get = api.get_namespaced_custom_object
    reads = []

    def get(*args):
        reads.append(1)
        if len(reads) == 3:
            api.objects.clear()  # kubectl delete trainjob, mid-run
        return real_get(*args)

    api.get_namespaced_custom_object = get
    with pytest.raises(RuntimeError, match="was deleted while the train task waited for it"):
        run(setup, api)


def test_the_deadline_exceeded_condition_ends_the_wait(setup):
    exceeded = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "TrainJob exceeded its active deadline"}
    with pytest.raises(RuntimeError, match="DeadlineExceeded TrainJob exceeded its active deadline"):
        run(setup, setup["fake"](script=[RUNNING, exceeded]))


@ONE_RELEASE
def test_on_trainer_2_1_the_wait_deadline_deletes_the_trainjob(setup, trainjob_schemas):
    api = FakeTrainer(trainjob_schemas["v2.1.0"], None, [RUNNING] * 50)
    with pytest.raises(TimeoutError):
        run(setup, api, active_deadline_s=1, clock=iter(range(0, 10**6, 10**4)).__next__)
    assert api.deleted == api.created and not api.objects, "nothing keeps running past the deadline"


def test_a_webhook_denial_is_reported_with_the_webhooks_own_message_not_as_rbac(setup, monkeypatch):
    monkeypatch.setattr(trainjob_spec, "RUNTIME", "torch-distributed-v9")
    with pytest.raises(RuntimeError) as caught:
        run(setup, setup["fake"]())
    message = str(caught.value)
    assert f'admission webhook "{WEBHOOK}" denied the request: unsupported runtime' in message
    assert "may not create" not in message and "role-trainjobs" not in message and "\n" not in message


def test_dispatch_refuses_more_nodes_than_the_cap_before_any_api_call(setup, monkeypatch):
    monkeypatch.setenv(trainjob_spec.MAX_NODES_ENV, "2")

    def no_api():
        raise AssertionError("no Kubernetes call for a refused count")

    monkeypatch.setattr(trainjob, "load_api", no_api)
    cfg = TrainConfig(model="tiny_cnn", nodes=3)
    with pytest.raises(ValueError, match=r"in \[1, 2\]"):
        dispatch.run_train(setup["data"], setup["out"], cfg, procs=1)


def test_dispatch_runs_one_node_in_the_pod_and_more_as_a_trainjob(setup, monkeypatch):
    calls = []
    monkeypatch.setattr(ranks, "launch", lambda data, out, cfg, procs: calls.append(("pod", procs)))
    monkeypatch.setattr(trainjob, "run_train_job", lambda data, out, cfg, *, procs, run_id: calls.append(("trainjob", procs, run_id)))
    dispatch.run_train(setup["data"], setup["out"], TrainConfig(model="tiny_cnn"), procs=2)
    dispatch.run_train(setup["data"], setup["out"], setup["cfg"], procs=2, run_id="r")
    assert calls == [("pod", 2), ("trainjob", 2, "r")]


# ------------------------------------------------------------------ RBAC


CALL_VERBS = {"create_namespaced_custom_object": "create", "get_namespaced_custom_object": "get", "delete_namespaced_custom_object": "delete"}


def test_the_role_grants_exactly_the_calls_the_code_makes(setup):
    api = Recording(setup["fake"]())
    run(setup, api)
    used = {("trainjobs", CALL_VERBS[m]) for m in api.calls if m in CALL_VERBS}
    role = yaml.safe_load((ROOT / "k8s" / "base" / "role-trainjobs.yaml").read_text())
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert used == granted, f"the Role grants {sorted(granted - used)} unused, lacks {sorted(used - granted)}"


@pytest.mark.parametrize("verb", ["create", "get", "delete"])
def test_each_permission_the_code_uses_is_needed(verb, setup, base_rbac, caplog):
    """Creating and reading fail the task in one line naming the permission; the clean-up's refusal is a warning."""
    authorizer = rbac.Authorizer(rbac.without_verb(base_rbac, "imgpipe-trainjobs", "trainjobs", verb))
    api = setup["fake"](authorizer=authorizer)
    needed = f"service account ml/imgpipe-pipeline may not {verb} trainjobs.trainer.kubeflow.org in namespace ml"
    if verb in ("create", "get"):
        with pytest.raises(RuntimeError) as caught:
            run(setup, api)
        message = str(caught.value)
        assert needed in message and "403 Forbidden" in message and "k8s/base/role-trainjobs.yaml" in message
        assert "\n" not in message and api.created == [], "one line; nothing runs"
        return
    with caplog.at_level("WARNING", logger="imgpipe.remote.trainjob"):
        report, _ = run(setup, api)
    assert report.step == "train" and api.objects, "the finished TrainJob stays when its delete is refused"
    assert [r for r in caplog.records if needed in r.getMessage()]


def test_kubeflow_edit_holds_the_trainjob_rights_where_trainer_is_installed():
    """Trainer v2.2.1's kubeflow-trainer-edit aggregates create/get/delete on trainjobs into kubeflow-edit."""
    trainer_edit = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "kubeflow-trainer-edit", "labels": {"rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit": "true"}},
        "rules": [
            {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "patch", "get", "list", "watch", "delete"]}
        ],
    }
    role = yaml.safe_load((ROOT / "k8s" / "base" / "role-trainjobs.yaml").read_text())
    owner = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "owner", "namespace": "ml"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
        "subjects": [{"kind": "User", "name": "owner@example.com"}],
    }
    with_trainer = rbac.Authorizer([owner], cluster_roles=[*rbac.KUBEFLOW_CLUSTER_ROLES, trainer_edit])
    assert with_trainer.uncovered("owner@example.com", "ml", role["rules"]) == []
    without = rbac.Authorizer([owner], cluster_roles=rbac.KUBEFLOW_CLUSTER_ROLES)
    assert without.uncovered("owner@example.com", "ml", role["rules"]), "without Trainer, kubeflow-edit has no trainjobs"


# ------------------------------------------------------------------ the compiled pipeline


def _compiled_tasks(ir: dict) -> dict[str, dict]:
    """Every container task of a compiled package, branches included, by display name."""
    tasks = (t for dag in ir_dags(ir) for t in dag["tasks"].values())
    return {t["taskInfo"]["name"]: t for t in tasks if "executorLabel" in ir["components"][t["componentRef"]["name"]]}


def test_the_pipeline_takes_train_nodes_and_gives_a_poller_without_gpus_what_a_trainjob_needs(tmp_path, monkeypatch):
    monkeypatch.delenv(kfp_package.GPU_ENV, raising=False)
    monkeypatch.setenv("IMGPIPE_GPU_IMAGE", "registry.test/gpu:3")
    monkeypatch.setenv("IMGPIPE_IMAGE_PULL_SECRETS", "regcred")
    package = kfp_package.compile_package(tmp_path / "p.yaml", train_gpus=2)
    ir, platform = yaml.safe_load_all(package.read_text())
    param = ir["root"]["inputDefinitions"]["parameters"]["train_nodes"]
    assert (param["parameterType"], param["defaultValue"]) == ("NUMBER_INTEGER", 1.0)
    tasks = _compiled_tasks(ir)
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def executor(name):
        return ir["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]

    def container(name):
        return ir["deploymentSpec"]["executors"][executor(name)]["container"]

    # train_nodes 1: the pod trains on its GPUs and holds no TrainJob settings.
    assert container("train")["resources"]["accelerator"]["resourceCount"] == "2"
    assert not {e["name"] for e in container("train")["env"]} & {trainjob_spec.IMAGE_ENV, trainjob_spec.NODE_RESOURCES_ENV, trainjob_spec.POD_ENV}
    # More: the poller holds no GPU, toleration, selector or /dev/shm, so a quota counts only the nodes.
    task = tasks["train-trainjob"]
    assert task["inputs"]["parameters"]["train_nodes"]["componentInputParameter"] == "pipelinechannel--train_nodes"
    res = container("train-trainjob")["resources"]
    assert "accelerator" not in res and (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("1", "1Gi")
    assert not {"tolerations", "nodeSelector", "emptyDirMounts"} & set(kube[executor("train-trainjob")])
    env = {e["name"]: e["value"] for e in container("train-trainjob")["env"]}
    assert env[trainjob_spec.IMAGE_ENV] == "registry.test/gpu:3" and env[trainjob_spec.SECRET_ENV] == "imgpipe-s3-credentials"
    node = json.loads(env[trainjob_spec.NODE_RESOURCES_ENV])
    assert node["limits"] == {"cpu": "16", "memory": "48Gi", "nvidia.com/gpu": "2"} and node["requests"]["cpu"] == "16"
    assert env[trainjob_spec.SHM_ENV] == "16Gi", "the nodes get the train task's /dev/shm"
    pod = json.loads(env[trainjob_spec.POD_ENV])
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert env[ranks.PROCS_ENV] == "2"
    assert [s["secretName"] for s in kube[executor("train-trainjob")]["imagePullSecret"]] == ["regcred"]


@pytest.mark.parametrize(("placement", "nodes"), [("pod", 2), ("trainjob", 1)])
def test_a_config_that_asks_for_another_node_count_than_the_task_was_compiled_for_is_refused(setup, monkeypatch, placement, nodes):
    monkeypatch.setattr(trainjob, "load_api", lambda: pytest.fail("no Kubernetes call"))
    monkeypatch.setattr(ranks, "launch", lambda *a: pytest.fail("no training"))
    cfg = TrainConfig(model="tiny_cnn", nodes=nodes)
    with pytest.raises(ValueError, match=rf"compiled to run .* asks for {nodes} node\(s\): the train_nodes run parameter decides"):
        dispatch.run_train(setup["data"], setup["out"], cfg, procs=1, placement=placement)


def test_only_this_jobs_output_counts_as_done(setup):
    run(setup, setup["fake"]())
    assert trainjob.committed_train(setup["data"], setup["out"], setup["cfg"]) is not None
    import dataclasses

    assert trainjob.committed_train(setup["data"], setup["out"], dataclasses.replace(setup["cfg"], epochs=2)) is None
    assert trainjob.committed_train(setup["data"] + "-other", setup["out"], setup["cfg"]) is None


def test_a_trainjob_still_running_after_its_output_is_committed_is_done_and_removed(setup):
    # A drained node's rank replaced after rank 0 committed waits for peers that have ended: the
    # TrainJob would run on to the deadline (kubeflow-1.11, three nodes, 2026-11-30).
    api = setup["fake"](script=[RUNNING] * 50)
    real_get = api.get_namespaced_custom_object
    reads = []

    def get(*args):
        obj = real_get(*args)
        reads.append(1)
        if len(reads) == 3:
            FakeTrainer._run_nodes(obj)  # rank 0 commits; the TrainJob stays Running
        return obj

    api.get_namespaced_custom_object = get
    report, said = run(setup, api)
    assert report.step == "train" and report.outputs > 0
    assert "its output is committed while it still runs" in said
    assert api.deleted == [setup["base"]] and not api.objects, "the stuck TrainJob is removed"
    assert len(reads) < 10, "not waited for until its deadline"


def test_a_trainjob_that_fails_after_its_output_is_committed_counts_as_done(setup):
    api = setup["fake"](script=[RUNNING, FAILED])
    real_get = api.get_namespaced_custom_object

    def get(*args):
        obj = real_get(*args)
        if obj["status"].get("conditions"):
            FakeTrainer._run_nodes(obj)  # committed before a replaced rank failed the JobSet
        return obj

    api.get_namespaced_custom_object = get
    report, _ = run(setup, api)
    assert report.step == "train" and api.deleted == [setup["base"]]


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (401, "Unauthorized", "did not accept the kubeconfig's credentials to read TrainJob ml/"),
        (500, "Internal Server Error", "failed to read TrainJob ml/"),
    ],
)
def test_an_api_error_while_waiting_is_one_line(setup, code, reason, expected):
    from kubernetes.client.exceptions import ApiException

    api = setup["fake"](script=[RUNNING] * 5)
    real_get = api.get_namespaced_custom_object
    reads = []

    def get(*args):
        reads.append(1)
        if len(reads) == 3:  # the token expired mid-wait, or the API server failed
            exc = ApiException(status=code, reason=reason)
            exc.body = json.dumps({"kind": "Status", "status": "Failure", "message": reason, "reason": reason, "code": code})
            raise exc
        return real_get(*args)

    api.get_namespaced_custom_object = get
    with pytest.raises(RuntimeError) as caught:
        run(setup, api)
    message = str(caught.value)
    assert "\n" not in message and expected in message and f"({code} " in message, message


def test_a_failed_read_of_the_manifest_does_not_end_the_wait(setup, monkeypatch):
    real = trainjob.committed_train
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) in (2, 3):  # the wait's reads (the first is the runner's, before anything is created)
            raise OSError("the object store did not answer")
        return real(*args)

    monkeypatch.setattr(trainjob, "committed_train", flaky)
    report, _ = run(setup, setup["fake"](script=[RUNNING, RUNNING, RUNNING, COMPLETE]))
    assert report.step == "train" and len(calls) >= 4
