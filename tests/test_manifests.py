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

from imgpipe.kfp import client as kfp_client
from imgpipe.kfp import connect as kfp_connect
from imgpipe.kfp import package as kfp_package
from tests import rbac

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BUILDS = ("base", "overlays/dev", "overlays/gpu")
# What gets applied: base holds the shared objects, the overlays add the Components they use.
DEPLOYED = ("overlays/dev", "overlays/gpu")
# The namespace each build installs into (a Kubeflow profile's, created by its Profile).
NAMESPACES = {"base": "imgpipe", "overlays/dev": "imgpipe-dev", "overlays/gpu": "imgpipe"}
ARGO_SCHEMAS = ("argo-workflows-v3.6.0-schema.json", "argo-workflows-v4.1.2-schema.json")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass", "StorageClass"}
CUSTOM = {"RayJob", "RayCluster", "CronWorkflow"}
# ClusterRoles a Kubeflow install provides, which a build may bind in its namespace.
KUBEFLOW_CLUSTER_ROLES = {("ClusterRole", "kubeflow-edit")}

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
    "components",
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


def _kind(directory: Path) -> str:
    return yaml.safe_load((directory / "kustomization.yaml").read_text()).get("kind", "Kustomization")


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
            assert _kind(path) == "Kustomization", f"{directory}: {entry} is a Component; list it under components:"
            sub_docs, sub_specs = _build(path)
            docs += sub_docs
            field_specs += sub_specs
        else:
            docs += _load_docs(path)
    # A Component's resources (and image field specs) join this kustomization's before its
    # generators, patches and transformers run, which then apply to them too.
    for entry in spec.get("components", []):
        path = (directory / entry).resolve()
        assert _kind(path) == "Component", f"{directory}: {entry} is not a kustomize Component"
        sub_docs, sub_specs = _build(path)
        docs += sub_docs
        field_specs += sub_specs
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
        if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
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
    deploy = (ROOT / "docs" / "deploy.md").read_text()
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
# Hardening: Pod Security, securityContext, API tokens, NetworkPolicy, RBAC.

