"""KubeRay: the manifests in k8s/ray/ against the KubeRay v1.7 CRDs, the RayJob builder,
and create-or-attach + wait against a fake ``CustomObjectsApi`` (no cluster here).

Validation is strict: every object schema that lists its properties also gets
``additionalProperties: false``, so a misspelt field (``shutdownAfterJobFinish``)
fails here instead of being pruned silently by the API server.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from imgpipe import contract, storage
from imgpipe.kfp import client as kfp_client
from imgpipe.remote import attempts, dispatch, kube, kuberay, rayjob_spec
from imgpipe.remote.payload import step_entrypoint
from imgpipe.resize.config import ResizeConfig
from tests import rbac
from tests.remote.test_ray_jobs import commit_like_the_job, parse_entrypoint

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s" / "ray"
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)


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


@pytest.fixture(scope="module")
def validators(schemas_dir: Path) -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for kind, file in (("RayJob", "kuberay-v1.7-ray.io_rayjobs.yaml"), ("RayCluster", "kuberay-v1.7-ray.io_rayclusters.yaml")):
        # The CRDs are 1-1.4 MB of YAML: libyaml's loader reads them ten times faster.
        crd = yaml.load((schemas_dir / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return out


def validate(validators, doc: dict) -> None:
    errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def load(name: str) -> dict:
    docs = list(yaml.safe_load_all((K8S / name).read_text()))
    assert len(docs) == 1, f"{name}: one resource per file"
    return docs[0]


def containers(cluster_spec: dict) -> list[dict]:
    templates = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def check_cluster_spec(spec: dict) -> None:
    """What both manifests promise: no work on the head, autoscaling CPU workers, secrets by reference."""
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == importlib.metadata.version("ray"), "image Ray version must match the client's"
    [workers] = spec["workerGroupSpecs"]
    assert workers["groupName"] == "cpu" and 0 <= workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert workers["maxReplicas"] >= 2
    for c in containers(spec):
        assert c["image"] == rayjob_spec.IMAGE_PLACEHOLDER
        assert set(c["resources"]) == {"requests", "limits"}
        assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]
        env = {e["name"]: e for e in c["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "imgpipe-s3-credentials", "key": name}
        # Nothing secret-looking has a literal value.
        assert not [e["name"] for e in c["env"] if SECRETISH.search(e["name"]) and "value" in e]
        assert all("configMapRef" in src or "secretRef" in src for src in c.get("envFrom", []))


@pytest.mark.parametrize("folder", [K8S, K8S.parent / "ray-shared"], ids=["ray", "ray-shared"])
def test_kustomization_lists_every_manifest(folder):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component", "an opt-in piece that overlays include"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def test_an_overlay_sets_the_image_everywhere(tmp_path, validators):
    """``kubectl kustomize`` renders the base with an overlay's ``images:``, nested CR containers included."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "ml",
                "components": [os.path.relpath(K8S, tmp_path), os.path.relpath(K8S.parent / "ray-shared", tmp_path)],
                "images": [{"name": "imgpipe-ray", "newName": "registry.example.com/imgpipe-ray", "newTag": "0.1.0"}],
            }
        )
    )
    rendered = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60, check=True)
    docs = list(yaml.safe_load_all(rendered.stdout))
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob"]
    for doc in docs:
        validate(validators, doc)
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert doc["metadata"]["namespace"] == "ml"
        assert {c["image"] for c in containers(spec)} == {"registry.example.com/imgpipe-ray:0.1.0"}


def test_rayjob_template_validates_and_keeps_its_promises(validators):
    job = load("rayjob-resize.yaml")
    validate(validators, job)
    spec = job["spec"]
    check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > spec["preRunningDeadlineSeconds"] > 0
    assert spec["backoffLimit"] == 0 and spec["submissionMode"] == "K8sJobMode"
    assert spec["suspend"] is True, "applied as is, the template must not start anything"
    assert spec["entrypoint"].startswith("python -m imgpipe.remote resize ")
    step, text = shlex.split(spec["entrypoint"])[3:]
    assert set(json.loads(text)) == {"source", "dest", "config"}, "the shape imgpipe.remote.job reads"
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": {"PYTHONUNBUFFERED": "1"}}


