"""A local run's outputs stay reachable after its store stopped: `imgpipe show` and `predict` start it, `imgpipe store` serves it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from imgpipe import storage
from imgpipe.cli import main
from imgpipe.local.names import LOCAL_BUCKET, STORE_DIR
from imgpipe.local.s3 import SERVING, local_s3_server, served_by_another
from tests.train.test_loader import write_resize_output

RESIZE = f"s3://{LOCAL_BUCKET}/runs/r1/resize"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A local run's workdir whose store holds a committed resize output, the store stopped, no endpoint named."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    with local_s3_server(work / STORE_DIR):
        write_resize_output(RESIZE, counts={"train": 8, "val": 4, "test": 4}, size=16)
    assert served_by_another(work / STORE_DIR) is None and "AWS_ENDPOINT_URL" not in os.environ
    return work


def test_show_opens_a_local_runs_output_after_its_store_stopped(workdir, capsys):
    assert main(["show", "--workdir", str(workdir), RESIZE]) == 0
    out = capsys.readouterr().out
    assert "resize" in out and "16" in out, out
    assert served_by_another(workdir / STORE_DIR) is None, "the store started for the command stopped with it"
    assert "AWS_ENDPOINT_URL" not in os.environ and not (workdir / STORE_DIR / SERVING).exists()


def test_a_local_uri_without_a_store_in_the_workdir_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert main(["show", "--workdir", str(tmp_path / "nothing"), RESIZE]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --workdir" in err and str(tmp_path / "nothing") in err, err
    assert not (tmp_path / "nothing").exists(), "nothing is made where no store was"


def test_an_endpoint_the_user_named_is_not_overridden(workdir, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.configure_s3()
    try:
        assert main(["show", "--workdir", str(workdir), RESIZE]) == 2
    finally:
        storage.configure_s3()
    assert "does not answer" in capsys.readouterr().err
    assert served_by_another(workdir / STORE_DIR) is None


def test_imgpipe_store_serves_it_and_prints_how_to_reach_it(workdir, capsys):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgpipe.cli", "store", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving until Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in text and "AWS_SECRET_ACCESS_KEY=" in text, text
        endpoint = served_by_another(workdir / STORE_DIR)
        assert endpoint and endpoint in text
        # Another command reaches the served store rather than starting a second server.
        assert main(["show", "--workdir", str(workdir), RESIZE]) == 0
        assert "resize" in capsys.readouterr().out
        assert served_by_another(workdir / STORE_DIR) == endpoint, "the served store is still up"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0 and served_by_another(workdir / STORE_DIR) is None
