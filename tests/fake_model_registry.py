"""A Model Registry REST server on 127.0.0.1, for the paths ``ModelRegistry.register_model`` uses.

As kubeflow/model-registry's OpenAPI (``api/openapi/model-registry.yaml``, the v1 API the
model-registry 0.3.18 client is generated from: ``mr_openapi/api/model_registry_service_api.py``)
and its server answer: ``find`` endpoints (``GET /registered_model``, ``/model_version``) give 404
when nothing matches; creates give 201 with a server id (a decimal string) and epoch-millisecond
timestamps; ``GET /registered_models`` lists (the client's constructor pings it with
``pageSize=1``); a version name is unique within its registered model (409 for a second one); an
artifact posted to a version is of type ``model-artifact``. Every request is recorded.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

BASE = "/api/model_registry/v1"


class FakeModelRegistry:
    """The server and what it holds: registered models, versions, artifacts, requests."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeModelRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        return {**body, "id": str(next(self._ids)), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}

    def handle(self, method: str, url: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        parsed = urlparse(url)
        path, query = parsed.path.removeprefix(BASE), {k: v[0] for k, v in parse_qs(parsed.query).items()}
        with self._lock:
            self.requests.append((method, path))
            if method == "GET" and path == "/registered_model":
                found = [m for m in self.models.values() if m["name"] == query.get("name")]
                return (200, found[0]) if found else (404, {"code": "404", "message": "no registered model found"})
            if method == "GET" and path == "/registered_models":  # the client's ping, page size 1
                items = list(self.models.values())[: int(query.get("pageSize", "100"))]
                return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
            if method == "POST" and path == "/registered_models":
                if any(m["name"] == body["name"] for m in self.models.values()):
                    return 409, {"code": "409", "message": f"registered model {body['name']} exists"}
                model = self._stamp({**body, "state": "LIVE"})
                self.models[model["id"]] = model
                return 201, model
            if method == "GET" and path == "/model_version":
                parent, name = query.get("parentResourceId"), query.get("name")
                found = [v for v in self.versions.values() if v["registeredModelId"] == parent and v["name"] == name]
                return (200, found[0]) if found else (404, {"code": "404", "message": "no model version found"})
            if method == "POST" and path == "/model_versions":
                if body.get("registeredModelId") not in self.models:
                    return 400, {"code": "400", "message": "registeredModelId names no registered model"}
                if any(v["registeredModelId"] == body["registeredModelId"] and v["name"] == body["name"] for v in self.versions.values()):
                    return 409, {"code": "409", "message": f"model version {body['name']} exists"}
                version = self._stamp({**body, "state": "LIVE"})
                self.versions[version["id"]] = version
                return 201, version
            if method == "POST" and path.startswith("/model_versions/") and path.endswith("/artifacts"):
                version_id = path.split("/")[2]
                if version_id not in self.versions:
                    return 404, {"code": "404", "message": "no model version found"}
                artifact = self._stamp({**body, "artifactType": "model-artifact", "state": "LIVE"})
                self.artifacts.setdefault(version_id, []).append(artifact)
                return 201, artifact
        return 404, {"code": "404", "message": f"{method} {path} is not served"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = registry.handle(method, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
