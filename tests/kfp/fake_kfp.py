"""A fake of the KFP v2beta1 REST API server on 127.0.0.1, held to the server's published contract.


The fake is a real HTTP server in a thread implementing only what ``kfp.Client`` calls
for these two commands (healthz, pipeline upload and lookup, versions, experiments,
runs, recurring runs), keeping objects in memory and recording every request, so the
tests assert on the bodies kfp's generated client actually sends.

With ``multi_user`` on it refuses what the real API server refuses in multi-user mode
(kubeflow/pipelines 2.15.0, unchanged from 2.5.0 to 2.17.0):

* an experiment without a namespace: ``backend/src/apiserver/server/experiment_server.go``
  ``canAccessExperiment``, "An experiment cannot have an empty namespace in multi-user mode";
* a run or recurring run without an experiment id: ``resource/resource_manager.go``
  ``GetValidExperimentNamespacePair``, "Experiment id can not be empty in multi-user mode";
  their namespace is the experiment's;
* pipelines: ``?namespace=`` on upload makes a namespaced pipeline (``server/
  pipeline_upload_server.go``); none makes a *shared* one, which a profile's service
  account should not create (and ``REQUIRE_NAMESPACE_FOR_PIPELINES``, 2.15.0, refuses:
  "Namespace is required for pipeline operations"); a version takes its pipeline's
  namespace; listing with ``namespace`` returns that namespace's pipelines only.

Errors come back as grpc-gateway v2 writes them (the API server's, ``go.mod`` v2.27.1): the
grpc code's HTTP status with a ``google.rpc.Status`` body, ``{"code": 3, "message", "details"}``
for InvalidArgument; the upload handlers, plain HTTP handlers, write ``{"error_message",
"error_details"}`` with 400.

With an ``authorizer`` (tests/rbac.py over the rendered Roles and RoleBindings) it also
authorizes every call as multi-user KFP does, for the account of the request's bearer token
(the subject a TokenReview of it would return): one SubjectAccessReview per call on a
``pipelines.kubeflow.org`` resource in the object's namespace (kubeflow/pipelines 2.15.0,
unchanged in 2.16.0 and 2.17.0, ``backend/src/apiserver/server/``):

* ``pipeline_server.go``: list pipelines -> ``list pipelines`` in the query's namespace;
  list a pipeline's versions -> ``list pipelines`` in the pipeline's namespace
  (``canAccessPipelineVersion`` -> ``canAccessPipeline``: a version is checked as its
  pipeline, never as ``pipelines/versions``); a shared pipeline (no namespace) is not checked;
* ``pipeline_upload_server.go``: upload a pipeline, upload a version -> ``create
  pipelines`` (``canUploadVersionedPipeline``); refused with HTTP 400 and
  ``{"error_message": "Failed to create a pipeline[ version]"}``;
* ``experiment_server.go``: list -> ``list experiments``, create -> ``create experiments``
  (named);
* ``run_server.go``: list -> ``list runs`` (the experiment's namespace), create -> ``create
  runs``, get -> ``get runs`` (named by the run's Kubernetes name);
* ``job_server.go``: recurring runs as ``jobs``: ``list``, ``create``, ``delete``.

A refusal is ``PermissionDenied`` (``resource/resource_manager.go`` ``IsAuthorized``), which
grpc-gateway v2 (the API server's, ``go.mod`` v2.27.1) answers with HTTP 403 and a
``google.rpc.Status`` body: ``{"code": 7, "message": ..., "details": []}``; no identity at all
is ``Unauthenticated`` (401, code 16).

Every exchange is checked against the Swagger document of the KFP release the fake plays
(:mod:`tests.kfp.contract`; 2.15.0 and 2.16.0, what kubeflow/manifests v1.11.0 and 26.03 ship):
a path, field or status that release would not serve is recorded in :attr:`FakeKfp.violations`,
and :func:`serve` fails when its block ends with any.
"""

