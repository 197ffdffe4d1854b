"""`imgpipe submit --wait` while KFP's API server is unavailable (its database restarting): waited out, then named."""

from __future__ import annotations

import json
import types

import pytest
import urllib3
from kfp_server_api.exceptions import ApiException

from imgpipe.kfp import client as kfp_client


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
    # What KFP 2.17's API server answers for GET /runs/{id} with its MariaDB stopped.
    error = ApiException(status=500, reason="Internal Server Error")
    said = "Failed to get a run: InternalServerError: dial tcp 10.0.0.7:3306: connect: connection refused"
    error.body = json.dumps({"error": "Failed to get a run", "code": 13, "message": said})
    return error


def test_a_database_outage_during_the_wait_is_waited_out():
    server = _Server("RUNNING", _db_down(), urllib3.exceptions.MaxRetryError(None, "/runs/r1"), "RUNNING", "SUCCEEDED")
    assert kfp_client._wait(server, "r1", timeout_s=60, poll_s=0, outage_s=60) == "SUCCEEDED"
    assert server.calls == 5


def test_an_outage_longer_than_the_grace_is_one_line_naming_the_servers_cause():
    server = _Server("RUNNING", _db_down())
    with pytest.raises(RuntimeError) as caught:
        kfp_client._wait(server, "r1", timeout_s=60, poll_s=0.01, outage_s=0.05)
    message = str(caught.value)
    assert message.startswith("Kubeflow Pipelines could not say how run r1 is for ") and "\n" not in message
    assert "HTTP 500: Failed to get a run: InternalServerError: dial tcp 10.0.0.7:3306" in message
    assert "--run-name NAME --wait" in message


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_refusal_or_a_missing_run_is_not_waited_out(status):
    error = ApiException(status=status, reason="no")
    error.body = '{"message": "no such run"}'
    server = _Server(error)
    with pytest.raises((ApiException, RuntimeError)):
        kfp_client._wait(server, "r1", timeout_s=60, poll_s=0, outage_s=60)
    assert server.calls == 1
