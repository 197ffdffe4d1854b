"""A local run's terminal output: a line per step with its counts, a line per epoch, kfp's own output kept in the log file."""

from __future__ import annotations

import io
import logging
import os

import pytest
from kfp import dsl
from kfp.local import logging_utils, status

from imgpipe.local.progress import StepFailed, describe_metrics, failure_reason, rejects_line, step_progress


def _kfp_task(name: str, ok: bool, lines: list[str], metrics: dict[str, float] | None = None) -> None:
    """What kfp.local's task dispatcher writes for one task, through kfp's own formatting (outputs and the closing rule too)."""
    with logging_utils.local_logger_context():
        shown = logging_utils.format_task_name(name)
        logging.info(f"Executing task {shown}")
        logging.info("Streamed logs:\n")
        with logging_utils.indented_print():
            for line in lines:
                print(line)
        if not ok:
            raise RuntimeError(f"Task {shown} finished with status {logging_utils.format_status(status.Status.FAILURE)}")
        logging.info(f"Task {shown} finished with status {logging_utils.format_status(status.Status.SUCCESS)}")
        if metrics is None:
            logging.info(f"Task {shown} has no outputs")
        else:
            artifact = dsl.Metrics(name="metrics", uri="/tmp/x/metrics", metadata=dict(metrics))
            other = dsl.Artifact(name="dataset", uri="/tmp/x/dataset", metadata={"inputs": 1.0, "outputs": 1.0, "rejected": 0.0})
            lines = logging_utils.make_log_lines_for_outputs({"dataset": other, "metrics": artifact, "Output": "s3://b/x"})
            logging.info("\n".join([f"Task {shown} outputs:", *lines]))
        logging_utils.print_horizontal_line()


def test_each_step_is_one_line_with_its_counts_and_the_log_keeps_everything(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "logs" / "run.log"
    counts = {"inputs": 300.0, "outputs": 229.0, "rejected": 71.0, "seconds": 2.0, "rejected_blank": 9.0, "rejected_near_duplicate": 62.0}
    with step_progress(log, terminal):
        _kfp_task("download", True, ['{"inputs": {"parameterValues": {"source_uri": "s3://x"}}}', "download: 10 in"])
        _kfp_task("clean", True, ["clean: decode 100%"], counts)
        _kfp_task("promote", True, [], {"promoted": 0.0, "promotion_candidate_macro_f1": 0.5, "promotion_current_macro_f1": 0.75})
    shown = terminal.getvalue().splitlines()
    assert [line.split()[0] for line in shown] == ["download", "clean", "promote"]
    assert all(" done in " in line for line in shown) and "\x1b" not in terminal.getvalue()
    assert shown[1].endswith(": 300 in -> 229 out, 71 rejected: 62 near_duplicate, 9 blank"), shown[1]
    assert shown[2].endswith(": not promoted (0.500 against the current 0.750)"), shown[2]
    text = log.read_text()
    assert "parameterValues" in text and "clean: decode 100%" in text


def test_training_shows_a_line_per_epoch_with_loss_f1_speed_and_time_left(tmp_path):
    terminal = io.StringIO()
    plan = "INFO imgpipe.train.assembly: train: peak learning rate 0.002 (as set); every parameter trains from the first of 3 epochs"
    epochs = [
        f"[KFP Executor 2025-01-01 10:00:0{e} INFO]: train: {{'epoch': {e}, 'train_loss': {2.0 - e / 2}, 'train_images': 480, "
        f"'images_per_s': 210.4, 'val_loss': nan, 'val_macro_f1': {0.2 + e / 10}, 'seconds': 40.0}}"
        for e in range(3)
    ]
    train_metrics = {"val_macro_f1": 0.4, "test_macro_f1": 0.38, "epochs_run": 3.0}
    with step_progress(tmp_path / "run.log", terminal):
        _kfp_task("train", True, [plan, *epochs], train_metrics)
    shown = terminal.getvalue().splitlines()
    assert shown[0].startswith("train") and shown[0].endswith("...")
    assert shown[1] == "    epoch 1/3, loss 2.000, val macro-F1 0.200, 210 img/s, about 80 s left"
    assert shown[2].startswith("    epoch 2/3, loss 1.500, val macro-F1 0.300") and shown[2].endswith("about 40 s left")
    assert shown[3].endswith("testing")
    assert shown[4].startswith("train") and shown[4].endswith("done in 0.0 s: 3 epochs, val macro-F1 0.400, test macro-F1 0.380"), shown[4]


def test_a_failed_step_raises_its_own_reason_and_leaves_the_traceback_in_the_log(tmp_path):
    terminal = io.StringIO()
    log = tmp_path / "run.log"
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "ValueError: unknown TrainConfig option(s) epoch"]
    with pytest.raises(StepFailed, match=r"^train: unknown TrainConfig option\(s\) epoch$") as caught, step_progress(log, terminal):
        _kfp_task("train", False, [f"line {i}" for i in range(40)] + traceback)
    assert isinstance(caught.value.__cause__, RuntimeError), "kfp's own error stays the cause"
    out = terminal.getvalue()
    assert out.startswith("train") and "failed" in out and str(log) in out and "\x1b" not in out
    assert "Traceback" not in out and "line 0" not in out, "the traceback goes to the log, not the terminal"
    assert "Traceback (most recent call last)" in log.read_text()


