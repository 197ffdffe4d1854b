"""One log line per phase of a step: what it counted and how long it took.

A pod's log is what an operator reads first when a step is slow or a count looks wrong,
so every step says, phase by phase, ``clean: decode: rows=725 kept=720 rejected=5 (1.62 s)``.
The counts are numbers only: a phase line never carries a URI, a path or a setting,
so no log line can leak a credential or a presigned URL through it.
"""

from __future__ import annotations

import logging
import numbers
import resource
import sys
import time

__all__ = ["PhaseLog", "peak_rss_mb"]


def peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MB (what a pod's memory limit is set against)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak * (1 if sys.platform == "darwin" else 1024) / 1e6)


class PhaseLog:
    """Logs each finished phase of one step run with its counts and the time since the last one.

    Usage::

        phases = PhaseLog("clean")
        ...                                   # plan
        phases.done("plan", rows=725, classes=12)
        ...                                   # decode
        phases.done("decode", kept=720, rejected=5)
    """

    def __init__(self, step: str, logger: logging.Logger | None = None) -> None:
        self.step = step
        self._log = logger or logging.getLogger(f"imgpipe.steps.{step}")
        self._started = self._last = time.monotonic()

    def done(self, phase: str, **counts: int | float) -> float:
        """Logs ``phase`` as finished now; returns its seconds.

        Raises:
            TypeError: If a count is not a number (phase lines carry no text from the data).
        """
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"phase count {name}={value!r} is not a number; phase lines carry counts only")
        now = time.monotonic()
        seconds, self._last = now - self._last, now
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in counts.items())
        self._log.info("%s: %s: %s (%.2f s, peak RSS %d MB)", self.step, phase, shown or "done", seconds, peak_rss_mb())
        return seconds

    @property
    def total(self) -> float:
        """Seconds since this log started."""
        return time.monotonic() - self._started
