"""`imgpipe run` as a new user meets it: every mistake refused before anything starts, one precedence, a run that says what it does.

No test here runs the pipeline: the store, kfp and the pipeline itself are replaced by stand-ins that
fail the test when a refused run reaches them (test_pipeline.py and test_cli.py run it whole).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imgpipe.cli import main
from imgpipe.local import run as local_run
from imgpipe.local.progress import StepFailed

ROOT = Path(__file__).resolve().parents[1]
LOCAL_YAML = str(ROOT / "configs" / "local.yaml")


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fails the test if the store, the engine or the pipeline is reached."""

    def reached(*args, **kwargs):
        raise AssertionError("the run started")

    for name in ("local_s3_server", "run_pipeline", "engine_for"):
        monkeypatch.setattr(local_run, name, reached)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgpipe run: error: "), err
    assert "\x1b" not in err and "Traceback" not in err
    return lines[0].removeprefix("imgpipe run: error: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", LOCAL_YAML, "--param", "epoch=1"], "unknown pipeline parameter 'epoch' (did you mean 'epochs'?)"),
        (["--param", "preset=resnett"], "resize: unknown preset 'resnett' (did you mean 'resnet'?)"),
        (["--param", "model=resnet19"], "train: unknown model 'resnet19' (did you mean 'resnet18'?)"),
        (["--config", LOCAL_YAML, "--set", "train.epoch=3"], "train: unknown TrainConfig option(s) epoch (did you mean 'epochs'?)"),
        (["--param", "epochs=-1"], "train: epochs must be an integer in [1, "),
        (["--classes", "99"], "synth: SynthConfig.classes must be in 1..37, got 99"),
        (["--shards", "0"], "--shards must be a whole number >= 1"),
        (["--source", "ftp://host/pics.tar"], "--source ftp://host/pics.tar: unsupported scheme 'ftp'"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2_with_nothing_started_or_written(tmp_path, capsys, nothing_starts, argv, message):
    workdir = tmp_path / "work"
    assert main(["run", "--workdir", str(workdir), *argv]) == 2
    assert message in _one_line_error(capsys)
    assert not workdir.exists(), "no output folder made"


def test_a_config_key_typo_is_refused_before_any_step(tmp_path, capsys, nothing_starts):
    typo = tmp_path / "typo.yaml"
    typo.write_text("train: {epoch: 3}\n")
    assert main(["run", "--workdir", str(tmp_path / "work"), "--config", str(typo)]) == 2
    assert _one_line_error(capsys).startswith("train: unknown TrainConfig option(s) epoch (did you mean 'epochs'?)")


def test_a_missing_source_is_refused_before_the_store_starts(tmp_path, capsys, nothing_starts):
    assert main(["run", "--workdir", str(tmp_path / "work"), "--source", str(tmp_path / "my-pictures")]) == 2
    assert (
        _one_line_error(capsys) == f"--source {tmp_path / 'my-pictures'} does not exist; give an existing folder, archive or list (docs/sources.md)"
    )
    assert not (tmp_path / "work").exists()


def test_the_command_line_wins_and_the_run_says_what_it_will_do_then_a_step_failure_is_the_last_line(tmp_path, capsys, monkeypatch):
    """defaults < --config < --param/--set; the settings printed (changed keys) and written; a failed step's own reason last."""
    seen: dict = {}

    def fake_pipeline(workdir, arguments, runner=None, **kwargs):
        seen.update(arguments)
        raise StepFailed("train: the step's own reason")

    monkeypatch.setattr(local_run, "run_pipeline", fake_pipeline)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    workdir = tmp_path / "work"
    argv = ["run", "--workdir", str(workdir), "--data-root", str(tmp_path / "data"), "--source", str(pictures), "--config", LOCAL_YAML]
    argv += ["--param", "epochs=1", "--param", "model=resnet34", "--set", "train.lr=0.001"]
    assert main(argv) == 2

    # The config file's train.epochs 3 and train.model resnet18 give way: the section no longer names them.
    assert seen["epochs"] == 1 and seen["model"] == "resnet34"
    train = seen["step_config"]["train"]
    assert "epochs" not in train and "model" not in train and train["lr"] == 0.001 and train["aug_policy"] == "basic"
    assert seen["step_config"]["resize"]["size"] == 96, "the file over the local default (image_size 64)"

    err = capsys.readouterr().err.strip().splitlines()
    (log,) = [line for line in err if line.startswith("imgpipe run: the whole log: ")]
    (settings,) = (workdir / "logs").glob("run-*.yaml")
    assert log.endswith(str(settings.with_suffix(".log")))
    (train_line,) = [line for line in err if line.startswith("  train: ")]
    assert "epochs=1" in train_line and "model=resnet34" in train_line and "lr=0.001" in train_line
    assert "patience" not in train_line, "only what differs from the defaults"
    written = yaml.safe_load(settings.read_text())
    assert written["train"]["epochs"] == 1 and written["train"]["model"] == "resnet34" and written["resize"]["size"] == 96
    assert "patience" in written["train"], "the file holds the whole resolved configuration"
    assert err[-1] == "imgpipe run: error: train: the step's own reason"


def test_a_step_command_takes_the_same_precedence(tmp_path, caplog, monkeypatch):
    """defaults < --config (its section) < --set < the command's own flags, for a step command too."""
    from imgpipe.steps import clean as clean_step

    got = []
    monkeypatch.setattr(clean_step, "clean", lambda source, dest, cfg: got.append(cfg) or _Report())
    config = tmp_path / "run.yaml"
    config.write_text("clean: {seed: 1, workers: 2, min_images_per_class: 3}\ntrain: {epochs: 9}\n")
    with caplog.at_level("INFO", logger="imgpipe"):
        assert main(["clean", "a", "b", "--config", str(config), "--set", "seed=2", "--set", "workers=3", "--workers", "4"]) == 0
    assert (got[0].seed, got[0].workers, got[0].min_images_per_class) == (2, 4, 3)
    assert "clean settings changed from the defaults: seed=2, workers=4, min_images_per_class=3" in caplog.text


class _Report:
    def summary(self) -> str:
        return "ok"


def test_kfps_error_colours_never_reach_a_pipe(tmp_path, capsys, monkeypatch):
    def failing(cfg, verbose=False):
        raise RuntimeError("Inner task failed: \x1b[96m'train'\x1b[0m inside 'condition-5'")

    monkeypatch.setattr(local_run, "run_local", failing)
    assert main(["run", "--workdir", str(tmp_path)]) == 2
    assert _one_line_error(capsys) == "Inner task failed: 'train' inside 'condition-5'"


def test_the_real_command_refuses_at_once(tmp_path):
    """The installed entry point, piped: exit 2, one plain line, in seconds (no store, no kfp)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "imgpipe.cli", "run", "--workdir", str(tmp_path / "w"), "--config", LOCAL_YAML, "--param", "epoch=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "did you mean 'epochs'" in done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "w").exists()


def test_compile_refuses_before_writing(tmp_path, capsys):
    out = tmp_path / "pkg" / "imgpipe.yaml"
    assert main(["compile", str(out), "--parallelism", "3"]) == 2
    assert "parallelism" in capsys.readouterr().err and not out.parent.exists()
