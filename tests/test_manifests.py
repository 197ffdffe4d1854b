"""k8s/: the kustomize base and overlays, built and validated offline.

Each build (tests/manifests.py's kustomize subset) is compared with ``kubectl kustomize``
where ``kubectl`` is installed. Then: core kinds with kubernetes-validate (strict), RayJob
and RayCluster against the KubeRay v1 CRD schemas, and the CronWorkflow against the
Argo Workflows v3.6.0 and v4.1.2 JSON schemas, all with unknown fields refused; what the
pods of a multi-user Kubeflow reference; the opt-in KServe Component.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imgpipe.kfp import client as kfp_client
from imgpipe.kfp import connect as kfp_connect
from imgpipe.kfp import package as kfp_package
from tests import serve_venv
from tests.helpers import deploy_guide
from tests.manifests import (
    ARGO_SCHEMAS,
    BUILDS,
    CLUSTER_SCOPED,
    DEPLOYED,
    K8S,
    NAMESPACES,
    ROOT,
    _build,
    _errors,
    _key,
    _kind,
    _load_docs,
    _strict,
    _walk_containers,
    argo_validator,
    build,
    kuberay_validator,
)

CUSTOM = {"RayJob", "RayCluster", "CronWorkflow"}
# ClusterRoles a Kubeflow install provides, which a build may bind in its namespace.
KUBEFLOW_CLUSTER_ROLES = {("ClusterRole", "kubeflow-edit")}


def _canonical(docs: Any) -> list[str]:
    return sorted(json.dumps(d, sort_keys=True) for d in docs)


# ----------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("name", BUILDS)
def test_build_matches_kubectl_kustomize_where_installed(name):
    docs = build(name)
    assert docs, f"{name} builds nothing"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # no kubectl here: the resolver's build is what the other tests check
    out = subprocess.run([kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _canonical(d for d in yaml.safe_load_all(out.stdout) if d) == _canonical(docs)


@pytest.mark.parametrize("name", BUILDS)
def test_core_kinds_are_valid_kubernetes_objects(name):
    version = kubernetes_validate.latest_version()
    core = [d for d in build(name) if d["kind"] not in CUSTOM]
    assert {d["kind"] for d in core} >= {"Secret", "Role", "RoleBinding", "ServiceAccount", "ConfigMap"}
    for doc in core:
        try:
            kubernetes_validate.validate(copy.deepcopy(doc), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")


@pytest.mark.parametrize("name", DEPLOYED)
def test_ray_resources_match_the_kuberay_crds(name, schemas_dir):
    ray = [d for d in build(name) if d["kind"] in ("RayJob", "RayCluster")]
    assert "RayJob" in {d["kind"] for d in ray}, "every overlay includes the k8s/ray Component"
    for doc in ray:
        assert _errors(kuberay_validator(schemas_dir, doc["kind"]), doc) == [], f"{name}: {doc['kind']}"


@pytest.mark.parametrize("schema", ARGO_SCHEMAS)
@pytest.mark.parametrize("name", DEPLOYED)
def test_cronworkflow_matches_the_argo_schema_strictly(name, schema, schemas_dir):
    (cron,) = [d for d in build(name) if d["kind"] == "CronWorkflow"]
    validator = argo_validator(schemas_dir, schema)
    assert _errors(validator, cron) == []
    typo = copy.deepcopy(cron)
    typo["spec"]["workflowSpec"]["templates"][0]["container"]["imagePullPolcy"] = "Always"
    assert _errors(validator, typo), "strict mode must refuse unknown fields"


def test_cronworkflow_submits_without_overlap_and_with_a_kfp_token():
    (cron,) = [d for d in build("overlays/gpu") if d["kind"] == "CronWorkflow"]
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    assert all(len(s.split()) == 5 for s in spec["schedules"]), "Argo cron: five fields"
    wf = spec["workflowSpec"]
    assert wf["serviceAccountName"] == "imgpipe-retrain"
    (token,) = [v for v in wf["volumes"] if v["name"] == "kfp-token"]
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    (template,) = wf["templates"]
    assert template["retryStrategy"]["retryPolicy"] == "OnError", "a failed run is not resubmitted"
    container = template["container"]
    assert container["command"] == ["imgpipe"] and container["args"][0] == "submit"
    assert {"--params-from-env", "--wait"} <= set(container["args"])
    assert container["args"][container["args"].index("--run-name") + 1] == "{{workflow.name}}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "kfp-token")
    assert env[kfp_connect.SA_TOKEN_PATH_ENV] == mount["mountPath"] + "/token"


@pytest.mark.parametrize("name", DEPLOYED)
def test_references_resolve_within_the_build(name, tmp_path_factory):
    docs = build(name)
    names = {_key(d) for d in docs}
    (cron,) = [d for d in docs if d["kind"] == "CronWorkflow"]
    container = cron["spec"]["workflowSpec"]["templates"][0]["container"]
    for ref in container["envFrom"]:
        assert ("ConfigMap", ref["configMapRef"]["name"]) in names
    assert ("ServiceAccount", cron["spec"]["workflowSpec"]["serviceAccountName"]) in names
    assert ("Secret", "imgpipe-s3-credentials") in names
    namespace = NAMESPACES[name]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] not in CLUSTER_SCOPED)
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        ref = (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert ref in names or ref in KUBEFLOW_CLUSTER_ROLES, f"{binding['metadata']['name']}: {ref}"
        assert all(s.get("namespace") for s in binding["subjects"]), f"{binding['metadata']['name']}: SA subject without namespace"
        assert all(("ServiceAccount", s["name"]) in names for s in binding["subjects"]), "subjects are our own accounts"

    # The retraining settings name real pipeline parameters.
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    package = kfp_package.compile_package(tmp_path_factory.mktemp("pkg") / "p.yaml")
    inputs = kfp_package.pipeline_inputs(package)
    params = kfp_package.params_from_env(config)
    assert set(params) <= set(inputs) and "data_root" in params
    kfp_package.parse_params(params, package)


def test_secret_is_a_template_and_rbac_covers_rayjobs():
    docs = build("base")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert not {"data", "stringData"} & set(secret), "no values in git"
    role = next(d for d in docs if _key(d) == ("Role", "imgpipe-rayjobs"))
    (rayjobs,) = [r for r in role["rules"] if r["resources"] == ["rayjobs"]]
    assert rayjobs["apiGroups"] == ["ray.io"] and {"create", "get", "delete"} == set(rayjobs["verbs"])
    # ...and exactly the verbs the code calls: tests/remote/test_kuberay.py records them against the fake API.


@pytest.mark.parametrize("name", ["overlays/dev", "overlays/gpu"])
def test_overlays_name_every_image(name):
    images = set()
    for doc in build(name):
        images |= {c["image"] for c in _walk_containers(doc)}
        if doc["kind"] == "CronWorkflow":
            images |= {t["container"]["image"] for t in doc["spec"]["workflowSpec"]["templates"]}
    assert images and all("/" in i and ":" in i for i in images), images


def test_dev_overlay_is_cpu_only_suspended_and_without_the_shared_cluster():
    docs = build("overlays/dev")
    cron = next(d for d in docs if d["kind"] == "CronWorkflow")
    assert cron["spec"]["suspend"] is True
    assert "RayCluster" not in {d["kind"] for d in docs}
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    assert config[kfp_package.GPU_ENV] == "false" and config["IMGPIPE_PARAM_PREVIOUS_RUN_PREFIX"] == "latest"
    gpu = build("overlays/gpu")
    assert "RayCluster" in {d["kind"] for d in gpu}
    assert next(d for d in gpu if d["kind"] == "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"


# ----------------------------------------------------------------------------------------
# A real multi-user Kubeflow: profile namespaces, what pods reference, Istio, version floors.


@pytest.mark.parametrize("name", BUILDS)
def test_no_build_owns_the_profile_namespace(name):
    assert "Namespace" not in {d["kind"] for d in build(name)}, "a profile's namespace is not ours to create or delete"
    profile = _load_docs(K8S / "profiles" / "imgpipe-dev.yaml")[0]
    assert (profile["apiVersion"], profile["kind"], profile["metadata"]["name"]) == ("kubeflow.org/v1", "Profile", NAMESPACES["overlays/dev"])


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]), spec["submitterPodTemplate"]]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    if doc["kind"] == "CronWorkflow":
        return [
            {"metadata": spec["workflowSpec"]["podMetadata"], "spec": {"containers": [t["container"] for t in spec["workflowSpec"]["templates"]]}}
        ]
    return []


def _references(template: dict) -> list[tuple[str, str, bool]]:
    """(kind, name, optional) of every ConfigMap/Secret a pod template's containers read."""
    out = []
    for c in template["spec"]["containers"]:
        for env in c.get("env", []):
            ref = env.get("valueFrom") or {}
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if key in ref:
                    out.append((kind, ref[key]["name"], bool(ref[key].get("optional"))))
        for src in c.get("envFrom", []):
            for key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if key in src:
                    out.append((kind, src[key]["name"], bool(src[key].get("optional"))))
    return out


