"""A local run's output for people: a line per step with its counts, a line per epoch, kfp's whole log in a file.

    with step_progress(workdir / "logs" / "run.log") as progress:
        run_the_pipeline()          # kfp.local prints into ``progress`` instead of the terminal

kfp.local writes everything to ``sys.stdout``: each task's executor input, its streamed log
and its outputs, about 750 lines for one run. Inside :func:`step_progress` that text goes to the
log file whole (every URI in it redacted, as :func:`imgpipe.storage.redact_text` does), and
the terminal gets a line per task as it ends, with what its Metrics output counted
(``clean ... done in 12.4 s: 300 in -> 229 out, 71 rejected: 62 near_duplicate, 9 blank``),
and during training a line per epoch (loss, validation macro-F1, images/s, time left). A task
that fails raises :class:`StepFailed` with the task's own last line (its exception's message);
the traceback stays in the log. kfp's own chatter on the root logger (``Skipping conditional
task ...``) goes to the log as well.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from imgpipe import storage

__all__ = ["StepFailed", "StepProgress", "step_progress", "rejects_line", "describe_metrics", "failure_reason"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own lines (kfp/local/task_dispatcher.py, logging_utils.py): task names are repr()'d.
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_OUTPUT = re.compile(r"^\s{4}(\w+): \w+\( name=")
_METADATA = re.compile(r"^\s*metadata=(\{.*\}) \)$")
_RULE = re.compile(r"^-{20,}$")
# The train step's per-epoch record (imgpipe.steps.train) and its plan, which names the epochs (imgpipe.train.assembly.describe_plan).
_EPOCH = re.compile(r"\btrain: (\{'epoch': .*\})\s*$")
_PLANNED = re.compile(r"peak learning rate .*\bof (\d+)(?: epochs\b|, then)")
# The last line of a Python traceback: ``ValueError: the reason`` (a dotted name for a module's own errors).
_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)(?:: (.*))?$")
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Refused|Failed|Exit|Interrupt))(?:: (.*))?$")
# kfp.local's own log lines (``15:19:07.110 - ERROR - Task 'clean' finished ...``): never a task's reason.
_KFP_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - ")
# Floats repr() writes that literal_eval does not read (outside quotes: names never hold them in these records).
_NOT_LITERAL = re.compile(r"(?<![\w'])-?(?:nan|inf)(?![\w'])")
_TAIL_LINES = 400  # a deep traceback, whole
_NAME_WIDTH = 24


class StepFailed(RuntimeError):
    """A task of a local run failed; the message is the task's name and its own one-line reason."""


