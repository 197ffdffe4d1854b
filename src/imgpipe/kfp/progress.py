"""A local run's output for people: one line per step on the terminal, kfp's whole log in a file.

    with step_progress(workdir / "logs" / "run.log") as progress:
        run_the_pipeline()          # kfp.local prints into ``progress`` instead of the terminal

kfp.local writes everything to ``sys.stdout``: each task's executor input, its streamed log
and its outputs, about 750 lines for one run. Inside :func:`step_progress` that text goes to the
log file whole (every URI in it redacted, as :func:`imgpipe.storage.redact_text` does), and
the terminal gets a line per task as it starts and ends (``clean ... done in 12.4 s``). A
failed task's last lines are shown with the log's path, so the reason is on screen without
``--verbose``.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from imgpipe import storage

__all__ = ["StepProgress", "step_progress"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own lines (kfp/local/task_dispatcher.py): task names are repr()'d.
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_TAIL_LINES = 25


class StepProgress(io.TextIOBase):
    """A text stream that keeps kfp.local's output in a log file and tells the terminal when tasks start and end."""

    def __init__(self, log: TextIO, terminal: TextIO, log_path: Path) -> None:
        self.log, self.terminal, self.log_path = log, terminal, log_path
        self.started: dict[str, float] = {}
        self.finished: list[tuple[str, str, float]] = []
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            # Executor inputs carry the run's parameters: a source URI's password or signature stays out of the file.
            line = storage.redact_text(line)
            self.log.write(line + "\n")
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.log.write(storage.redact_text(self._partial))
            self._partial = ""
        self.log.flush()

    def _line(self, line: str) -> None:
        if line.strip():
            self.tail.append(line)
        if (m := _STARTED.search(line)) is not None:
            self.started[m.group(1)] = time.monotonic()
            self.tail.clear()
            self.terminal.write(f"{m.group(1):<24} ...")
            self.terminal.flush()
        elif (m := _FINISHED.search(line)) is not None:
            name, status = m.group(1), m.group(2)
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            self.finished.append((name, status, seconds))
            word = "done" if status == "SUCCESS" else status
            self.terminal.write(f" {word} in {seconds:.1f} s\n")
            if status != "SUCCESS":
                self.terminal.write("".join(f"    {t}\n" for t in self.tail))
                self.terminal.write(f"    (the whole log: {self.log_path})\n")
            self.terminal.flush()


@contextlib.contextmanager
def step_progress(log_path: Path, terminal: TextIO | None = None) -> Iterator[StepProgress]:
    """Sends ``sys.stdout`` to ``log_path`` while the block runs, with a line per kfp task to ``terminal`` (stderr)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = terminal or sys.stderr
    with open(log_path, "w", encoding="utf-8") as log:
        progress = StepProgress(log, terminal, log_path)
        try:
            with contextlib.redirect_stdout(progress):
                yield progress
        except BaseException:
            if progress.started and len(progress.finished) < len(progress.started):
                terminal.write(" failed\n" + "".join(f"    {t}\n" for t in progress.tail) + f"    (the whole log: {log_path})\n")
            raise
        finally:
            progress.flush()
