"""The TrainJob object a multi-node train runs as: what it carries, its node pods, and the settings it is built from."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from imgpipe import contract, storage
from imgpipe.remote import trainjob_spec
from imgpipe.train.config import TrainConfig
from tests.remote.fake_kuberay import strict
from tests.remote.fake_trainer import GPU_POD, run

# No test here checks the ONNX or TorchScript exports (tests/train/test_export.py does).
pytestmark = pytest.mark.usefixtures("no_exports")


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
    # Each node pod preferably where no other of this TrainJob's is (JobSet labels them with its name, the TrainJob's).
    (spread,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {trainjob_spec.JOBSET_LABEL: name}}}
    assert spread["podAffinityTerm"] == term
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


def test_a_cpu_build_asks_for_no_gpu_on_any_node(setup, monkeypatch):
    monkeypatch.setenv(trainjob_spec.NODE_RESOURCES_ENV, json.dumps({"requests": {"cpu": "8"}, "limits": {"cpu": "8", "memory": "48Gi"}}))
    monkeypatch.setenv(trainjob_spec.POD_ENV, "")
    api = setup["fake"]()
    run(setup, api)
    body = api.sent[api.created[0]]
    assert "nvidia.com/gpu" not in json.dumps(body), "no GPU limit, toleration or selector"
    meta, pod = _node_pod(body)
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false"} and "tolerations" not in pod


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