@pytest.mark.parametrize("name", ["overlays/dev", "overlays/gpu"])
def test_every_pod_reads_only_configmaps_and_secrets_the_overlay_creates(name, tmp_path_factory, monkeypatch):
    docs = build(name)
    made = {_key(d) for d in docs}
    # KubeRay creates the token Secret of a token-auth RayCluster under the cluster's name (key auth_token).
    made |= {
        ("Secret", d["metadata"]["name"]) for d in docs if d["kind"] == "RayCluster" and (d["spec"].get("authOptions") or {}).get("mode") == "token"
    }
    refs = [r for d in docs for t in _pod_templates(d) for r in _references(t)]
    # The pipeline's tasks, as compiled for this overlay (its retraining settings).
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    monkeypatch.setenv(kfp_package.GPU_ENV, config[kfp_package.GPU_ENV])
    package = kfp_package.compile_package(tmp_path_factory.mktemp("pkg") / "p.yaml")
    _, platform = yaml.safe_load_all(package.read_text())
    for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        refs += [("Secret", s["secretName"], s.get("optional", False)) for s in executor.get("secretAsEnv", [])]
        refs += [("ConfigMap", c["configMapName"], c.get("optional", False)) for c in executor.get("configMapAsEnv", [])]
    missing = sorted({(k, n) for k, n, optional in refs if (k, n) not in made and (name == "overlays/gpu" or not optional)})
    assert not missing, f"{name}: pods would read {missing}, which this overlay does not create"
    assert {("ConfigMap", "imgpipe-s3-config"), ("Secret", "imgpipe-s3-credentials")} <= {(k, n) for k, n, _ in refs}