def test_shared_raycluster_validates_and_keeps_its_promises(validators):
    cluster = load("../ray-shared/raycluster-shared.yaml")
    validate(validators, cluster)
    check_cluster_spec(cluster["spec"])
    assert cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] >= 1  # see the file: concurrency 0 sizes at start


def test_strict_validation_catches_a_misspelt_field(validators):
    job = load("rayjob-resize.yaml")
    job["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        validate(validators, job)


# ------------------------------------------------------------------ the builder


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


def test_builder_output_validates_and_carries_the_run(validators):
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    before = copy.deepcopy(template)
    job = rayjob_spec.build_rayjob(template, params())
    validate(validators, job)
    assert template == before, "the template is copied, never changed"
    assert job["metadata"]["name"] == "imgpipe-resize-0123456789abcdef" and job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["annotations"] == {"imgpipe.io/run-id": "run-7"}
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "resize"
    spec = job["spec"]
    assert spec["suspend"] is False and parse_entrypoint(spec["entrypoint"])[1:3] == ("s3://b/clean", "s3://b/resize")
    assert {c["image"] for c in containers(spec["rayClusterSpec"])} == {"registry.example.com/imgpipe-ray:0.1.0"}
    [workers] = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["replicas"], workers["maxReplicas"]) == (0, 0, 3)
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == {
        "PYTHONUNBUFFERED": "1",
        "AWS_ENDPOINT_URL": "http://minio.kubeflow:9000",
    }


def test_every_pod_of_the_rayjob_pulls_with_the_operators_secrets(validators):
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    job = rayjob_spec.build_rayjob(template, params(pull_secrets=("regcred",)))
    validate(validators, job)
    pods = rayjob_spec._pod_specs(job["spec"])
    assert len(pods) >= 3 and all(p["imagePullSecrets"] == [{"name": "regcred"}] for p in pods), "head, workers, submitter"
    assert "imagePullSecrets" not in json.dumps(rayjob_spec.build_rayjob(template, params())), "none unless named"
    assert kube.pull_secrets(" regcred, other ") == ("regcred", "other")
    with pytest.raises(ValueError, match=kube.PULL_SECRETS_ENV):
        kube.pull_secrets("Reg Cred")


def test_builder_refuses_the_image_placeholder_and_bad_counts():
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    with pytest.raises(ValueError, match=rayjob_spec.IMAGE_ENV):
        rayjob_spec.build_rayjob(template, params(image=None))
    with pytest.raises(ValueError, match="min <= max"):
        rayjob_spec.build_rayjob(template, params(min_workers=4, max_workers=2))
    with pytest.raises(ValueError, match="no worker group 'gpu'"):
        rayjob_spec.build_rayjob(template, params(worker_group="gpu"))


def test_concurrency_zero_is_sized_for_the_worker_groups_maximum():
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    sized = rayjob_spec.sized_for_autoscaling(ResizeConfig(), template, None, "cpu")
    assert sized.concurrency == 8 * 4  # maxReplicas x the CPU limit: one task per CPU
    assert rayjob_spec.sized_for_autoscaling(ResizeConfig(), template, 2, "cpu").concurrency == 8
    assert rayjob_spec.sized_for_autoscaling(ResizeConfig(concurrency=5), template, None, "cpu").concurrency == 5


def test_missing_template_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match=rayjob_spec.TEMPLATE_ENV):
        rayjob_spec.load_template(tmp_path / "rayjob-resize.yaml")


