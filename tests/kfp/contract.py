"""The KFP v2beta1 REST contract a fake KFP server is held to: the API server's own Swagger file.

``tests/contracts/kfp/<version>/kfp_api_single_file.swagger.json`` is the document
kubeflow/pipelines publishes for each release kubeflow/manifests ships (2.15.0 in v1.11.0,
2.16.0 in 26.03; README.md there has the table). :meth:`KfpContract.check` takes one exchange
(method, path, query, request body, status, response body) and says what in it the server at
that version would not have done:

* a path or method the document does not list;
* a JSON request body that its operation's schema refuses, unknown fields included: the API
  server unmarshals with ``DiscardUnknown: false`` (``backend/src/apiserver/common/utils.go``
  ``CustomMarshaler`` at 2.15.0 and 2.16.0), so an unknown field is a 400 there; an int64 field
  (a string in the Swagger file) may come as a JSON number, which protojson accepts;
* a response status the operation does not list (``200`` and ``default``), or a body its
  schema refuses: ``200`` the operation's, an error ``googlerpcStatus`` (grpc-gateway v2's
  error body, ``go.mod`` v2.27.1), every object closed to fields the schema does not name.

Three routes are plain HTTP handlers in ``backend/src/apiserver/main.go``, not grpc-gateway's,
and answer as their source says rather than as the Swagger file does: ``healthz`` writes
``commit_sha``, ``tag_name``, ``multi_user`` and ``pipeline_store``; ``pipelines/upload`` and
``pipelines/upload_version`` write errors as ``{"error_message", "error_details"}``
(``server/pipeline_upload_server.go`` ``writeErrorToResponse``, ``apiv1beta1.Error``) with 400,
409 or 500, or as text with 400 (``http.Error``: a namespace that fails validation).
:meth:`KfpContract.as_served` turns an object into what protojson would answer (int64 as strings).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

CONTRACTS = Path(__file__).resolve().parents[1] / "contracts" / "kfp"
# The KFP releases kubeflow/manifests ships at or above imgpipe's floor (2.15).
VERSIONS = ("2.15.0", "2.16.0")
UPLOADS = ("/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version")
HEALTHZ = "/apis/v2beta1/healthz"
# main.go's healthz handler at 2.15.0 and 2.16.0 (a literal JSON string); 2.5.0's writes no pipeline_store.
HEALTHZ_BODY = {
    "type": "object",
    "properties": {
        "commit_sha": {"type": "string"},
        "tag_name": {"type": "string"},
        "multi_user": {"type": "boolean"},
        "pipeline_store": {"type": "string"},
    },
    "required": ["commit_sha", "tag_name", "multi_user", "pipeline_store"],
    "additionalProperties": False,
}


def healthz_body(version: str) -> dict[str, Any]:
    """The healthz handler's answer at ``version``: ``pipeline_store`` came in 2.15.0 (2.5.0 writes the other three)."""
    if tuple(int(p) for p in version.split(".")) >= (2, 15, 0):
        return HEALTHZ_BODY
    names = ["commit_sha", "tag_name", "multi_user"]
    return {**HEALTHZ_BODY, "properties": {k: HEALTHZ_BODY["properties"][k] for k in names}, "required": names}


# pipeline_upload_server.go writeErrorToResponse: apiv1beta1.Error with these statuses.
UPLOAD_ERROR = {
    "type": "object",
    "properties": {"error_message": {"type": "string"}, "error_details": {"type": "string"}},
    "required": ["error_message"],
    "additionalProperties": False,
}
UPLOAD_ERROR_STATUSES = (400, 409, 500)


def _lenient_int64(node: Any) -> Any:
    """int64 fields (strings in the Swagger file) that also take a JSON number, as protojson parses them."""
    if isinstance(node, dict):
        node = {k: _lenient_int64(v) for k, v in node.items()}
        if node.get("type") == "string" and node.get("format") in ("int64", "uint64"):
            node["type"] = ["string", "integer"]
        return node
    if isinstance(node, list):
        return [_lenient_int64(v) for v in node]
    return node