@pytest.mark.parametrize("name", ["overlays/dev", "overlays/gpu"])
def test_ray_pods_and_the_retraining_pod_opt_out_of_istio(name):
    templates = [(d["kind"], t) for d in build(name) for t in _pod_templates(d)]
    assert {k for k, _ in templates} >= {"RayJob", "CronWorkflow"}
    for kind, template in templates:
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false", kind


def test_retraining_submits_into_its_own_profile_namespace():
    (cron,) = [d for d in build("overlays/dev") if d["kind"] == "CronWorkflow"]
    env = {e["name"]: e for e in cron["spec"]["workflowSpec"]["templates"][0]["container"]["env"]}
    assert env[kfp_client.NAMESPACE_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_dev_overlay_uses_the_object_store_kfp_installs():
    docs = build("overlays/dev")
    s3 = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-s3-config"))["data"]
    assert s3["AWS_ENDPOINT_URL"] == "http://seaweedfs.kubeflow.svc.cluster.local:8333", "KFP >= 2.15 ships SeaweedFS"
    assert "minio" not in json.dumps(docs).lower().replace("mlpipeline-minio-artifact", "")
    retrain = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    assert retrain["IMGPIPE_PARAM_DATA_ROOT"].startswith("s3://mlpipeline/private/imgpipe-dev/"), "where a profile's KFP keys may write"


def test_stated_version_floors_match_the_fields_used(tmp_path):
    readme = (ROOT / "README.md").read_text()
    base = (K8S / "base" / "kustomization.yaml").read_text()
    deploy = deploy_guide()
    floors = {"Kubeflow Pipelines": "2.15", "KubeRay": "1.6", "Argo Workflows": "3.6"}
    for product, version in floors.items():
        assert f"{product} ≥ {version}" in readme and f"{product} ≥ {version}" in deploy, product
        assert re.search(rf"{product}\s+>= {re.escape(version)}", base), product
    # The fields behind each floor are the ones actually used.
    assert "preRunningDeadlineSeconds" in (K8S / "ray" / "rayjob-resize.yaml").read_text()
    _, platform = yaml.safe_load_all(kfp_package.compile_package(tmp_path / "p.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    assert any(c.get("optional") for e in executors for c in e.get("configMapAsEnv", []))
    assert all(len(c["spec"]["schedules"]) for c in (d for d in build("overlays/gpu") if d["kind"] == "CronWorkflow"))


@pytest.mark.parametrize("name", BUILDS)
def test_the_ray_address_an_overlay_schedules_is_a_cluster_it_allows(name):
    from imgpipe.remote.targets import check_allowed

    docs = build(name)
    retrain = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-s3-config"))["data"]
    check_allowed(retrain["IMGPIPE_PARAM_RAY_ADDRESS"], environ=config)
    with pytest.raises(ValueError, match="not a configured Ray cluster"):
        check_allowed("http://elsewhere.example:8265", environ=config)


# ----------------------------------------------------------------------------------------
# KServe (opt-in Component k8s/serving).

KSERVE_CRD = "kserve-kubeflow-manifests-v1.11.0-inferenceservices.serving.kserve.io.yaml"


def test_the_serving_component_is_a_valid_inferenceservice_for_the_onnx_export(schemas_dir):
    assert _kind(K8S / "serving") == "Component", "opt-in: overlays add it under components:"
    docs = _build(K8S / "serving")[0]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    kubernetes_validate.validate(copy.deepcopy(account), kubernetes_validate.latest_version(), strict=True)
    assert isvc["spec"]["predictor"]["serviceAccountName"] == account["metadata"]["name"]
    secrets = {d["metadata"]["name"] for d in build("base") if d["kind"] == "Secret"}
    assert {s["name"] for s in account["secrets"]} <= secrets, "it reads the store with the base's S3 Secret"
    crd = yaml.safe_load((schemas_dir / KSERVE_CRD).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == isvc["apiVersion"].split("/")[1]]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(isvc))
    assert not errors, [e.message for e in errors[:5]]
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["storageUri"].startswith("s3://")


# KServe's ServingRuntime CRD where Kubeflow 1.11 runs it and where issue 70's controller does.
SERVING_RUNTIME_CRDS = ("kserve-v0.15.2-serving.kserve.io_servingruntimes.yaml", "kserve-v0.20.0-serving.kserve.io_servingruntimes.yaml")


def test_the_serving_component_brings_imgpipes_runtime_for_the_same_model(schemas_dir):
    from imgpipe.containers import catalog
    from tests.test_manifests_security import restricted_violations

    docs = _build(K8S / "serving")[0]
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    for name in SERVING_RUNTIME_CRDS:
        crd = yaml.safe_load((schemas_dir / name).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == runtime["apiVersion"].split("/")[1]]
        errors = list(jsonschema.Draft7Validator(_strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))).iter_errors(runtime))
        assert not errors, (name, [e.message for e in errors[:5]])
    spec = runtime["spec"]
    model = isvc["spec"]["predictor"]["model"]
    assert {"name": model["modelFormat"]["name"], "version": "1", "autoSelect": False} in spec["supportedModelFormats"], "named, never picked"
    assert spec["protocolVersions"] == [model["protocolVersion"]] == ["v2"]
    assert model["runtime"] == "kserve-tritonserver", "Triton stays the InferenceService's runtime; imgpipe-onnx is chosen by name"
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container" and container["image"] == "imgpipe-serve" and "serve" in catalog.KINDS
    assert restricted_violations({"containers": [container], "volumes": spec["volumes"]}) == []
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert container["command"] == ["python", "-m", "imgpipe.serving.runtime"]


