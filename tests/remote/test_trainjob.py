"""Training across nodes as a Kubeflow Trainer TrainJob, against a fake that behaves as Trainer v2.2.1.

No cluster here: :class:`FakeTrainer` stands in for the API server and the Trainer
controller as kubeflow/trainer at tag v2.2.1 (commit c505fc7) has them:

* the CRD (``manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml``, vendored in
  tests/schemas): a create is validated against its schema strictly, with its CEL name
  rules (RFC 1035 label, at most 63 characters), and stored pruned to it;
* the validating webhook (``pkg/webhooks/trainjob_webhook.go``): the runtime must exist
  ("specified clusterTrainingRuntime must be created before the TrainJob is created"), and
  the torch plugin refuses the ``PET_*`` variables it sets itself;
* the controller: no condition while the JobSet runs (``status.jobsStatus`` only), then the
  JobSet's ``Completed``/``Failed`` condition copied as ``Complete``/``Failed`` with its
  reason and message (``pkg/runtime/framework/plugins/jobset/jobset.go``). A successful
  TrainJob "runs" its nodes' command: ``python -m imgpipe.remote train PAYLOAD`` in-process;
* RBAC: every call is authorized as the run's service account against k8s/base as rendered
  (tests/rbac.py), a refusal being the API server's 403.
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from imgpipe import contract, storage
from imgpipe.kfp import client as kfp_client
from imgpipe.remote import dispatch, ranks, trainjob
from imgpipe.remote.job import main as job_main
from imgpipe.remote.ray_jobs import attempt_id, job_id
from imgpipe.train.config import TrainConfig
from tests import rbac
from tests.remote.test_kuberay import Recording, prune, strict
from tests.train.test_loader import write_resize_output

ROOT = Path(__file__).resolve().parents[2]
RUN_USER = rbac.service_account("ml", kfp_client.PIPELINE_SERVICE_ACCOUNT)
CRD = "kubeflow-trainer-v2.2.1-trainer.kubeflow.org_trainjobs.yaml"
RUNTIMES = ("torch-distributed", "deepspeed-distributed", "mlx-distributed", "jax-distributed", "xgboost-distributed")
TORCH_RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# Controller steps a TrainJob walks through, one per read: the JobSet running, then its end.
RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}]}
COMPLETE = {"type": "Complete", "status": "True", "reason": "AllJobsCompleted", "message": "jobset completed successfully"}
FAILED = {
    "type": "Failed", "status": "True", "reason": "FailedJobs",
    "message": "jobset failed due to one or more job failures (first failed job: {name}-node-0)",
}  # fmt: skip
SUCCESS = [RUNNING, COMPLETE]


@pytest.fixture(scope="module")
def trainjob_schema(schemas_dir: Path) -> dict:
    crd = yaml.load((schemas_dir / CRD).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def base_rbac(tmp_path_factory) -> list[dict]:
    return rbac.render(ROOT / "k8s" / "base", tmp_path_factory.mktemp("rbac"), namespace="ml")


class FakeTrainer:
    """A ``CustomObjectsApi`` for TrainJobs, with Trainer v2.2.1's validation, webhook and controller."""

    def __init__(self, schema: dict, authorizer: rbac.Authorizer | None, script=SUCCESS, *, run_nodes=True) -> None:
        self.schema, self.validator = schema, jsonschema.Draft7Validator(strict(schema))
        self.authorizer, self.script, self.run_nodes = authorizer, list(script), run_nodes
        self.objects: dict[tuple[str, str], dict] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.sent: dict[str, dict] = {}

    def _authorize(self, verb, namespace, name="") -> None:
        request = rbac.Request(verb, trainjob.GROUP, trainjob.PLURAL, namespace, "", name)
        if self.authorizer is not None and not self.authorizer.allows(RUN_USER, request):
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = rbac.forbidden_status(RUN_USER, request)
            raise exc

    @staticmethod
    def _check(group, version, plural) -> None:
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")

    def _invalid(self, name: str, causes: list[str]) -> ApiException:
        exc = ApiException(status=422, reason="Unprocessable Entity")
        exc.body = json.dumps({"kind": "Status", "reason": "Invalid", "code": 422,
                               "message": f'TrainJob.trainer.kubeflow.org "{name}" is invalid: {"; ".join(causes)}'})  # fmt: skip
        return exc

    def _admit(self, body: dict) -> None:
        """The schema, its CEL rules and the validating webhook, as the API server runs them on a create."""
        name = body["metadata"]["name"]
        causes = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in self.validator.iter_errors(body)]
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            causes.append("metadata.name must match RFC 1035 DNS label format")
        if len(name) > 63:
            causes.append("metadata.name must be no more than 63 characters")
        runtime = body["spec"].get("runtimeRef", {}).get("name")
        if runtime not in RUNTIMES:
            causes.append(f"spec.runtimeRef: Invalid value: {runtime!r}: specified clusterTrainingRuntime must be created before the TrainJob is created")
        reserved = [e["name"] for e in body["spec"].get("trainer", {}).get("env", []) if e["name"] in TORCH_RESERVED]
        if reserved:
            causes.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}")
        if causes:
            raise self._invalid(name, causes)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._check(group, version, plural)
        self._authorize("create", namespace)
        name = body["metadata"]["name"]
        if (namespace, name) in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self._admit(body)
        self.created.append(name)
        self.sent[name] = copy.deepcopy(body)
        stored = prune(copy.deepcopy(body), self.schema)
        self.objects[(namespace, name)] = {**stored, "status": {}, "_steps": [copy.deepcopy(s) for s in self.script]}
        return {k: copy.deepcopy(v) for k, v in self.objects[(namespace, name)].items() if k != "_steps"}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._check(group, version, plural)
        self._authorize("get", namespace, name)
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="NotFound")
        if obj["_steps"]:
            step = obj["_steps"].pop(0)
            if "type" in step:
                condition = {**step, "message": step["message"].format(name=name)}
                obj["status"] = {**obj["status"], "conditions": [condition]}
                if step["type"] == "Complete" and self.run_nodes:
                    self._run_nodes(obj)
            else:
                obj["status"] = {**obj["status"], **step}
        return {k: copy.deepcopy(v) for k, v in obj.items() if k != "_steps"}

    @staticmethod
    def _run_nodes(obj: dict) -> None:
        """What the nodes' torchrun runs, in this process (one rank): ``python -m imgpipe.remote train PAYLOAD``."""
        trainer = obj["spec"]["trainer"]
        assert trainer["command"] == ["torchrun"] and trainer["args"][:2] == ["-m", "imgpipe.remote"]
        assert job_main(trainer["args"][2:]) == 0

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        self._authorize("delete", namespace, name)
        if self.objects.pop((namespace, name), None) is None:
            raise ApiException(status=404, reason="NotFound")
        self.deleted.append(name)  # the JobSet and its pods follow (owner references)
        return {"kind": "Status", "status": "Success"}


