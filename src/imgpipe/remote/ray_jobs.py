"""Running a step on a remote Ray cluster as a Ray job, idempotently per run.

    report = run_step_job("resize", source, dest, cfg, address="http://raycluster-head-svc:8265", run_id=run_id)

How it works in detail: docs/internals/remote.md, "imgpipe.remote.ray_jobs".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from imgpipe import commit, storage
from imgpipe.contract import StepReport
from imgpipe.remote.attempts import RUN_ID_ENV, attempt_id, committed_report, job_id, resolve_run_id
from imgpipe.remote.payload import step_entrypoint
from imgpipe.remote.runner import run_remote
from imgpipe.remote.targets import check_allowed

__all__ = ["resolve_auth_token", "connect", "run_step_job"]

log = logging.getLogger(__name__)

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
LOG_TAIL_LINES = 20


def resolve_auth_token(environ: Any = None, home: Path | None = None) -> str | None:
    """The Ray auth token Ray's own client would use, or ``None`` (see the module docstring).

    Raises:
        ValueError: If ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file (Ray
            itself treats that as fatal rather than falling back).
    """
    environ = os.environ if environ is None else environ
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc}") from exc
        if not token:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    if environ.get("RAY_AUTH_MODE", "").lower() == "token":
        default = (home or Path.home()) / ".ray" / "auth_token"
        if default.is_file():
            return default.read_text().strip() or None
    return None


def connect(address: str, token: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address``, authenticated when a token is known.

    Raises:
        ValueError: If ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` names another cluster:
            Ray's client would silently use that one instead of ``address``.
        RuntimeError: If the cluster refuses the credentials (or their absence).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    check_allowed(address)  # the token goes to configured clusters only
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "").rstrip("/")
        if value and value != address.rstrip("/"):
            raise ValueError(
                f"{name}={value} is set and Ray's JobSubmissionClient would use it instead of {address}; unset it, or make it the same address"
            )
    token = token or resolve_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        hint = "the token was refused" if token else "no token was found"
        raise RuntimeError(
            f"Ray Jobs API at {address} requires authentication and {hint}: set RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH to the cluster's token (KubeRay: the Secret of the cluster's "
            f"authOptions). Ray said: {str(exc).splitlines()[0]}"
        ) from exc


def _job_cfg(cfg: Any) -> Any:
    """The config the job runs: the same, joining its own cluster (``ray_address`` cleared)."""
    return dataclasses.replace(cfg, ray_address="")


# ----------------------------------------------------------------------------------------
# The Jobs API mode.


def _status(info: Any) -> str:
    status = info.status
    return str(getattr(status, "value", status))


def _is_missing(exc: RuntimeError) -> bool:
    # JobSubmissionClient raises RuntimeError("Request failed with status code 404: Job X does not exist.").
    return "404" in str(exc) or "does not exist" in str(exc)


def _job_info(client: Any, submission_id: str) -> Any | None:
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if _is_missing(exc):
            return None
        raise


def _state(status: str) -> str:
    return {"PENDING": "active", "RUNNING": "active", "SUCCEEDED": "succeeded"}.get(status, "failed")


def _headline(message: str | None) -> str:
    """The first line of a job's status message, without the copy of the log Ray appends."""
    line = (message or "").strip().split("\n", 1)[0]
    return re.sub(r",? last available logs.*$", "", line)


def _last_lines(text: str, n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def _follow(client: Any, submission_id: str, out: TextIO, timeout_s: float | None) -> int:
    """Streams the job's log to ``out`` over the Jobs API websocket; returns characters written."""
    written = 0

    async def follow() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout_s))
    except asyncio.TimeoutError:
        pass  # the poll loop below reports the timeout
    except Exception as exc:  # a dropped websocket, a running event loop, no aiohttp: poll instead
        log.warning("following the log of Ray job %s failed (%s); polling it instead", submission_id, exc)
    return written


