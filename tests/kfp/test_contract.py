"""The KFP contract check itself: it refuses what the API server would not do, and the vendored files are upstream's.

The fake KFP server (tests/kfp/fake_kfp.py) is only as good as this check, so each kind of
departure it must catch is tried here once, on each release's document: the error body the fake
answered before it was held to the contract (grpc-gateway v1's ``{"error", "code", "message"}``),
a path the API does not have, a status the operation does not list, a field the schema does not
name, in an answer or in a request.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.kfp.contract import CONTRACTS, VERSIONS, contract

README = (CONTRACTS / "README.md").read_text()
PIPELINES = "/apis/v2beta1/pipelines"
RUNS = "/apis/v2beta1/runs"


def git_blob(path: Path) -> str:
    """``git hash-object`` of a file: what the upstream tree records for it."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("version", ["2.4.1", "2.5.0", "2.15.0", "2.16.0"])
def test_each_vendored_swagger_is_the_upstream_file_at_its_tag(version):
    path = CONTRACTS / version / "kfp_api_single_file.swagger.json"
    assert f"| `{version}/kfp_api_single_file.swagger.json` |" in README
    row = next(line for line in README.splitlines() if line.startswith(f"| `{version}/"))
    assert git_blob(path) in row, f"{path.name} at {version} is not the blob README.md names"
    assert git_blob(CONTRACTS / "LICENSE") in README


@pytest.mark.parametrize("version", VERSIONS)
def test_what_the_server_serves_passes(version):
    kfp = contract(version)
    run = {"run_id": "r1", "display_name": "x", "experiment_id": "e1", "state": "PENDING", "runtime_config": {"parameters": {"epochs": 3}}}
    assert kfp.check("GET", f"{RUNS}/r1", {}, None, 200, run) == []
    assert kfp.check("POST", RUNS, {}, {"display_name": "x", "experiment_id": "e1"}, 200, run) == []
    assert kfp.check("POST", f"{RUNS}/r1:terminate", {}, None, 200, {}) == []
    status = {"code": 3, "message": "Experiment id can not be empty in multi-user mode", "details": []}
    assert kfp.check("POST", RUNS, {}, {"display_name": "x"}, 400, status) == []
    upload = f"{PIPELINES}/upload"
    assert kfp.check("POST", upload, {"name": "p"}, {"uploadfile": b""}, 400, {"error_message": "Failed to create a pipeline"}) == []
    assert kfp.check("POST", upload, {"name": "p"}, {"uploadfile": b""}, 400, "Invalid input error: ...") == []
    healthz = {"commit_sha": "unknown", "tag_name": version, "multi_user": True, "pipeline_store": "database"}
    assert kfp.check("GET", "/apis/v2beta1/healthz", {}, None, 200, healthz) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_what_the_server_would_not_do_is_refused(version):
    kfp = contract(version)
    v1_error = {"error": "bad", "code": 3, "message": "bad", "details": []}  # what the fake answered before
    assert "'error' was unexpected" in " ".join(kfp.check("POST", RUNS, {}, {"display_name": "x"}, 400, v1_error))
    assert kfp.check("GET", "/apis/v2beta1/pipelines/p1/runs", {}, None, 200, {}) == [f"KFP {version} serves no GET /apis/v2beta1/pipelines/p1/runs"]
    assert kfp.check("PATCH", f"{RUNS}/r1", {}, {}, 200, {}) == [f"KFP {version} serves no PATCH {RUNS}/r1"]
    assert "status 201 is not one the operation lists" in " ".join(kfp.check("POST", RUNS, {}, {}, 201, {}))
    answered = kfp.check("GET", f"{RUNS}/r1", {}, None, 200, {"run_id": "r1", "namespace": "team-a"})
    assert answered and "'namespace' was unexpected" in answered[0], "v2beta1Run has no namespace"
    sent = kfp.check("POST", RUNS, {}, {"display_name": "x", "pipeline_root": "s3://b"}, 200, {"run_id": "r"})
    assert sent and "'pipeline_root' was unexpected" in sent[0], "DiscardUnknown: false refuses an unknown request field"
    recurring = {"display_name": "n", "max_concurrency": 1, "trigger": {"cron_schedule": {"cron": "0 0 2 * * *"}}}
    assert kfp.check("POST", "/apis/v2beta1/recurringruns", {}, recurring, 200, kfp.as_served("v2beta1RecurringRun", recurring)) == []
    unserved = kfp.check("POST", "/apis/v2beta1/recurringruns", {}, recurring, 200, recurring)
    assert unserved and "max_concurrency" in unserved[0], "protojson answers int64 as a string"
    assert "is not an integer" in " ".join(kfp.check("GET", PIPELINES, {"page_size": "ten"}, None, 200, {}))
    upload = f"{PIPELINES}/upload"
    assert kfp.check("POST", upload, {}, None, 403, {"error_message": "x"}), "the upload handler answers 400, 409 or 500"


VENDORED = sorted(p for p in CONTRACTS.parent.rglob("*") if p.is_file() and p.name != "README.md")
# The digest each folder's README gives for its files: upstream's git blob id, or an md5.
DIGESTS = {"kfp": git_blob, "trainer-kserve": git_blob, "model-registry": lambda p: hashlib.md5(p.read_bytes()).hexdigest()}


@pytest.mark.parametrize("path", VENDORED, ids=lambda p: str(p.relative_to(CONTRACTS.parent)))
def test_every_vendored_contract_is_named_with_its_origin_and_is_the_file_its_digest_names(path):
    folder = path.relative_to(CONTRACTS.parent).parts[0]
    readme = CONTRACTS.parent / folder / "README.md"
    text = readme.read_text()
    relative = path.relative_to(readme.parent).as_posix()
    assert f"`{relative}`" in text, f"{readme} names no {relative} (origin, tag, licence)"
    if folder in DIGESTS:
        assert DIGESTS[folder](path) in text, f"{relative} is not the file whose digest {readme} gives: edited after it was vendored?"
