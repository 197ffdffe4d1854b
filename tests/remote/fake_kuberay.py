"""A fake KubeRay for the RayJob tests: a ``CustomObjectsApi`` whose "operator" advances each RayJob, and the CRD checks they share.

Every call of the fake is authorized as the pipeline's account against k8s/base as rendered
(tests/rbac.py; the ``fakes_authorize_with_the_rendered_role`` fixture), a refusal being the
API server's 403.
"""

from __future__ import annotations

import copy
import io
from typing import Any

from kubernetes.client.exceptions import ApiException

from imgpipe.kfp import client as kfp_client
from imgpipe.remote import kuberay, rayjob_spec
from imgpipe.remote.payload import step_entrypoint
from imgpipe.resize.config import ResizeConfig
from tests import rbac
from tests.conftest import ROOT
from tests.helpers import commit_like_the_job

K8S = ROOT / "k8s" / "ray"


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema that rejects properties it does not list."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        listed = "properties" in schema and "additionalProperties" not in schema
        if listed and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validate(validators, doc: dict) -> None:
    errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def params(**overrides) -> rayjob_spec.RayJobParams:
    values = dict(
        name="imgpipe-resize-0123456789abcdef",
        namespace="ml",
        entrypoint=step_entrypoint("resize", "s3://b/clean", "s3://b/resize", ResizeConfig()),
        image="registry.example.com/imgpipe-ray:0.1.0",
        max_workers=3,
        env_vars={"AWS_ENDPOINT_URL": "http://minio.kubeflow:9000"},
        annotations={"imgpipe.io/run-id": "run-7"},
    )
    values.update(overrides)
    return rayjob_spec.RayJobParams(**values)


