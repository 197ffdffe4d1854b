"""k8s/ built offline for the manifest tests: a kustomize subset and the schemas' validators.

Builds use a small pure-Python resolver for the kustomize subset these files use
(resources, configMapGenerator with merge, generatorOptions, strategic-merge patches
incl. ``$patch: delete``, namespace, images incl. ``configurations`` field specs); it
refuses anything else, and tests/test_manifests.py compares each build with ``kubectl
kustomize`` where ``kubectl`` is installed. The validators check RayJob and RayCluster
against the KubeRay v1 CRD schemas and the CronWorkflow against the Argo Workflows JSON
schemas, with unknown fields refused.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BUILDS = ("base", "overlays/dev", "overlays/gpu")
# What gets applied: base holds the shared objects, the overlays add the Components they use.
DEPLOYED = ("overlays/dev", "overlays/gpu")
# The namespace each build installs into (a Kubeflow profile's, created by its Profile).
NAMESPACES = {"base": "imgpipe", "overlays/dev": "imgpipe-dev", "overlays/gpu": "imgpipe"}
ARGO_SCHEMAS = ("argo-workflows-v3.6.0-schema.json", "argo-workflows-v4.1.2-schema.json")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass", "StorageClass"}

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
