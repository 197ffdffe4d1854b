"""The machine a benchmark ran on: what a result needs beside it to be compared with another.

    from host import describe
    env = {**describe(), ...}   # cpu_model, cpus, kernel, booted, python, loadavg, damon_pageout

A ratio measured in one run holds on its machine; figures of two runs compare only if the
machine is the same. The VM these benchmarks run on was restarted on 2026-11-26 at 20:10, and
since then a fresh process's imports take about 1.5 times as long and FFCV's epochs about twice
as long, while imgpipe's warm per-sample times fell by a tenth (docs/benchmarks.md, "Against the
peers"); nothing in the results said so. Each result now carries the CPU, the kernel and the
boot time, and whether the kernel runs a DAMON ``pageout`` scheme (memory reclaimed by the
kernel on its own, which can send a file read again from disk).

Standard library only.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

__all__ = ["describe", "cpu_model", "booted", "damon_pageout"]

_DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it, or the platform's processor string."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def booted(stat: Path = Path("/proc/stat")) -> str | None:
    """When the machine started (UTC, ISO 8601, to the second), from the kernel's ``btime``; ``None`` where unknown."""
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("btime "):
                return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(line.split()[1])))
    except (OSError, ValueError):
        pass
    return None


def damon_pageout(root: Path = _DAMON) -> bool | None:
    """Whether a running DAMON daemon pages memory out by itself; ``None`` where the kernel has no DAMON sysfs."""
    if not root.is_dir():
        return None
    try:
        for daemon in sorted(root.glob("[0-9]*")):
            if (daemon / "state").read_text().strip() != "on":
                continue
            if any(action.read_text().strip() == "pageout" for action in daemon.glob("contexts/*/schemes/*/action")):
                return True
    except OSError:
        return None
    return False


def describe() -> dict[str, Any]:
    """The machine, for a benchmark's environment record."""
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "booted": booted(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "damon_pageout": damon_pageout(),
    }
