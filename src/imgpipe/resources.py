"""What this process may use: CPUs and memory under its container's limits, and its lifetime.

``os.cpu_count()`` reports the node's cores; a pod with a CPU limit of 2 on a 64-core node
that sizes a pool by it starts 64 workers that the CFS quota then throttles. Everything
in imgpipe that sizes a pool asks :func:`available_cpus` instead (one CPU budget), which
reads the affinity mask and the cgroup CPU quota, v2 (``cpu.max``) or v1
(``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``). :func:`memory_limit` reads the
memory limit the same way, and :func:`usable_memory` caps it by the machine's RAM: what a
step divides among its workers.

:func:`die_with_parent` makes a worker process end when the process that started it
dies, even by ``kill -9``: a pool worker must never outlive the step it works for.
:func:`reaped_with_me` does the same for processes this one does not start directly (a
local Ray's daemons, agents and workers): a small reaper process kills them once this
process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CGROUP_ROOT",
    "cpu_quota",
    "available_cpus",
    "use_system_allocator",
    "memory_limit",
    "physical_memory",
    "usable_memory",
    "die_with_parent",
    "reaped_with_me",
    "tagged_processes",
    "process_table",
    "boot_ticks",
    "free_port",
    "hide_unused_module",
    "return_freed_memory",
    "trim_heap",
]

# Names the processes a reaper ends: set in this process's environment, inherited by all
# that it starts and everything they start in turn.
REAP_TAG_ENV = "IMGPIPE_REAP_TAG"

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_UNLIMITED_V1 = 1 << 62  # cgroup v1 reports "no limit" as a huge page-rounded number


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The container's CPU limit in CPUs (``1.5`` for ``1500m``), or ``None`` when there is none."""
    try:
        v2 = _read(root / "cpu.max")
        if v2 is not None:
            quota, period = v2.split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_us = _read(root / "cpu" / "cpu.cfs_quota_us")
        period_us = _read(root / "cpu" / "cpu.cfs_period_us")
        if quota_us is not None and period_us is not None:
            return None if int(quota_us) <= 0 else int(quota_us) / int(period_us)
    except ValueError:
        return None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by the container's CPU limit (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The container's memory limit in bytes, or ``None`` when there is none."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text is None:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= _UNLIMITED_V1 else value
    return None


def physical_memory() -> int | None:
    """The machine's RAM in bytes, or ``None`` where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def usable_memory(root: Path = CGROUP_ROOT) -> int | None:
    """Memory this process may plan with: the container's limit, capped by the machine's RAM.

    A limit above the node's RAM (or none at all) does not make more memory: the kernel's
    OOM killer acts on the RAM there is. ``None`` only when neither is known.
    """
    known = [m for m in (memory_limit(root), physical_memory()) if m is not None]
    return min(known) if known else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for local servers and Ray nodes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hidden:
    """A meta path finder that answers for some top-level packages as if they were not installed."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def hide_unused_module(name: str) -> bool:
    """Makes ``name`` unimportable in this process, unless it is imported already; whether it hid it.

    For a step's own process only (a CLI step command), to keep it from paying for a
    package it never uses: pyarrow imports pandas, where installed, the first time it
    builds an array (to recognize pandas objects), 0.3 s of CPU in every process of a cold
    ``imgpipe clean`` in an environment that has pandas. The step images do not install
    pandas, so hiding it gives the command line the process a pod runs. (A ``None`` in
    ``sys.modules`` would not do: pyarrow's lazy import gets ``None`` back, not an ImportError.)
    """
    if name in sys.modules:
        return False
    for finder in sys.meta_path:
        if isinstance(finder, _Hidden) and name in finder.names:
            return True
    sys.meta_path.insert(0, _Hidden(frozenset({name})))
    return True


def return_freed_memory() -> bool:
    """Gives the memory this process has freed back to the system; whether the C library could.

    A step that drops its per-image records (clean's plan and results, hundreds of thousands
    of small objects) before its next phase would otherwise keep their pages: glibc's
    allocator returns freed heap memory only from the top of the heap, so the next phase's
    buffers come on top of them and the peak grows with the number of images. ``malloc_trim``
    releases every free page of the heap and its arenas (glibc >= 2.8). Elsewhere (musl,
    macOS) nothing happens.
    """
    gc.collect()
    return trim_heap()


