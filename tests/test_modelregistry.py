"""Registering a promoted model with the real model-registry client against a Model Registry REST server.

The server is held to the OpenAPI contract of the versions kubeflow/manifests ships
(tests/fake_model_registry.py, tests/contracts/model-registry/); each test runs against each.
"""

from __future__ import annotations

import json
import re

import pytest

from imgpipe import storage
from imgpipe.serving.registry import register_model
from tests.fake_model_registry import VERSIONS, Contract, FakeModelRegistry, load_contract

pytest.importorskip("model_registry")


@pytest.fixture(params=VERSIONS)
def registry(request):
    """A fake of each shipped server version, to start with ``with``; leaving it raises on any answer outside its contract."""
    return FakeModelRegistry(request.param)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig
    from tests.train.test_loader import write_resize_output

    root = tmp_path_factory.mktemp("registry")
    data = write_resize_output("file://" + str(root / "resize"), size=16)
    out = "file://" + str(root / "model")
    train(data, out, TrainConfig(model="tiny_cnn", epochs=1, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=8))
    return out


def test_a_model_is_registered_with_its_onnx_uri_and_card(model, registry):
    with registry as server:
        got = register_model(model, "run-1", server.address, name="pets")
        assert got["created"] and got["uri"] == storage.join(model, "model.onnx")
        (registered,) = server.models.values()
        (version,) = server.versions.values()
        (artifact,) = server.artifacts[version["id"]]
        assert registered["name"] == "pets" and version["name"] == "run-1"
        assert artifact["uri"] == got["uri"] and artifact["modelFormatName"] == "onnx" and artifact["modelFormatVersion"] == "18"
        props = {k: next(iter(v.values())) for k, v in version["customProperties"].items() if isinstance(v, dict)}
        card = json.loads(storage.read_bytes(storage.join(model, "model.json")))
        assert any(str(card["data"]["manifest_sha256"]) in str(v) for v in props.values())


def test_registering_again_is_a_no_op_and_a_new_version_joins_the_model(model, registry):
    with registry as server:
        register_model(model, "run-1", server.address, name="pets")
        again = register_model(model, "run-1", server.address, name="pets")
        assert not again["created"] and len(server.versions) == 1
        register_model(model, "run-2", server.address, name="pets")
        assert len(server.models) == 1 and sorted(v["name"] for v in server.versions.values()) == ["run-1", "run-2"]


def test_no_registry_or_no_card_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.delenv("IMGPIPE_MODEL_REGISTRY", raising=False)
    with pytest.raises(ValueError, match="Model Registry"):
        register_model(model, "run-1")
    with FakeModelRegistry() as server, pytest.raises(Exception, match="manifest|committed"):  # noqa: PT012
        register_model("file://" + str(tmp_path), "run-1", server.address)


def _as_run(model: str, tmp_path, monkeypatch, run_id: str) -> str:
    """A data root whose run ``run_id`` trained ``model`` (a copy), under a task's read policy; returns the root."""
    from imgpipe import contract
    from imgpipe.stepio import artifacts as ka

    root = "file://" + str(tmp_path / "root")
    dst = ka.run_prefix(root, run_id, "train")
    for name in [f["name"] for f in contract.read_manifest(model)["files"]] + [contract.MANIFEST, contract.SUCCESS]:
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(model, name)))
    # The task's read policy: a local data root, and the model's data (elsewhere in this test) listed.
    monkeypatch.setenv("IMGPIPE_SOURCE_LOCAL", "1")
    monkeypatch.setenv("IMGPIPE_READ_PREFIXES", json.loads(storage.read_bytes(storage.join(model, "model.json")))["data"]["uri"])
    return root


def test_a_promoted_run_is_registered_where_the_operator_names_a_registry(model, tmp_path, monkeypatch, registry):
    from imgpipe.stepio import artifacts as ka

    root = _as_run(model, tmp_path, monkeypatch, "r7")
    with registry as server:
        monkeypatch.setenv("IMGPIPE_MODEL_REGISTRY", server.address)
        assert ka.promote_run(root, "r7").promoted
        (version,) = server.versions.values()
        assert version["name"] == "r7"