@serve_venv.needs_serve_venv
def test_the_serving_runtimes_command_line_is_one_the_runtime_takes(tmp_path):
    """With KServe's substitutions and an empty model directory, it gets as far as looking for the model, and says so in one line."""
    docs = _build(K8S / "serving")[0]
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    (container,) = runtime["spec"]["containers"]
    args = [a.replace("{{.Name}}", isvc["metadata"]["name"]).replace("=/mnt/models", f"={tmp_path}") for a in container["args"]]
    assert f"--model_dir={tmp_path}" in args and "--http_port=8080" in args
    # The serve image's python: kserve is in the serve venv only (tests/serve_venv.py).
    command = [serve_venv.python(), *container["command"][1:], *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"imgpipe.serving.runtime: {tmp_path} must hold one imgpipe model (model.json and its ONNX), in it or in one subfolder; it holds none"
    )


# Label Studio for the label review (opt-in Component k8s/label-studio; tests/cluster/test_label_studio.py runs it).


def test_the_label_studio_component_is_valid_and_takes_its_account_from_its_secret():
    assert _kind(K8S / "label-studio") == "Component", "opt-in: overlays add it under components:"
    docs = _build(K8S / "label-studio")[0]
    for doc in docs:
        kubernetes_validate.validate(copy.deepcopy(doc), kubernetes_validate.latest_version(), strict=True)
    by_kind = {d["kind"]: d for d in docs}
    secret, deployment, service = by_kind["Secret"], by_kind["Deployment"], by_kind["Service"]
    data = secret["stringData"]
    assert set(data) == {"username", "password", "token", "url"} and not any(data[k] for k in ("username", "password", "token")), "a template"
    assert data["url"] == "http://label-studio:8080", "the one Label Studio a run may send the token to: this Component's Service"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert {ref["name"] for ref in from_secret.values()} == {secret["metadata"]["name"]}
    assert {"LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"} <= set(from_secret)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true", "the Secret's token is then the API key imgpipe sends"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind["PersistentVolumeClaim"]["metadata"]["name"], "the reviewers' work outlives the pod"
