"""The resize step as a Ray job: addresses, ids, auth, the retry rules, then a real head.

The unit tests use an in-process fake of ``JobSubmissionClient`` that "runs" a job
by parsing its entrypoint with the real CLI parser and committing an output with the
config it carries. The Ray tests start a real head with the Jobs API and token
authentication (``ray start --head --block`` in its own process group, stopped by
that group, never by ``ray stop``, which kills every Ray on the machine) and must run
inside the loopback-only network namespace (``scripts/in-loopback-netns``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
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

from imgpipe import contract, registry, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.config import config_from_dict, config_to_dict
from imgpipe.remote import attempts, dispatch, job, payload, ray_jobs, targets
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.resize import resize
from imgpipe.writer import OutputWriter
from tests import imagefactory as f
from tests.helpers import free_port, write_download_output

# ------------------------------------------------------------------ addresses, ids, entrypoint


@pytest.mark.parametrize(
    ("address", "mode", "target", "namespace"),
    [
        ("", "local", "", None),
        ("auto", "local", "auto", None),
        ("ray://head:10001", "local", "ray://head:10001", None),
        ("http://head:8265/", "jobs", "http://head:8265", None),
        ("https://ray.example.com", "jobs", "https://ray.example.com", None),
        ("kuberay", "kuberay", "", None),
        ("kuberay://ml-team", "kuberay", "", "ml-team"),
    ],
)
def test_parse_address(address, mode, target, namespace):
    assert targets.parse_address(address) == targets.RemoteTarget(mode, target, namespace)


@pytest.mark.parametrize(("address", "message"), [("http://", "no host"), ("kuberay://ML_Team", "namespace")])
def test_bad_remote_addresses_fail_at_the_config_boundary(address, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(ResizeConfig, {"ray_address": address})


def test_remote_addresses_are_valid_config():
    assert ResizeConfig(ray_address="http://head:8265").ray_address == "http://head:8265"
    assert ResizeConfig(ray_address="kuberay://ml").ray_address == "kuberay://ml"


def test_job_id_is_deterministic_per_run_and_config():
    cfg = ResizeConfig(size=32)
    a = attempts.job_id("resize", "s3://b/clean", "s3://b/resize", cfg, "run-1")
    assert a == attempts.job_id("resize", "s3://b/clean", "s3://b/resize", ResizeConfig(size=32), "run-1")
    assert a.startswith("imgpipe-resize-") and len(a) == len("imgpipe-resize-") + 16
    others = {
        attempts.job_id("resize", "s3://b/clean", "s3://b/resize", cfg, "run-2"),
        attempts.job_id("resize", "s3://b/clean", "s3://b/other", cfg, "run-1"),
        attempts.job_id("resize", "s3://b/clean", "s3://b/resize", ResizeConfig(size=64), "run-1"),
    }
    assert a not in others and len(others) == 3
    # Without a run id every call is a new job.
    assert attempts.job_id("resize", "s", "d", cfg, None) != attempts.job_id("resize", "s", "d", cfg, None)
    assert [attempts.attempt_id(a, n) for n in (1, 2)] == [a, a + "-a2"]


def test_run_id_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv(attempts.RUN_ID_ENV, "from-env")
    assert attempts.resolve_run_id("explicit") == "explicit"
    assert attempts.resolve_run_id() == "from-env"
    monkeypatch.setenv(attempts.RUN_ID_ENV, "  ")
    assert attempts.resolve_run_id() is None


def parse_entrypoint(entrypoint: str) -> tuple[str, str, str, ResizeConfig]:
    """What the job's ``python -m imgpipe.remote`` makes of an entrypoint: step, source, dest, config."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "imgpipe.remote"], entrypoint
    step, text = argv[3:]
    body = json.loads(text)
    return step, body["source"], body["dest"], config_from_dict(registry.step(step).config_class(), body["config"])


def test_the_remote_entry_point_runs_the_step_with_exactly_that_config(monkeypatch):
    calls = []
    monkeypatch.setattr(registry.Step, "run", lambda self: lambda *a: calls.append(a) or _Summary())
    cfg = ResizeConfig(preset="clip", mode="pad")
    assert job.main(["resize", payload.payload("s3://b/in", "s3://b/out", cfg)]) == 0
    assert calls == [("s3://b/in", "s3://b/out", cfg)]
    with pytest.raises(ValueError, match="usage"):
        job.main(["download", "{}"])
    with pytest.raises(ValueError, match="source, dest, config"):
        job.main(["resize", '{"source": 1}'])
    with pytest.raises(ValueError, match="unknown ResizeConfig option"):
        job.main(["resize", '{"source": "a", "dest": "b", "config": {"sise": 3}}'])


