"""KubeRay's RayJob: the manifests in k8s/ray/ against the KubeRay v1.7 CRDs, then the RayJob builder.

Validation is strict: every object schema that lists its properties also gets
``additionalProperties: false``, so a misspelt field (``shutdownAfterJobFinish``)
fails here instead of being pruned silently by the API server.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from imgpipe.remote import kube, rayjob_spec
from imgpipe.resize.config import ResizeConfig
from tests.conftest import ROOT
from tests.helpers import parse_entrypoint
from tests.remote.fake_kuberay import K8S, params, validate

SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)


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