IMAGE_UID = 10001  # docker/Dockerfile: the images' user
PSS_LABELS = K8S / "profiles" / "pod-security-labels.yaml"
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# KubeRay labels every head and worker pod with its cluster's name; a template cannot
# override it (ray-project/kuberay v1.6.0 ray-operator/controllers/ray/common/pod.go labelPod).
RAY_CLUSTER_LABEL = "ray.io/cluster"
# The service accounts every pipeline of a namespace runs as (multi-user KFP: default-editor;
# standalone: pipeline-runner), and a namespace's default one.
SHARED_ACCOUNTS = {"default-editor", "pipeline-runner", "default"}
RUN_ACCOUNT = "imgpipe-pipeline"
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
_SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security Standard "restricted" (which includes "baseline") refuses in ``pod``.

    The controls of https://kubernetes.io/docs/concepts/security/pod-security-standards/
    that a pod spec's fields decide; init containers count like containers.
    """
    out = []
    psc = pod.get("securityContext") or {}
    out += [f"pod: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: type {sorted(set(volume) - {'name'})}")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    if psc.get("sysctls"):
        out.append("pod: sysctls")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in _SECCOMP_OK:
        out.append(f"pod: seccomp {pod_seccomp}")
    for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        sc, name = c.get("securityContext") or {}, c["name"]
        caps = sc.get("capabilities") or {}
        checks = {
            "privileged": sc.get("privileged") is True,
            "allowPrivilegeEscalation not false": sc.get("allowPrivilegeEscalation") is not False,
            "capabilities not dropping ALL": "ALL" not in caps.get("drop", []),
            "capabilities added": bool(set(caps.get("add", [])) - {"NET_BIND_SERVICE"}),
            "runAsNonRoot not true": sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True,
            "runAsUser 0": sc.get("runAsUser") == 0,
            "seccomp not RuntimeDefault/Localhost": ((sc.get("seccompProfile") or {}).get("type") or pod_seccomp) not in _SECCOMP_OK,
            "hostPort": any(port.get("hostPort") for port in c.get("ports", [])),
            "procMount": sc.get("procMount", "Default") != "Default",
        }
        out += [f"{name}: {what}" for what, failed in checks.items() if failed]
    return out


def _autoscaler(cluster: dict) -> list[dict]:
    """The container KubeRay adds to the head pod, with what the manifest sets on it.

    ray-project/kuberay v1.6.0 ray-operator/controllers/ray/common/pod.go:
    BuildAutoscalerContainer, then mergeAutoscalerOverrides (securityContext, volumeMounts).
    """
    if not cluster.get("enableInTreeAutoscaling"):
        return []
    options = cluster.get("autoscalerOptions") or {}
    return [{"name": "autoscaler", "securityContext": options.get("securityContext"), "volumeMounts": options.get("volumeMounts", [])}]


def _pods(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod ``doc`` brings, with what the operators add that matters here.

    Argo's own init and wait containers are not in a manifest: their securityContext is
    the workflow controller's `executor` setting (docs/deploy.md, "Pod Security").
    """
    spec = doc.get("spec") or {}
    if doc["kind"] in ("RayJob", "RayCluster"):
        cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
        head = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
        head["containers"] += _autoscaler(cluster)
        pods = [("head", head)] + [(f"worker {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        if doc["kind"] == "RayJob":
            pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return pods
    if doc["kind"] == "CronWorkflow":
        wf = spec["workflowSpec"]
        common = {k: wf[k] for k in ("securityContext", "volumes", "automountServiceAccountToken", "serviceAccountName") if k in wf}
        # A template's own securityContext replaces the workflow's (argo-workflows v3.5.15
        # workflow/controller/workflowpod.go createWorkflowPod).
        return [
            (t["name"], {**common, **({"securityContext": t["securityContext"]} if "securityContext" in t else {}), "containers": [t["container"]]})
            for t in wf["templates"]
            if "container" in t
        ]
    return []


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches ``labels``."""
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok &= {"Exists": key in labels, "DoesNotExist": key not in labels, "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[
            op
        ]
    return ok


def test_the_restricted_check_refuses_what_restricted_refuses():
    good = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    }
    assert restricted_violations(good) == []
    bad = {
        "no seccomp": lambda p: p["securityContext"].pop("seccompProfile"),
        "root allowed": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "unchecked init container": lambda p: p.setdefault("initContainers", []).append({"name": "i"}),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
    }
    for what, mutate in bad.items():
        pod = copy.deepcopy(good)
        mutate(pod)
        assert restricted_violations(pod), what


def test_profile_namespaces_get_pod_security_labels():
    """Item 1: enforce what KFP's own pods meet (baseline), warn and audit on restricted."""
    patch = yaml.safe_load(PSS_LABELS.read_text())
    assert patch == {"metadata": {"labels": patch["metadata"]["labels"]}}, (
        "a merge patch of labels only: it can neither create nor delete a namespace"
    )
    labels = patch["metadata"]["labels"]
    prefix = "pod-security.kubernetes.io/"
    assert {k.removeprefix(prefix): v for k, v in labels.items() if not k.endswith("-version")} == {
        "enforce": "baseline",
        "warn": "restricted",
        "audit": "restricted",
    }
    assert re.fullmatch(r"v1\.\d+", labels[prefix + "enforce-version"]), "enforce pinned to a Kubernetes minor version"
    assert {labels[prefix + m + "-version"] for m in ("warn", "audit")} == {"latest"}
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "--type merge --patch-file k8s/profiles/pod-security-labels.yaml" in deploy


@pytest.mark.parametrize("name", DEPLOYED)
def test_every_pod_we_bring_meets_pod_security_restricted(name):
    """Item 2: uid 10001, no escalation, no capabilities, RuntimeDefault, a read-only root with /tmp."""
    pods = [(d["kind"], role, pod) for d in build(name) for role, pod in _pods(d)]
    expected = {"RayJob", "CronWorkflow"} | ({"RayCluster"} if name != "overlays/dev" else set())
    assert {kind for kind, _, _ in pods} == expected
    assert {role for kind, role, _ in pods if kind == "RayJob"} == {"head", "worker cpu", "submitter"}
    for kind, role, pod in pods:
        where = f"{name}: {kind} {role}"
        assert restricted_violations(pod) == [], where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == IMAGE_UID, where
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, f"{where} {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in scratch, f"{where} {c['name']}: a read-only root needs an emptyDir at /tmp (Ray: /tmp/ray)"


@pytest.mark.parametrize("name", BUILDS)
def test_only_the_autoscaler_and_the_retraining_pod_get_an_api_token(name):
    """Item 3: Ray pods never call the Kubernetes API; KubeRay's autoscaler and Argo's executor do."""
    for doc in build(name):
        for role, pod in _pods(doc):
            where = f"{name}: {doc['kind']} {role}"
            token_volumes = {
                v["name"]
                for v in pod.get("volumes", [])
                if any("serviceAccountToken" in source for source in (v.get("projected") or {}).get("sources", []))
            }
            holders = {c["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in token_volumes}
            if doc["kind"] == "CronWorkflow":
                # Argo's wait container reports results with the pod's token (role-retrain.yaml).
                assert pod.get("automountServiceAccountToken", True) is True and pod["serviceAccountName"] == "imgpipe-retrain", where
                continue
            assert pod.get("automountServiceAccountToken") is False, where
            assert holders == ({"autoscaler"} if role == "head" else set()), where
            if role == "head":
                (autoscaler,) = [c for c in pod["containers"] if c["name"] == "autoscaler"]
                (mount,) = [m for m in autoscaler["volumeMounts"] if m["name"] in token_volumes]
                assert mount["mountPath"] == TOKEN_MOUNT and mount["readOnly"] is True, where
                (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
                paths = {
                    item["path"] for s in volume["projected"]["sources"] for item in (next(iter(s.values())).get("items") or [{"path": "token"}])
                }
                assert paths == {"token", "ca.crt", "namespace"}, f"{where}: what in-cluster clients read from {TOKEN_MOUNT}"


@pytest.mark.parametrize("name", BUILDS)
def test_networkpolicy_lets_only_this_namespace_reach_the_ray_pods(name):
    """Item 4: Ray pods (as KubeRay labels them) take connections from this namespace and the operator only."""
    docs = build(name)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]
    for doc in (d for d in docs if d["kind"] in ("RayJob", "RayCluster")):
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
            labels = {**template["metadata"]["labels"], RAY_CLUSTER_LABEL: "any-cluster", "ray.io/is-ray-node": "yes"}
            assert _selects(selector, labels), f"{doc['kind']}: a Ray pod left out"
        if doc["kind"] == "RayJob":
            assert not _selects(selector, doc["spec"]["submitterPodTemplate"]["metadata"]["labels"])
    ray_peer = namespace_peer = operator_peer = None
    for rule in spec["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges"
            if "namespaceSelector" in peer:
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}, "only the operator from elsewhere"
                operator_peer = rule
            elif peer["podSelector"] == {}:
                namespace_peer = rule
            else:
                assert peer["podSelector"] == selector, "Ray pods of this namespace"
                ray_peer = rule
    assert ray_peer is not None and "ports" not in ray_peer, "Ray's own ports are mostly random: every port, Ray pods only"
    assert namespace_peer is not None and {(p["protocol"], p["port"]) for p in namespace_peer["ports"]} == {("TCP", 8265), ("TCP", 10001)}
    assert operator_peer is not None and operator_peer["ports"] == [{"protocol": "TCP", "port": 8265}]


@pytest.mark.parametrize("name", BUILDS)
def test_the_rayjob_role_is_bound_to_imgpipes_own_account_only(name, monkeypatch):
    """Item 5: no binding names an account every pipeline of the namespace runs as."""
    from tests.remote.test_kuberay import CALL_VERBS

    docs = build(name)
    names = {_key(d) for d in docs}
    namespace = NAMESPACES[name]
    assert ("ServiceAccount", RUN_ACCOUNT) in names
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    for binding in bindings.values():
        assert not {s["name"] for s in binding["subjects"]} & SHARED_ACCOUNTS, binding["metadata"]["name"]
    run_account = [{"kind": "ServiceAccount", "name": RUN_ACCOUNT, "namespace": namespace}]
    assert bindings["imgpipe-rayjobs"]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "imgpipe-rayjobs"}
    assert bindings["imgpipe-rayjobs"]["subjects"] == run_account
    # The account must still run a KFP pipeline: what default-editor is bound to in a profile.
    assert bindings["imgpipe-pipeline-kubeflow-edit"]["roleRef"]["name"] == "kubeflow-edit"
    assert bindings["imgpipe-pipeline-kubeflow-edit"]["subjects"] == run_account
    # The scheduled retraining's runs run as it (imgpipe submit reads the variable).
    retrain = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    monkeypatch.setenv(kfp_client.SERVICE_ACCOUNT_ENV, retrain[kfp_client.SERVICE_ACCOUNT_ENV])
    assert kfp_client.Target().resolved().service_account == RUN_ACCOUNT
    role = next(d for d in docs if _key(d) == ("Role", "imgpipe-rayjobs"))
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == set(CALL_VERBS.values()), "exactly the calls tests/remote/test_kuberay.py records"
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert f"--as=system:serviceaccount:{NAMESPACES['overlays/dev']}:{RUN_ACCOUNT}" in deploy


# ----------------------------------------------------------------------------------------
# Who applies what: a cluster admin the objects labelled so, a profile's owner the rest.

APPLIED_BY = "imgpipe.dev/applied-by"
# The two commands of docs/deploy.md, "Who applies what" (kubectl filters the rendered
# objects by the selector before it sends any: kubernetes/kubernetes
# staging/src/k8s.io/cli-runtime/pkg/resource/builder.go, visitByPaths, FilterByLabelSelector).
ADMIN_SELECTOR = f"{APPLIED_BY}=cluster-admin"
OWNER_SELECTOR = f"{APPLIED_BY}!=cluster-admin"
# (API group, resource) of each kind an overlay renders.
RESOURCES = {
    "Secret": ("", "secrets"),
    "ConfigMap": ("", "configmaps"),
    "ServiceAccount": ("", "serviceaccounts"),
    "ResourceQuota": ("", "resourcequotas"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "CronWorkflow": ("argoproj.io", "cronworkflows"),
    "RayJob": ("ray.io", "rayjobs"),
    "RayCluster": ("ray.io", "rayclusters"),
}
OWNER, CONTRIBUTOR = "owner@example.com", "contributor@example.com"


def _selected(selector: str, doc: dict) -> bool:
    """Whether ``doc`` matches a one-term equality selector (``k=v``; ``k!=v`` also matches docs without ``k``)."""
    labels = doc["metadata"].get("labels") or {}
    if "!=" in selector:
        key, value = selector.split("!=")
        return labels.get(key) != value
    key, value = selector.split("=")
    return labels.get(key) == value


def _profile(namespace: str, *extra: list[dict]) -> rbac.Authorizer:
    """The rights Kubeflow gives in a profile namespace (tests/rbac.py), plus ``extra`` ClusterRoles."""
    roles = [r for group in (rbac.KUBEFLOW_CLUSTER_ROLES, *extra) for r in group]
    return rbac.Authorizer(rbac.profile_bindings(namespace, OWNER, CONTRIBUTOR), roles)


@pytest.mark.parametrize("name", DEPLOYED)
def test_a_profile_member_applies_the_rest_and_only_the_admin_applies_the_labelled(name):
    """The split follows what kubeflow-edit (a profile's contributors; its owner has it too) allows."""
    docs, namespace = build(name), NAMESPACES[name]
    admin = [d for d in docs if _selected(ADMIN_SELECTOR, d)]
    owner = [d for d in docs if _selected(OWNER_SELECTOR, d)]
    assert sorted(map(_key, admin + owner)) == sorted(map(_key, docs)) and not set(map(_key, admin)) & set(map(_key, owner))
    expected = {"Role", "RoleBinding", "RayJob"} | ({"RayCluster", "ResourceQuota"} if name == "overlays/gpu" else set())
    assert {d["kind"] for d in admin} == expected
    assert {d["kind"] for d in owner} == {"Secret", "ConfigMap", "ServiceAccount", "NetworkPolicy", "CronWorkflow"}
    kubeflow = _profile(namespace)
    for doc in owner:
        group, resource = RESOURCES[doc["kind"]]
        for verb in ("get", "create", "patch"):  # what `kubectl apply` sends (get first, then create or patch)
            request = rbac.Request(verb, group, resource, namespace, name="" if verb == "create" else doc["metadata"]["name"])
            assert kubeflow.allows(CONTRIBUTOR, request), f"{name}: kubeflow-edit cannot {verb} {_key(doc)}"
    for doc in admin:
        group, resource = RESOURCES[doc["kind"]]
        assert not kubeflow.allows(CONTRIBUTOR, rbac.Request("create", group, resource, namespace)), f"{_key(doc)} needs no admin"


@pytest.mark.parametrize("name", DEPLOYED)
def test_the_owner_cannot_grant_the_rayjob_role_without_kuberays_aggregation(name):
    """RBAC escalation prevention: a Role (or a binding to it) only with rights one holds.

    The owner (kubeflow-admin: kubeflow-edit plus roles/rolebindings) could make the retrain
    Role, but not the RayJob Role: nothing on ray.io. Kubeflow's own KubeRay install
    aggregates ray.io into kubeflow-edit, and then default-editor, which every pipeline
    runs as, may create RayJobs too (docs/deploy.md, "RBAC").
    """
    docs, namespace = build(name), NAMESPACES[name]
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "Role"}
    kubeflow = _profile(namespace)
    assert kubeflow.allows(OWNER, rbac.Request("create", "rbac.authorization.k8s.io", "roles", namespace))
    assert not kubeflow.allows(CONTRIBUTOR, rbac.Request("create", "rbac.authorization.k8s.io", "roles", namespace))
    missing = kubeflow.uncovered(OWNER, namespace, roles["imgpipe-rayjobs"])
    assert {(r.group, r.resource) for r in missing} == {("ray.io", "rayjobs")}
    assert kubeflow.uncovered(OWNER, namespace, roles["imgpipe-retrain"]) == []
    default_editor = rbac.service_account(namespace, "default-editor")
    create_rayjob = rbac.Request("create", "ray.io", "rayjobs", namespace)
    assert not kubeflow.allows(default_editor, create_rayjob)
    with_kuberay = _profile(namespace, rbac.KUBERAY_EDIT)
    assert with_kuberay.uncovered(OWNER, namespace, roles["imgpipe-rayjobs"]) == []
    assert with_kuberay.allows(default_editor, create_rayjob), "the binding to imgpipe-pipeline does not keep others out"
    # The pods rules of the RayJob Role are kubeflow-edit's already (imgpipe-pipeline is bound to it).
    pods = [
        rbac.Request(verb, "", resource.partition("/")[0], namespace, resource.partition("/")[2])
        for rule in roles["imgpipe-rayjobs"]
        if rule["apiGroups"] == [""]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    assert pods and all(kubeflow.allows(default_editor, r) for r in pods)


def test_deploy_md_says_who_applies_what_with_these_selectors():
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "## Who applies what" in deploy
    for overlay in ("dev", "gpu"):
        assert f"kubectl apply -k k8s/overlays/{overlay} -l {ADMIN_SELECTOR}" in deploy
        assert f"kubectl apply -k k8s/overlays/{overlay} -l '{OWNER_SELECTOR}'" in deploy
    assert "KubeRay 1.3.2" in deploy and "aggregated-roles.yaml" in deploy, "Kubeflow's KubeRay aggregates ray.io into kubeflow-edit"
    assert "pipelines/versions" not in (K8S / "base" / "role-retrain.yaml").read_text().split("rules:")[1]


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