def test_the_compiled_promote_task_carries_the_registry(tmp_path, monkeypatch):
    import yaml

    from imgpipe.kfp import package as kfp_package

    monkeypatch.setenv("IMGPIPE_MODEL_REGISTRY", "http://model-registry-service.kubeflow.svc.cluster.local:8080")
    monkeypatch.delenv(kfp_package.GPU_ENV, raising=False)
    ir = next(yaml.safe_load_all(kfp_package.compile_package(tmp_path / "p.yaml").read_text()))
    envs = {n: {e["name"]: e["value"] for e in x["container"].get("env", [])} for n, x in ir["deploymentSpec"]["executors"].items()}
    assert envs["exec-promote"]["IMGPIPE_MODEL_REGISTRY"].endswith(":8080"), "the gate registers what it promotes"
    assert [n for n, env in envs.items() if "IMGPIPE_MODEL_REGISTRY" in env] == ["exec-promote"]


def test_the_command_line_registers_by_hand(model, capsys):
    from imgpipe.cli import main

    with FakeModelRegistry() as server:
        assert main(["register", model, "--version", "manual-1", "--registry", server.address]) == 0
        assert "registered: imgpipe-classifier version manual-1" in capsys.readouterr().out


def test_the_fake_serves_the_contracts_paths_only_and_checks_its_own_answers():
    with FakeModelRegistry() as server:
        # The client that installs by default today (0.3.18) calls /v1: the shipped servers have no such route.
        assert server.handle("GET", "/api/model_registry/v1/registered_models?pageSize=1", None)[0] == 404
        assert server.handle("GET", "/api/model_registry/v1alpha3/registered_models?pageSize=1", None)[0] == 200
        # A missing required field: the real server's 422, which its contract does not list (tests/cluster/test_registry_fake.py).
        status, answer = server.handle("POST", "/api/model_registry/v1alpha3/registered_models", {"description": "no name"})
        assert (status, answer) == (422, {"code": "Bad Request", "message": "required field 'name' is zero value."})
        status, answer = server.handle("POST", "/api/model_registry/v1alpha3/registered_models", {"name": 7})
        assert status == 400 and "is not of type 'string'" in answer["message"]
    contract = Contract(load_contract(VERSIONS[0]))
    _, op, _ = contract.match("POST", "/api/model_registry/v1alpha3/registered_models")
    assert contract.response_errors(op, 422, {"code": "422", "message": "x"}), "the webhook-style 422 is not in this contract"
    assert contract.response_errors(op, 201, {"name": 7}), "a field of the wrong type is caught"


def _as_newer_server(server: FakeModelRegistry) -> None:
    """Rewrites the fake's routes to /api/model_registry/v1, as a Kubeflow Hub server serves them."""
    server.contract.routes = [(re.compile(p.pattern.replace("v1alpha3", "v1")), m, t, op) for p, m, t, op in server.contract.routes]


def test_a_registry_on_another_api_version_fails_registration_in_one_line_and_promotes_nothing(model, tmp_path, monkeypatch):
    from imgpipe import contract
    from imgpipe.serving.registry import RegistryError
    from imgpipe.stepio import artifacts as ka

    root = _as_run(model, tmp_path, monkeypatch, "r8")
    with FakeModelRegistry() as server:
        _as_newer_server(server)
        monkeypatch.setenv("IMGPIPE_MODEL_REGISTRY", server.address)
        with pytest.raises(RegistryError) as info:
            ka.promote_run(root, "r8")
        message = str(info.value)
        assert "serves /api/model_registry/v1 " in message and "v1alpha3" in message and "nothing was promoted" in message
        assert "\n" not in message
        assert ka.read_latest(root) is None and not contract.is_committed(ka.run_prefix(root, "r8", "promote"))

        monkeypatch.setenv("IMGPIPE_MODEL_REGISTRY_OPTIONAL", "1")  # the operator's choice: promote without it
        assert ka.promote_run(root, "r8").promoted and ka.read_latest(root)["run_id"] == "r8"
