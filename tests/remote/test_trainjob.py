"""Training across nodes as a Kubeflow Trainer TrainJob, against a fake of each Trainer Kubeflow ships.

No cluster here: :class:`FakeTrainer` stands in for the API server and the Trainer
controller as kubeflow/trainer has them at v2.1.0 (commit 73c9bec, what kubeflow/manifests
v1.11.0 and 26.03 ship) and at v2.2.1 (commit c505fc7); every test that creates a TrainJob
runs against both (tests/contracts/trainer-kserve/README.md has the facts and citations):

* the CRD (``manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml``, vendored in
  tests/schemas and tests/contracts/trainer-kserve): fields the schema lacks are pruned, or
  with ``fieldValidation=Strict`` refused with the API server's 400 ``strict decoding error:
  unknown field``; the rest is validated against the schema (422), with its CEL name rules
  (RFC 1035 label, at most 63 characters), and stored pruned;
* the validating webhook ``validator.trainjob.trainer.kubeflow.org``
  (``pkg/webhooks/trainjob_webhook.go``): the runtime must exist, and the torch plugin refuses
  the ``PET_*`` variables it sets itself; a denial is the API server's 403 ``admission webhook
  "..." denied the request: ...`` (controller-runtime's ``Denied``), not RBAC's;
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
from imgpipe.kfp import package as kfp_package
from imgpipe.remote import dispatch, ranks, trainjob, trainjob_spec
from imgpipe.remote.attempts import attempt_id, job_id
from imgpipe.remote.job import main as job_main
from imgpipe.train.config import TrainConfig
from tests import rbac
from tests.remote.test_kuberay import Recording, prune, strict
from tests.train.test_loader import write_resize_output

# No test here checks the ONNX or TorchScript exports (tests/train/test_export.py does).
pytestmark = pytest.mark.usefixtures("no_exports")

ROOT = Path(__file__).resolve().parents[2]
RUN_USER = rbac.service_account("ml", kfp_client.PIPELINE_SERVICE_ACCOUNT)
# The TrainJob CRD of each Trainer release kubeflow/manifests ships or imgpipe supports.
CRDS = {
    "v2.1.0": ROOT / "tests" / "contracts" / "trainer-kserve" / "kubeflow-trainer-v2.1.0-trainer.kubeflow.org_trainjobs.yaml",
    "v2.2.1": ROOT / "tests" / "schemas" / "kubeflow-trainer-v2.2.1-trainer.kubeflow.org_trainjobs.yaml",
}
WEBHOOK = "validator.trainjob.trainer.kubeflow.org"
RUNTIMES = ("torch-distributed", "deepspeed-distributed", "mlx-distributed", "jax-distributed", "xgboost-distributed")
TORCH_RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# Controller steps a TrainJob walks through, one per read: the JobSet running, then its end.
RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}]}
COMPLETE = {"type": "Complete", "status": "True", "reason": "AllJobsCompleted", "message": "jobset completed successfully"}
FAILED = {
    "type": "Failed",
    "status": "True",
    "reason": "FailedJobs",
    "message": "jobset failed due to one or more job failures (first failed job: {name}-node-0)",
}
SUCCESS = [RUNNING, COMPLETE]


@pytest.fixture(scope="module")
def trainjob_schemas() -> dict[str, dict]:
    """Each vendored TrainJob CRD's ``v1alpha1`` schema, by Trainer release."""
    out = {}
    for release, path in CRDS.items():
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        out[release] = version["schema"]["openAPIV3Schema"]
    return out


# For a test that installs the CRDs it needs itself: the release of ``setup`` would only repeat it.
ONE_RELEASE = pytest.mark.parametrize("trainer_release", [next(iter(CRDS))])


@pytest.fixture(params=list(CRDS))
def trainer_release(request) -> str:
    return request.param


@pytest.fixture
def trainjob_schema(trainjob_schemas, trainer_release) -> dict:
    return trainjob_schemas[trainer_release]


