"""k8s/: the kustomize base and overlays, built and validated offline.

Builds use a small pure-Python resolver for the kustomize subset these files use
(resources, configMapGenerator with merge, generatorOptions, strategic-merge patches
incl. ``$patch: delete``, namespace, images incl. ``configurations`` field specs); it
refuses anything else, and where ``kubectl`` is installed each build is also compared
with ``kubectl kustomize``. Then: core kinds with kubernetes-validate (strict), RayJob
and RayCluster against the KubeRay v1 CRD schemas, and the CronWorkflow against the
Argo Workflows v3.6.0 and v4.1.2 JSON schemas, all with unknown fields refused.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imgpipe import kfp_client

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BUILDS = ("base", "overlays/dev", "overlays/gpu")
# The namespace each build installs into (a Kubeflow profile's, created by its Profile).
NAMESPACES = {"base": "imgpipe", "overlays/dev": "imgpipe-dev", "overlays/gpu": "imgpipe"}
ARGO_SCHEMAS = ("argo-workflows-v3.6.0-schema.json", "argo-workflows-v4.1.2-schema.json")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass", "StorageClass"}
CUSTOM = {"RayJob", "RayCluster", "CronWorkflow"}

# ----------------------------------------------------------------------------------------
# A kustomize subset.

_SUPPORTED = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "images",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "configurations",
}


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to these files: maps merge, lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


def _walk_containers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            yield from _walk_containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_containers(v)


def _at_path(node: Any, parts: list[str]) -> Iterator[tuple[dict, str]]:
    """(parent, key) pairs for a kustomize field-spec path; lists are traversed."""
    if isinstance(node, list):
        for item in node:
            yield from _at_path(item, parts)
    elif isinstance(node, dict) and parts:
        if len(parts) == 1:
            if parts[0] in node:
                yield node, parts[0]
        elif parts[0] in node:
            yield from _at_path(node[parts[0]], parts[1:])


def _retag(image: str, rule: dict) -> str:
    name, sep, tag = image.partition(":")
    if name != rule["name"]:
        return image
    return rule.get("newName", name) + (":" + rule["newTag"] if "newTag" in rule else sep + tag)


def _build(directory: Path) -> tuple[list[dict], list[dict]]:
    """(resources, image field specs) of one kustomization directory."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - _SUPPORTED
    assert not unsupported, f"{directory}: the test resolver does not implement {sorted(unsupported)}"
    docs: list[dict] = []
    field_specs: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            sub_docs, sub_specs = _build(path)
            docs += sub_docs
            field_specs += sub_specs
        else:
            docs += _load_docs(path)
    for entry in spec.get("configurations", []):
        field_specs += yaml.safe_load((directory / entry).read_text()).get("images", [])

    generators = spec.get("configMapGenerator", [])
    if generators:
        assert (spec.get("generatorOptions") or {}).get("disableNameSuffixHash") is True, "name hashes not implemented"
    for gen in generators:
        data = dict(item.split("=", 1) for item in gen.get("literals", []))
        assert set(gen) <= {"name", "literals", "behavior"}, gen
        behavior = gen.get("behavior", "create")
        existing = [d for d in docs if _key(d) == ("ConfigMap", gen["name"])]
        if behavior == "create":
            assert not existing, f"ConfigMap {gen['name']} already exists"
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
        else:
            (target,) = existing
            target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data

    for patch_entry in spec.get("patches", []):
        assert set(patch_entry) <= {"path", "patch"}, f"patch targets not implemented: {patch_entry}"
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text() if "path" in patch_entry else patch_entry["patch"])
        matches = [d for d in docs if _key(d) == _key(patch)]
        assert len(matches) == 1, f"{directory}: patch {_key(patch)} matches {len(matches)} resources"
        if patch.get("$patch") == "delete":
            docs.remove(matches[0])
        else:
            docs[docs.index(matches[0])] = _merge(matches[0], patch)

    namespace = spec.get("namespace")
    if namespace:
        service_accounts = {(d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs if d["kind"] == "ServiceAccount"}
        for doc in docs:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = namespace
                continue
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
            if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                # kustomize rewrites a subject only for a ServiceAccount object it builds.
                for subject in doc.get("subjects", []):
                    if subject["kind"] != "ServiceAccount":
                        continue
                    ours = (subject["name"], subject.get("namespace")) in service_accounts
                    unset = "namespace" not in subject and any(subject["name"] == n for n, _ in service_accounts)
                    if ours or unset:
                        subject["namespace"] = namespace

    for rule in spec.get("images", []):
        for doc in docs:
            for container in _walk_containers(doc):
                if "image" in container:
                    container["image"] = _retag(container["image"], rule)
            for fs in field_specs:
                if fs.get("kind") in (None, doc["kind"]):
                    for parent, key in _at_path(doc, fs["path"].split("/")):
                        parent[key] = _retag(parent[key], rule)
    return docs, field_specs


@cache
def build(name: str) -> tuple[dict, ...]:
    return tuple(_build(K8S / name)[0])


def _canonical(docs: Any) -> list[str]:
    return sorted(json.dumps(d, sort_keys=True) for d in docs)


# ----------------------------------------------------------------------------------------
# Schemas.


def _strict(node: Any) -> Any:
    """Adds ``additionalProperties: false`` to every object schema that lists properties."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@cache
def argo_validator(schemas: Path, name: str) -> jsonschema.protocols.Validator:
    path = schemas / name
    assert path.is_file(), f"{path} is missing"
    schema = json.loads(path.read_text())
    root = _strict(
        {
            "$schema": schema.get("$schema", "http://json-schema.org/draft-07/schema#"),
            "definitions": schema["definitions"],
            "$ref": "#/definitions/io.argoproj.workflow.v1alpha1.CronWorkflow",
        }
    )
    cls = jsonschema.validators.validator_for(root)
    cls.check_schema(root)
    return cls(root)


@cache
def kuberay_validator(schemas: Path, kind: str) -> jsonschema.protocols.Validator:
    path = schemas / f"kuberay-v1.7-ray.io_{kind.lower()}s.yaml"
    assert path.is_file(), f"{path} is missing"
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(doc)]


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


@pytest.mark.parametrize("name", BUILDS)
def test_ray_resources_match_the_kuberay_crds(name, schemas_dir):
    ray = [d for d in build(name) if d["kind"] in ("RayJob", "RayCluster")]
    assert "RayJob" in {d["kind"] for d in ray}, "k8s/ray is part of every build"
    for doc in ray:
        assert _errors(kuberay_validator(schemas_dir, doc["kind"]), doc) == [], f"{name}: {doc['kind']}"


@pytest.mark.parametrize("schema", ARGO_SCHEMAS)
@pytest.mark.parametrize("name", BUILDS)
def test_cronworkflow_matches_the_argo_schema_strictly(name, schema, schemas_dir):
    (cron,) = [d for d in build(name) if d["kind"] == "CronWorkflow"]
    validator = argo_validator(schemas_dir, schema)
    assert _errors(validator, cron) == []
    typo = copy.deepcopy(cron)
    typo["spec"]["workflowSpec"]["templates"][0]["container"]["imagePullPolcy"] = "Always"
    assert _errors(validator, typo), "strict mode must refuse unknown fields"


def test_cronworkflow_submits_without_overlap_and_with_a_kfp_token():
    (cron,) = [d for d in build("base") if d["kind"] == "CronWorkflow"]
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
    assert env[kfp_client.SA_TOKEN_PATH_ENV] == mount["mountPath"] + "/token"


@pytest.mark.parametrize("name", BUILDS)
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
        assert ("Role", binding["roleRef"]["name"]) in names
        assert all(s.get("namespace") for s in binding["subjects"]), f"{binding['metadata']['name']}: SA subject without namespace"
    rayjobs = next(d for d in docs if _key(d) == ("RoleBinding", "imgpipe-rayjobs"))
    assert {"name": "default-editor", "kind": "ServiceAccount", "namespace": namespace} in rayjobs["subjects"]

    # The retraining settings name real pipeline parameters.
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    package = kfp_client.compile_package(tmp_path_factory.mktemp("pkg") / "p.yaml")
    inputs = kfp_client.pipeline_inputs(package)
    params = kfp_client.params_from_env(config)
    assert set(params) <= set(inputs) and "data_root" in params
    kfp_client.parse_params(params, package)


def test_secret_is_a_template_and_rbac_covers_rayjobs():
    docs = build("base")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert not {"data", "stringData"} & set(secret), "no values in git"
    role = next(d for d in docs if _key(d) == ("Role", "imgpipe-rayjobs"))
    (rayjobs,) = [r for r in role["rules"] if r["resources"] == ["rayjobs"]]
    assert rayjobs["apiGroups"] == ["ray.io"] and {"create", "get", "delete"} == set(rayjobs["verbs"])
    # ...and exactly the verbs the code calls: tests/test_kuberay.py records them against the fake API.


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
    assert config[kfp_client.GPU_ENV] == "false" and config["IMGPIPE_PARAM_PREVIOUS_RUN_PREFIX"] == "latest"
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
        return [{"metadata": spec["workflowSpec"]["podMetadata"], "spec": {"containers": [t["container"] for t in spec["workflowSpec"]["templates"]]}}]
    return []


def _references(template: dict) -> list[tuple[str, str, bool]]:
    """(kind, name, optional) of every ConfigMap/Secret a pod template's containers read."""
    out = []
    for c in template["spec"]["containers"]:
        for env in c.get("env", []):
            ref = (env.get("valueFrom") or {})
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
    made |= {("Secret", d["metadata"]["name"]) for d in docs if d["kind"] == "RayCluster" and (d["spec"].get("authOptions") or {}).get("mode") == "token"}
    refs = [r for d in docs for t in _pod_templates(d) for r in _references(t)]
    # The pipeline's tasks, as compiled for this overlay (its retraining settings).
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    monkeypatch.setenv(kfp_client.GPU_ENV, config[kfp_client.GPU_ENV])
    package = kfp_client.compile_package(tmp_path_factory.mktemp("pkg") / "p.yaml")
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
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    floors = {"Kubeflow Pipelines": "2.15", "KubeRay": "1.6", "Argo Workflows": "3.6"}
    for product, version in floors.items():
        assert f"{product} ≥ {version}" in readme and f"{product} ≥ {version}" in deploy, product
        assert re.search(rf"{product}\s+>= {re.escape(version)}", base), product
    # The fields behind each floor are the ones actually used.
    assert "preRunningDeadlineSeconds" in (K8S / "ray" / "rayjob-resize.yaml").read_text()
    _, platform = yaml.safe_load_all(kfp_client.compile_package(tmp_path / "p.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    assert any(c.get("optional") for e in executors for c in e.get("configMapAsEnv", []))
    assert all(len(c["spec"]["schedules"]) for c in (d for d in build("base") if d["kind"] == "CronWorkflow"))


@pytest.mark.parametrize("name", BUILDS)
def test_the_ray_address_an_overlay_schedules_is_a_cluster_it_allows(name):
    from imgpipe import ray_jobs

    docs = build(name)
    retrain = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    config = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-s3-config"))["data"]
    ray_jobs.check_allowed(retrain["IMGPIPE_PARAM_RAY_ADDRESS"], environ=config)
    with pytest.raises(ValueError, match="not a configured Ray cluster"):
        ray_jobs.check_allowed("http://elsewhere.example:8265", environ=config)