@pytest.fixture
def setup(tmp_path, monkeypatch, trainjob_schema, base_rbac):
    for name in (trainjob.IMAGE_ENV, trainjob.NODE_RESOURCES_ENV, trainjob.SECRET_ENV, trainjob.MAX_NODES_ENV, trainjob.SHM_ENV, "IMGPIPE_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    data = write_resize_output("file://" + str(tmp_path / "resize"), classes=3, size=16)
    out = "file://" + str(tmp_path / "train")
    cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=4, num_workers=0, device="cpu", shuffle_buffer=8, nodes=2)

    def fake(script=SUCCESS, authorizer: Any = "role", **kwargs) -> FakeTrainer:
        chosen = rbac.Authorizer(base_rbac) if authorizer == "role" else authorizer
        return FakeTrainer(trainjob_schema, chosen, script, **kwargs)

    return {"data": data, "out": out, "cfg": cfg, "fake": fake, "base": job_id("train", data, out, cfg, "run-9")}


def run(setup, api, **kwargs):
    stream = io.StringIO()
    report = trainjob.run_train_job(
        setup["data"], setup["out"], setup["cfg"], procs=4, namespace="ml", run_id="run-9", api=api,
        image="reg/imgpipe-gpu:1", secret="imgpipe-s3-credentials", poll_s=0, stream=stream, **kwargs,
    )  # fmt: skip
    return report, stream.getvalue()