from __future__ import annotations

import contextlib
import datetime
import email
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from tests import rbac, serving
from tests.kfp.contract import contract, healthz_body

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]  # names lower-cased


@dataclass
class FakeKfp:
    """In-memory KFP objects plus the request log; ``run_state`` is what GET /runs/{id} reports."""

    requests: list[Request] = field(default_factory=list)
    pipelines: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    experiments: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    recurring: list[dict] = field(default_factory=list)
    run_state: str = "SUCCEEDED"
    version: str = "2.15.0"  # the KFP release whose contract every exchange is checked against
    violations: list[str] = field(default_factory=list)
    multi_user: bool = False
    require_namespace_for_pipelines: bool = False
    authorizer: rbac.Authorizer | None = None
    # Who a bearer token is (a TokenReview's answer); tests/cluster passes a real TokenReview.
    authenticate: Callable[[str], str | None] = rbac.token_subject
    reviews: list[rbac.Request] = field(default_factory=list)  # every SubjectAccessReview made
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def posted(self, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == API + suffix]


def _matching(items: list[dict], query: dict[str, str], **equal: str) -> list[dict]:
    """Items passing a kfp filter (display_name EQUALS) and exact field matches."""
    out = [i for i in items if all(i.get(k) == v for k, v in equal.items() if v is not None)]
    if query.get("filter"):
        for p in json.loads(query["filter"])["predicates"]:
            assert p["key"] == "display_name" and p["operation"] in (1, "EQUALS"), p
            out = [i for i in out if i["display_name"] == p["stringValue"]]
    return out


def _given(query: dict[str, str], *keys: str) -> dict[str, str]:
    """The query's ``keys`` that it has: the server leaves a field it was not given out of its answer."""
    return {k: query[k] for k in keys if query.get(k) is not None}


def _status(code: int, message: str, cause: str | None = None) -> dict[str, Any]:
    """A ``google.rpc.Status`` answer as the API server's grpc-gateway writes it: the wrapped message, and the
    cause's own Status as its one detail (checked against the real server: tests/cluster/test_kfp_fake.py)."""
    detail = {"@type": "type.googleapis.com/google.rpc.Status", "code": code, "message": cause or message}
    return {"code": code, "message": message, "details": [detail]}


def _version(version_id: str, pipeline_id: str, query: dict[str, str], package: bytes) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(package) if d]
    spec = docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}
    return {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version_id,
        "display_name": query["name"],
        "name": query["name"],
        "created_at": _now(),
        "pipeline_spec": spec,
        **_given(query, "description"),
        "package": package,
    }


def _bad_inputs(fake: FakeKfp, body: dict) -> str | None:
    """What the server's ExecutionSpec check says of a run's parameters against its version's root inputs."""
    ref = body.get("pipeline_version_reference") or {}
    version = next((v for v in fake.versions if v["pipeline_version_id"] == ref.get("pipeline_version_id")), None)
    if version is None:
        return None
    spec = version["pipeline_spec"].get("pipeline_spec", version["pipeline_spec"])
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    given = (body.get("runtime_config") or {}).get("parameters") or {}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        return f"Invalid input error: parameter(s) provided are not required by pipeline: {', '.join(unknown)}"
    for name, d in declared.items():
        if name not in given and "defaultValue" not in d and not d.get("isOptional"):
            return f"Invalid input error: parameter {name} is not optional, yet has neither default value nor user provided value"
    return None


def _invalid(message: str, cause: str | None = None) -> tuple[int, Any]:
    """InvalidArgument, as grpc-gateway v2 maps it."""
    return 400, _status(3, message, cause)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _denied(context: str, user: str, request: rbac.Request) -> str:
    """The API server's PermissionDenied text (resource_manager.go IsAuthorized, wrapped by the server)."""
    attributes = (
        f"&ResourceAttributes{{Namespace:{request.namespace},Verb:{request.verb},Group:pipelines.kubeflow.org,"
        f"Version:v1beta1,Resource:{request.resource},Subresource:,Name:{request.name},}}"
    )
    return f"{context}: PermissionDenied: User '{user}' is not authorized with reason:  (request: {attributes}): Unauthorized access"