@functools.cache
def _libc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    """The C library's function ``name`` (returning an int), or ``None`` where it has none (musl, macOS)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return function


def trim_heap() -> bool:
    """``malloc_trim(0)``: the C library's free heap pages back to the system, with no garbage collection; whether it could.

    For loops over batches (the train step's loaders call it every few batches they deliver). glibc serves a block
    of up to 32 MB from its heaps once a block that large has been freed (its mmap threshold
    rises to it), and it keeps the pages of freed blocks that are not at the top of a heap.
    Batches of varying sizes from loader threads then raise the resident memory pass after
    pass: an evaluation loader over 12,000 rows of 64 px kept 120 MB more after one pass,
    and more after each further pass. Trimming every 10 batches kept it flat (docs/benchmarks.md,
    "Scale"). A trim costs a walk of the free lists; the pages it returns are faulted in again
    when used.
    """
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is None:
        return False
    trim(0)
    return True


def one_malloc_arena() -> bool:
    """``mallopt(M_ARENA_MAX, 1)``: threads started from here on allocate from the main heap; whether it could.

    glibc gives each new thread a heap (an arena) of its own, and pages freed in one stay with
    it. The download's pool threads free row groups of megabytes in turn: its resident memory
    swung by 70 MB, and its peak at 128k images was 236 MB (1.25x that at 4k). With one arena
    it was 212 MB (1.20x), and the step took 12 % less CPU (docs/benchmarks.md, "Scale").
    """
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    m_arena_max = -8  # <malloc.h>
    return mallopt is not None and bool(mallopt(m_arena_max, 1))


def use_system_allocator() -> str:
    """Makes the C library's allocator Arrow's default from here on; the backend it had.

    The download, clean and train steps call it first. They handle row groups of megabytes
    on several threads, and pyarrow's default (mimalloc) keeps segments per thread: 46 MB of
    clean's peak at 128k images, and a quarter more than the train step's row cache holds; a
    first epoch of 224 px raw rows ran at 1,400-3,100 images/s against 3,400-3,800 with
    glibc's (docs/benchmarks.md, "Scale"). Buffers already allocated go back to the pool
    that made them. Unlike ``ARROW_DEFAULT_MEMORY_POOL`` (which the ``imgpipe`` command sets
    before pyarrow is imported), this works after pyarrow has allocated, so a kfp
    component's process, which imports the step in a running interpreter, gets it too.
    """
    import pyarrow as pa

    before = pa.default_memory_pool().backend_name
    pa.set_memory_pool(pa.system_memory_pool())
    return before


def die_with_parent(owner: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ends this process with ``sig`` when its parent, or ``owner``, dies (Linux).

    Meant for a pool initializer. The kernel signals the process when the one that forked
    it dies (``PR_SET_PDEATHSIG``): enough for a ``fork`` pool. A ``forkserver`` pool's
    workers are forked by the forkserver, which only exits once no worker holds its
    "alive" pipe: the workers would wait for it and it for them. So pass ``owner``, the
    step's own pid: a thread waits on a pidfd of it, readable when it exits (a zombie
    included), and ends this process then. ``owner`` also covers a parent that died
    before this call, which no signal would then report.

    Returns:
        Whether the request was made (``False`` off Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return False
    # The owner may have died between fork and prctl, and then no signal would ever come:
    # a parent pid other than the owner's sends this process to watch it, which ends the
    # process at once if the owner is gone. Only a known pid tells a dead parent from a
    # live one: a step that runs as its container's main process is pid 1, and so is its
    # workers' parent (testing for a parent pid of 1 killed every worker there).
    if owner is not None and owner != os.getppid():
        _watch(owner, sig)
    return True


def _watch(pid: int, sig: int) -> None:
    import select
    import threading

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone already (ESRCH), or a kernel before 5.3
        if not _alive(pid):
            os.kill(os.getpid(), sig)
        return

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait, name=f"die-with-{pid}", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def reaped_with_me() -> Iterator[str]:
    """Everything started inside the block dies with this process, however it ends.

    Processes started inside inherit a tag in their environment (:data:`REAP_TAG_ENV`);
    a reaper process started before it waits for this process to exit (a pidfd) and then
    kills every process carrying the tag. A local Ray needs this: its daemons share the
    driver's fate, but their children (the dashboard and runtime-env agents, busy
    workers) outlive a ``kill -9`` of the driver by minutes, and its agents even a
    clean ``ray.shutdown()`` by a while. On a normal exit the reaper is told to reap at
    once, and the block waits for it.

    Yields:
        The tag.
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex}"
    reaper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from imgpipe.resources import _reap; _reap(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))",
            str(os.getpid()),
            tag,
            # Start times are whole ticks (10 ms): one started in the block's first tick
            # counts, and so would one started just before it, within that same tick.
            str(boot_ticks()),
        ],
        env={k: v for k, v in os.environ.items() if k != REAP_TAG_ENV},
        # Closing this pipe tells the reaper to reap now (the block ended).
        stdin=subprocess.PIPE,
        # Its own session: a Ctrl-C or a group kill aimed at this process must not end it first.
        start_new_session=True,
    )
    previous = os.environ.get(REAP_TAG_ENV)
    os.environ[REAP_TAG_ENV] = tag
    try:
        yield tag
    finally:
        if previous is None:
            os.environ.pop(REAP_TAG_ENV, None)
        else:
            os.environ[REAP_TAG_ENV] = previous
        reaper.stdin.close()
        try:
            reaper.wait(timeout=_PATIENCE_S + 5)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``REAP_TAG_ENV=tag`` (this one excluded)."""
    needle = f"{REAP_TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return found


def process_table() -> dict[int, tuple[int, int]]:
    """Every live process (zombies aside): pid -> (parent pid, start time in clock ticks)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue  # dead, waiting for its parent to collect it: nothing left to kill
        table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


