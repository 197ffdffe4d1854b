"""A local run's terminal output: a line per step, kfp's own output kept in the log file."""

from __future__ import annotations

import io
import logging

import pytest
from kfp.local import logging_utils, status

from imgpipe.kfp.progress import step_progress


def _kfp_task(name: str, ok: bool, lines: list[str]) -> None:
    """What kfp.local's task dispatcher writes for one task, through kfp's own formatting."""
    with logging_utils.local_logger_context():
        shown = logging_utils.format_task_name(name)
        logging.info(f"Executing task {shown}")
        logging.info("Streamed logs:\n")
        with logging_utils.indented_print():
            for line in lines:
                print(line)
        if ok:
            logging.info(f"Task {shown} finished with status {logging_utils.format_status(status.Status.SUCCESS)}")
        else:
            raise RuntimeError(f"Task {shown} finished with status {logging_utils.format_status(status.Status.FAILURE)}")


def test_each_step_is_one_line_and_the_log_keeps_everything(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "logs" / "run.log"
    with step_progress(log, terminal):
        _kfp_task("download", True, ['{"inputs": {"parameterValues": {"source_uri": "s3://x"}}}', "download: 10 in"])
        _kfp_task("clean", True, ["clean: decode 100%"])
    shown = terminal.getvalue().splitlines()
    assert [line.split()[0] for line in shown] == ["download", "clean"]
    assert all(" done in " in line for line in shown) and "\x1b" not in terminal.getvalue()
    text = log.read_text()
    assert "parameterValues" in text and "clean: decode 100%" in text


def test_a_failed_step_shows_its_last_lines_and_the_log(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "run.log"
    with pytest.raises(RuntimeError), step_progress(log, terminal):
        _kfp_task("resize", False, [f"line {i}" for i in range(40)] + ["ValueError: the reason"])
    out = terminal.getvalue()
    assert out.startswith("resize") and "failed" in out and "ValueError: the reason" in out and str(log) in out
    assert "line 0\n" not in out, "only the tail"
