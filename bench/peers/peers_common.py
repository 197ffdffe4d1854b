"""What the peer comparisons share: a child process timed from outside, the spread of repeats, markdown rows.

    run = timed_child([python, "bench/peers/peers_loader.py", "--child", name, ...])   # run.seconds, run.result, run.error
    s = spread([run.seconds for run in runs])                                     # median, min, max, runs
    print(markdown(["contender", "cold s"], [[name, fmt_spread(s)]]))

Everything here is standard library only: the FFCV and MosaicML children run it in the
peers' own virtualenv (``.venv/peers``), which has no imgpipe.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["REPO", "Run", "peers_python", "timed_child", "spread", "fmt_spread", "markdown", "rotated", "last_line_error"]

REPO = Path(__file__).resolve().parents[1]


def peers_python() -> str:
    """The interpreter of the peers' own venv (FFCV, MosaicML Streaming): ``$IMGPIPE_PEERS_PYTHON`` or ``.venv/peers``."""
    return os.environ.get("IMGPIPE_PEERS_PYTHON") or str(REPO / ".venv" / "peers" / "bin" / "python")


@dataclass(frozen=True)
class Run:
    """One child process: wall seconds from its start to its exit, its last stdout line as JSON, or why it failed."""

    seconds: float
    result: dict[str, Any] | None
    error: str | None


def last_line_error(text: str) -> str:
    """The last non-empty line of a traceback or log: what a table row can show."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160]


def timed_child(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 1800, result: bool = True) -> Run:
    """Runs ``cmd`` as a fresh process and times it from outside, as a pod's run is timed: start to exit.

    With ``result`` the last line of its stdout must be JSON (the run's result); without, stdout is ignored.
    """
    if not Path(cmd[0]).exists() and os.sep in cmd[0]:
        return Run(0.0, None, f"not installed: {cmd[0]} is missing (make bench-peers installs it)")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=env or os.environ.copy(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return Run(time.perf_counter() - t0, None, f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        return Run(seconds, None, f"exit {done.returncode}: {last_line_error(done.stderr or done.stdout)}")
    lines = done.stdout.strip().splitlines()
    if not result:
        return Run(seconds, {}, None)
    try:
        return Run(seconds, json.loads(lines[-1]) if lines else {}, None)
    except json.JSONDecodeError:
        return Run(seconds, None, f"no JSON result: {last_line_error(done.stdout)}")


def spread(values: Iterable[float]) -> dict[str, Any] | None:
    """Median, min and max of the repeats (and the runs themselves); None when no repeat succeeded."""
    runs = [float(v) for v in values]
    if not runs:
        return None
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": [round(v, 3) for v in runs]}


def fmt_spread(s: dict[str, Any] | None, digits: int = 2) -> str:
    """``median (min–max)``, or a dash."""
    if s is None:
        return "—"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A markdown table; ``right[i]`` right-aligns column ``i`` (numbers)."""
    right = right or [i > 0 for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """``names`` started at ``repeat`` (mod len): each contender takes its turn first, so load falls on all alike."""
    k = repeat % len(names) if names else 0
    return [*names[k:], *names[:k]]