def test_the_reason_is_the_exception_the_last_traceback_ends_with_else_the_last_line():
    # As kfp.local streams a component's traceback (indented), then logs the failure itself.
    streamed = [
        "    [KFP Executor 2026-01-01 15:19:06,915 INFO]: clean: commit: outputs=0 rejected=2",
        "    Traceback (most recent call last):",
        '      File "/src/imgpipe/outcome.py", line 42, in check_rows',
        '        raise DegenerateOutput(f"{report.step} kept no image")',
        "    imgpipe.outcome.DegenerateOutput: clean kept no image from 2 input(s) of the download: rejected 2 (not_an_image 2)",
        "    ",
        "15:19:07.110 - ERROR - Task 'clean' finished with status FAILURE",
    ]
    assert failure_reason(streamed) == "clean kept no image from 2 input(s) of the download: rejected 2 (not_an_image 2)"
    chained = ["Traceback (most recent call last):", "  x", "ValueError: first", "", "During handling ...", "Traceback (most recent call last):"]
    assert failure_reason([*chained, '  File "y"', "RuntimeError: second"]) == "second"
    assert failure_reason(["... 400 lines on", "imgpipe.contract.UncommittedOutputError: s3://b/x is not committed"]) == "s3://b/x is not committed"
    assert failure_reason(["Killed"]) == "Killed"
    assert failure_reason([]) == "failed without output"


def test_kfps_skipping_lines_go_to_the_log_not_the_terminal(tmp_path):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    kfp_file = os.path.join(os.sep, "venv", "kfp", "local", "orchestrator", "enhanced_dag_orchestrator.py")
    try:
        with step_progress(tmp_path / "run.log", io.StringIO()):
            record = logging.LogRecord("root", logging.INFO, kfp_file, 615, "Skipping conditional task %s", ("train-trainjob",), None)
            root.handle(record)
            logging.getLogger("imgpipe").warning("a warning of our own")
    finally:
        root.removeHandler(handler)
    assert "Skipping" not in stream.getvalue() and "a warning of our own" in stream.getvalue()
    assert "Skipping conditional task train-trainjob" in (tmp_path / "run.log").read_text()


def test_counts_in_words():
    assert rejects_line({"inputs": 10, "outputs": 10, "rejected": 0}) == "10 in -> 10 out, 0 rejected"
    assert rejects_line({"rejected": 3, "rejects_by_reason": {"blank": 1, "corrupt": 2}}) == "3 rejected: 2 corrupt, 1 blank"
    assert describe_metrics({"promoted": 1.0}) == "promoted"
    assert describe_metrics({"something": 1.0}) == ""
