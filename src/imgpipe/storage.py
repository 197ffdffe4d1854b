"""Object storage behind one interface, chosen by URI scheme.

``file://`` URIs and plain paths go to the local file system, ``s3://`` URIs to any
S3-compatible service (AWS, MinIO, Ceph, moto). Nothing else in imgpipe opens a
path or calls boto3 directly, so every step runs unchanged against either.

Every write goes to a temporary name and becomes visible only when it completes:
locally a ``.tmp-*`` file renamed into place, on S3 an object that exists only once
its (multipart) upload completes. A killed writer therefore never leaves a
half-written object under its final name. Prefix-level atomicity (a whole step's
output) is built on top of this in :mod:`imgpipe.contract`.

The S3 endpoint comes from ``configure_s3(endpoint_url=...)`` or the standard
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables; credentials from the
standard AWS chain (environment, profile, IRSA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlparse

__all__ = [
    "ObjectInfo",
    "S3Options",
    "Settings",
    "settings",
    "use_settings",
    "configure_s3",
    "configure_endpoint",
    "SETTINGS_ENV",
    "settings_env",
    "SECRET_ENV",
    "schemes",
    "serves",
    "is_local",
    "local_path",
    "fork_safe",
    "segments",
    "normalize_uri",
    "redact_uri",
    "join",
    "get_backend",
    "exists",
    "list_objects",
    "iter_objects",
    "stat",
    "open_read",
    "read_bytes",
    "read_some",
    "open_write",
    "write_bytes",
    "delete",
    "delete_prefix",
    "delete_many",
    "download_file",
    "upload_file",
    "arrow_filesystem",
    "arrow_path",
    "with_retries",
]

T = TypeVar("T")
TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, size in bytes and change token.

    ``etag`` changes whenever the object's bytes do: S3's ETag, or a local file's
    modification time and inode (``None`` where a store gives none).
    """

    uri: str
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class S3Options:
    """Connection settings for S3-compatible storage.

    Attributes:
        endpoint_url: Service endpoint, e.g. ``http://minio.kubeflow:9000``; ``None``
            uses ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` or AWS itself.
        region: Region name; MinIO and moto accept any.
        addressing_style: ``path`` works with every S3-compatible server; ``virtual``
            is what AWS prefers for new buckets.
        max_attempts: Retries for transient errors (throttling, 5xx, connection resets).
        max_pool_connections: Connections per client, sized for parallel writes.
    """

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "path"
    max_attempts: int = 8
    max_pool_connections: int = 32


_s3_options = S3Options()
_clients: dict[tuple[int, S3Options], Any] = {}
_arrow_filesystems: dict[tuple[Any, ...], Any] = {}
# The environment an S3 file system is made from: another value makes another one.
_ARROW_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)
_clients_lock = threading.Lock()
# (endpoint, bucket) pairs whose store answered a bulk DeleteObjects with AccessDenied.
_bulk_delete_denied: set[tuple[str | None, str]] = set()
_DENIED = ("AccessDenied", "403", "Forbidden")
# Single-object deletes in flight at once when the bulk call is refused.
DELETE_CONCURRENCY = 16
_log = logging.getLogger(__name__)


def configure_s3(**kwargs: Any) -> S3Options:
    """Sets the process-wide S3 options (see :class:`S3Options`) and returns them."""
    global _s3_options
    _s3_options = S3Options(**{**_s3_options.__dict__, **kwargs})
    with _clients_lock:
        _clients.clear()
        _arrow_filesystems.clear()
    return _s3_options


def _s3_settings() -> S3Options:
    """This process's S3 options with endpoint and region resolved, and no credentials."""
    return dataclasses.replace(
        _s3_options,
        endpoint_url=_endpoint_url(),
        region=_s3_options.region or os.environ.get("AWS_DEFAULT_REGION") or None,
    )


def _use_s3_settings(options: S3Options) -> None:
    if options != _s3_options:
        configure_s3(**options.__dict__)


def _endpoint_url() -> str | None:
    return _s3_options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def normalize_uri(uri: str | os.PathLike[str]) -> str:
    """Returns a canonical URI: plain paths become absolute ``file://`` URIs.

    Raises:
        ValueError: For an empty URI or an unsupported scheme.
    """
    text = os.fspath(uri)
    if not text:
        raise ValueError("empty storage URI")
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else text
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {text!r} must be file:///absolute/path (got host {parsed.netloc!r})")
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI {text!r} has no bucket; expected s3://bucket/prefix")
        return f"s3://{parsed.netloc}/{parsed.path.lstrip('/')}"
    raise ValueError(f"unsupported storage URI {text!r}: use file://, s3:// or a local path")


