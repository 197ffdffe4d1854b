"""moto's S3 server, for the tests that need what SeaweedFS (the store everything else uses) refuses.

Each user names why (docs/reliability.md, "Where moto stays"):

- tests/data/test_listed_sources.py ``..`` in a key: AWS S3 stores ``pets/cat/../../up.jpg`` as it is
  and lists it under ``pets/``; SeaweedFS answers ``InvalidRequest``, so the hostile key that
  imgpipe must refuse can only be planted on a store that keeps it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from imgpipe import resources
from imgpipe.local.s3 import S3Identity, pointed_at


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Runs moto's S3 server as a process on 127.0.0.1 and points this process (and its children) at it.

    The server speaks the real S3 HTTP API, so everything that talks to it, boto3 and
    pyarrow's own S3 client alike, goes through signing, multipart uploads and
    pagination as against a real store. The environment is restored on exit.

    Yields:
        The endpoint URL, ``http://127.0.0.1:PORT``.

    Raises:
        RuntimeError: If the server does not come up.
    """
    port = resources.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local S3 server (moto) did not start on 127.0.0.1") from None
                time.sleep(0.2)
        # moto takes any key; the environment is set and restored as for the store everything else uses.
        with pointed_at(f"http://127.0.0.1:{port}", S3Identity("moto", "local", "local")):
            yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
