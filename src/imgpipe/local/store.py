"""The local object store after ``imgpipe run``: what its ``s3://imgpipe-local/...`` URIs need to open.

    with reachable(["s3://imgpipe-local/runs/<id>/train"], workdir="./.data"):
        build_report("s3://imgpipe-local/runs/<id>/train")

A local run keeps its outputs in SeaweedFS over ``{workdir}/seaweedfs`` (:mod:`imgpipe.local.s3`),
and the server stops with the run. A command handed a URI in that bucket reaches it here: the
server another process runs over the directory (a run still going, or ``imgpipe store``), else one
started for the length of the command. ``imgpipe store`` serves it in the foreground and prints
the endpoint and keys that pandas, the AWS CLI or boto3 need. An endpoint the user named
(``--s3-endpoint``, ``$AWS_ENDPOINT_URL``) is never overridden.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from imgpipe.contract import PREDICTIONS
from imgpipe.local.names import DEFAULT_WORKDIR, LOCAL_BUCKET, STORE_DIR, in_local_store
from imgpipe.local.s3 import pointed_at, read_identity, seaweedfs_server, served_by_another
from imgpipe.local.weed import STORE_INFLIGHT_MB

__all__ = ["reachable", "serve", "store_dir", "usage_lines"]

log = logging.getLogger(__name__)


def store_dir(workdir: str | Path | None) -> Path:
    """Where the local store of ``imgpipe run --workdir workdir`` keeps its data."""
    return Path(workdir or DEFAULT_WORKDIR).resolve() / STORE_DIR


@contextlib.contextmanager
def reachable(uris: Iterable[object], workdir: str | Path | None = None, *, endpoint: str | None = None) -> Iterator[str | None]:
    """Makes the local store reachable for this process while any of ``uris`` is in it.

    Args:
        uris: What the command reads and writes.
        workdir: The local run's ``--workdir``.
        endpoint: The endpoint the user named (``--s3-endpoint``); with it, or ``$AWS_ENDPOINT_URL``, nothing is done.

    Yields:
        The endpoint in use, or ``None`` when nothing had to be done (no URI in the local
        bucket, or an endpoint named by the user).

    Raises:
        ValueError: If a URI is in the local bucket but ``workdir`` holds no local store.
    """
    local = [u for u in uris if in_local_store(u)]
    if not local or endpoint or os.environ.get("AWS_ENDPOINT_URL"):
        yield None
        return
    data_dir = store_dir(workdir)
    try:
        identity = read_identity(data_dir)
    except RuntimeError:
        raise ValueError(
            f"{local[0]} is in the local object store of `imgpipe run`, kept under its --workdir "
            f"(default {DEFAULT_WORKDIR}); {data_dir} holds none: pass --workdir DIR, the run's own"
        ) from None
    running = served_by_another(data_dir)
    if running is not None:
        with pointed_at(running, identity):
            yield running
        return
    log.info("starting the local object store in %s for this command (imgpipe store keeps it up)", data_dir)
    with seaweedfs_server(data_dir) as started:
        yield started


def usage_lines(endpoint: str, data_dir: Path) -> list[str]:
    """How to reach the store at ``endpoint`` from a shell, pandas and the AWS CLI."""
    key = read_identity(data_dir)
    train = f"s3://{LOCAL_BUCKET}/runs/<run id>/train"
    return [
        f"the local object store ({data_dir}) serves s3://{LOCAL_BUCKET} at {endpoint} (its other ports on "
        f"{urlparse(endpoint).hostname} alone, each asking for this start's certificate; {STORE_INFLIGHT_MB} MB in flight per server at most)",
        "in another shell:",
        f"  export AWS_ENDPOINT_URL={endpoint} AWS_DEFAULT_REGION=us-east-1",
        f"  export AWS_ACCESS_KEY_ID={key.access_key} AWS_SECRET_ACCESS_KEY={key.secret_key}",
        f"  aws s3 ls s3://{LOCAL_BUCKET}/runs/",
        f"  python -c \"import pandas as pd; print(pd.read_parquet('{train}/{PREDICTIONS}'))\"",
        f"  imgpipe show {train}",
    ]


def serve(workdir: str | Path | None = None, *, stop: threading.Event | None = None) -> int:
    """``imgpipe store``: serves the local store until interrupted (or ``stop`` is set), after printing how to reach it.

    When another process serves it already, prints how to reach that one and returns.

    Raises:
        ValueError: If ``workdir`` holds no local store.
    """
    data_dir = store_dir(workdir)
    try:
        read_identity(data_dir)
    except RuntimeError:
        raise ValueError(f"{data_dir} holds no local object store: `imgpipe run` makes one (its --workdir, default {DEFAULT_WORKDIR})") from None
    endpoint = served_by_another(data_dir)
    if endpoint is not None:
        print("\n".join(usage_lines(endpoint, data_dir)), flush=True)
        return 0
    stop = stop or threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if threading.current_thread() is threading.main_thread() else None
    try:
        with seaweedfs_server(data_dir) as endpoint:
            print("\n".join(usage_lines(endpoint, data_dir) + ["serving until Ctrl-C"]), flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(1.0):
                    pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