def _unknown_fields(sent: Any, kept: Any, path: str = "") -> list[str]:
    """The paths of ``sent`` that pruning to the schema dropped (``kept`` is the pruned copy)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        return [f for k, v in sent.items() for f in ([f"{path}{k}"] if k not in kept else _unknown_fields(v, kept[k], f"{path}{k}."))]
    if isinstance(sent, list) and isinstance(kept, list):
        return [f for a, b in zip(sent, kept) for f in _unknown_fields(a, b, path)]
    return []


@pytest.fixture(scope="module")
def base_rbac(tmp_path_factory) -> list[dict]:
    return rbac.render(ROOT / "k8s" / "base", tmp_path_factory.mktemp("rbac"), namespace="ml")


class FakeTrainer:
    """A ``CustomObjectsApi`` for TrainJobs, with one Trainer release's CRD, webhook and controller."""

    def __init__(self, schema: dict, authorizer: rbac.Authorizer | None, script=SUCCESS, *, run_nodes=True) -> None:
        self.schema, self.validator = schema, jsonschema.Draft7Validator(schema)
        self.authorizer, self.script, self.run_nodes = authorizer, list(script), run_nodes
        self.objects: dict[tuple[str, str], dict] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.sent: dict[str, dict] = {}

    def _authorize(self, verb, namespace, name="") -> None:
        request = rbac.Request(verb, trainjob_spec.GROUP, trainjob_spec.PLURAL, namespace, "", name)
        if self.authorizer is not None and not self.authorizer.allows(RUN_USER, request):
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = rbac.forbidden_status(RUN_USER, request)
            raise exc

    @staticmethod
    def _check(group, version, plural) -> None:
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")

    @staticmethod
    def _status(code: int, reason: str, message: str) -> ApiException:
        exc = ApiException(status=code, reason=reason)
        exc.body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
        return exc

    def _admit(self, body: dict, field_validation: str | None) -> dict:
        """Decoding (unknown fields), the schema with its CEL rules, then the validating webhook; returns the object as stored."""
        name = body["metadata"]["name"]
        stored = prune(copy.deepcopy(body), self.schema)
        unknown = _unknown_fields(body, stored)
        if unknown and field_validation == "Strict":  # apiserver: strict decoding refuses, 400, nothing is created
            fields = ", ".join(f'unknown field "{f}"' for f in unknown)
            raise self._status(400, "BadRequest", f'TrainJob in version "v1alpha1" cannot be handled as a TrainJob: strict decoding error: {fields}')
        causes = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in self.validator.iter_errors(stored)]
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            causes.append("metadata.name must match RFC 1035 DNS label format")
        if len(name) > 63:
            causes.append("metadata.name must be no more than 63 characters")
        if causes:
            raise self._status(422, "Invalid", f'TrainJob.trainer.kubeflow.org "{name}" is invalid: {"; ".join(causes)}')
        runtime = stored["spec"].get("runtimeRef", {}).get("name")
        denials = []
        if runtime not in RUNTIMES:
            denials.append(f"unsupported runtime: {{kind: ClusterTrainingRuntime, name: {runtime}}}")
        reserved = [e for e in stored["spec"].get("trainer", {}).get("env", []) if e["name"] in TORCH_RESERVED]
        if reserved:
            denials.append(
                f"spec.trainer.env: Invalid value: {json.dumps(reserved)}: must not have reserved envs, "
                f"invalid envs configured: [{' '.join(e['name'] for e in reserved)}]"
            )
        if denials:
            raise self._status(403, "Forbidden", f'admission webhook "{WEBHOOK}" denied the request: {"; ".join(denials)}')
        return stored

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, field_validation=None):
        self._check(group, version, plural)
        self._authorize("create", namespace)
        name = body["metadata"]["name"]
        if (namespace, name) in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        stored = self._admit(body, field_validation)
        self.created.append(name)
        self.sent[name] = copy.deepcopy(body)
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


# What a GPU build compiles into the train task (pipelines/options.py, trainjob_settings).
GPU_NODE = {"requests": {"cpu": "32", "memory": "48Gi"}, "limits": {"cpu": "32", "memory": "48Gi", "nvidia.com/gpu": "4"}}
GPU_POD = {
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
    "imagePullSecrets": [{"name": "regcred"}],
}