class _Descendants:
    """The processes below ``owner``, remembered (with their start times) while it lives.

    A process whose title a library rewrote (setproctitle, as Ray's agents do) may no
    longer show its environment, and one whose parent died hangs under init: what was
    seen below the owner is what gets killed.
    """

    def __init__(self, owner: int, since: int) -> None:
        self.owner = owner
        # What the owner started before the block (a test session's S3 server) is not ours.
        self.since = since
        self.seen: dict[int, int] = {}

    def update(self) -> dict[int, tuple[int, int]]:
        table = process_table()
        known = {self.owner, *self.seen}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, started) in table.items():
                if ppid in known and pid not in known and started >= self.since and pid != os.getpid():
                    self.seen[pid] = started
                    known.add(pid)
                    grew = True
        return table

    def alive(self, table: dict[int, tuple[int, int]]) -> list[int]:
        return [pid for pid, started in self.seen.items() if table.get(pid, (0, None))[1] == started]


_PATIENCE_S = 30.0
_WATCH_S = 0.25
# A tagged process may still be starting one (fork, then exec) when the last one seen dies.
_QUIET_S = 0.3


def _wait_for_owner(owner: int, tree: _Descendants) -> None:
    import select

    try:
        fd = os.pidfd_open(owner)
    except OSError:
        fd = None  # gone already, or a kernel without pidfd (its death still closes stdin)
    watched = [sys.stdin.fileno()] + ([fd] if fd is not None else [])
    while fd is not None or _alive(owner):
        tree.update()
        if select.select(watched, [], [], _WATCH_S)[0]:
            return


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat gives start times in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _reap(owner: int, tag: str, since: int) -> None:
    """The reaper's body: waits for ``owner`` to exit or close its stdin, then kills what it started."""
    tree = _Descendants(owner, since)
    _wait_for_owner(owner, tree)
    deadline = time.monotonic() + _PATIENCE_S
    quiet_since = None
    while time.monotonic() < deadline:
        table = tree.update()
        pids = set(tree.alive(table)) | set(tagged_processes(tag))
        pids.discard(owner)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > _QUIET_S:
            return
        time.sleep(0.05)
