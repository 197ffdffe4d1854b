"""tests/kfp/fake_kfp.py against the real KFP API server (tier 3): the same calls, the same answers.

imgpipe's quick tests talk to the fake; this runs every kind of call imgpipe makes (healthz,
upload, versions, experiments, runs, recurring runs, filters, and the refusals: 401, 403, 404,
409, 400) against both, as the same accounts, and compares each answer's status, its error code
and the fields of its body. The fake authenticates and authorizes through the real API server's
TokenReview and SubjectAccessReview, as KFP does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.cluster.conftest import kubectl, settings
from tests.cluster.kfp_backend import api_server, enable_profile, token
from tests.cluster.test_argo import _ApiServerAuth
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture
from tests.kfp import fake_kfp

pytestmark = pytest.mark.cluster
V2 = "/apis/v2beta1"
PACKAGE = """\
components:
  comp-hello:
    executorLabel: exec-hello
    inputDefinitions:
      parameters:
        who: {parameterType: STRING}
deploymentSpec:
  executors:
    exec-hello:
      container: {image: localhost/none, command: [echo], args: ["{{$.inputs.parameters['who']}}"]}
pipelineInfo: {name: hello}
root:
  dag:
    tasks:
      hello:
        componentRef: {name: comp-hello}
        inputs: {parameters: {who: {componentInputParameter: who}}}
        taskInfo: {name: hello}
  inputDefinitions:
    parameters:
      who: {parameterType: STRING}
schemaVersion: 2.1.0
sdkVersion: kfp-2.17.0
"""

Call = Callable[..., tuple[int, Any]]


def _caller(host: str) -> Call:
    def call(method: str, path: str, bearer: str | None = None, *, params: dict | None = None, body: Any = None, upload: bool = False) -> tuple:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        files = {"uploadfile": ("pipeline.yaml", PACKAGE.encode(), "application/x-yaml")} if upload else None
        r = requests.request(method, f"{host}{V2}{path}", headers=headers, params=params, json=body, files=files, timeout=30)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    return call


def _shape(status: int, payload: Any) -> dict[str, Any]:
    """What is compared: the status, an error's gRPC code, and the body's fields (its lists' items' too)."""
    if not isinstance(payload, dict):
        return {"status": status, "body": "text"}
    shape: dict[str, Any] = {"status": status, "fields": sorted(k for k, v in payload.items() if v not in (None, "", [], {}))}
    if status >= 400:
        shape = {"status": status, "code": payload.get("code")}
    for key, value in payload.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            shape[f"{key}[]"] = sorted(k for k, v in value[0].items() if v not in (None, "", [], {}))
    return shape


def _script(call: Call, owner: str, outsider: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls, in order, each answer's shape; ids from the server's own earlier answers."""
    tag = uuid.uuid4().hex[:8]
    seen: list[tuple[str, dict[str, Any]]] = []

    def step(name: str, answer: tuple[int, Any]) -> Any:
        seen.append((name, _shape(*answer)))
        return answer[1]

    step("healthz", call("GET", "/healthz"))
    step("experiments without identity", call("GET", "/experiments", params={"namespace": NAMESPACE}))
    step("experiments as an outsider", call("GET", "/experiments", outsider, params={"namespace": NAMESPACE}))
    experiment = step("create experiment", call("POST", "/experiments", owner, body={"display_name": f"cmp-{tag}", "namespace": NAMESPACE}))
    step("create experiment without namespace", call("POST", "/experiments", owner, body={"display_name": f"cmp-{tag}-x"}))
    step("create experiment twice", call("POST", "/experiments", owner, body={"display_name": f"cmp-{tag}", "namespace": NAMESPACE}))
    by_name = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "stringValue": f"cmp-{tag}"}]})
    step("list experiments by name", call("GET", "/experiments", owner, params={"namespace": NAMESPACE, "filter": by_name}))
    pipeline = step("upload", call("POST", "/pipelines/upload", owner, params={"name": f"cmp-{tag}", "namespace": NAMESPACE}, upload=True))
    step("upload twice", call("POST", "/pipelines/upload", owner, params={"name": f"cmp-{tag}", "namespace": NAMESPACE}, upload=True))
    step("upload as an outsider", call("POST", "/pipelines/upload", outsider, params={"name": f"cmp-{tag}-o", "namespace": NAMESPACE}, upload=True))
    step("list pipelines by name", call("GET", "/pipelines", owner, params={"namespace": NAMESPACE, "filter": by_name}))
    pid = pipeline.get("pipeline_id", "")
    step("upload a version", call("POST", "/pipelines/upload_version", owner, params={"name": f"cmp-{tag}-v2", "pipelineid": pid}, upload=True))
    versions = step("list versions", call("GET", f"/pipelines/{pid}/versions", owner, params={"page_size": "10"}))
    eid = experiment.get("experiment_id", "")
    vid = (versions.get("pipeline_versions") or [{}])[0].get("pipeline_version_id", "")
    run = {"display_name": f"cmp-{tag}", "experiment_id": eid, "pipeline_version_reference": {"pipeline_id": pid, "pipeline_version_id": vid}}
    step("run without experiment", call("POST", "/runs", owner, body={**run, "experiment_id": ""}))
    step("run as an outsider", call("POST", "/runs", outsider, body={**run, "runtime_config": {"parameters": {"who": "x"}}}))
    step("run with an unknown parameter", call("POST", "/runs", owner, body={**run, "runtime_config": {"parameters": {"who": "x", "epochs": 3}}}))
    step("get a run that does not exist", call("GET", f"/runs/{uuid.uuid4()}", owner))
    step("list runs", call("GET", "/runs", owner, params={"experiment_id": eid, "namespace": NAMESPACE}))
    rr = {**run, "runtime_config": {"parameters": {"who": "x"}}, "mode": "DISABLE", "max_concurrency": "1"}
    step("recurring run with a bad cron", call("POST", "/recurringruns", owner, body={**rr, "trigger": {"cron_schedule": {"cron": "every day"}}}))
    step("list recurring runs", call("GET", "/recurringruns", owner, params={"experiment_id": eid, "namespace": NAMESPACE}))
    return seen


def test_the_fake_answers_imgpipes_calls_as_the_real_api_server_does(dev_overlay, api_client):  # noqa: F811
    host = api_server()
    enable_profile(NAMESPACE)
    kubectl("create", "serviceaccount", "outsider", "-n", "default", check=False)  # an account of no profile (here, not test_kfp's)
    owner, outsider = token("default-editor", NAMESPACE), token("outsider", "default")
    real = _script(_caller(host), owner, outsider)
    auth = _ApiServerAuth(api_client)
    with fake_kfp.serve("2.16.0", host=settings()["CLUSTER_NODE_IP"], multi_user=True, authorizer=auth, authenticate=auth.authenticate) as (url, _):
        fake = _script(_caller(url), owner, outsider)
        differ = [(name, r, f) for (name, r), (_, f) in zip(real, fake, strict=True) if r != f]
        assert not differ, "\n".join(f"{name}:\n  real {r}\n  fake {f}" for name, r, f in differ)