@pytest.fixture
def setup(tmp_path, monkeypatch, trainjob_schema, base_rbac):
    for name in (trainjob_spec.IMAGE_ENV, trainjob_spec.SECRET_ENV, trainjob_spec.MAX_NODES_ENV, trainjob_spec.SHM_ENV, "IMGPIPE_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(trainjob_spec.NODE_RESOURCES_ENV, json.dumps(GPU_NODE))
    monkeypatch.setenv(trainjob_spec.POD_ENV, json.dumps(GPU_POD))
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
        setup["data"],
        setup["out"],
        setup["cfg"],
        procs=4,
        namespace="ml",
        run_id="run-9",
        api=api,
        image="reg/imgpipe-gpu:1",
        secret="imgpipe-s3-credentials",
        poll_s=0,
        stream=stream,
        **kwargs,
    )
    return report, stream.getvalue()


def _node_pod(body: dict) -> tuple[dict, dict]:
    """The node pods' metadata and spec a TrainJob sets, in either Trainer's form."""
    spec = body["spec"]
    if "podTemplateOverrides" in spec:  # Trainer 2.1
        (override,) = spec["podTemplateOverrides"]
        assert override["targetJobs"] == [{"name": "node"}]
        return override["metadata"], override["spec"]
    (patch,) = spec["runtimePatches"]  # Trainer 2.2
    assert patch["manager"] == trainjob_spec.PATCH_MANAGER
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"  # torch_distributed.yaml names its replicated job and container "node"
    return job["template"]["spec"]["template"]["metadata"], job["template"]["spec"]["template"]["spec"]


def test_the_trainjob_validates_against_each_trainer_and_carries_the_run(setup, trainjob_schema, trainer_release):
    api = setup["fake"]()
    report, printed = run(setup, api)
    (name,) = api.created
    body = api.sent[name]
    assert not list(jsonschema.Draft7Validator(strict(trainjob_schema)).iter_errors(body)), "no field the release lacks"
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"}
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 4, "reg/imgpipe-gpu:1")
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4", "one GPU per process"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e}
    assert secrets == {k: {"name": "imgpipe-s3-credentials", "key": k} for k in storage.SECRET_ENV}
    assert not [e for e in trainer["env"] if "value" in e and re.search("SECRET|KEY_ID", e["name"])], "no key in clear"
    # v2.2 ends the TrainJob at its deadline; v2.1 has no such field (the wait's deadline deletes it).
    assert spec.get("activeDeadlineSeconds") == (trainjob_spec.DEFAULT_ACTIVE_DEADLINE_S if trainer_release >= "v2.2" else None)
    meta, pod = _node_pod(body)
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}, "torch's rendezvous stays out of the mesh"
    assert (pod["tolerations"], pod["nodeSelector"], pod["imagePullSecrets"]) == (
        GPU_POD["tolerations"],
        GPU_POD["nodeSelector"],
        GPU_POD["imagePullSecrets"],
    )
    labels = body["metadata"]["labels"]
    assert labels["imgpipe.dev/step"] == "train" and labels["imgpipe.dev/run-id"] == "run-9"
    # The nodes ran the resolved config; the output is committed and the TrainJob deleted.
    assert report.step == "train" and contract.read_manifest(setup["out"])["config"]["nodes"] == 2
    assert api.deleted == [name] and not api.objects
    assert "Complete AllJobsCompleted jobset completed successfully" in printed


def test_every_node_gets_a_memory_backed_dev_shm(setup, trainjob_schema, monkeypatch):
    monkeypatch.setenv(trainjob_spec.SHM_ENV, "16Gi")
    api = setup["fake"]()
    run(setup, api)
    body = api.sent[api.created[0]]
    assert not list(jsonschema.Draft7Validator(strict(trainjob_schema)).iter_errors(body))
    _, pod = _node_pod(body)
    assert pod["containers"][0]["name"] == "node"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    params = dict(name="x", namespace="ml", image="i:1", nodes=2, procs_per_node=1, args=[])
    for bad in ("16 GiB", "-1Gi", "lots", "16Gi; rm"):
        with pytest.raises(ValueError, match=trainjob_spec.SHM_ENV):
            trainjob_spec.build_trainjob(trainjob_spec.TrainJobParams(shm_size=bad, **params))


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