def test_the_trainjob_validates_against_trainer_v221_and_carries_the_run(setup, trainjob_schema):
    api = setup["fake"]()
    report, printed = run(setup, api)
    (name,) = api.created
    body = api.sent[name]
    assert not list(jsonschema.Draft7Validator(strict(trainjob_schema)).iter_errors(body))
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"}
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 4, "reg/imgpipe-gpu:1")
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4", "one GPU per process"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e}
    assert secrets == {k: {"name": "imgpipe-s3-credentials", "key": k} for k in storage.SECRET_ENV}
    assert not [e for e in trainer["env"] if "value" in e and re.search("SECRET|KEY_ID", e["name"])], "no key in clear"
    assert spec["activeDeadlineSeconds"] == trainjob.DEFAULT_ACTIVE_DEADLINE_S
    labels = body["metadata"]["labels"]
    assert labels["imgpipe.dev/step"] == "train" and labels["imgpipe.dev/run-id"] == "run-9"
    # The nodes ran the resolved config; the output is committed and the TrainJob deleted.
    assert report.step == "train" and contract.read_manifest(setup["out"])["config"]["nodes"] == 2
    assert api.deleted == [name] and not api.objects
    assert "Complete AllJobsCompleted jobset completed successfully" in printed


def test_every_node_gets_a_memory_backed_dev_shm_through_runtime_patches(setup, trainjob_schema, monkeypatch):
    monkeypatch.setenv(trainjob.SHM_ENV, "16Gi")
    api = setup["fake"]()
    run(setup, api)
    body = api.sent[api.created[0]]
    assert not list(jsonschema.Draft7Validator(strict(trainjob_schema)).iter_errors(body))
    (patch,) = body["spec"]["runtimePatches"]
    assert patch["manager"] == trainjob.PATCH_MANAGER
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    # torch_distributed.yaml at v2.2.1 names its replicated job and its container "node".
    assert job["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    for bad in ("16 GiB", "-1Gi", "lots", "16Gi; rm"):
        with pytest.raises(ValueError, match=trainjob.SHM_ENV):
            trainjob.shm_patch(bad)


def test_a_crd_without_runtime_patches_prunes_them_and_the_trainjob_is_deleted(setup, trainjob_schema, monkeypatch):
    # v2.1's CRD set pod volumes through podTemplateOverrides; runtimePatches is v2.2's.
    monkeypatch.setenv(trainjob.SHM_ENV, "16Gi")
    old = copy.deepcopy(trainjob_schema)
    del old["properties"]["spec"]["properties"]["runtimePatches"]
    api = FakeTrainer(old, None, SUCCESS)
    api.validator = jsonschema.Draft7Validator({})
    with pytest.raises(RuntimeError, match=r"dropped spec.runtimePatches .*Kubeflow Trainer >= 2.2.0"):
        run(setup, api)
    assert api.deleted == api.created and not api.objects


def test_a_retry_after_the_output_is_committed_creates_nothing(setup):
    run(setup, setup["fake"]())
    again = setup["fake"]()
    report, _ = run(setup, again)
    assert again.created == [] and report.step == "train"


def test_a_retry_attaches_to_the_running_trainjob_and_never_starts_a_second(setup):
    api = setup["fake"]()
    with pytest.raises(TimeoutError):  # the first attempt of the task gives up waiting (a pod restart, say)
        run(setup, api, active_deadline_s=1, clock=iter(range(0, 10**6, 10**4)).__next__)
    assert len(api.created) == 1
    report, _ = run(setup, api)  # the retried task
    assert len(api.created) == 1, "attached, not created again"
    assert report.step == "train"


def test_409_attaches_to_the_trainjob_another_submitter_created(setup):
    api = setup["fake"]()
    name = setup["base"]
    body = trainjob.build_trainjob(trainjob.TrainJobParams(name=name, namespace="ml", image="reg/x:1", nodes=2, procs_per_node=4,
                                                           args=["-m", "imgpipe.remote", "train", "{}"]))  # fmt: skip
    created, new = trainjob._create_or_attach(api, body)
    again, new_again = trainjob._create_or_attach(api, body)
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


def test_an_older_trainers_crd_prunes_the_deadline_and_the_trainjob_is_deleted(setup, trainjob_schema):
    # kubeflow/trainer v2.1.0's CRD has no spec.activeDeadlineSeconds (added in v2.2.0).
    old = copy.deepcopy(trainjob_schema)
    del old["properties"]["spec"]["properties"]["activeDeadlineSeconds"]
    api = FakeTrainer(old, None, SUCCESS)
    api.validator = jsonschema.Draft7Validator({})  # the old API server accepts it, then prunes the field
    with pytest.raises(RuntimeError, match=r"dropped spec.activeDeadlineSeconds .*Kubeflow Trainer >= 2.2.0"):
        run(setup, api)
    assert api.deleted == api.created and not api.objects, "deleted before it could run without a deadline"


def test_the_webhook_refuses_a_runtime_that_is_not_installed(setup, monkeypatch):
    monkeypatch.setattr(trainjob, "RUNTIME", "torch-distributed-v9")
    with pytest.raises(RuntimeError, match="must be created before the TrainJob is created"):
        run(setup, setup["fake"]())


def test_reserved_torchrun_variables_and_a_missing_image_are_refused_before_any_call():
    base = dict(name="x", namespace="ml", nodes=2, procs_per_node=1, args=[])
    with pytest.raises(ValueError, match="PET_NNODES"):
        trainjob.build_trainjob(trainjob.TrainJobParams(image="i:1", env={"PET_NNODES": "9"}, **base))
    with pytest.raises(ValueError, match=trainjob.IMAGE_ENV):
        trainjob.build_trainjob(trainjob.TrainJobParams(image="", **base))


@pytest.mark.parametrize("nodes", [0, -2, 5, 65])
def test_node_counts_out_of_range_are_refused(nodes, monkeypatch):
    monkeypatch.delenv(trainjob.MAX_NODES_ENV, raising=False)
    with pytest.raises((ValueError, TypeError), match="nodes must be between 1 and"):
        trainjob.check_nodes(nodes) if nodes <= 64 else TrainConfig(model="tiny_cnn", nodes=nodes)


def test_the_operator_sets_the_cap_and_a_run_cannot_raise_it(monkeypatch):
    monkeypatch.setenv(trainjob.MAX_NODES_ENV, "16")
    assert trainjob.check_nodes(16) == 16
    monkeypatch.setenv(trainjob.MAX_NODES_ENV, "many")
    with pytest.raises(ValueError, match=trainjob.MAX_NODES_ENV):
        trainjob.check_nodes(2)
    with pytest.raises(TypeError):
        trainjob.check_nodes("2")


def test_dispatch_refuses_more_nodes_than_the_cap_before_any_api_call(setup, monkeypatch):
    monkeypatch.setenv(trainjob.MAX_NODES_ENV, "2")

    def no_api():
        raise AssertionError("no Kubernetes call for a refused count")

    monkeypatch.setattr(trainjob, "load_api", no_api)
    cfg = TrainConfig(model="tiny_cnn", nodes=3)
    with pytest.raises(ValueError, match="between 1 and 2"):
        dispatch.run_train(setup["data"], setup["out"], cfg, procs=1)


def test_dispatch_runs_one_node_in_the_pod_and_more_as_a_trainjob(setup, monkeypatch):
    calls = []
    monkeypatch.setattr(ranks, "launch", lambda data, out, cfg, procs: calls.append(("pod", procs)))
    monkeypatch.setattr(trainjob, "run_train_job", lambda data, out, cfg, *, procs, run_id: calls.append(("trainjob", procs, run_id)))
    dispatch.run_train(setup["data"], setup["out"], TrainConfig(model="tiny_cnn"), procs=2)
    dispatch.run_train(setup["data"], setup["out"], setup["cfg"], procs=2, run_id="r")
    assert calls == [("pod", 2), ("trainjob", 2, "r")]


def test_the_node_resources_come_from_the_task_and_are_checked():
    text = json.dumps({"requests": {"cpu": "16"}, "limits": {"cpu": "16", "memory": "48Gi", "nvidia.com/gpu": "2"}})
    assert trainjob.node_resources(2, text)["limits"]["nvidia.com/gpu"] == "2"
    assert trainjob.node_resources(3, "")["limits"] == {"nvidia.com/gpu": "3"}
    for bad in ("{", '["cpu"]', '{"limits": 4}', '{"cpus": {}}'):
        with pytest.raises(ValueError, match=trainjob.NODE_RESOURCES_ENV):
            trainjob.node_resources(1, bad)


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
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "kubeflow-trainer-edit", "labels": {"rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit": "true"}},
        "rules": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "patch", "get", "list", "watch", "delete"]}],
    }  # fmt: skip
    role = yaml.safe_load((ROOT / "k8s" / "base" / "role-trainjobs.yaml").read_text())
    owner = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "owner", "namespace": "ml"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
             "subjects": [{"kind": "User", "name": "owner@example.com"}]}  # fmt: skip
    with_trainer = rbac.Authorizer([owner], cluster_roles=[*rbac.KUBEFLOW_CLUSTER_ROLES, trainer_edit])
    assert with_trainer.uncovered("owner@example.com", "ml", role["rules"]) == []
    without = rbac.Authorizer([owner], cluster_roles=rbac.KUBEFLOW_CLUSTER_ROLES)
    assert without.uncovered("owner@example.com", "ml", role["rules"]), "without Trainer, kubeflow-edit has no trainjobs"