SUCCESS = [("Initializing", ""), ("Running", "PENDING"), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
# The account a pipeline's resize task runs as (k8s/base/serviceaccount-pipeline.yaml), in the
# namespace these tests use: every fake call is authorized for it against the rendered Role.
RUN_USER = rbac.service_account("ml", kfp_client.PIPELINE_SERVICE_ACCOUNT)


def prune(obj: Any, schema: dict) -> Any:
    """Drops what a structural schema does not list, as the API server does on every write.

    Kubernetes' custom resource field pruning (apiextensions.k8s.io/v1 CRDs always prune):
    an object field not in ``properties`` goes unless the schema has
    ``x-kubernetes-preserve-unknown-fields``; ``metadata`` is the API server's own
    (the CRD schema lists it as a bare object).
    """
    if isinstance(obj, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties")
        if props is not None:
            for key in list(obj):
                if key in props:
                    obj[key] = prune(obj[key], props[key])
                elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                    del obj[key]
        elif isinstance(schema.get("additionalProperties"), dict):
            for key in obj:
                obj[key] = prune(obj[key], schema["additionalProperties"])
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in obj]
    return obj


class FakeCustomObjects:
    """A stand-in for ``CustomObjectsApi`` with an "operator" that advances a RayJob one
    status per read, and "runs" its entrypoint when it succeeds.

    Every call is authorized as :data:`RUN_USER` by ``authorizer`` (the rendered Role and
    RoleBindings; none: everything allowed), a refusal being the API server's 403 with its
    ``Status`` body. With ``schema`` (a RayJob CRD's openAPIV3Schema) a create stores and
    returns the object pruned to it, as the API server does.
    """

    authorizer: rbac.Authorizer | None = None

    def __init__(self, script=SUCCESS, message="", *, schema: dict | None = None, authorizer: rbac.Authorizer | None = None) -> None:
        self.script, self.message = list(script), message
        self.schema = schema
        if authorizer is not None:
            self.authorizer = authorizer
        self.objects: dict[tuple[str, str], dict] = {}
        self.created: list[str] = []
        self.bodies: dict[str, dict] = {}  # what each create sent, kept after a delete
        self.deleted: list[str] = []

    def authorize(self, verb, group, resource, namespace, name="", subresource="") -> None:
        """Raises the API server's 403 unless :data:`RUN_USER` may make the call."""
        request = rbac.Request(verb, group, resource, namespace, subresource, name)
        if self.authorizer is not None and not self.authorizer.allows(RUN_USER, request):
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = rbac.forbidden_status(RUN_USER, request)
            raise exc

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        self.authorize("delete", group, plural, namespace, name)
        if self.objects.pop((namespace, name), None) is None:
            raise ApiException(status=404, reason="NotFound")
        self.deleted.append(name)
        return {"kind": "Status", "status": "Success"}

    def _check(self, group, version, plural) -> None:
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs")

    def put(self, namespace, name, deployment, job="", entrypoint="", reason="", message=""):
        status = {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": reason, "message": message}
        self.objects[(namespace, name)] = {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"entrypoint": entrypoint},
            "status": status,
            "_steps": [],
        }

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._check(group, version, plural)
        self.authorize("create", group, plural, namespace)
        key = (namespace, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(key[1])
        self.bodies[key[1]] = copy.deepcopy(body)
        stored = prune(copy.deepcopy(body), self.schema) if self.schema is not None else copy.deepcopy(body)
        self.objects[key] = {**stored, "status": {}, "_steps": list(self.script)}
        return {k: copy.deepcopy(v) for k, v in self.objects[key].items() if k != "_steps"}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._check(group, version, plural)
        self.authorize("get", group, plural, namespace, name)
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="NotFound")
        if obj["_steps"]:
            deployment, job = obj["_steps"].pop(0)
            obj["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job}
            if job in ("FAILED", "STOPPED") or deployment == "Failed":
                obj["status"].update(reason="AppFailed", message=self.message)
            if job == "SUCCEEDED":
                commit_like_the_job(obj["spec"]["entrypoint"])
        return copy.deepcopy(obj)


def run(api, run_args, poll_s=0, **kwargs):
    out = io.StringIO()
    core_api = api if hasattr(api, "list_namespaced_pod") else kuberay.NO_LOGS
    report = kuberay.run_step_rayjob(
        "resize",
        run_args["source"],
        run_args["dest"],
        run_args["cfg"],
        namespace="ml",
        run_id="run-7",
        api=api,
        core_api=core_api,
        template=run_args["template"],
        image="reg/imgpipe-ray:1",
        poll_s=poll_s,
        out=out,
        **kwargs,
    )
    return report, out.getvalue()


def full_run(api, run_args):
    """The whole path: the template from the cluster, create, wait, the submitter's log, delete."""
    return run(api, {**run_args, "template": None})


# Statuses as KubeRay v1.6.0 sets them (ray-operator/controllers/ray/rayjob_controller.go): a spec the
# validator refuses stays ValidationFailed and is never requeued; a head lost in K8sJobMode ends Failed
# with SubmissionFailed once the submitter Job gives up; activeDeadlineSeconds ends Failed/DeadlineExceeded.

VALIDATION_FAILED = ("ValidationFailed", "", "ValidationFailed", "The RayJob spec is invalid: preRunningDeadlineSeconds must be a positive integer")
HEAD_EVICTED = (
    "Failed",
    "",
    "SubmissionFailed",
    "Job submission has failed. Reason: BackoffLimitExceeded. Message: Job has reached the specified backoff limit",
)


class FakeCluster(FakeCustomObjects):
    """The fake operator plus what imgpipe reads around it: deletes, the cluster's template, submitter pods and logs."""

    def __init__(self, script=SUCCESS, message="", final=None, template=None, logs=(), **kwargs) -> None:
        super().__init__(script, message, **kwargs)
        self.final = final  # (deployment, job, reason, message) the script ends in and then keeps
        self.logs = list(logs)
        if template is not None:
            self.objects[("ml", "imgpipe-resize")] = {**copy.deepcopy(template), "status": {}, "_steps": []}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        obj = super().get_namespaced_custom_object(group, version, namespace, plural, name)
        if not self.objects[(namespace, name)]["_steps"] and self.final and name != "imgpipe-resize":
            deployment, job, reason, message = self.final
            self.objects[(namespace, name)]["status"] = obj["status"] = {
                "jobDeploymentStatus": deployment,
                "jobStatus": job,
                "reason": reason,
                "message": message,
            }
        return obj

    # CoreV1Api: the submitter Job's pod (label job-name=<rayjob>) and its log.
    def list_namespaced_pod(self, namespace, label_selector=""):
        from types import SimpleNamespace

        self.authorize("list", "", "pods", namespace)
        name = label_selector.split("=", 1)[1]
        pods = [SimpleNamespace(metadata=SimpleNamespace(name=f"{name}-x7k2p", creation_timestamp=1))] if self.logs else []
        return SimpleNamespace(items=pods)

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        self.authorize("get", "", "pods", namespace, name, subresource="log")
        return "\n".join(self.logs[: len(self.logs)]) + "\n"


class Recording:
    """Passes every call to a fake API and records which method it was."""

    def __init__(self, api) -> None:
        self.api, self.calls = api, set()

    def __getattr__(self, name):
        self.calls.add(name)
        return getattr(self.api, name)
