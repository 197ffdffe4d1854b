"""A Model Registry REST server on 127.0.0.1, held to the OpenAPI contract the shipped servers publish.

Routes, path parameters, request bodies, status codes and response bodies come from
kubeflow/model-registry's ``api/openapi/model-registry.yaml`` as vendored in
``tests/contracts/model-registry/`` (v0.3.4 and v0.3.8: the servers kubeflow/manifests
v1.11.0, 26.03 and master deploy; byte-identical from v0.3.4 to v0.3.8). Nothing here lists a
path: a request is matched against the contract's path templates (``/api/model_registry/v1alpha3/...``),
so a client speaking another API version (``/api/model_registry/v1``, model-registry 0.3.12+)
gets the router's 404, as from the real server.

Each request body is validated against the operation's ``requestBody`` schema (400 with the
contract's ``Error`` body when it fails), and each answer against the contract's response
schema for its status; an answer the contract does not allow (a status the operation does not
list, a field of the wrong type, an operation the fake does not implement) is recorded in
:attr:`FakeModelRegistry.violations`, and leaving the ``with`` block with any raises: the fake
can never pass a test by answering what the server would not.

What the contract says only in prose, or not at all, is as the real v0.3.8 server does it
(compared call by call on the cluster: tests/cluster/test_registry_fake.py): ``find`` operations
give 404 when nothing matches; creates give 201 with a server id (a decimal string),
epoch-millisecond timestamps and an empty ``customProperties`` where none was sent; names are
unique (409 for a second registered model of one name, or a second version of one name within a
model); a body without a required field gets 422 (``Bad Request``, "required field 'name' is zero
value."), which the contract does not list; a version naming a registered model that does not
exist is created; an artifact posted to a version is a ``model-artifact`` and has no ``state``
unless one was sent.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

from tests import serving

CONTRACTS = Path(__file__).resolve().parent / "contracts" / "model-registry"
# The server versions kubeflow/manifests deploys (tests/contracts/model-registry/README.md).
VERSIONS = ("v0.3.4", "v0.3.8")


def load_contract(version: str) -> dict[str, Any]:
    """The vendored OpenAPI document of Model Registry ``version``."""
    return yaml.load((CONTRACTS / f"model-registry-{version}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _discriminated(node: Any) -> Any:
    """OpenAPI's ``discriminator`` + ``oneOf`` as JSON Schema ``if``/``then`` (the type field picks one branch)."""
    if isinstance(node, dict):
        node = {k: _discriminated(v) for k, v in node.items()}
        if "discriminator" in node and "oneOf" in node:
            prop, mapping = node["discriminator"]["propertyName"], node["discriminator"].get("mapping", {})
            node.pop("oneOf")
            node["allOf"] = [
                {"if": {"properties": {prop: {"const": key}}, "required": [prop]}, "then": {"$ref": ref}} for key, ref in mapping.items()
            ]
        return node
    if isinstance(node, list):
        return [_discriminated(v) for v in node]
    return node


