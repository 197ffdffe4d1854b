"""resources: the CPU budget and memory limit under cgroup v1 and v2, workers that die with their parent, the exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgpipe import resources
from imgpipe.resources import (
    available_cpus,
    cpu_quota,
    die_with_parent,
    memory_limit,
    physical_memory,
    usable_memory,
)


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
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
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
""",
        ]
    )
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


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"memory.max": "1073741824\n"}, 1 << 30),
        ({"memory.max": f"{1 << 55}\n"}, "ram"),  # a limit above the node's RAM
        ({"memory.max": "max\n"}, "ram"),
        ({}, "ram"),
    ],
)
def test_usable_memory_is_the_limit_capped_by_the_ram(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    ram = physical_memory()
    assert ram is not None and ram > 1 << 30
    assert usable_memory(tmp_path) == (ram if expected == "ram" else expected)


def test_processes_started_in_a_reaped_block_die_with_the_process(tmp_path):
    """kill -9 of the process that opened the block: what it started (and their children) goes too."""
    import subprocess
    import sys
    import time

    from imgpipe import resources

    script = (
        "import subprocess, sys, time\n"
        "from imgpipe.resources import reaped_with_me\n"
        "with reaped_with_me() as tag:\n"
        "    # a grandchild in its own session, like Ray's agents: neither PDEATHSIG nor a group kill reaches it\n"
        '    inner = (\'import subprocess,sys,time; subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], \'\n'
        "             'start_new_session=True); time.sleep(600)')\n"
        "    subprocess.Popen([sys.executable, '-c', inner], start_new_session=True)\n"
        "    print(tag, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    tag = proc.stdout.readline().strip()
    deadline = time.monotonic() + 10
    while len(resources.tagged_processes(tag)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(resources.tagged_processes(tag)) == 2, "its child and grandchild carry the tag"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while resources.tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resources.tagged_processes(tag) == []


def test_a_reaped_block_that_ends_normally_leaves_no_reaper():
    from imgpipe import resources

    with resources.reaped_with_me() as tag:
        assert os.environ[resources.REAP_TAG_ENV] == tag
    assert resources.REAP_TAG_ENV not in os.environ
    assert resources.tagged_processes(tag) == []


def test_a_reaped_block_leaves_what_ran_before_it_alone():
    """The owner's earlier children (a test session's S3 server) are not the block's to kill."""
    import subprocess
    import sys
    import time

    from imgpipe import resources

    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.05)  # start times have a resolution of one clock tick (10 ms)
    try:
        with resources.reaped_with_me():
            inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={"PATH": "/usr/bin"})
        assert inside.wait(timeout=10) == -signal.SIGKILL, "started inside (even without the tag): reaped"
        assert earlier.poll() is None, "started before: left alone"
    finally:
        earlier.kill()
        earlier.wait()


def test_a_killed_child_not_yet_collected_is_not_alive():
    """A zombie holds its pid and start time until its parent waits: the reaper must not
    keep killing it until its patience runs out (it did, for 30 s at every such exit)."""

    from imgpipe import resources

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in resources.process_table()
        child.kill()
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        assert child.pid not in resources.process_table()
    finally:
        child.kill()
        child.wait()


def _in_own_pid_namespace(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` as pid 1 of a new pid namespace, as a container's main process runs."""
    try:
        return subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except FileNotFoundError:
        pytest.skip("needs unshare (util-linux)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_worker_of_a_step_running_as_pid_1_lives():
    # A container's main process is pid 1; its workers' parent is then pid 1, alive.
    code = (
        "import os, time\n"
        "from imgpipe.resources import die_with_parent\n"
        "assert os.getpid() == 1\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    die_with_parent(owner=1)\n"
        "    os._exit(7)\n"
        "print('worker exit', os.waitpid(pid, 0)[1] >> 8)\n"
    )
    result = _in_own_pid_namespace(code)
    if result.returncode and "Operation not permitted" in result.stderr:
        pytest.skip("creating a pid namespace needs privileges here")
    assert result.stdout.strip() == "worker exit 7", result.stderr


def test_the_system_allocator_becomes_arrows_default_after_pyarrow_has_allocated():
    code = (
        "import os\n"
        "os.environ.pop('ARROW_DEFAULT_MEMORY_POOL', None)\n"
        "import pyarrow as pa\n"
        "kept = pa.array([b'x' * 1000] * 100)\n"
        "from imgpipe import resources\n"
        "print(resources.use_system_allocator(), pa.default_memory_pool().backend_name)\n"
        "assert pa.array([b'y' * 1000] * 100).to_pylist()[0] == b'y' * 1000 and kept.to_pylist()[0] == b'x' * 1000\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == ["mimalloc", "system"]


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize(
    ("step", "first_read"),
    [("download", "_plan"), ("clean", "contract.read_manifest"), ("train", "contract.read_manifest")],
)
def test_each_step_that_handles_row_groups_switches_to_the_system_allocator_first(step, first_read, monkeypatch, tmp_path):
    """A kfp component imports the step in a running interpreter: the environment variable the command sets comes too late there."""
    import importlib

    from imgpipe.steps.download import DownloadConfig

    module = importlib.import_module(f"imgpipe.steps.{step}")
    switched = []
    monkeypatch.setattr(resources, "use_system_allocator", lambda: switched.append(step) or "mimalloc")
    owner, _, name = first_read.rpartition(".")
    monkeypatch.setattr(getattr(module, owner) if owner else module, name, _stop)
    args = (str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(_Stop):
        getattr(module, step)(*args, DownloadConfig()) if step == "download" else getattr(module, step)(*args)
    assert switched == [step]


def test_trimming_the_heap_hands_back_the_pages_of_blocks_freed_below_its_top():
    """glibc keeps freed heap blocks' pages (only the top of a heap goes back by itself); ``trim_heap`` returns them.

    In a fresh process: a freed 16 MB block raises glibc's mmap threshold, so twenty 8 MB blocks
    come from the heap; all but the last are freed (the last keeps the top in use).
    """
    code = (
        "import ctypes\n"
        "from imgpipe import resources\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024\n"
        "libc.free(libc.malloc(16 << 20))\n"
        "blocks = [libc.malloc(8 << 20) for _ in range(20)]\n"
        "for b in blocks:\n"
        "    ctypes.memset(b, 1, 8 << 20)\n"
        "for b in blocks[:-1]:\n"
        "    libc.free(b)\n"
        "before = anon()\n"
        "assert resources.trim_heap()\n"
        "print(before - anon())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert int(out) >= 100, f"only {out.strip()} MB handed back of the 152 MB freed"


@pytest.mark.parametrize("one", [False, True])
def test_with_one_malloc_arena_a_new_thread_allocates_from_the_main_heap(one):
    """glibc gives a new thread an arena of its own (mapped above the program break); after
    ``one_malloc_arena`` it allocates below the break, from the main heap. In a fresh process."""
    code = (
        "import ctypes, sys, threading\n"
        "from imgpipe import resources\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]\n"
        f"assert {one} is False or resources.one_malloc_arena()\n"
        "got = []\n"
        "t = threading.Thread(target=lambda: got.append(libc.malloc(64)))\n"
        "t.start(); t.join()\n"
        "print(int(got[0] < libc.sbrk(0)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == str(int(one))


def test_the_download_step_takes_one_malloc_arena_before_its_threads_start(monkeypatch, tmp_path):
    from imgpipe.steps import download as download_step

    calls = []
    monkeypatch.setattr(resources, "one_malloc_arena", lambda: calls.append("arena") or True)
    monkeypatch.setattr(download_step, "_source_list", _stop)
    with pytest.raises(_Stop):
        download_step.download("x", str(tmp_path / "out"), download_step.DownloadConfig())
    assert calls == ["arena"]


def test_a_report_switches_to_the_system_allocator_first(monkeypatch, tmp_path):
    """Each step's component draws its report; resize's and ``imgpipe show`` had drawn it on mimalloc."""
    from imgpipe.report import steps as report_steps

    switched = []
    monkeypatch.setattr(resources, "use_system_allocator", lambda: switched.append("report") or "mimalloc")
    monkeypatch.setattr(report_steps.contract, "read_manifest", _stop)
    with pytest.raises(_Stop):
        report_steps.build_report(str(tmp_path / "out"))
    assert switched == ["report"]