def test_a_cpu_build_asks_for_no_gpu_on_any_node(setup, monkeypatch):
    monkeypatch.setenv(trainjob_spec.NODE_RESOURCES_ENV, json.dumps({"requests": {"cpu": "8"}, "limits": {"cpu": "8", "memory": "48Gi"}}))
    monkeypatch.setenv(trainjob_spec.POD_ENV, "")
    api = setup["fake"]()
    run(setup, api)
    body = api.sent[api.created[0]]
    assert "nvidia.com/gpu" not in json.dumps(body), "no GPU limit, toleration or selector"
    meta, pod = _node_pod(body)
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false"} and "tolerations" not in pod


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


def test_reserved_torchrun_variables_and_a_missing_image_are_refused_before_any_call():
    base = dict(name="x", namespace="ml", nodes=2, procs_per_node=1, args=[])
    with pytest.raises(ValueError, match="PET_NNODES"):
        trainjob_spec.build_trainjob(trainjob_spec.TrainJobParams(image="i:1", env={"PET_NNODES": "9"}, **base))
    with pytest.raises(ValueError, match=trainjob_spec.IMAGE_ENV):
        trainjob_spec.build_trainjob(trainjob_spec.TrainJobParams(image="", **base))


@pytest.mark.parametrize("nodes", [0, -2, 5, 65])
def test_node_counts_out_of_range_are_refused(nodes, monkeypatch):
    monkeypatch.delenv(trainjob_spec.MAX_NODES_ENV, raising=False)
    with pytest.raises((ValueError, TypeError), match=r"nodes must be an integer in \[1, "):
        trainjob_spec.check_nodes(nodes) if nodes <= 64 else TrainConfig(model="tiny_cnn", nodes=nodes)


def test_the_operator_sets_the_cap_and_a_run_cannot_raise_it(monkeypatch):
    monkeypatch.setenv(trainjob_spec.MAX_NODES_ENV, "16")
    assert trainjob_spec.check_nodes(16) == 16
    monkeypatch.setenv(trainjob_spec.MAX_NODES_ENV, "many")
    with pytest.raises(ValueError, match=trainjob_spec.MAX_NODES_ENV):
        trainjob_spec.check_nodes(2)
    with pytest.raises(TypeError):
        trainjob_spec.check_nodes("2")


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


def test_the_node_resources_come_from_the_task_and_are_checked():
    text = json.dumps({"requests": {"cpu": "16"}, "limits": {"cpu": "16", "memory": "48Gi", "nvidia.com/gpu": "2"}})
    assert trainjob_spec.node_resources(2, text)["limits"]["nvidia.com/gpu"] == "2"
    assert trainjob_spec.node_resources(3, "") == {}, "a CPU build: no GPU unless the compiled resources ask for one"
    for bad in ("{", '["cpu"]', '{"limits": 4}', '{"cpus": {}}'):
        with pytest.raises(ValueError, match=trainjob_spec.NODE_RESOURCES_ENV):
            trainjob_spec.node_resources(1, bad)
    with pytest.raises(ValueError, match="processes run on each"):
        trainjob_spec.node_resources(4, text)
    for bad in ("{", '{"env": []}', "[]"):
        with pytest.raises(ValueError, match=trainjob_spec.POD_ENV):
            trainjob_spec.pod_settings(bad)


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
    dags = [ir["root"]["dag"]] + [c["dag"] for c in ir["components"].values() if "dag" in c]
    return {t["taskInfo"]["name"]: t for dag in dags for t in dag["tasks"].values() if "executorLabel" in ir["components"][t["componentRef"]["name"]]}


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