def _closed(node: Any) -> Any:
    """Every object schema that names its properties refuses others (what DiscardUnknown: false does)."""
    if isinstance(node, dict):
        node = {k: _closed(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


class KfpContract:
    """The operations of one KFP release's v2beta1 Swagger document."""

    def __init__(self, version: str) -> None:
        self.version = version
        document = json.loads((CONTRACTS / version / "kfp_api_single_file.swagger.json").read_text())
        self.definitions = _closed(document["definitions"])
        self.request_definitions = _lenient_int64(self.definitions)
        self.routes: list[tuple[re.Pattern[str], str, str, dict[str, Any]]] = []
        for template, item in document["paths"].items():
            # A template segment like {run_id}:archive keeps its literal suffix.
            pattern = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", re.escape(template)) + "$")
            for method, op in item.items():
                if method in ("get", "post", "delete", "patch", "put"):
                    self.routes.append((pattern, method.upper(), template, op))

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        """``(template, operation)`` serving ``method path``, or ``None``."""
        for pattern, verb, template, op in self.routes:
            if verb == method and pattern.match(path):
                return template, op
        return None

    def as_served(self, definition: str, value: Any) -> Any:
        """``value`` as the server marshals a ``definition`` (protojson): int64 fields as strings."""
        return self._served(self.definitions[definition], value)

    def _served(self, schema: dict[str, Any], value: Any) -> Any:
        if "$ref" in schema:
            return self._served(self.definitions[schema["$ref"].rsplit("/", 1)[1]], value)
        if isinstance(value, dict):
            props = schema.get("properties", {})
            return {k: self._served(props[k], v) if k in props else v for k, v in value.items()}
        if isinstance(value, list) and "items" in schema:
            return [self._served(schema["items"], v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool) and schema.get("format") in ("int64", "uint64"):
            return str(value)
        return value

    def _errors(self, schema: dict[str, Any], value: Any, where: str, *, request: bool = False) -> list[str]:
        definitions = self.request_definitions if request else self.definitions
        validator = jsonschema.Draft4Validator({**schema, "definitions": definitions})
        return [f"{where}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(value)]

    def check(self, method: str, path: str, query: dict[str, str], body: Any, status: int, payload: Any) -> list[str]:
        """What in this exchange the KFP API server of :attr:`version` would not have done (empty: all of it)."""
        found = self.operation(method, path)
        if found is None:
            return [f"KFP {self.version} serves no {method} {path}"]
        template, op = found
        name = f"{method} {template}"
        problems = []
        params = {p["name"]: p for p in op.get("parameters", [])}
        for key, value in query.items():
            spec = params.get(key)
            if spec is not None and spec["in"] == "query" and spec.get("type") == "integer" and not re.fullmatch(r"-?\d+", value):
                problems.append(f"{name}: query {key}={value!r} is not an integer")
        bodies = [p for p in params.values() if p["in"] == "body"]
        if bodies and isinstance(body, (dict, list)):
            problems += self._errors(bodies[0]["schema"], body, f"{name} request", request=True)
        if template == HEALTHZ:
            return problems + self._errors(healthz_body(self.version), payload, f"{name} response")
        if template in UPLOADS and status != 200:
            if status not in UPLOAD_ERROR_STATUSES:
                problems.append(f"{name}: the upload handler answers errors with {UPLOAD_ERROR_STATUSES}, not {status}")
            if isinstance(payload, str):  # http.Error
                return problems + ([] if status == 400 else [f"{name}: a text error comes with 400, not {status}"])
            return problems + self._errors(UPLOAD_ERROR, payload, f"{name} {status} response")
        key = str(status) if str(status) in op["responses"] else "default"
        if key == "default" and status < 400:
            problems.append(f"{name}: status {status} is not one the operation lists ({sorted(op['responses'])})")
        schema = op["responses"][key].get("schema")
        if schema is not None:
            problems += self._errors(schema, payload, f"{name} {status} response")
        return problems


@cache
def contract(version: str) -> KfpContract:
    """The contract of KFP ``version`` (loaded once)."""
    return KfpContract(version)
