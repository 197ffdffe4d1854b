"""``s3://bucket/key`` URIs on any S3-compatible service (AWS, SeaweedFS, MinIO, Ceph).

The endpoint comes from :func:`configure` (``imgpipe.storage.configure_s3``) or the
standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables; credentials from the
standard AWS chain (environment, profile, IRSA). An object exists only once its
(multipart) upload completes. Used through :mod:`imgpipe.storage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from imgpipe.storage.base import TMP_MARKER, Backend, ObjectInfo, forget_arrow_filesystems

__all__ = ["S3Options", "S3Backend", "configure", "resolved_settings", "use_settings", "endpoint_url", "boto3_credentials"]


@dataclass(frozen=True)
class S3Options:
    """Connection settings for S3-compatible storage.

    Attributes:
        endpoint_url: Service endpoint, e.g. ``http://minio.kubeflow:9000``; ``None``
            uses ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` or AWS itself.
        region: Region name; SeaweedFS and MinIO accept any.
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
_clients: dict[tuple[int, S3Options, str | None], Any] = {}
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


def configure(**kwargs: Any) -> S3Options:
    """Sets the process-wide S3 options (see :class:`S3Options`) and returns them."""
    global _s3_options
    _s3_options = S3Options(**{**_s3_options.__dict__, **kwargs})
    with _clients_lock:
        _clients.clear()
    forget_arrow_filesystems()
    return _s3_options


def resolved_settings() -> S3Options:
    """This process's S3 options with endpoint and region resolved, and no credentials."""
    return dataclasses.replace(
        _s3_options,
        endpoint_url=endpoint_url(),
        region=_s3_options.region or os.environ.get("AWS_DEFAULT_REGION") or None,
    )


def use_settings(options: S3Options) -> None:
    if options != _s3_options:
        configure(**options.__dict__)


def endpoint_url() -> str | None:
    return _s3_options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


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
        return resolved_settings()

    def use_settings(self, settings: S3Options) -> None:
        use_settings(settings)

    def arrow_key(self) -> Any:
        return (_s3_options, *(os.environ.get(name) for name in _ARROW_ENV))

    def segments(self, uri: str) -> list[str]:
        bucket, key = self._split(uri)
        return [bucket, *(p for p in key.split("/") if p)]

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

    @staticmethod
    def client(signature_version: str | None = None) -> Any:
        """The boto3 S3 client for this process (clients are not fork-safe); ``s3v4``: one that presigns with SigV4."""
        key = (os.getpid(), _s3_options, signature_version)
        with _clients_lock:
            if key not in _clients:
                import boto3
                from botocore.config import Config

                cfg = Config(
                    retries={"max_attempts": _s3_options.max_attempts, "mode": "adaptive"},
                    max_pool_connections=_s3_options.max_pool_connections,
                    s3={"addressing_style": _s3_options.addressing_style},
                    **({"signature_version": signature_version} if signature_version else {}),
                )
                _clients[key] = boto3.session.Session().client(
                    "s3",
                    endpoint_url=endpoint_url(),
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
            if (endpoint_url(), bucket) not in _bulk_delete_denied:
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
                _bulk_delete_denied.add((endpoint_url(), bucket))
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

    # SigV4's longest: a presigned URL lives at most 7 days.
    MAX_PRESIGN_S = 7 * 24 * 3600

    def presigned_get(self, uri: str, expires_s: int) -> str:
        if not 1 <= expires_s <= self.MAX_PRESIGN_S:
            raise ValueError(f"a presigned URL lives 1 s to 7 days (SigV4), not {expires_s} s")
        bucket, key = self._split(uri)
        # SigV4: botocore presigns with the legacy SigV2 at a custom endpoint otherwise (no expiry bound, the key id in clear).
        presigner = self.client("s3v4")
        return str(presigner.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s)))

    def upload_file(self, local_path: str | os.PathLike[str], uri: str) -> None:
        bucket, key = self._split(uri)
        self.client().upload_file(str(local_path), bucket, key)

    def arrow_path(self, uri: str) -> str:
        bucket, key = self._split(uri)
        return f"{bucket}/{key}"

    def new_arrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {"region": _s3_options.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        endpoint = endpoint_url()
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


_NOT_ALLOWED = {*_DENIED, "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_CHECK_ENDPOINT = "the endpoint (--s3-endpoint or AWS_ENDPOINT_URL)"
_CHECK_KEYS = "the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; in a pod, the secret the pipeline mounts) and the bucket's policy"


def explain(exc: BaseException) -> str | None:
    """One line a user can act on for a botocore failure, else ``None``.

    A missing bucket, a store that does not answer and access denied each name the setting to check.
    """
    if not type(exc).__module__.startswith("botocore"):
        return None
    from botocore import exceptions as bx

    where = endpoint_url() or "the default AWS endpoint"
    if isinstance(exc, bx.ClientError):
        code, error = _error_code(exc), exc.response.get("Error", {})
        bucket = error.get("BucketName") or ""
        what = f"bucket {bucket!r}" if bucket else "the bucket"
        if code == "NoSuchBucket":
            return f"{what} does not exist on {where} ({exc.operation_name}): create it, or check the URI's bucket name and {_CHECK_ENDPOINT}"
        if code in _NOT_ALLOWED:
            return f"access denied on {where} ({code} in {exc.operation_name}): check {_CHECK_KEYS}"
        return f"the object store at {where} refused {exc.operation_name}: {code} {error.get('Message', '')}".rstrip()
    if isinstance(exc, bx.NoCredentialsError):
        return f"no credentials for the object store at {where}: set {_CHECK_KEYS.split(' and the')[0]}"
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError)):
        return f"the object store at {where} does not answer ({type(exc).__name__}): is it running, and is {_CHECK_ENDPOINT} right?"
    return f"the object store at {where} failed: {exc}"