# ------------------------------------------------------------------ the compiled pipeline


def test_the_pipeline_takes_train_nodes_and_gives_the_train_task_what_a_trainjob_needs(tmp_path, monkeypatch):
    monkeypatch.delenv(kfp_client.GPU_ENV, raising=False)
    monkeypatch.setenv("IMGPIPE_GPU_IMAGE", "registry.test/gpu:3")
    package = kfp_client.compile_package(tmp_path / "p.yaml", train_gpus=2)
    ir = next(yaml.safe_load_all(package.read_text()))
    param = ir["root"]["inputDefinitions"]["parameters"]["train_nodes"]
    assert (param["parameterType"], param["defaultValue"]) == ("NUMBER_INTEGER", 1.0)
    (task,) = [t for t in ir["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == "train"]
    assert task["inputs"]["parameters"]["train_nodes"]["componentInputParameter"] == "train_nodes"
    executor = ir["components"][task["componentRef"]["name"]]["executorLabel"]
    env = {e["name"]: e["value"] for e in ir["deploymentSpec"]["executors"][executor]["container"]["env"]}
    assert env[trainjob.IMAGE_ENV] == "registry.test/gpu:3" and env[trainjob.SECRET_ENV] == "imgpipe-s3-credentials"
    node = json.loads(env[trainjob.NODE_RESOURCES_ENV])
    assert node["limits"] == {"cpu": "16", "memory": "48Gi", "nvidia.com/gpu": "2"} and node["requests"]["cpu"] == "16"
    assert env[trainjob.SHM_ENV] == "16Gi", "the nodes get the train task's /dev/shm"


def test_only_this_jobs_output_counts_as_done(setup):
    run(setup, setup["fake"]())
    assert trainjob.committed_train(setup["data"], setup["out"], setup["cfg"]) is not None
    import dataclasses

    assert trainjob.committed_train(setup["data"], setup["out"], dataclasses.replace(setup["cfg"], epochs=2)) is None
    assert trainjob.committed_train(setup["data"] + "-other", setup["out"], setup["cfg"]) is None
