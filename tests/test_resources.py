"""resources: the CPU budget and memory limit under cgroup v1 and v2, and workers that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from imgpipe.resources import available_cpus, cpu_quota, die_with_parent, memory_limit


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_available_cpus_respects_the_container_limit(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    unlimited = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (unlimited if expected is None else min(expected, unlimited))



@pytest.mark.parametrize(
    "files,expected",
    [
        ({"memory.max": "8589934592\n"}, 8 << 30),
        ({"memory.max": "max\n"}, None),
        ({"memory/memory.limit_in_bytes": "4294967296\n"}, 4 << 30),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ({}, None),
    ],
)
def test_memory_limit_under_cgroup_v1_and_v2(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert memory_limit(tmp_path) == expected
    assert cpu_quota(tmp_path) is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_worker_dies_when_its_parent_is_killed(tmp_path):
    """A parent starts a child that asked to die with it, then is killed with SIGKILL."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path[:0] = {sys.path!r}
from imgpipe.resources import die_with_parent
pid = os.fork()
if pid == 0:
    die_with_parent()
    open({str(pid_file)!r}, "w").write(str(os.getpid()))
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the worker outlived its parent"
    assert die_with_parent.__doc__ and available_cpus() >= 1