class _Summary:
    def summary(self) -> str:
        return "ok"


def test_entrypoint_carries_the_resolved_config_whole():
    cfg = ResizeConfig(preset="clip", mode="pad", pad_value=114, ops=("clahe:3", "gaussian_blur:1.5"), format="jpeg")
    entrypoint = payload.step_entrypoint("resize", "s3://b/my clean", "s3://b/out", cfg)
    step, source, dest, parsed = parse_entrypoint(entrypoint)
    assert (step, source, dest) == ("resize", "s3://b/my clean", "s3://b/out")
    assert parsed == cfg and config_to_dict(parsed) == config_to_dict(cfg)


def test_only_non_secret_s3_settings_are_forwarded():
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA...",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "tok",
    }
    assert storage.settings_env(env) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}


def test_auth_token_sources_in_rays_order(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert ray_jobs.resolve_auth_token(env, home) == "from-env"
    assert ray_jobs.resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == "from-file"
    # The default file is what Ray's client sends only in token mode; so do we.
    assert ray_jobs.resolve_auth_token({}, home) is None
    assert ray_jobs.resolve_auth_token({"RAY_AUTH_MODE": "token"}, home) == "from-home"
    with pytest.raises(ValueError, match="cannot be read"):
        ray_jobs.resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_an_environment_address_that_would_win_is_refused(monkeypatch):
    monkeypatch.setenv(targets.CLUSTERS_ENV, "http://head:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265")
    with pytest.raises(ValueError, match="RAY_ADDRESS=http://other:8265"):
        ray_jobs.connect("http://head:8265")


# ------------------------------------------------------------------ the retry rules, on a fake client


def commit_like_the_job(entrypoint: str) -> None:
    """Does what the job's driver would: a committed resize output with the entrypoint's config."""
    step, source, dest, cfg = parse_entrypoint(entrypoint)
    out = OutputWriter(dest, step)
    out.begin()
    out.commit(inputs=0, rejects=[], config=cfg, upstream={"source": storage.normalize_uri(source)})


class FakeJobClient:
    """In-process stand-in for ``JobSubmissionClient``: each job walks through ``script``."""

    def __init__(self, script=("PENDING", "RUNNING", "SUCCEEDED"), logs="driver says hi\n", tail_fails=False):
        self.script, self.log_text, self.tail_fails = list(script), logs, tail_fails
        self.jobs: dict[str, dict] = {}
        self.submitted: list[str] = []

    def add(self, submission_id, status, message="", entrypoint=""):
        self.jobs[submission_id] = {"steps": [status], "entrypoint": entrypoint, "message": message, "logs": self.log_text}

    def submit_job(self, *, entrypoint, submission_id, runtime_env=None, metadata=None):
        if submission_id in self.jobs:
            raise RuntimeError(f"Request failed with status code 500: Job with submission_id {submission_id} already exists.")
        self.submitted.append(submission_id)
        self.jobs[submission_id] = {
            "steps": list(self.script),
            "entrypoint": entrypoint,
            "message": "",
            "logs": self.log_text,
            "runtime_env": runtime_env,
            "metadata": metadata,
        }
        return submission_id

    def get_job_info(self, submission_id):
        if submission_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {submission_id} does not exist.")
        job = self.jobs[submission_id]
        status = job["steps"][0]
        if len(job["steps"]) > 1:
            job["steps"].pop(0)
        elif status == "SUCCEEDED" and job["entrypoint"] and not job.get("ran"):
            commit_like_the_job(job["entrypoint"])
            job["ran"] = True
        message = job["message"] or ("Job finished successfully." if status == "SUCCEEDED" else "Job failed: exit code 2")
        return SimpleNamespace(status=status, message=message)

    def get_job_logs(self, submission_id):
        return self.jobs[submission_id]["logs"]

    async def tail_job_logs(self, submission_id):
        if self.tail_fails:
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
        yield self.jobs[submission_id]["logs"]


@pytest.fixture
def job_args(tmp_path):
    source, dest = str(tmp_path / "clean"), str(tmp_path / "resize")
    cfg = ResizeConfig(size=16, ray_address="http://head:8265")
    job_cfg = ResizeConfig(size=16)
    base = attempts.job_id("resize", storage.normalize_uri(source), storage.normalize_uri(dest), job_cfg, "run-7")
    return SimpleNamespace(source=source, dest=dest, cfg=cfg, job_cfg=job_cfg, base=base)


def run(job_args, client, out, **kwargs):
    return ray_jobs.run_step_job(
        "resize",
        job_args.source,
        job_args.dest,
        job_args.cfg,
        address="http://head:8265",
        run_id="run-7",
        client=client,
        out=out,
        poll_s=0,
        **kwargs,
    )


def test_log_lines_never_carry_the_password_of_a_cluster_address(job_args, caplog):
    address = "http://ops:s3cret@head:8265"
    with caplog.at_level("INFO", logger="imgpipe"), open(os.devnull, "w") as out:
        ray_jobs.run_step_job(
            "resize",
            job_args.source,
            job_args.dest,
            job_args.cfg,
            address=address,
            run_id="run-7",
            client=FakeJobClient(),
            out=out,
            poll_s=0,
        )
    submitted = [m for m in caplog.messages if "submitted Ray job" in m]
    assert submitted and "http://head:8265 (credentials and query removed)" in submitted[0]
    assert not [m for m in caplog.messages if "s3cret" in m]


def test_fake_submits_streams_and_returns_the_committed_report(job_args, capsys):
    client = FakeJobClient()
    report = run(job_args, client, sys.stdout)
    assert client.submitted == [job_args.base]
    assert capsys.readouterr().out == "driver says hi\n"  # streamed once, not again by the poll
    assert (report.step, report.dest) == ("resize", storage.normalize_uri(job_args.dest))
    manifest = contract.read_manifest(job_args.dest)
    assert manifest["config"]["ray_address"] == "" and manifest["config"]["size"] == 16
    submitted = client.jobs[job_args.base]
    assert submitted["metadata"]["imgpipe.run_id"] == "run-7"

    # A retry of the same run finds the finished job and its output: nothing is resubmitted.
    again = run(job_args, client, sys.stdout)
    assert client.submitted == [job_args.base] and again == report


def test_fake_attaches_to_a_running_job_and_polls_when_the_websocket_drops(job_args, capsys):
    client = FakeJobClient(tail_fails=True)
    client.add(
        job_args.base,
        "RUNNING",
        entrypoint=payload.step_entrypoint("resize", storage.normalize_uri(job_args.source), storage.normalize_uri(job_args.dest), job_args.job_cfg),
    )
    client.jobs[job_args.base]["steps"] = ["RUNNING", "RUNNING", "SUCCEEDED"]
    report = run(job_args, client, sys.stdout)
    assert client.submitted == [] and report.step == "resize"
    assert capsys.readouterr().out == "driver says hi\n"


def test_fake_failed_job_gets_a_new_attempt_then_gives_up(job_args, tmp_path):
    client = FakeJobClient(script=("RUNNING", "FAILED"), logs="".join(f"line {i}\n" for i in range(50)))
    client.add(job_args.base, "FAILED", message="Job entrypoint command failed with exit code 2")
    out = open(os.devnull, "w")  # noqa: SIM115
    with pytest.raises(RuntimeError) as err:
        run(job_args, client, out, max_attempts=2)
    assert client.submitted == [job_args.base + "-a2"]
    text = str(err.value)
    assert "ended FAILED" in text and "exit code 2" in text
    assert "line 49" in text and "line 29" not in text  # the last lines only
    # Every attempt used: a clear refusal, no third job.
    with pytest.raises(RuntimeError, match="no attempt left for this run id"):
        run(job_args, client, out, max_attempts=2)
    assert client.submitted == [job_args.base + "-a2"]
    out.close()


def test_fake_succeeded_job_whose_output_is_gone_runs_again(job_args):
    client = FakeJobClient()
    client.add(job_args.base, "SUCCEEDED")  # finished, but DEST holds nothing
    report = run(job_args, client, open(os.devnull, "w"))  # noqa: SIM115
    assert client.submitted == [job_args.base + "-a2"] and report.step == "resize"


def test_fake_timeout_leaves_the_job_running(job_args):
    client = FakeJobClient(script=["RUNNING"] * 1000)
    with pytest.raises(TimeoutError, match="keeps running"):
        run(job_args, client, open(os.devnull, "w"), timeout_s=0.05)  # noqa: SIM115


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


def build_clean(root: str, n: int = 6) -> str:
    members = {f"images/{name}_{i}.jpg": f.jpeg(48 + 3 * i, 40 + 2 * i, seed=i) for i, name in enumerate(["cat", "dog"] * (n // 2))}
    download = write_download_output(storage.join(root, "download"), members)
    dest = storage.join(root, "clean")
    report = clean(download, dest, CleanConfig(workers=1, seed=1, rows_per_shard=4, row_group_rows=2))
    assert (report.outputs, report.rejected) == (n, 0)
    return dest


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


# ----------------------------------------------------------------------------------------
# ray_address is a run's parameter: only "", KubeRay and configured clusters get the job.


@pytest.mark.parametrize("address", ["ray://evil.example:10001", "http://attacker.example:8265", "auto", "10.0.0.7:6379"])
def test_an_unconfigured_cluster_is_refused(address, monkeypatch):
    monkeypatch.setenv(targets.CLUSTERS_ENV, "http://imgpipe-ray-shared-head-svc:8265")
    with pytest.raises(ValueError, match="not a configured Ray cluster"):
        targets.check_allowed(address)


def test_local_kuberay_and_configured_clusters_are_accepted(monkeypatch):
    monkeypatch.setenv(targets.CLUSTERS_ENV, "http://Head-Svc:8265/, ray://other:10001")
    assert targets.check_allowed("").mode == "local"
    assert targets.check_allowed("kuberay://team-a").namespace == "team-a"
    assert targets.check_allowed("http://head-svc:8265").mode == "jobs"
    assert targets.check_allowed("ray://other:10001").mode == "local"


def test_resize_refuses_a_hostile_address_before_contacting_it(tmp_path, monkeypatch):
    import ray.job_submission

    def contacted(*args, **kwargs):
        raise AssertionError("a client was made for a hostile address")

    monkeypatch.delenv(targets.CLUSTERS_ENV, raising=False)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", contacted)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-clusters-token")
    source = build_clean("file://" + str(tmp_path))
    with pytest.raises(ValueError, match="not a configured Ray cluster"):
        resize(source, "file://" + str(tmp_path / "out"), ResizeConfig(size=16, ray_address="http://attacker.example:8265"))
    with pytest.raises(ValueError, match="not a configured Ray cluster"):
        ray_jobs.connect("http://attacker.example:8265")


def _task_output():
    from imgpipe.resize.task import TaskOutput
    from imgpipe.steps.resize import output_schema

    return TaskOutput(dest="s3://b/out", attempt="0" * 32, schema=output_schema("raw"), rows_per_shard=8, row_group_rows=4)


def test_no_credential_travels_in_a_resize_tasks_arguments(s3_bucket, monkeypatch):
    import pickle

    from imgpipe.steps.resize import list_row_groups, plan_tasks, task_arguments

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the store's own (random) key: the server checks it
    assert len(secret) >= 16
    source = build_clean(f"{s3_bucket}/t")
    fs, _ = storage.arrow_filesystem(source)
    assert secret.encode() in pickle.dumps(fs), "what used to travel: a file system holding the static keys"
    tasks = plan_tasks(list_row_groups(contract.data_files(source)))
    shipped = pickle.dumps((tasks, task_arguments(ResizeConfig(size=16), _task_output())))
    assert secret.encode() not in shipped


def test_resize_tasks_reach_the_drivers_store_whatever_their_environment(s3_endpoint, monkeypatch):
    """An endpoint given by --s3-endpoint lives in the driver only; a Ray worker started earlier lacks it."""
    from imgpipe.steps.resize import task_arguments

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure_s3(endpoint_url=s3_endpoint)
    try:
        settings = dict(task_arguments(ResizeConfig(size=16), _task_output())["settings"].by_scheme)["s3"]
        assert settings.endpoint_url == s3_endpoint and settings.region
    finally:
        storage.configure_s3(endpoint_url=None)