def _wait(client: Any, submission_id: str, out: TextIO, timeout_s: float | None, poll_s: float, follow: bool) -> tuple[Any, str]:
    """Streams logs until the job is terminal; returns its info and full log."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    written = _follow(client, submission_id, out, timeout_s) if follow else 0
    while True:
        info = client.get_job_info(submission_id)
        logs = client.get_job_logs(submission_id) or ""
        if len(logs) > written:  # what the websocket missed (or everything, when polling)
            out.write(logs[written:])
            out.flush()
            written = len(logs)
        if _status(info) in TERMINAL:
            return info, logs
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"Ray job {submission_id} is still {_status(info)} after {timeout_s:.0f}s; it keeps running "
                "(a retry with the same run id re-attaches; `ray job stop` ends it)"
            )
        time.sleep(poll_s)


def run_step_job(
    step: str,
    source: str,
    dest: str,
    cfg: Any,
    *,
    address: str,
    run_id: str | None = None,
    client: Any = None,
    out: TextIO | None = None,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
    max_attempts: int = 3,
    follow_logs: bool = True,
) -> StepReport:
    """Runs a step as a Ray job through the cluster's Jobs API and waits for it.

    Args:
        step: The ``imgpipe`` sub-command (``resize``).
        source: Input prefix, as the step takes it.
        dest: Output prefix.
        cfg: The step's resolved config; the job runs it with ``ray_address`` cleared.
        address: The Jobs API URL, e.g. ``http://raycluster-head-svc:8265``.
        run_id: Idempotency key (default ``$IMGPIPE_RUN_ID``); see the module docstring.
        client: A ``JobSubmissionClient`` (default: :func:`connect` to ``address``).
        out: Where the job's log is streamed (default stdout).
        timeout_s: Give up waiting after this long (the job keeps running); ``None`` waits.
        poll_s: Status poll interval.
        max_attempts: Attempts in all for one job id, across retries.
        follow_logs: Stream logs over the websocket (else poll them).

    Returns:
        The step report, read from the committed manifest at ``dest``.

    Raises:
        RuntimeError: If the job fails or stops, with its status, message and last log lines.
        TimeoutError: If ``timeout_s`` passes first.
    """
    source, dest = storage.normalize_uri(source), storage.normalize_uri(dest)
    commit.check_disjoint(dest, [source], step)
    job_cfg = _job_cfg(cfg)
    run_id = resolve_run_id(run_id)
    if run_id is None:
        log.warning("%s: no run id (--run-id or $%s): a retry of this call cannot re-attach to its job", step, RUN_ID_ENV)
    base = job_id(step, source, dest, job_cfg, run_id)
    target = _JobsApiTarget(
        step, source, dest, job_cfg, client or connect(address), address, run_id, base, out or sys.stdout, timeout_s, poll_s, follow_logs
    )
    return run_remote(target, base=base, committed=lambda: committed_report(step, source, dest, job_cfg), max_attempts=max_attempts)


@dataclass
class _JobsApiTarget:
    """A step as Ray jobs of a cluster's Jobs API, for :func:`imgpipe.remote.runner.run_remote`."""

    step: str
    source: str
    dest: str
    cfg: Any
    client: Any
    address: str
    run_id: str | None
    base: str
    out: TextIO
    timeout_s: float | None
    poll_s: float
    follow_logs: bool
    logs: str = ""

    def find(self, name: str) -> Any | None:
        return _job_info(self.client, name)

    def state(self, info: Any) -> tuple[str, str]:
        return _state(_status(info)), f"{_status(info)}: {_headline(info.message)}"

    def submit(self, name: str, attempt: int, previous: Any, detail: str) -> None:
        if previous is not None:
            log.warning("%s: Ray job %s ended %s; submitting attempt %d", self.step, attempt_id(self.base, attempt - 1), detail, attempt)
        _submit(self.client, self.step, self.source, self.dest, self.cfg, name, self.run_id, attempt)
        shown = storage.redact_uri(self.address)  # a cluster address may carry user:password@
        log.info(
            "%s: submitted Ray job %s (attempt %d) to %s; follow it with `ray job logs -f %s --address %s`",
            self.step,
            name,
            attempt,
            shown,
            name,
            shown,
        )

    def attach(self, name: str, info: Any, detail: str) -> None:
        log.info("%s: attaching to Ray job %s (%s) at %s", self.step, name, _status(info), storage.redact_uri(self.address))

    def wait(self, name: str, obj: Any) -> Any:
        info, self.logs = _wait(self.client, name, self.out, self.timeout_s, self.poll_s, self.follow_logs)
        return info

    def done(self, name: str) -> None:
        log.info("%s: Ray job %s already succeeded and %s holds its output; not resubmitting", self.step, name, self.dest)

    def failure(self, name: str, detail: str, final: Any) -> str:
        ended = f"Ray job {name} for {self.step} {self.dest} ended {_status(final)}: {_headline(final.message)}"
        return f"{ended}\nlast log lines:\n{_last_lines(self.logs)}"

    def no_output(self, name: str) -> str:
        return f"Ray job {name} SUCCEEDED but {self.dest} does not hold its committed output (another run wrote there meanwhile?)"

    def clean_up(self, names: list[str]) -> None:
        """The Jobs API keeps finished jobs (its dashboard shows them); nothing to delete."""


def _submit(client: Any, step: str, source: str, dest: str, job_cfg: Any, submission_id: str, run_id: str | None, attempt: int) -> None:
    env = storage.settings_env()
    if env:
        log.info("%s: forwarding %s to the job", step, ", ".join(sorted(env)))  # names only, never values
    try:
        client.submit_job(
            entrypoint=step_entrypoint(step, source, dest, job_cfg),
            submission_id=submission_id,
            runtime_env={"env_vars": env} if env else None,
            metadata={"imgpipe.step": step, "imgpipe.run_id": run_id or "", "imgpipe.attempt": str(attempt)},
        )
    except RuntimeError as exc:
        # Another submitter won the race for this id: the job exists, so attach to it.
        if "already exists" not in str(exc) or _job_info(client, submission_id) is None:
            raise
        log.info("%s: Ray job %s was submitted concurrently; attaching", step, submission_id)