class _Refused(Exception):
    """The API server's answer to a call it does not authorize."""

    def __init__(self, status: int, payload: dict) -> None:
        super().__init__(status)
        self.status, self.payload = status, payload


def _handler(fake: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _body(self) -> Any:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
                return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in msg.get_payload()}
            return json.loads(raw) if raw else None

        def _send(self, status: int, payload: Any) -> None:
            text = isinstance(payload, str)  # Go's http.Error: the message and a newline, as text
            data = (payload + "\n").encode() if text else json.dumps(payload).encode()
            serving.answer(self, status, data, {"Content-Type": "text/plain; charset=utf-8" if text else "application/json"})

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = self._body() if method in ("POST", "PATCH") else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.requests.append(Request(method, url.path, query, body, headers))
            parts = url.path[len(API) :].strip("/").split("/")
            token = headers.get("authorization", "").removeprefix("Bearer ")
            try:
                status, payload = route(method, parts, query, body, fake.authenticate(token) if token else None)
            except _Refused as refused:
                status, payload = refused.status, refused.payload
            except Exception as exc:  # a call the fake does not model: an answer, not a dropped connection
                status, payload = 500, _status(13, f"the fake cannot answer this: {type(exc).__name__}: {exc}")
            fake.violations += contract(fake.version).check(method, url.path, query, body, status, payload)
            self._send(status, payload)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    def check(user: str | None, verb: str, resource: str, namespace: str, name: str = "", *, context: str, upload: str = "") -> None:
        """One SubjectAccessReview; raises the API server's refusal (``upload``: the upload endpoint's words)."""
        if fake.authorizer is None or not fake.multi_user or not namespace:
            return  # single-user mode, or a shared pipeline: not checked
        request = rbac.Request(verb, "pipelines.kubeflow.org", resource, namespace, name=name)
        fake.reviews.append(request)
        if upload and (user is None or not fake.authorizer.allows(user, request)):
            raise _Refused(400, {"error_message": upload, "error_details": upload})  # any failure of the upload handler
        if user is None:
            message = "Failed to check authorization. User identity is empty in the request header"
            raise _Refused(401, _status(16, message))
        if fake.authorizer.allows(user, request):
            return
        raise _Refused(403, _status(7, _denied(context, user, request)))

    def pipeline_namespace(pipeline_id: str) -> str:
        return next((p["namespace"] for p in fake.pipelines if p["pipeline_id"] == pipeline_id), "")

    def experiment_namespace(experiment_id: str | None) -> str:
        return next((e.get("namespace", "") for e in fake.experiments if e["experiment_id"] == experiment_id), "")

    def route(method: str, parts: list[str], q: dict[str, str], body: Any, user: str | None) -> tuple[int, Any]:
        match method, parts:
            case "GET", ["healthz"]:
                healthz = {"commit_sha": "unknown", "tag_name": fake.version, "multi_user": fake.multi_user, "pipeline_store": "database"}
                return 200, {k: healthz[k] for k in healthz_body(fake.version)["required"]}
            case "GET", ["pipelines"]:
                namespace = q.get("namespace", "")
                check(
                    user,
                    "list",
                    "pipelines",
                    namespace,
                    context=f"Failed to list pipelines due to authorization error. Check if you have read permission to namespace {namespace}",
                )
                found = _matching(fake.pipelines, q, namespace=namespace if fake.multi_user else None)
                return 200, {"pipelines": found, "total_size": len(found)}
            case "POST", ["pipelines", "upload"]:
                namespace = q.get("namespace", "") if fake.multi_user else ""
                if fake.multi_user and fake.require_namespace_for_pipelines and not namespace:
                    # pipeline_upload_server.go: http.Error(w, err.Error(), 400) of validation.ValidateNamespaceRequired
                    return 400, "Invalid input error: Namespace is required for pipeline operations"
                check(user, "create", "pipelines", namespace, context="", upload="Failed to create a pipeline")
                if any(p.get("name", p["display_name"]) == q["name"] and p["namespace"] == namespace for p in fake.pipelines):
                    # pipeline_upload_server.go: the store's AlreadyExists, through its plain handler
                    message = "Failed to create a pipeline and a pipeline version"
                    return 409, {"error_message": message, "error_details": message}
                pipeline = {
                    "pipeline_id": fake.new_id("p"),
                    "display_name": q["name"],
                    "name": q["name"],
                    "created_at": _now(),
                    "namespace": namespace,
                    **_given(q, "description"),
                }
                fake.pipelines.append(pipeline)
                fake.versions.append(_version(fake.new_id("v"), pipeline["pipeline_id"], q, body["uploadfile"]))
                return 200, pipeline
            case "POST", ["pipelines", "upload_version"]:
                check(user, "create", "pipelines", pipeline_namespace(q["pipelineid"]), context="", upload="Failed to create a pipeline version")
                version = _version(fake.new_id("v"), q["pipelineid"], q, body["uploadfile"])
                fake.versions.append(version)
                return 200, {k: v for k, v in version.items() if k != "package"}
            case "GET", ["pipelines", pid, "versions"]:
                namespace = pipeline_namespace(pid)
                check(
                    user,
                    "list",
                    "pipelines",
                    namespace,
                    context="Failed to list pipeline versions due to authorization error. "
                    f"Check if you have read permission to namespace {namespace}",
                )
                found = [{k: v for k, v in x.items() if k != "package"} for x in _matching(fake.versions, q, pipeline_id=pid)]
                return 200, {"pipeline_versions": found[: int(q.get("page_size") or 10)], "total_size": len(found)}
            case "GET", ["experiments"]:
                check(user, "list", "experiments", q.get("namespace", ""), context="Failed to authorize with API")
                found = _matching(fake.experiments, q, namespace=q.get("namespace"))
                return 200, {"experiments": found, "total_size": len(found)}
            case "POST", ["experiments"]:
                if fake.multi_user and not body.get("namespace"):
                    return _invalid("Failed to authorize the request: An experiment cannot have an empty namespace in multi-user mode")
                check(
                    user,
                    "create",
                    "experiments",
                    body.get("namespace", ""),
                    body.get("display_name", ""),
                    context="Failed to authorize the request: Failed to authorize with API",
                )
                name, namespace = body.get("display_name", ""), body.get("namespace", "")
                if any(e["display_name"] == name and e.get("namespace") == namespace for e in fake.experiments):
                    cause = f"Failed to create a new experiment. The name {name} already exists. Please specify a new name"
                    return 409, _status(6, f"Failed to create a experiment: Already exist error: {cause}", cause)
                experiment = {
                    **body,
                    "experiment_id": fake.new_id("e"),
                    "created_at": _now(),
                    "storage_state": "AVAILABLE",
                    "last_run_created_at": "1970-01-01T00:00:00Z",
                }
                fake.experiments.append(experiment)
                return 200, experiment
            case "GET", ["runs"]:
                namespace = experiment_namespace(q.get("experiment_id"))
                check(
                    user,
                    "list",
                    "runs",
                    namespace,
                    context=f"Failed to list runs due to authorization error. Check if you have permission to access namespace {namespace}",
                )
                return 200, {"runs": _matching(fake.runs, q, experiment_id=q.get("experiment_id"))}
            case "POST", ["runs"]:
                if fake.multi_user and not body.get("experiment_id"):
                    return _invalid("Experiment id can not be empty in multi-user mode")
                namespace = _namespace_of(body)
                check(
                    user,
                    "create",
                    "runs",
                    namespace,
                    context=f"Failed to create a run due to authorization error. Check if you have write permissions to namespace {namespace}",
                )
                if problem := _bad_inputs(fake, body):
                    wrapped = f"Failed to create a new run: Failed to generate the ExecutionSpec: invalid pipeline job inputs: {problem}"
                    return _invalid(wrapped, problem.removeprefix("Invalid input error: "))
                run = {**body, "run_id": fake.new_id("r"), "state": "PENDING"}  # v2beta1Run has no namespace: its experiment's
                fake.runs.append(run)
                return 200, run
            case "GET", ["runs", run_id]:
                run = next((r for r in fake.runs if r["run_id"] == run_id), None)
                if run is None:
                    cause = f"Run {run_id} not found"
                    return 404, _status(5, f"Failed to get a run: Failed to authorize the request: ResourceNotFoundError: {cause}", cause)
                namespace = _namespace_of(run)
                check(
                    user,
                    "get",
                    "runs",
                    namespace,
                    run_id,
                    context=f"Failed to access run {run_id}. Check if you have access to namespace {namespace}",
                )
                return 200, {**run, "state": fake.run_state}
            case "GET", ["recurringruns"]:
                check(user, "list", "jobs", experiment_namespace(q.get("experiment_id")), context="Failed to authorize with API")
                return 200, {"recurringRuns": _matching(fake.recurring, q, experiment_id=q.get("experiment_id"))}
            case "POST", ["recurringruns"]:
                if fake.multi_user and not body.get("experiment_id"):
                    return _invalid("Experiment id can not be empty in multi-user mode")
                check(user, "create", "jobs", _namespace_of(body), context="Failed to authorize with API")
                cron = (body.get("trigger") or {}).get("cron_schedule", {}).get("cron")
                if cron is not None and not 5 <= len(cron.split()) <= 6:  # robfig/cron, as the server parses it
                    cause = (
                        "Schedule cron is not a supported format(https://godoc.org/github.com/robfig/cron). "
                        f"Error: Expected 5 to 6 fields, found {len(cron.split())}: {cron}"
                    )
                    return _invalid(f"Failed to create a recurring run due to conversion error: Invalid input error: {cause}", cause)
                rr = contract(fake.version).as_served(
                    "v2beta1RecurringRun", {**body, "recurring_run_id": fake.new_id("rr"), "namespace": _namespace_of(body)}
                )
                fake.recurring.append(rr)
                return 200, rr
            case "DELETE", ["recurringruns", rr_id]:
                namespace = next((r["namespace"] for r in fake.recurring if r["recurring_run_id"] == rr_id), "")
                check(user, "delete", "jobs", namespace, rr_id, context="Failed to authorize with API")
                fake.recurring[:] = [r for r in fake.recurring if r["recurring_run_id"] != rr_id]
                return 200, {}
        return 404, _status(5, "Not Found")  # grpc-gateway's unmatched route

    def _namespace_of(body: dict) -> str:
        experiment = next((e for e in fake.experiments if e["experiment_id"] == body.get("experiment_id")), {})
        return experiment.get("namespace", "")

    return Handler


@contextlib.contextmanager
def serve(version: str = "2.15.0", host: str = "127.0.0.1", **settings: Any) -> Iterator[tuple[str, FakeKfp]]:
    """A fake of KFP ``version`` on ``host`` (loopback unless a test names its own namespace's address): ``(base URL, fake)``.

    Raises:
        AssertionError: When the block ends, if any exchange broke the release's contract.
    """
    fake = FakeKfp(version=version, **settings)
    server = ThreadingHTTPServer((host, 0), _handler(fake))
    thread = serving.start(server)
    try:
        yield f"http://{host}:{server.server_address[1]}", fake
    finally:
        serving.stop(server, thread)
    assert not fake.violations, f"the fake answered what KFP {version} would not: {fake.violations}"
