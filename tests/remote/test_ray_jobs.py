"""The resize step as a Ray job, without Ray: addresses, ids, auth, the retry rules on a fake client, which clusters may get it.

The unit tests use an in-process fake of ``JobSubmissionClient`` that "runs" a job
by parsing its entrypoint with the real CLI parser and committing an output with the
config it carries (tests/remote/test_ray_jobs_head.py runs jobs on a real head).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from imgpipe import contract, storage
from imgpipe import step_table as registry
from imgpipe.config import config_from_dict, config_to_dict
from imgpipe.remote import attempts, job, payload, ray_jobs, targets
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.resize import resize
from tests.helpers import commit_like_the_job, parse_entrypoint
from tests.remote.conftest import build_clean

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
