"""The reliability suite (``make test-faults``): real steps, as separate processes, under faults.

Every step runs as ``imgpipe <step>`` in a fresh process, the way a pod runs it, against
the local S3 server on loopback. Each test records its figures in
``out/reliability/<test>.json``; docs/reliability.md holds the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imgpipe import resources
from tests.conftest import ROOT

FIGURES = ROOT / "out" / "reliability"
IMGPIPE = [sys.executable, "-m", "imgpipe.cli"]
# Marks every process a test starts (inherited by pool workers and Ray processes alike),
# so leftovers can be found after a kill.
TAG_ENV = "IMGPIPE_FAULT_TAG"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session", autouse=True)
def loopback_only() -> None:
    """The suite sends nothing off loopback: it runs only in the loopback-only namespace."""
    if os.environ.get("IMGPIPE_IN_NETNS") != "1":
        pytest.skip("the reliability suite runs only inside scripts/in-loopback-netns (make test-faults)")
    # if_nameindex() asks this process's network namespace (/sys/class/net may show the host's).
    up = [name for _, name in socket.if_nameindex() if name != "lo"]
    if up:
        pytest.fail(f"the reliability suite runs only in a loopback-only namespace (scripts/in-loopback-netns); up: {up}")
    with pytest.raises(OSError):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: no route here


@dataclass
class StepRun:
    """One finished ``imgpipe`` process."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float  # the largest of the process and the children it waited for

    def check(self) -> StepRun:
        assert self.returncode == 0, f"{' '.join(self.args)} failed ({self.returncode}):\n{self.stderr[-3000:]}"
        return self


@dataclass
class Runner:
    """Starts ``imgpipe`` commands with a given S3 endpoint and a tag to find leftovers by."""

    endpoint: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra_env: dict[str, str] = field(default_factory=dict)
    since: int = field(default_factory=lambda: resources.boot_ticks())

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ENDPOINT_URL": self.endpoint,
            TAG_ENV: self.tag,
            # This tree's sources, whatever the virtual environment's editable install points at.
            "PYTHONPATH": os.pathsep.join((str(ROOT / "src"), str(ROOT))),
            "TQDM_DISABLE": "1",
            **self.extra_env,
        }

    def start(self, *args: str) -> subprocess.Popen:
        # Output goes to files: an undrained pipe fills up and blocks the step (and its pool
        # workers, mid-decode) on a write to stderr.
        out, err = (tempfile.TemporaryFile("w+") for _ in range(2))  # noqa: SIM115 - closed by finish()
        proc = subprocess.Popen([*IMGPIPE, *args], env=self.env(), stdout=out, stderr=err, text=True, cwd=ROOT)
        proc.output_files = (out, err)  # type: ignore[attr-defined]
        return proc

    def finish(self, proc: subprocess.Popen, started: float, timeout: float = 600) -> StepRun:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{proc.args} did not finish in {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = (_drain(f) for f in proc.output_files)
        return StepRun(list(proc.args), proc.returncode, out, err, time.monotonic() - started, usage.ru_maxrss / 1024)

    def run(self, *args: str, timeout: float = 600) -> StepRun:
        started = time.monotonic()
        return self.finish(self.start(*args), started, timeout)

    def leftovers(self) -> list[str]:
        """Command lines of live processes carrying this runner's tag, or orphaned Ray processes.

        A process that rewrites its title (Ray's agents use setproctitle) may no longer show
        its environment: orphans (parent 1) named ``ray::`` or running Ray's code that
        started after this runner count too.
        """
        found = []
        for pid, (ppid, started) in resources.process_table().items():
            if ppid == 1 and started >= self.since:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if cmd.startswith("ray::") or "/ray/" in cmd:
                    found.append(cmd[:200])
        needle = f"{TAG_ENV}={self.tag}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                tagged = needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if tagged and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
                    found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
            except OSError:
                continue
        return found

    def wait_no_leftovers(self, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def _drain(fh) -> str:
    fh.seek(0)
    text = fh.read()
    fh.close()
    return text


def kill_hard(proc: subprocess.Popen) -> None:
    """``kill -9`` of the step's own process only: its children must notice by themselves."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture
def figures(request: pytest.FixtureRequest):
    """A dict the test fills; written to out/reliability/<test name>.json at the end."""
    data: dict = {}
    yield data
    FIGURES.mkdir(parents=True, exist_ok=True)
    name = request.node.name.replace("/", "_")
    (FIGURES / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
