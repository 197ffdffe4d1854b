"""tests/fake_model_registry.py against the real Model Registry server (tier 5): the same calls, the same answers.

imgpipe's quick tests register models with the fake; this runs every kind of call the
model-registry client makes for imgpipe (list, find by name, create a registered model, a version
and its model artifact, read them back, and the refusals: a name taken twice, a parent that does
not exist, a body the API does not take, a path of another API version) against the fake and the
real server, and compares each answer's status and the fields of its body. Ids and timestamps
differ by nature; their presence and type are compared.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from imgpipe.serving.registry import API_PATH
from tests.cluster.test_serving import registry
from tests.fake_model_registry import FakeModelRegistry

pytestmark = pytest.mark.cluster
VARYING = {"id", "createTimeSinceEpoch", "lastUpdateTimeSinceEpoch", "registeredModelId", "message"}


def _shape(body: Any) -> Any:
    """A body with its values reduced to their types (and lists to their first item's shape)."""
    if isinstance(body, dict):
        return {k: _shape(v) for k, v in body.items()}
    if isinstance(body, list):
        return [_shape(body[0])] if body else []
    return type(body).__name__


def _calls(host: str) -> list[tuple[str, int, Any]]:
    """imgpipe's calls, in the order a registration makes them, on the server at ``host``; (call, status, body)."""
    base = f"{host}{API_PATH}"
    suffix = uuid.uuid4().hex[:6]
    name, run = f"compare-model-{suffix}", f"run-{suffix}"  # new on the real server too (it keeps what earlier runs made)
    seen: list[tuple[str, int, Any]] = []

    def call(label: str, method: str, path: str, **kwargs: Any) -> Any:
        answer = requests.request(method, f"{base}{path}", timeout=30, **kwargs)
        try:
            body = answer.json()
        except ValueError:
            body = answer.text[:200]
        seen.append((label, answer.status_code, body))
        return body

    call("list registered models", "GET", "/registered_models", params={"pageSize": "10"})
    call("find a missing model", "GET", "/registered_model", params={"name": name})
    model = call("create a registered model", "POST", "/registered_models", json={"name": name, "owner": "imgpipe"})
    call("create it again", "POST", "/registered_models", json={"name": name})
    call("create one without a name", "POST", "/registered_models", json={"owner": "imgpipe"})
    call("find it by name", "GET", "/registered_model", params={"name": name})
    call("get it by id", "GET", f"/registered_models/{model.get('id')}")
    call("get a missing id", "GET", "/registered_models/987654321")
    version = call(
        "create a version",
        "POST",
        "/model_versions",
        json={"name": run, "registeredModelId": model.get("id"), "author": "imgpipe", "description": "resnet18"},
    )
    call("create the version again", "POST", "/model_versions", json={"name": run, "registeredModelId": model.get("id")})
    call("a version of a missing model", "POST", "/model_versions", json={"name": run, "registeredModelId": "987654321"})
    call("find the version", "GET", "/model_version", params={"name": run, "parentResourceId": model.get("id")})
    call("list its versions", "GET", f"/registered_models/{model.get('id')}/versions")
    artifact = {"artifactType": "model-artifact", "name": name, "uri": "s3://bucket/runs/r1/train/model.onnx", "modelFormatName": "onnx"}
    call("add its model artifact", "POST", f"/model_versions/{version.get('id')}/artifacts", json=artifact)
    call("list its artifacts", "GET", f"/model_versions/{version.get('id')}/artifacts")
    newer = requests.get(f"{host}/api/model_registry/v1/registered_models", timeout=30)
    seen.append(("another API version (model-registry 0.3.12+)", newer.status_code, None))
    return seen


def test_the_fake_registry_gives_the_real_servers_answers():
    real = _calls(registry())
    with FakeModelRegistry("v0.3.8") as fake_server:
        fake = _calls(fake_server.address)
    differences = []
    for (label, real_status, real_body), (_, fake_status, fake_body) in zip(real, fake, strict=True):
        if real_status != fake_status:
            differences.append(f"{label}: status {fake_status} (fake) vs {real_status} (real): {str(real_body)[:200]}")
            continue
        ours, theirs = _shape(fake_body), _shape(real_body)
        if isinstance(ours, dict) and isinstance(theirs, dict):
            for key in sorted(set(ours) ^ set(theirs)):
                differences.append(f"{label}: field {key!r} only in the {'fake' if key in ours else 'real server'}'s answer")
            for key in sorted((set(ours) & set(theirs)) - VARYING):
                if ours[key] != theirs[key] and key not in ("items",):
                    differences.append(f"{label}: field {key!r} is {ours[key]} (fake) vs {theirs[key]} (real)")
    assert not differences, "\n".join(differences)
