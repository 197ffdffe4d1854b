"""`imgpipe submit --wait` while KFP's API server is unavailable (its database restarting): waited out, then named."""

from __future__ import annotations

import json
import types

import pytest
import urllib3
from kfp_server_api.exceptions import ApiException

from imgpipe.kfp import run_end


class _Server:
    """``get_run`` answers from a script: an exception to raise or a state to report."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def get_run(self, run_id):
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return types.SimpleNamespace(state=answer)


def _db_down() -> ApiException:
    # What KFP 2.17's API server answered for GET /runs/{id} with its MariaDB stopped
    # (tests/cluster/test_kfp_faults.py, 2026-11-28; the run's id and the Service address shortened).
    error = ApiException(status=500, reason="Internal Server Error")
    said = (
        "Failed to get a run: Failed to authorize the request: Failed to authorize with the run ID r1: Failed to fetch run r1: "
        "InternalServerError: Failed to get run: dial tcp 10.96.205.74:3306: connect: connection refused"
    )
    details = [{"@type": "type.googleapis.com/google.rpc.Status", "code": 13, "message": "Internal Server Error"}]
    error.body = json.dumps({"code": 13, "message": said, "details": details})
    return error


def test_a_database_outage_during_the_wait_is_waited_out():
    server = _Server("RUNNING", _db_down(), urllib3.exceptions.MaxRetryError(None, "/runs/r1"), "RUNNING", "SUCCEEDED")
    assert run_end.wait_for_run(server, "r1", timeout_s=60, poll_s=0, outage_s=60) == "SUCCEEDED"
    assert server.calls == 5


def test_an_outage_longer_than_the_grace_is_one_line_naming_the_servers_cause():
    server = _Server("RUNNING", _db_down())
    with pytest.raises(RuntimeError) as caught:
        run_end.wait_for_run(server, "r1", timeout_s=60, poll_s=0.01, outage_s=0.05)
    message = str(caught.value)
    assert message.startswith("Kubeflow Pipelines could not say how run r1 is for ") and "\n" not in message
    assert "HTTP 500: Failed to get a run: Failed to authorize the request" in message and "3306: connect: connection refused" in message
    assert "--run-name NAME --wait" in message


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_refusal_or_a_missing_run_is_not_waited_out(status):
    error = ApiException(status=status, reason="no")
    error.body = '{"message": "no such run"}'
    server = _Server(error)
    with pytest.raises((ApiException, RuntimeError)):
        run_end.wait_for_run(server, "r1", timeout_s=60, poll_s=0, outage_s=60)
    assert server.calls == 1


def test_a_read_is_tried_again_through_an_outage_and_a_write_is_not(monkeypatch):
    from imgpipe.kfp import refusals

    monkeypatch.setattr(refusals.time, "sleep", lambda s: None)
    answers = [_db_down(), urllib3.exceptions.ProtocolError("Connection aborted."), "found"]

    def list_pipelines():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert refusals.call("look for pipeline imgpipe", "list", "pipelines", "team-a", list_pipelines) == "found"
    tries = []

    def upload():
        tries.append(1)
        raise _db_down()

    with pytest.raises(RuntimeError, match=r"^Kubeflow Pipelines is unavailable: could not upload it \(HTTP 500: Failed to get a run"):
        refusals.call("upload it", "create", "pipelines", "team-a", upload)
    assert len(tries) == 1


def test_a_read_gives_up_after_its_retries_with_one_line(monkeypatch):
    from imgpipe.kfp import refusals

    monkeypatch.setattr(refusals, "READ_RETRY_S", 0.0)

    def list_pipelines():
        raise _db_down()

    with pytest.raises(RuntimeError) as caught:
        refusals.call("look for pipeline imgpipe", "list", "pipelines", "team-a", list_pipelines)
    assert str(caught.value).startswith("Kubeflow Pipelines is unavailable: could not look for pipeline imgpipe (HTTP 500: ")