def rejects_line(manifest: Mapping[str, Any]) -> str:
    """A data step's counts: ``300 in -> 229 out, 71 rejected: 62 near_duplicate, 9 blank`` (reasons by count)."""
    by_reason = sorted(((r, int(n)) for r, n in (manifest.get("rejects_by_reason") or {}).items() if int(n)), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{n} {reason}" for reason, n in by_reason)
    counts = f"{int(manifest['inputs'])} in -> {int(manifest['outputs'])} out, " if "inputs" in manifest else ""
    return f"{counts}{int(manifest['rejected'])} rejected" + (f": {shown}" if shown else "")


def describe_metrics(metrics: Mapping[str, Any]) -> str:
    """A task's Metrics output in words: a data step's counts, training's scores, the promotion's verdict."""
    if "promoted" in metrics:
        scores = {k.split("_", 2)[1]: v for k, v in metrics.items() if k.startswith("promotion_")}
        compared = f" ({scores['candidate']:.3f} against the current {scores['current']:.3f})" if {"candidate", "current"} <= set(scores) else ""
        return ("promoted" if metrics["promoted"] else "not promoted") + compared
    if "epochs_run" in metrics:
        parts = [f"{int(metrics['epochs_run'])} epochs"]
        parts += [f"{label} {metrics[k]:.3f}" for k, label in (("val_macro_f1", "val macro-F1"), ("test_macro_f1", "test macro-F1")) if k in metrics]
        return ", ".join(parts)
    if {"inputs", "outputs", "rejected"} <= set(metrics):
        reasons = {k.removeprefix("rejected_"): v for k, v in metrics.items() if k.startswith("rejected_")}
        return rejects_line({**metrics, "rejects_by_reason": reasons})
    return ""


def failure_reason(lines: Iterable[str]) -> str:
    """A failed task's reason: the message of the exception its last traceback ends with, else its last line of its own."""
    lines = [line.rstrip() for line in lines if line.strip() and not _KFP_LINE.match(line.strip())]
    starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent call last):"]
    if starts:
        indent = _indent(lines[starts[-1]])
        # The frames are indented under "Traceback"; the exception is the first line back at its level.
        for line in lines[starts[-1] + 1 :]:
            if _indent(line) <= indent and (m := _RAISED.match(line.strip())) is not None:
                return m.group(2) or m.group(1)
    for line in reversed(lines):  # no traceback whole in view: the last line that names an error
        if (m := _ERROR_LINE.match(line.strip())) is not None:
            return m.group(2) or m.group(1)
    return lines[-1].strip() if lines else "failed without output"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class StepProgress(io.TextIOBase):
    """A text stream that keeps kfp.local's output in a log file and tells the terminal what each task does."""

    def __init__(self, log: TextIO, terminal: TextIO, log_path: Path) -> None:
        self.log, self.terminal, self.log_path = log, terminal, log_path
        self.started: dict[str, float] = {}
        self.finished: list[tuple[str, str, float]] = []
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.failure: tuple[str, str] | None = None
        self._partial = ""
        self._running: str | None = None
        self._open = False  # the terminal's line "name ..." waits for its end
        self._done: tuple[str, float] | None = None  # a task that succeeded; its outputs follow
        self._counts = ""
        self._output: str | None = None
        self._planned: int | None = None
        self._epoch_seconds: list[float] = []

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

    def _say(self, text: str) -> None:
        self.terminal.write(text)
        self.terminal.flush()

    def _line(self, line: str) -> None:
        if line.strip():
            self.tail.append(line)
        if (m := _STARTED.search(line)) is not None:
            self.settle()
            name = m.group(1)
            self.started[name] = time.monotonic()
            self.tail.clear()
            self._running, self._planned, self._epoch_seconds = name, None, []
            self._say(f"{name:<{_NAME_WIDTH}} ...")
            self._open = True
        elif (m := _FINISHED.search(line)) is not None:
            name, status = m.group(1), m.group(2)
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            self.finished.append((name, status, seconds))
            self._running = None
            if status == "SUCCESS":
                self._done, self._counts = (name, seconds), ""
            else:
                self._fail(name, seconds)
        elif self._done is not None and (m := _OUTPUT.match(line)) is not None:
            self._output = m.group(1)
        elif self._done is not None and self._output == "metrics" and (m := _METADATA.match(line)) is not None:
            self._counts = describe_metrics(_literal(m.group(1)) or {})
        elif _RULE.match(line.strip()):
            self.settle()
        elif self._running is not None:
            self._training(line)

    def _training(self, line: str) -> None:
        """A per-epoch line on the terminal for each epoch record the train step logs."""
        if (m := _PLANNED.search(line)) is not None:
            self._planned = int(m.group(1))
            return
        m = _EPOCH.search(line)
        record = _literal(m.group(1)) if m is not None else None
        if not record:
            return
        if self._open:
            self._say("\n")
            self._open = False
        epoch = int(record["epoch"]) + 1
        self._epoch_seconds.append(float(record.get("seconds") or 0.0))
        shown = [f"epoch {epoch}" + (f"/{self._planned}" if self._planned else "")]
        if isinstance(record.get("train_loss"), float):
            shown.append(f"loss {record['train_loss']:.3f}")
        if isinstance(record.get("val_macro_f1"), float):
            shown.append(f"val macro-F1 {record['val_macro_f1']:.3f}")
        if isinstance(record.get("images_per_s"), float):
            shown.append(f"{record['images_per_s']:.0f} img/s")
        if self._planned:
            left = (self._planned - epoch) * sum(self._epoch_seconds) / len(self._epoch_seconds)
            shown.append(f"about {_duration(left)} left" if epoch < self._planned else "testing")
        self._say(f"    {', '.join(shown)}\n")

    def settle(self) -> None:
        """Ends the line of a task that succeeded, with its counts when its outputs named them."""
        if self._done is None:
            return
        name, seconds = self._done
        head = "" if self._open else f"{name:<{_NAME_WIDTH}}"
        self._say(f"{head} done in {seconds:.1f} s" + (f": {self._counts}" if self._counts else "") + "\n")
        self._done, self._open, self._output = None, False, None

    def _fail(self, name: str, seconds: float | None = None) -> None:
        """Ends a failed task's line with where its traceback is; its reason becomes :attr:`failure`."""
        if self.failure is not None:
            return
        self.failure = (name, failure_reason(list(self.tail)))
        took = f" after {seconds:.1f} s" if seconds is not None else ""
        head = "" if self._open else f"{name:<{_NAME_WIDTH}}"
        self._say(f"{head} failed{took} (its traceback: {self.log_path})\n")
        self._open = False


def _literal(text: str) -> dict[str, Any] | None:
    """A logged dict (Python's repr; ``nan`` and ``inf`` read as ``None``), or ``None`` when it holds more than literals."""
    try:
        value = ast.literal_eval(_NOT_LITERAL.sub("None", text))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class _KfpChatterToLog(logging.Filter):
    """Sends kfp's records on the root logger (``Skipping conditional task ...``) to the log instead of the terminal."""

    def __init__(self, progress: StepProgress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or f"{os.sep}kfp{os.sep}" not in record.pathname:
            return True
        self.progress.log.write(f"{record.levelname} {storage.redact_text(record.getMessage())}\n")
        return False


def _drop_handlers_writing_to(stream: Any) -> None:
    """Removes the logging handlers made during the block on the redirected stdout (kfp's): its log closes after it."""
    for logger in [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]:
        for handler in list(logger.handlers):
            if getattr(handler, "stream", None) is stream:
                logger.removeHandler(handler)


@contextlib.contextmanager
def step_progress(log_path: Path, terminal: TextIO | None = None) -> Iterator[StepProgress]:
    """Sends ``sys.stdout`` to ``log_path`` while the block runs, with a line per kfp task to ``terminal`` (stderr).

    Raises:
        StepFailed: When a task fails: ``"{task}: {its reason}"`` (kfp's own error is its cause).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = terminal or sys.stderr
    with open(log_path, "w", encoding="utf-8") as log:  # at rest: every line through storage.redact_text (Progress.write)
        progress = StepProgress(log, terminal, log_path)
        chatter = _KfpChatterToLog(progress)
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(chatter)
        try:
            with contextlib.redirect_stdout(progress):
                yield progress
            progress.settle()
        except BaseException as exc:
            progress.settle()
            running = [name for name in progress.started if name not in {f[0] for f in progress.finished}]
            if running:
                progress._fail(running[-1])
            if progress.failure is not None and isinstance(exc, RuntimeError) and not isinstance(exc, StepFailed):
                name, reason = progress.failure
                raise StepFailed(f"{name}: {reason}") from exc
            raise
        finally:
            for handler in handlers:
                handler.removeFilter(chatter)
            _drop_handlers_writing_to(progress)
            progress.flush()
