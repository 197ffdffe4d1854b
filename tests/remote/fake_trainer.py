"""A fake of each Kubeflow Trainer Kubeflow ships, for the TrainJob tests.

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
from typing import Any

import jsonschema
from kubernetes.client.exceptions import ApiException

from imgpipe.kfp import client as kfp_client
from imgpipe.remote import trainjob, trainjob_spec
from imgpipe.remote.job import main as job_main
from tests import rbac
from tests.conftest import ROOT
from tests.remote.fake_kuberay import prune

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


def _unknown_fields(sent: Any, kept: Any, path: str = "") -> list[str]:
    """The paths of ``sent`` that pruning to the schema dropped (``kept`` is the pruned copy)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        return [f for k, v in sent.items() for f in ([f"{path}{k}"] if k not in kept else _unknown_fields(v, kept[k], f"{path}{k}."))]
    if isinstance(sent, list) and isinstance(kept, list):
        return [f for a, b in zip(sent, kept) for f in _unknown_fields(a, b, path)]
    return []


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