class Contract:
    """The operations of one OpenAPI document: path templates, their schemas and statuses."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.components = _discriminated(document["components"])
        self.routes: list[tuple[re.Pattern[str], str, str, dict[str, Any]]] = []
        for template, item in document["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")
            for method, op in item.items():
                if method in ("get", "post", "patch", "put", "delete"):
                    self.routes.append((pattern, method.upper(), template, op))

    def match(self, method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]] | None:
        """``(template, operation, path parameters)`` serving ``method path``, or ``None``."""
        for pattern, verb, template, op in self.routes:
            found = pattern.match(path)
            if found and verb == method:
                return template, op, found.groupdict()
        return None

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            kind, name = node["$ref"].split("/")[-2:]
            node = self.components[kind][name]
        return node

    def validator(self, schema: dict[str, Any]) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({**schema, "components": self.components})

    def request_errors(self, op: dict[str, Any], body: Any) -> list[str]:
        spec = op.get("requestBody")
        if spec is None:
            return []
        spec = self.resolve(spec)
        if body is None:
            return ["a request body is required"] if spec.get("required") else []
        schema = spec["content"]["application/json"]["schema"]
        return [f"{'.'.join(map(str, e.absolute_path)) or 'body'}: {e.message}" for e in self.validator(schema).iter_errors(body)]

    def missing_fields(self, op: dict[str, Any], body: Any) -> list[str]:
        """The required top-level fields a JSON object body lacks."""
        spec = op.get("requestBody")
        if spec is None or not isinstance(body, dict):
            return []
        schema = self.resolve(self.resolve(spec)["content"]["application/json"]["schema"])
        return [f for f in schema.get("required", []) if body.get(f) in (None, "")]

    def response_errors(self, op: dict[str, Any], status: int, body: Any) -> list[str]:
        responses = op.get("responses", {})
        spec = responses.get(str(status)) or responses.get("default")
        if spec is None:
            return [f"status {status} is not among the operation's responses {sorted(responses)}"]
        schema = (self.resolve(spec).get("content") or {}).get("application/json", {}).get("schema")
        if schema is None:
            return []
        return [f"{'.'.join(map(str, e.absolute_path)) or 'body'}: {e.message}" for e in self.validator(schema).iter_errors(body)]


def _error(status: int, message: str) -> tuple[int, dict[str, str]]:
    return status, {"code": str(status), "message": message}


class FakeModelRegistry:
    """The server and what it holds: registered models, versions, artifacts, requests, contract violations."""

    def __init__(self, version: str = VERSIONS[-1]) -> None:
        self.version = version
        self.contract = Contract(load_contract(version))
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeModelRegistry:
        self.thread = serving.start(self.server)
        return self

    def __exit__(self, *exc: Any) -> None:
        serving.stop(self.server, self.thread)
        if self.violations and exc[0] is None:
            raise AssertionError(f"the fake answered outside the Model Registry {self.version} contract: {self.violations}")

    def _stamp(self, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        stamped = {"customProperties": {}, **body, **extra}  # the server answers an empty map where none was sent
        return {**stamped, "id": str(next(self._ids)), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}

    def handle(self, method: str, url: str, body: Any) -> tuple[int, Any]:
        """One request, as the server answers it; the answer is checked against the contract."""
        parsed = urlparse(url)
        query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
        with self._lock:
            self.requests.append((method, parsed.path))
            found = self.contract.match(method, parsed.path)
            if found is None:  # the server's router: no such route
                return 404, {"code": "404", "message": f"{method} {parsed.path}: not found"}
            template, op, params = found
            missing = self.contract.missing_fields(op, body)
            if missing:  # the server's 422, which the contract does not list (its answer, word for word)
                return 422, {"code": "Bad Request", "message": f"required field '{missing[0]}' is zero value."}
            errors = self.contract.request_errors(op, body)
            if errors:
                status, answer = _error(400, f"invalid {op['operationId']} request: {'; '.join(errors)}")
            else:
                serve = getattr(self, "_" + op["operationId"], None)
                if serve is None:
                    self.violations.append(f"{op['operationId']} ({method} {template}) is not implemented by the fake")
                    return 500, {"code": "500", "message": "not implemented by the fake"}
                status, answer = serve(params, query, body)
            problems = self.contract.response_errors(op, status, answer)
            if problems:
                self.violations.append(f"{op['operationId']} -> {status}: {'; '.join(problems)}")
            return status, answer

    # The operations the model-registry client's register/get calls use, by operationId.

    def _page(self, items: list[dict[str, Any]], query: dict[str, str]) -> tuple[int, Any]:
        size = int(query.get("pageSize") or 100)
        page = [copy.deepcopy(i) for i in items[:size]]
        return 200, {"items": page, "nextPageToken": "", "pageSize": size, "size": len(page)}

    def _getRegisteredModels(self, params, query, body):  # noqa: N802 - the contract's operationId
        return self._page(list(self.models.values()), query)

    def _findRegisteredModel(self, params, query, body):  # noqa: N802
        found = [m for m in self.models.values() if m["name"] == query.get("name") or m.get("externalId") == query.get("externalId")]
        return (200, copy.deepcopy(found[0])) if found else _error(404, "no registered model found")

    def _getRegisteredModel(self, params, query, body):  # noqa: N802
        model = self.models.get(params["registeredmodelId"])
        return (200, copy.deepcopy(model)) if model else _error(404, "no registered model found")

    def _createRegisteredModel(self, params, query, body):  # noqa: N802
        if any(m["name"] == body["name"] for m in self.models.values()):
            return _error(409, f"registered model {body['name']} exists")
        model = self._stamp(body, state=body.get("state", "LIVE"))
        self.models[model["id"]] = model
        return 201, copy.deepcopy(model)

    def _getRegisteredModelVersions(self, params, query, body):  # noqa: N802
        if params["registeredmodelId"] not in self.models:
            return _error(404, "no registered model found")
        return self._page([v for v in self.versions.values() if v["registeredModelId"] == params["registeredmodelId"]], query)

    def _findModelVersion(self, params, query, body):  # noqa: N802
        parent, name = query.get("parentResourceId"), query.get("name")
        found = [v for v in self.versions.values() if v["name"] == name and parent in (None, v["registeredModelId"])]
        return (200, copy.deepcopy(found[0])) if found else _error(404, "no model version found")

    def _getModelVersion(self, params, query, body):  # noqa: N802
        version = self.versions.get(params["modelversionId"])
        return (200, copy.deepcopy(version)) if version else _error(404, "no model version found")

    def _createModelVersion(self, params, query, body):  # noqa: N802
        # The server takes a registeredModelId that names no model (v0.3.8 answers 201): so does the fake.
        if any(v["registeredModelId"] == body["registeredModelId"] and v["name"] == body["name"] for v in self.versions.values()):
            return _error(409, f"model version {body['name']} exists")
        version = self._stamp(body, state=body.get("state", "LIVE"))
        self.versions[version["id"]] = version
        return 201, copy.deepcopy(version)

    def _createRegisteredModelVersion(self, params, query, body):  # noqa: N802
        return self._createModelVersion(params, query, {**body, "registeredModelId": params["registeredmodelId"]})

    def _getModelVersionArtifacts(self, params, query, body):  # noqa: N802
        if params["modelversionId"] not in self.versions:
            return _error(404, "no model version found")
        return self._page(self.artifacts.get(params["modelversionId"], []), query)

    def _upsertModelVersionArtifact(self, params, query, body):  # noqa: N802
        version_id = params["modelversionId"]
        if version_id not in self.versions:
            return _error(404, "no model version found")
        existing = [a for a in self.artifacts.get(version_id, []) if body.get("id") and a["id"] == body["id"]]
        if existing:
            existing[0].update(body)
            return 200, copy.deepcopy(existing[0])
        artifact = self._stamp(body, artifactType=body.get("artifactType", "model-artifact"))  # no state unless sent
        self.artifacts.setdefault(version_id, []).append(artifact)
        return 201, copy.deepcopy(artifact)

    def _findModelArtifact(self, params, query, body):  # noqa: N802
        parent, name = query.get("parentResourceId"), query.get("name")
        found = [a for vid, items in self.artifacts.items() for a in items if a.get("name") == name and parent in (None, vid)]
        return (200, copy.deepcopy(found[0])) if found else _error(404, "no model artifact found")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = registry.handle(method, self.path, body)
                data = json.dumps(payload).encode()
                serving.answer(self, status, data, {"Content-Type": "application/json"})

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._answer("PATCH")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