def test_the_packaged_template_is_the_one_in_k8s_ray_and_needs_no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(rayjob_spec.TEMPLATE_ENV, raising=False)
    path = rayjob_spec.template_path("resize")
    assert path.is_file(), f"{path}: imgpipe must ship the RayJob template as package data"
    assert path.read_bytes() == (K8S / "rayjob-resize.yaml").read_bytes()
    assert rayjob_spec.load_template(path)["kind"] == "RayJob"
    # One copy in the repository: each template in k8s/ray/ is packaged through a relative
    # symlink (kustomize reads k8s/ray/; the wheel gets the file).
    for template in sorted(K8S.glob("rayjob-*.yaml")):
        link = ROOT / "src" / "imgpipe" / "manifests" / template.name
        assert link.is_symlink(), f"{link} must be a symlink to {template}"
        assert os.readlink(link) == f"../../../k8s/ray/{template.name}", "relative, so it holds in any checkout"
        assert link.resolve() == template.resolve()
    custom = tmp_path / "custom.yaml"
    monkeypatch.setenv(rayjob_spec.TEMPLATE_ENV, str(custom))
    assert rayjob_spec.template_path("resize") == custom, "the environment variable still overrides it"


# ------------------------------------------------------------------ create-or-attach and wait, on a fake API

SUCCESS = [("Initializing", ""), ("Running", "PENDING"), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
# The account a pipeline's resize task runs as (k8s/base/serviceaccount-pipeline.yaml), in the
# namespace these tests use: every fake call is authorized for it against the rendered Role.
RUN_USER = rbac.service_account("ml", kfp_client.PIPELINE_SERVICE_ACCOUNT)


@pytest.fixture(scope="module")
def base_rbac(tmp_path_factory) -> list[dict]:
    """k8s/base as ``kubectl kustomize`` renders it into the namespace ``ml``."""
    return rbac.render(ROOT / "k8s" / "base", tmp_path_factory.mktemp("rbac"), namespace="ml")


@pytest.fixture(autouse=True)
def _fakes_authorize_with_the_rendered_role(base_rbac, monkeypatch):
    monkeypatch.setattr(FakeCustomObjects, "authorizer", rbac.Authorizer(base_rbac))


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


@pytest.fixture
def run_args(tmp_path, monkeypatch):
    for name in (rayjob_spec.IMAGE_ENV, rayjob_spec.MAX_WORKERS_ENV, attempts.RUN_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    source, dest = storage.normalize_uri(str(tmp_path / "clean")), storage.normalize_uri(str(tmp_path / "resize"))
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    cfg = ResizeConfig(size=16, ray_address="kuberay://ml")
    job_cfg = rayjob_spec.sized_for_autoscaling(ResizeConfig(size=16), template, None, "cpu")
    return dict(
        source=source,
        dest=dest,
        cfg=cfg,
        template=template,
        base=attempts.job_id("resize", source, dest, job_cfg, "run-7"),
        entrypoint=step_entrypoint("resize", source, dest, job_cfg),
    )


def run(api, run_args, **kwargs):
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
        poll_s=0,
        out=out,
        **kwargs,
    )
    return report, out.getvalue()


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


# ------------------------------------------------------------------ no hang, no orphans, the cluster's template
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
        kuberay.run_step_rayjob(
            "resize",
            run_args["source"],
            run_args["dest"],
            run_args["cfg"],
            namespace="ml",
            run_id="run-7",
            api=api,
            core_api=api,
            template=run_args["template"],
            image="reg/imgpipe-ray:1",
            poll_s=600,
            out=io.StringIO(),
            sleep=sleep,
            clock=lambda: now[0],
        )
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


# The API calls imgpipe.remote.kuberay makes, as (resource, RBAC verb).
CALL_VERBS = {
    "create_namespaced_custom_object": ("rayjobs", "create"),
    "get_namespaced_custom_object": ("rayjobs", "get"),
    "delete_namespaced_custom_object": ("rayjobs", "delete"),
    "list_namespaced_pod": ("pods", "list"),
    "read_namespaced_pod_log": ("pods/log", "get"),
}


class Recording:
    """Passes every call to a fake API and records which method it was."""

    def __init__(self, api) -> None:
        self.api, self.calls = api, set()

    def __getattr__(self, name):
        self.calls.add(name)
        return getattr(self.api, name)


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


# ------------------------------------------------------------------ RBAC: every permission the code uses is needed


def full_run(api, run_args):
    """The whole path: the template from the cluster, create, wait, the submitter's log, delete."""
    return run(api, {**run_args, "template": None})


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


# ------------------------------------------------------------------ an operator whose CRD prunes the fields imgpipe needs


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
