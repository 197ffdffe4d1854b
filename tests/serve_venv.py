"""The serve venv: ``imgpipe[serve]``, with kserve 0.20, whose pandas < 3 this venv's pandas 3 excludes.

``make test`` builds it (``.venv/serve``) and names its python in ``$IMGPIPE_SERVE_PYTHON``; the
tests that run kserve's model server (``python -m imgpipe.serving.runtime``) start it with that
python, and import the kserve-free rest (:mod:`imgpipe.serving.model`) here. Where make test names
it, a missing one fails; a bare pytest skips in one line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from imgpipe.containers.catalog import serve_python
from imgpipe.serving.triton import MODEL_NAME

PYTHON = serve_python()
NAMED = PYTHON.exists() or "IMGPIPE_SERVE_PYTHON" in os.environ
MISSING = None if NAMED else f"no serve venv at {PYTHON} (make test builds it; kserve needs pandas<3)"
needs_serve_venv = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def python() -> str:
    """The serve venv's python; skips the test where there is none."""
    if MISSING:
        pytest.skip(MISSING)
    return str(PYTHON)


@contextlib.contextmanager
def runtime(model_dir: Path, log: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str, int]]:
    """``python -m imgpipe.serving.runtime`` on a free loopback port, ready (``/v2/health/ready``): ``(process, URL, port)``.

    Stopped at the end of the block (TERM, then KILL after 30 s); its output is in ``log``.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [python(), "-m", "imgpipe.serving.runtime", f"--model_name={MODEL_NAME}", f"--model_dir={model_dir}", f"--http_port={port}", *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the server exited {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"not ready in 90 s: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield proc, url, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
