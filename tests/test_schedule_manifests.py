"""The scheduled retraining (k8s/argo): the images it compiles and how long Argo keeps its runs.

* Images: each overlay's ``images:`` is the one place that names the images. The test renders
  every overlay with ``kubectl kustomize`` (as committed, and with its ``images:`` pointed at
  another registry by tag and by digest), runs the CronWorkflow's own command, ``imgpipe submit
  --params-from-env ...``, in the CronWorkflow container's environment against a fake Kubeflow
  Pipelines API, and compares every image of the pipeline that command compiled and uploaded
  with the overlay's entry for that name, as it does the images of the Ray pods and of the
  CronWorkflow.
* History: the CronWorkflow's ``ttlStrategy`` merged with the ``workflowDefaults`` of the Argo
  that Kubeflow Pipelines installs, as the workflow controller merges them, gives the TTL that
  Argo's garbage collector computes: it must be the retention docs/deploy.md states.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from imgpipe import cli
from imgpipe.containers import catalog
from imgpipe.kfp import connect as kfp_connect
from tests.helpers import deploy_guide
from tests.kfp.fake_kfp import serve
from tests.manifests import ARGO_SCHEMAS, K8S, argo_validator, build

KUBECTL = shutil.which("kubectl")
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The names the manifests and imgpipe.containers.catalog give the pipeline's images: imgpipe-<kind>.
IMAGE_NAMES = {f"imgpipe-{kind}": kind for kind in catalog.STEP_KINDS}
# What Argo substitutes for {{workflow.name}}: the CronWorkflow's name and the schedule's time.
WORKFLOW_NAME = "imgpipe-retrain-1718000000"
# docs/deploy/install.md, "Step by step", step 6: a finished retraining workflow is kept 7 days.
RETENTION_S = 7 * 24 * 3600

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed: these tests render the overlays with `kubectl kustomize`, "
    "the images transformer that this pins (install kubectl to run them)",
)

# ----------------------------------------------------------------------------------------
# Rendering overlays.


def _retargeted(kustomization: dict, how: str) -> None:
    """Points ``images:`` at another registry, by tag or by digest, as docs/deploy.md step 2 asks."""
    for entry in kustomization["images"]:
        entry.pop("newTag", None)
        entry.pop("digest", None)
        entry["newName"] = f"registry.example.com/ml/{entry['name']}"
        if how == "tag":
            entry["newTag"] = "2.0.0-rc1"
        else:
            # A distinct digest per name, so that a name compiled into another's image shows.
            entry["digest"] = "sha256:" + f"{sorted(IMAGE_NAMES).index(entry['name']) + 1:x}" * 64


def _overlay(tmp_path: Path, overlay: str, how: str) -> tuple[Path, dict[str, str]]:
    """A copy of k8s/ with ``overlay``'s ``images:`` as committed or retargeted; (its directory, expected images).

    The expected images are what kustomize's images transformer writes for each name:
    ``newName`` (or the name), then ``@digest``, else ``:newTag``.
    """
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    directory = tree / "overlays" / overlay
    path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    if how != "committed":
        _retargeted(kustomization, how)
        path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    expected = {}
    for entry in kustomization.get("images", []):
        ref = entry.get("newName", entry["name"])
        if "digest" in entry:
            ref += "@" + entry["digest"]
        elif "newTag" in entry:
            ref += ":" + str(entry["newTag"])
        expected[entry["name"]] = ref
    assert set(expected) == set(IMAGE_NAMES), f"{overlay}: `images:` must name each of {sorted(IMAGE_NAMES)}"
    return directory, expected


def _kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _images(node: Any) -> list[str]:
    """Every ``image`` string in a manifest (containers, the autoscaler, Argo's template container)."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [i for k, v in node.items() if k != "image" for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


# ----------------------------------------------------------------------------------------
# Running the CronWorkflow's command.


def _container(cron: dict) -> dict:
    (template,) = cron["spec"]["workflowSpec"]["templates"]
    return template["container"]


def _pod_environment(docs: list[dict], cron: dict) -> dict[str, str]:
    """The environment of the CronWorkflow's container: its ``envFrom``, then its ``env`` (which wins, as in Kubernetes)."""
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    container = _container(cron)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom source {source}"
        env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            # The Downward API's namespace: the one kustomize rendered the CronWorkflow into.
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, var
            env[var["name"]] = cron["metadata"]["namespace"]
    return env


def _run_scheduled_submit(docs: list[dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Runs the CronWorkflow's command in its container's environment; the packages it uploaded."""
    (cron,) = [d for d in docs if d["kind"] == "CronWorkflow"]
    container = _container(cron)
    assert container["command"] == ["imgpipe"], container["command"]
    argv = [a.replace("{{workflow.name}}", WORKFLOW_NAME) for a in container["args"]]
    for name in list(os.environ):
        if name.startswith(("IMGPIPE_", "KF_PIPELINES_")):
            monkeypatch.delenv(name)
    for name, value in _pod_environment(docs, cron).items():
        monkeypatch.setenv(name, value)
    # The pod's HOME is its /tmp emptyDir; a test writes only under tmp_path.
    monkeypatch.setenv("HOME", str(tmp_path))
    # The KFP that Kubeflow 26.03 ships, multi-user, held to its API contract (tests/kfp/fake_kfp.py),
    # in place of the in-cluster address the CronWorkflow names.
    with serve("2.16.0", multi_user=True) as (host, fake):
        monkeypatch.setenv(kfp_connect.HOST_ENV, host)
        monkeypatch.setenv(kfp_connect.TOKEN_ENV, "the-pods-service-account-token")
        assert cli.main(argv) == 0
    packages = [v["package"].decode() for v in fake.versions]
    assert packages and len(fake.runs) == 1, "the command compiles, uploads and starts one run"
    return packages


def _compiled_images(package: str) -> list[tuple[str, str]]:
    """(where, image) of every image a package names: each executor's, and the images it hands on at run time."""
    spec = next(yaml.safe_load_all(package))
    found = []
    for name, executor in spec["deploymentSpec"]["executors"].items():
        found.append((name, executor["container"]["image"]))
        # The resize task passes IMGPIPE_RAY_IMAGE to the RayJob it creates (imgpipe.remote.kuberay).
        found += [
            (f"{name} ${e['name']}", e["value"])
            for e in executor["container"].get("env", [])
            if e["name"] in {f"IMGPIPE_{k.upper()}_IMAGE" for k in catalog.KINDS}
        ]
    return found


# Each overlay once and each way of naming an image once in make test; the other pairs in make test-slow.
IN_MAKE_TEST = {("dev", "committed"), ("dev", "digest"), ("gpu", "tag")}


@needs_kubectl
@pytest.mark.parametrize(
    ("overlay", "how"),
    [
        pytest.param(overlay, how, id=f"{overlay}-{how}", marks=() if (overlay, how) in IN_MAKE_TEST else pytest.mark.slow)
        for overlay in OVERLAYS
        for how in ("committed", "tag", "digest")
    ],
)
def test_the_scheduled_run_compiles_the_images_the_overlay_names(overlay, how, tmp_path, monkeypatch):
    directory, expected = _overlay(tmp_path, overlay, how)
    docs = _kustomize(directory)
    named = {ref: name for name, ref in expected.items()}

    # What kustomize itself sets: the Ray pods and the CronWorkflow's container.
    for doc in docs:
        if doc["kind"] in ("RayJob", "RayCluster"):
            assert set(_images(doc)) == {expected["imgpipe-ray"]}, f"{overlay} ({how}): {doc['kind']}"
        elif doc["kind"] == "CronWorkflow":
            assert set(_images(doc)) == {expected["imgpipe-cpu"]}, f"{overlay} ({how}): CronWorkflow"

    # What the scheduled run compiles into the pipeline it uploads and runs.
    used = set()
    for package in _run_scheduled_submit(docs, monkeypatch, tmp_path):
        for where, image in _compiled_images(package):
            assert image in named, f"{overlay} ({how}): {where} compiled {image!r}; the overlay names {expected}"
            used.add(named[image])
            if "$IMGPIPE_RAY_IMAGE" in where:
                assert image == expected["imgpipe-ray"], f"{overlay} ({how}): {where}"
    assert used == set(IMAGE_NAMES), f"{overlay} ({how}): the pipeline uses {sorted(used)}"
    # ...and the catalog reads each name's image, not the registry's default.
    assert {f"imgpipe-{k}": v for k, v in vars(catalog.images()).items()} == expected


def test_a_whole_image_name_wins_over_registry_and_tag():
    digest = "registry.example.com:5000/ml/imgpipe-ray@sha256:" + "ab" * 32
    env = {
        "IMGPIPE_REGISTRY": "elsewhere.example/ml",
        "IMGPIPE_IMAGE_TAG": "9.9.9",
        "IMGPIPE_CPU_IMAGE": "registry.example.com:5000/ml/imgpipe-cpu:1.2.3",
        "IMGPIPE_RAY_IMAGE": f"  {digest}\n",
    }
    assert catalog.image("cpu", env) == "registry.example.com:5000/ml/imgpipe-cpu:1.2.3"
    assert catalog.image("ray", env) == digest
    assert catalog.image("gpu", env) == "elsewhere.example/ml/imgpipe-gpu:9.9.9"


# ----------------------------------------------------------------------------------------
# How long Argo keeps the retraining's workflows.

# The `workflowDefaults` of the workflow controller Kubeflow Pipelines installs, verbatim
# (kubeflow/pipelines 2.17.0, manifests/kustomize/third-party/argo/base/
# workflow-controller-configmap-patch.yaml, added by kubeflow/pipelines#13485; 2.16.x and
# kubeflow/manifests 26.03, which ships 2.16.0, set none). The controller merges it into
# every Workflow it runs, the CronWorkflow's included.
KFP_WORKFLOW_DEFAULTS = {
    "spec": {
        "ttlStrategy": {"secondsAfterCompletion": 3600, "secondsAfterSuccess": 3600, "secondsAfterFailure": 3600},
        "templateDefaults": {"retryStrategy": {"limit": "2", "retryPolicy": "OnError"}},
    }
}


def argo_merge(defaults: Any, workflow: Any) -> Any:
    """``workflowDefaults`` merged into a workflow as Argo's controller does it.

    argo-workflows v4.1.2 ``workflow/controller/controller.go`` ``setWorkflowDefaults`` calls
    ``workflow/util/merge.go`` ``MergeTo``: a strategic merge patch with the workflow as the
    patch over the defaults, so objects merge key by key and the workflow's own value wins
    wherever it sets one. Lists would merge by their patch keys; the defaults have none, so
    a list is taken whole here (the caller checks that).
    """
    if isinstance(defaults, dict) and isinstance(workflow, dict):
        merged = copy.deepcopy(defaults)
        for key, value in workflow.items():
            merged[key] = argo_merge(defaults[key], value) if key in defaults else copy.deepcopy(value)
        return merged
    return copy.deepcopy(workflow)


def argo_ttl(spec: dict, phase: str) -> int | None:
    """Seconds Argo keeps a finished workflow of ``spec`` in ``phase``; ``None``: forever.

    argo-workflows v4.1.2 (the same in v3.6.0 and v3.7.3) ``workflow/gccontroller/gc_controller.go``
    ``ttl``: secondsAfterFailure for a Failed workflow, else secondsAfterSuccess for a Succeeded
    one, else secondsAfterCompletion for any completed one (Succeeded, Failed, Error); the
    Workflow's own ``spec.ttlStrategy`` (after the defaults are merged in) when it has one
    (``pkg/apis/workflow/v1alpha1/workflow_types.go`` ``GetTTLStrategy``).
    """
    ttl = spec.get("ttlStrategy")
    if ttl is None:
        return None
    if phase == "Failed" and "secondsAfterFailure" in ttl:
        return ttl["secondsAfterFailure"]
    if phase == "Succeeded" and "secondsAfterSuccess" in ttl:
        return ttl["secondsAfterSuccess"]
    if phase in ("Succeeded", "Failed", "Error") and "secondsAfterCompletion" in ttl:
        return ttl["secondsAfterCompletion"]
    return None


def _lists(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_lists(v) for v in node.values())
    return isinstance(node, list)


def test_the_merge_and_ttl_model_reproduce_argo():
    assert not _lists(KFP_WORKFLOW_DEFAULTS), "argo_merge takes lists whole; merging one would need its patch key"
    only_completion = argo_merge(KFP_WORKFLOW_DEFAULTS["spec"], {"ttlStrategy": {"secondsAfterCompletion": RETENTION_S}})
    # What a CronWorkflow with only secondsAfterCompletion gets on KFP's Argo: an hour.
    assert only_completion["ttlStrategy"] == {"secondsAfterCompletion": RETENTION_S, "secondsAfterSuccess": 3600, "secondsAfterFailure": 3600}
    assert argo_ttl(only_completion, "Succeeded") == argo_ttl(only_completion, "Failed") == 3600
    assert argo_ttl(only_completion, "Error") == RETENTION_S
    assert argo_ttl({"ttlStrategy": {"secondsAfterCompletion": 5}}, "Succeeded") == 5
    assert argo_ttl({}, "Succeeded") is None and argo_ttl({"ttlStrategy": {"secondsAfterSuccess": 5}}, "Running") is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retraining_history_is_kept_as_documented(overlay):
    (cron,) = [d for d in build(f"overlays/{overlay}") if d["kind"] == "CronWorkflow"]
    effective = argo_merge(KFP_WORKFLOW_DEFAULTS["spec"], cron["spec"]["workflowSpec"])
    for phase in ("Succeeded", "Failed", "Error"):
        assert argo_ttl(effective, phase) == RETENTION_S, f"{overlay}: a {phase} workflow"
        assert argo_ttl(cron["spec"]["workflowSpec"], phase) == RETENTION_S, f"{overlay}: a {phase} workflow, no defaults"
    # The CronWorkflow controller keeps this many finished workflows at most, each within its TTL.
    assert (cron["spec"]["successfulJobsHistoryLimit"], cron["spec"]["failedJobsHistoryLimit"]) == (3, 5)
    deploy = " ".join(deploy_guide().split())
    assert "the last 3 succeeded and 5 failed retraining workflows, each for 7 days after it ends" in deploy


@pytest.mark.parametrize("schema", ARGO_SCHEMAS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cronworkflow_passes_the_argo_schema_strictly(overlay, schema, schemas_dir):
    (cron,) = [d for d in build(f"overlays/{overlay}") if d["kind"] == "CronWorkflow"]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in argo_validator(schemas_dir, schema).iter_errors(cron)]
    assert errors == [], f"{overlay}: {schema}"
