"""The resize step as a Ray job on a real Ray head with the Jobs API and token authentication.

The head runs as ``ray start --head --block`` in its own process group, stopped by that
group, never by ``ray stop`` (which kills every Ray on the machine); the tests must run
inside the loopback-only network namespace (``scripts/in-loopback-netns``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from imgpipe import contract
from imgpipe.remote import attempts, dispatch, ray_jobs, targets
from imgpipe.resize.config import ResizeConfig
from tests.helpers import free_port
from tests.remote.conftest import build_clean

# ------------------------------------------------------------------ a real Ray head with the Jobs API

# Gated like every Ray test by the `ray` marker (tests/conftest.py).
ray_test = pytest.mark.ray


def _stop_process_group(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stops the head we started: its process group, then any of its processes left over.

    ``ray start --block`` answers SIGTERM by draining the node for up to 30 s; every job
    here is finished by teardown, so a short grace period, then SIGKILL, is enough.
    """
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Workers that left the group still name our private temp dir on their command line.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if temp_dir.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with the dashboard/Jobs API and token auth on.

    Its own temp dir keeps ``ray.init()`` elsewhere on the machine from finding it
    (``ray start`` records its address there), and the token lives in a file of ours,
    not in ``~/.ray``.
    """
    pytest.importorskip("aiohttp", reason="the Jobs API needs ray[default]")
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="imgpipe-ray-", dir="/tmp")  # short: Ray's socket paths live here
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    port, gcs_port = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                str(bin_dir / "ray"),
                "start",
                "--head",
                "--block",
                "--disable-usage-stats",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(port),
                "--include-dashboard",
                "true",
                "--num-cpus",
                "2",
                "--object-store-memory",
                str(200 * 1024 * 1024),
                "--temp-dir",
                temp_dir,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token_path.read_text()}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(url, headers=headers)
                break
            except Exception as exc:  # not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the Jobs API at {url} did not come up in 180 s ({exc}):\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield SimpleNamespace(url=url, token_path=token_path, client=client)
    finally:
        _stop_process_group(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def jobs_env(ray_head, monkeypatch):
    """The submitter's environment: the token only through RAY_AUTH_TOKEN_PATH, as in a pod."""
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", attempts.RUN_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_path))
    monkeypatch.setenv(targets.CLUSTERS_ENV, ray_head.url)  # the operator configured this cluster
    return ray_head


def our_jobs(client) -> list:
    return [j for j in client.list_jobs() if (j.submission_id or "").startswith("imgpipe-resize-")]


@ray_test
def test_wrong_or_missing_token_is_refused_clearly(jobs_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(RuntimeError, match="token was refused"):
        ray_jobs.connect(jobs_env.url)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    with pytest.raises(RuntimeError, match="no token was found"):
        ray_jobs.connect(jobs_env.url)


@ray_test
def test_resize_runs_as_a_ray_job_and_a_retry_reattaches(jobs_env, tmp_path, capsys):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    cfg = ResizeConfig(size=16, batch_size=4, concurrency=1, rows_per_shard=4, row_group_rows=2, ray_address=jobs_env.url)

    report = dispatch.run_step("resize", source, dest, cfg, run_id="pipeline-run-1")
    streamed = capsys.readouterr().out
    assert (report.inputs, report.outputs, report.rejected) == (6, 6, 0)
    # The job's own log came through: the step's summary line, printed by the job's CLI.
    assert "resize: 6 in -> 6 out, 0 rejected" in streamed and dest in streamed

    manifest = contract.read_manifest(dest, expect_step="resize")
    assert manifest["config"]["ray_address"] == "" and manifest["config"]["size"] == 16
    # Inside the job ($RAY_ADDRESS set) "auto" joins the cluster: a cluster path never takes the pool.
    assert manifest["config"]["executor"] == "auto" and manifest["extra"]["executor"] == "ray"
    assert manifest["inputs"] == manifest["outputs"] + manifest["rejected"] == 6
    assert sum(f["rows"] for f in manifest["files"]) == 6 and len(contract.data_files(dest, manifest)) >= 2
    assert report.files == [contract.FileEntry(**f) for f in manifest["files"]]

    [job] = our_jobs(jobs_env.client)
    assert str(job.status) == "SUCCEEDED" and job.metadata["imgpipe.run_id"] == "pipeline-run-1"
    assert job.submission_id == attempts.job_id("resize", source, dest, replace(cfg, ray_address=""), "pipeline-run-1")

    # The retry of the same pipeline task: same report, no second job, nothing re-run.
    again = dispatch.run_step("resize", source, dest, cfg, run_id="pipeline-run-1")
    assert again == report and capsys.readouterr().out == ""
    assert [j.submission_id for j in our_jobs(jobs_env.client)] == [job.submission_id]


@ray_test
def test_a_failing_job_raises_with_its_error(jobs_env, tmp_path):
    cfg = ResizeConfig(size=16, ray_address=jobs_env.url)
    missing, dest = "file://" + str(tmp_path / "no-such-clean"), "file://" + str(tmp_path / "resize")
    with pytest.raises(RuntimeError) as err:
        dispatch.run_step("resize", missing, dest, cfg, run_id="pipeline-run-2")
    text = str(err.value)
    assert "ended FAILED" in text and "is not a committed step output" in text
    assert not contract.is_committed(dest)