def redact_uri(uri: str | os.PathLike[str]) -> str:
    """``uri`` as it may be persisted or logged: without userinfo, query or fragment.

    Presigned URLs carry their signature and access key in the query, ``user:pass@``
    URLs their password; neither may reach a manifest, an artifact or a log. What
    remains names the object well enough to find it.
    """
    text = os.fspath(uri)
    parsed = urlparse(text)
    if not parsed.scheme or parsed.scheme == "file":
        return text
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets (RFC 3986 section 3.2.2)
    if parsed.port:
        host = f"{host}:{parsed.port}"
    redacted = parsed._replace(netloc=host, query="", fragment="", params="").geturl()
    if parsed.username or parsed.password or parsed.query or parsed.fragment:
        redacted += " (credentials and query removed)"
    return redacted


def join(base: str, *parts: str) -> str:
    """Joins path components onto a URI with ``/`` (never the OS separator)."""
    out = normalize_uri(base) if base else base
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out.rstrip("/") + "/" + part
    return out


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    describe: str = "operation",
) -> T:
    """Calls ``fn`` and retries transient failures with exponential backoff.

    Args:
        fn: The operation.
        attempts: Total tries.
        base_delay: First backoff in seconds; doubles each retry.
        retry_on: Exception types that count as transient.
        describe: Name used in the final error.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == attempts:
                raise OSError(f"{describe} failed after {attempts} attempts: {exc}") from exc
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class Backend(ABC):
    """Operations every storage backend provides, on full URIs.

    A new scheme is one subclass, its settings (what :meth:`settings` returns and
    :meth:`use_settings` takes) and one entry in :data:`_BACKENDS`.
    """

    # Objects are files of this machine's file system (a path can be handed to a library).
    local = False
    # A forked child can keep using this backend (no client threads to inherit broken).
    fork_safe = True

    def settings(self) -> Any:
        """What another process needs to reach the same store (never credentials); ``None`` for none."""
        return None

    def use_settings(self, settings: Any) -> None:  # noqa: B027 - most backends have none
        """Adopts :meth:`settings` of another process."""

    def segments(self, uri: str) -> list[str]:
        """The location of ``uri`` as path segments, root first (a bucket counts as one)."""
        return [p for p in urlparse(normalize_uri(uri)).path.split("/") if p]

    def exists(self, uri: str) -> bool:
        """Whether an object exists at exactly this URI."""
        return self.size(uri) is not None

    @abstractmethod
    def size(self, uri: str) -> int | None:
        """The size of the object at exactly this URI, ``None`` if there is none."""

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size and change token of the object at exactly this URI, ``None`` if there is none."""
        size = self.size(uri)
        return None if size is None else ObjectInfo(uri, size)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """All committed objects below ``prefix`` (recursively), sorted by URI."""
        return sorted(self.iter_objects(prefix), key=lambda o: o.uri)

    @abstractmethod
    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """The committed objects below ``prefix``, a page at a time (never all held at once), in the store's order."""

    @abstractmethod
    def open_read(self, uri: str) -> IO[bytes]:
        """A streaming binary reader; raises FileNotFoundError if absent."""

    def read_some(self, uri: str, limit: int) -> tuple[bytes, ObjectInfo]:
        """At most ``limit`` bytes of an object, with its whole size and change token as read.

        Raises:
            FileNotFoundError: If there is no object.
        """
        info = self.stat(uri)
        if info is None:
            raise FileNotFoundError(f"no object at {uri}")
        with self.open_read(uri) as fh:
            return fh.read(limit), info

    @abstractmethod
    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary writer whose object appears only when the block exits cleanly."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Deletes one object; absent objects are ignored."""

    @abstractmethod
    def delete_many(self, uris: list[str]) -> int:
        """Deletes these objects (absent ones are ignored); returns how many were asked for."""

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object below ``prefix``; returns how many."""
        return self.delete_many([o.uri for o in self.list_objects(prefix)])

    def symlinks(self, prefix: str) -> list[str]:
        """Symbolic links on the way to ``prefix`` or below it (none where the store has no links)."""
        return []

    @abstractmethod
    def arrow_path(self, uri: str) -> str:
        """The path of ``uri`` inside this backend's ``pyarrow.fs`` file system (no I/O)."""

    @abstractmethod
    def new_arrow_filesystem(self) -> Any:
        """A new ``pyarrow.fs.FileSystem`` for this backend; use :func:`arrow_filesystem`, which caches."""

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """A ``pyarrow.fs.FileSystem`` (one per process and settings) and the path within it."""
        key = (type(self), os.getpid(), _s3_options, *(os.environ.get(name) for name in _ARROW_ENV))
        with _clients_lock:
            fs = _arrow_filesystems.get(key)
            if fs is None:
                fs = _arrow_filesystems[key] = self.new_arrow_filesystem()
        return fs, self.arrow_path(uri)

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        """Copies an object to a local file (atomically)."""
        local_path = Path(local_path)
        tmp = local_path.with_name(f"{local_path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with self.open_read(uri) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, local_path: str | os.PathLike[str], uri: str) -> None:
        """Copies a local file to an object."""
        with open(local_path, "rb") as src, self.open_write(uri) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


class LocalBackend(Backend):
    """``file://`` URIs on the local (or mounted) file system."""

    local = True

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(urlparse(normalize_uri(uri)).path)

    def size(self, uri: str) -> int | None:
        path = self._path(uri)
        return path.stat().st_size if path.is_file() else None

    def stat(self, uri: str) -> ObjectInfo | None:
        path = self._path(uri)
        return self._info(path) if path.is_file() else None

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        root = self._path(prefix)
        if root.is_file():
            yield self._info(root)
            return
        if root.is_dir():
            for dirpath, dirs, files in os.walk(root):
                dirs.sort()  # a stable order from one listing to the next
                for name in sorted(files):
                    if TMP_MARKER in name:
                        continue  # an uncommitted write in progress (or abandoned)
                    yield self._info(Path(dirpath) / name)

    @staticmethod
    def _info(path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo("file://" + str(path), st.st_size, f"{st.st_mtime_ns:x}-{st.st_ino:x}")

    def open_read(self, uri: str) -> IO[bytes]:
        path = self._path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no object at {uri}")
        return open(path, "rb")

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        path = self._path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        root = self._path(prefix)
        if root.is_file():
            root.unlink()
            return 1
        if not root.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(root))
        shutil.rmtree(root)
        return count

    def delete_many(self, uris: list[str]) -> int:
        for uri in uris:
            self.delete(uri)
        return len(uris)

    def symlinks(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        found = [str(p) for p in (path, *path.parents) if p.is_symlink()]
        if path.is_dir() and not path.is_symlink():
            for dirpath, dirs, files in os.walk(path):  # os.walk does not follow links
                found += [os.path.join(dirpath, n) for n in (*dirs, *files) if os.path.islink(os.path.join(dirpath, n))]
        return sorted(found)

    def arrow_path(self, uri: str) -> str:
        return str(self._path(uri))

    def new_arrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        src = self._path(uri)
        if not src.is_file():
            raise FileNotFoundError(f"no object at {uri}")
        local_path = Path(local_path)
        tmp = local_path.with_name(f"{local_path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)


class _S3Writer(io.RawIOBase):
    """Spools writes to a local temporary file; the upload happens at commit."""

    def __init__(self) -> None:
        super().__init__()
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.spool.write(b)

    def tell(self) -> int:
        return self.spool.tell()


class S3Backend(Backend):
    """``s3://bucket/key`` URIs on any S3-compatible service."""

    # The AWS SDK (boto3's pools, pyarrow's S3 client) keeps threads that do not survive a
    # fork: a child can deadlock on a lock one of them held.
    fork_safe = False

    def settings(self) -> S3Options:
        return _s3_settings()

    def use_settings(self, settings: S3Options) -> None:
        _use_s3_settings(settings)

    def segments(self, uri: str) -> list[str]:
        bucket, key = self._split(uri)
        return [bucket, *(p for p in key.split("/") if p)]

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(normalize_uri(uri))
        return parsed.netloc, parsed.path.lstrip("/")

    @staticmethod
    def client() -> Any:
        """The boto3 S3 client for this process (clients are not fork-safe)."""
        key = (os.getpid(), _s3_options)
        with _clients_lock:
            if key not in _clients:
                import boto3
                from botocore.config import Config

                cfg = Config(
                    retries={"max_attempts": _s3_options.max_attempts, "mode": "adaptive"},
                    max_pool_connections=_s3_options.max_pool_connections,
                    s3={"addressing_style": _s3_options.addressing_style},
                )
                _clients[key] = boto3.session.Session().client(
                    "s3",
                    endpoint_url=_endpoint_url(),
                    region_name=_s3_options.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                    config=cfg,
                )
            return _clients[key]

    def size(self, uri: str) -> int | None:
        info = self.stat(uri)
        return None if info is None else info.size

    def stat(self, uri: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            head = self.client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(uri, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"') or None)

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = self._split(prefix)
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):  # 1,000 keys a page, in key order
            for obj in page.get("Contents", []):
                name = obj["Key"]
                # "a/b" must not list "a/bc/...": only the object itself or keys below "a/b/".
                if key and name != key and not key.endswith("/") and not name.startswith(key + "/"):
                    continue
                yield ObjectInfo(f"s3://{bucket}/{name}", int(obj["Size"]), str(obj.get("ETag", "")).strip('"') or None)

    def open_read(self, uri: str) -> IO[bytes]:
        return self._get(uri)["Body"]  # botocore StreamingBody: read(n), iter_chunks(), close()

    def read_some(self, uri: str, limit: int) -> tuple[bytes, ObjectInfo]:
        answer = self._get(uri)  # one GET: the size and ETag come with the bytes
        with answer["Body"] as body:
            data = body.read(limit)
        return data, ObjectInfo(uri, int(answer["ContentLength"]), str(answer.get("ETag", "")).strip('"') or None)

    def _get(self, uri: str) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        try:
            return self.client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object at {uri}") from exc
            raise

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        bucket, key = self._split(uri)
        writer = _S3Writer()
        try:
            yield writer  # type: ignore[misc]
            writer.spool.seek(0)
            # upload_fileobj switches to multipart for large objects; either way the object
            # only becomes visible when the upload completes, so there is no partial state.
            self.client().upload_fileobj(writer.spool, bucket, key)
        finally:
            writer.spool.close()

    def delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        self.client().delete_object(Bucket=bucket, Key=key)

    def delete_many(self, uris: list[str]) -> int:
        """Bulk ``DeleteObjects`` where the store allows it, else one ``DeleteObject`` per key.

        A per-prefix policy may grant deletes on keys but not the bulk call: SeaweedFS
        before 4.32 (what Kubeflow Pipelines 2.15 and 2.16 install) authorizes ``POST
        ?delete`` against the bucket, not the keys, so a profile's key for
        ``mlpipeline/private/<namespace>/*`` gets ``AccessDenied`` for it while a single
        delete of the same key passes (seaweedfs/seaweedfs 4.00
        ``weed/s3api/s3api_server.go``, the ``?delete`` route behind ``iam.Auth`` with
        ``ACTION_WRITE``; ``weed/s3api/auth_credentials.go``, the resource checked is the
        request's bucket and object, empty for the bulk call). The first such answer is
        remembered for the bucket, so a process asks once and then deletes key by key.
        """
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            bucket, key = self._split(uri)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            remaining = keys
            if (_endpoint_url(), bucket) not in _bulk_delete_denied:
                remaining = self._delete_in_bulk(bucket, keys)
            if remaining:
                self._delete_one_by_one(bucket, remaining)
        return len(uris)

    def _delete_in_bulk(self, bucket: str, keys: list[str]) -> list[str]:
        """Deletes in batches of 1,000; returns the keys left when the bulk call is denied."""
        from botocore.exceptions import ClientError

        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                answer = self.client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except ClientError as exc:
                if _error_code(exc) not in _DENIED:
                    raise
                _bulk_delete_denied.add((_endpoint_url(), bucket))
                _log.info(
                    "s3://%s: the store refuses bulk deletes (%s); deleting %d object(s) one at a time",
                    bucket,
                    _error_code(exc),
                    len(keys) - i,
                )
                return keys[i:]
            # DeleteObjects answers 200 even when keys fail; each failure is an entry in Errors.
            if answer.get("Errors"):
                failed = ", ".join(f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})" for e in answer["Errors"][:5])
                raise OSError(f"could not delete {len(answer['Errors'])} object(s) in s3://{bucket}: {failed}")
        return []

    def _delete_one_by_one(self, bucket: str, keys: list[str]) -> None:
        """One ``DeleteObject`` per key, a bounded number at once (the client's connection pool)."""
        from concurrent.futures import ThreadPoolExecutor

        client = self.client()
        workers = max(1, min(DELETE_CONCURRENCY, _s3_options.max_pool_connections, len(keys)))
        with ThreadPoolExecutor(workers, thread_name_prefix="imgpipe-delete") as pool:
            for _ in pool.map(lambda k: client.delete_object(Bucket=bucket, Key=k), keys):
                pass

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)
        local_path = Path(local_path)
        tmp = local_path.with_name(f"{local_path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            self.client().download_file(bucket, key, str(tmp))
            os.replace(tmp, local_path)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object at {uri}") from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, local_path: str | os.PathLike[str], uri: str) -> None:
        bucket, key = self._split(uri)
        self.client().upload_file(str(local_path), bucket, key)

    def arrow_path(self, uri: str) -> str:
        bucket, key = self._split(uri)
        return f"{bucket}/{key}"

    def new_arrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {"region": _s3_options.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        endpoint = _endpoint_url()
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        from botocore.credentials import RefreshableCredentials

        creds = boto3_credentials()
        if creds is not None and not isinstance(creds, RefreshableCredentials):
            # Static keys (environment, config file) never expire: pass them, so processes
            # that do not share this one's environment (Ray workers) read with the same
            # identity. Expiring ones (IRSA, assume-role) are left to pyarrow's own AWS
            # chain, which refreshes them; frozen copies would expire in a long job.
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=_s3_options.max_attempts)
        return pafs.S3FileSystem(**kwargs)


def _error_code(exc: Any) -> str:
    """The S3 error code of a botocore ``ClientError`` (``AccessDenied``, ``NoSuchKey``, ...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def boto3_credentials() -> Any:
    """The credentials boto3's standard chain resolves in this process, or ``None``."""
    import boto3

    return boto3.session.Session().get_credentials()


_BACKENDS: dict[str, Backend] = {"file": LocalBackend(), "s3": S3Backend()}


@dataclass(frozen=True)
class Settings:
    """This process's storage settings, for another process: each backend's, by scheme.

    Made by :func:`settings`, adopted by :func:`use_settings` in a pool worker, a Ray task
    or a DataLoader worker (whose environment or in-process settings, such as an endpoint
    given on the command line, may differ). Holds no credentials: each process takes them
    from its own environment. Picklable and comparable.
    """

    by_scheme: tuple[tuple[str, Any], ...] = ()


def settings() -> Settings:
    """This process's storage settings (:class:`Settings`), resolved, without credentials."""
    return Settings(tuple((scheme, b.settings()) for scheme, b in sorted(_BACKENDS.items()) if b.settings() is not None))


def use_settings(value: Settings) -> None:
    """Adopts :func:`settings` of another process (a no-op when they are already in use).

    Raises:
        TypeError: For anything but a :class:`Settings`.
    """
    if not isinstance(value, Settings):
        raise TypeError(f"expected storage.Settings, got {type(value).__name__}")
    for scheme, backend_settings in value.by_scheme:
        _BACKENDS[scheme].use_settings(backend_settings)


# The environment variables that hold storage settings and no secret: what a process on
# another machine (a Ray job's driver) must see to reach the same store as this one.
SETTINGS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
# The environment variables that hold the store's static credentials: what a Kubernetes
# Secret gives a pod (the pipeline's S3 Secret has these keys, and a TrainJob's nodes read them).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def settings_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The non-secret storage settings (:data:`SETTINGS_ENV`) set in ``environ`` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in SETTINGS_ENV if environ.get(name)}


def configure_endpoint(endpoint_url: str | None) -> None:
    """Points the object-store backend at an S3-compatible endpoint (``--s3-endpoint``)."""
    configure_s3(endpoint_url=endpoint_url)


def schemes() -> tuple[str, ...]:
    """The URI schemes storage serves (plain paths are ``file``)."""
    return tuple(sorted(_BACKENDS))


def serves(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is one storage serves (a plain path, or a URI of :func:`schemes`)."""
    scheme = urlparse(os.fspath(uri)).scheme.lower()
    return scheme == "" or scheme in _BACKENDS


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a file of this machine's file system."""
    return get_backend(uri).local


def local_path(uri: str) -> Path:
    """The file-system path of a local ``uri``.

    Raises:
        ValueError: For a URI that is not local (see :func:`is_local`).
    """
    if not is_local(uri):
        raise ValueError(f"{redact_uri(uri)} is not on this machine's file system")
    return Path(urlparse(normalize_uri(uri)).path)


def fork_safe(uris: Iterable[str]) -> bool:
    """Whether a forked child may use every backend these URIs need (else start it fresh)."""
    return all(get_backend(u).fork_safe for u in uris)


def segments(uri: str) -> list[str]:
    """The location of ``uri`` as segments, root first: ``s3://b/a/c`` is ``[b, a, c]``, ``/x/y`` ``[x, y]``."""
    return get_backend(uri).segments(normalize_uri(uri))


def get_backend(uri: str) -> Backend:
    """Returns the backend serving ``uri``'s scheme."""
    return _BACKENDS[urlparse(normalize_uri(uri)).scheme]


def exists(uri: str) -> bool:
    """Whether an object exists at ``uri``."""
    return get_backend(uri).exists(normalize_uri(uri))


def size(uri: str) -> int | None:
    """The size of the object at ``uri`` (one HEAD request on S3), ``None`` if there is none."""
    return get_backend(uri).size(normalize_uri(uri))


def stat(uri: str) -> ObjectInfo | None:
    """Size and change token of the object at ``uri`` (one HEAD request on S3), ``None`` if there is none."""
    return get_backend(uri).stat(normalize_uri(uri))


def list_objects(prefix: str) -> list[ObjectInfo]:
    """Committed objects below ``prefix``, sorted by URI."""
    return get_backend(prefix).list_objects(normalize_uri(prefix))


def iter_objects(prefix: str) -> Iterator[ObjectInfo]:
    """Committed objects below ``prefix`` as the store lists them, a page at a time (for listings of millions)."""
    return get_backend(prefix).iter_objects(normalize_uri(prefix))


def symlinks(prefix: str) -> list[str]:
    """Symbolic links on the way to ``prefix`` (itself or a parent) or anywhere below it; ``[]`` on S3."""
    return get_backend(prefix).symlinks(normalize_uri(prefix))


def open_read(uri: str) -> IO[bytes]:
    """Opens ``uri`` for streaming reads."""
    return get_backend(uri).open_read(normalize_uri(uri))


def read_some(uri: str, limit: int) -> tuple[bytes, ObjectInfo]:
    """At most ``limit`` bytes of the object at ``uri``, with its whole size and change token (one GET on S3)."""
    return get_backend(uri).read_some(normalize_uri(uri), limit)


def read_bytes(uri: str) -> bytes:
    """Reads a whole (small) object."""
    with open_read(uri) as fh:
        return fh.read()


def open_write(uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    """Opens ``uri`` for writing; the object appears only if the block exits cleanly."""
    return get_backend(uri).open_write(normalize_uri(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a whole object atomically."""
    with open_write(uri) as fh:
        fh.write(data)


def delete(uri: str) -> None:
    """Deletes one object (absent is fine)."""
    get_backend(uri).delete(normalize_uri(uri))


def delete_prefix(prefix: str) -> int:
    """Deletes all objects below ``prefix``; returns how many were deleted."""
    return get_backend(prefix).delete_prefix(normalize_uri(prefix))


def delete_many(uris: list[str]) -> int:
    """Deletes these objects (absent ones are ignored), in bulk where the store allows it."""
    by_scheme: dict[str, list[str]] = {}
    for uri in map(normalize_uri, uris):
        by_scheme.setdefault(urlparse(uri).scheme, []).append(uri)
    for scheme, group in by_scheme.items():
        _BACKENDS[scheme].delete_many(group)
    return sum(map(len, by_scheme.values()))


def download_file(uri: str, local_path: str | os.PathLike[str]) -> None:
    """Copies an object to a local file."""
    get_backend(uri).download_file(normalize_uri(uri), local_path)


def upload_file(local_path: str | os.PathLike[str], uri: str) -> None:
    """Copies a local file to an object."""
    get_backend(uri).upload_file(local_path, normalize_uri(uri))


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """A ``pyarrow.fs`` file system and path for ``uri`` (for Parquet readers, Ray, the loader).

    The file system is made once per process and settings (an S3 one holds a client and
    its connections): asking for another object's path costs nothing.
    """
    return get_backend(uri).arrow_filesystem(normalize_uri(uri))


def arrow_path(uri: str) -> str:
    """The path of ``uri`` inside the file system :func:`arrow_filesystem` gives (no I/O)."""
    return get_backend(uri).arrow_path(normalize_uri(uri))
