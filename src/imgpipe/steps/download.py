"""The download step: image archives in, Parquet shards of raw member bytes out.

Sources are ``http(s)://``, ``s3://`` or ``file://`` URIs or plain paths, each a
tar / tar.gz / tar.bz2 / tar.xz / zip archive (recognised by content) or a local
directory. Remote archives are spooled to a local temporary file while they are
hashed; local ones are hashed in a first streaming pass. Every checksum is verified
before the destination is touched, so a mismatch leaves an older committed output
intact.

Members are then read one at a time through :mod:`imgpipe.data.archive` (never
extracted to disk) and written as ``part-00000.parquet``, ``part-00001.parquet``, ...
with the schema :data:`SHARD_SCHEMA`:

* ``path`` (string): the member path, ``/``-separated, leading ``./`` stripped,
* ``bytes`` (binary): the member's content, unchanged,
* ``size`` (int64): ``len(bytes)``,
* ``sha256`` (string): hex SHA-256 of ``bytes``.

Unsafe members (absolute or ``..`` paths, links, devices, FIFOs), oversized and
duplicate ones become rejects; the output follows :mod:`imgpipe.contract`.

Where a source may come from is a :class:`imgpipe.data.sources.SourcePolicy`: everything
but link-local (cloud metadata) addresses for the operator's own calls, much less for
a URI that arrives as a pipeline parameter (the kfp component). HTTP redirects are
followed by hand so that every hop is checked against it before connecting; a refusal
(:class:`imgpipe.data.sources.SourceRefused`, a ``ValueError``) is never retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import numpy as np
import pyarrow as pa
import requests
import urllib3
from tqdm import tqdm

from imgpipe import contract, storage
from imgpipe.contract import OutputWriter, Reject, StepReport
from imgpipe.data import archive
from imgpipe.data.sources import SourcePolicy, check_redirect, is_http, peer_checked_session
from imgpipe.phases import PhaseLog

__all__ = [
    "STEP",
    "OXFORD_PET_IMAGES_URL",
    "OXFORD_PET_ANNOTATIONS_URL",
    "SHARD_SCHEMA",
    "DownloadConfig",
    "download",
]

STEP = "download"

# The Oxford-IIIT Pet release (https://www.robots.ox.ac.uk/~vgg/data/pets/), at the addresses
# torchvision's OxfordIIITPet uses. The release pins them by md5 only
# (5c4f3ee8e5d25df40f4fd59a7f44e54c, 95a8c909bbe2e81eed6a22bccdf3f68f): there is no published
# sha256, so a pin has to be computed once from a trusted copy, and DownloadConfig.sha256
# stays empty by default.
OXFORD_PET_IMAGES_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"
OXFORD_PET_ANNOTATIONS_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

MEMBER_TOO_LARGE = "member_too_large"
DUPLICATE_MEMBER = "duplicate_member"

_MiB = 1 << 20
_GiB = 1 << 30
# Arrow's binary type addresses a column chunk with int32 offsets.
_MAX_BINARY_BYTES = (1 << 31) - 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = _MiB
_MAX_BACKOFF_S = 60.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
# Headroom under max_expansion_ratio for tiny archives, whose per-member header and
# path costs alone can exceed 100x the few hundred bytes they compress to.
_EXPANSION_SLACK = _MiB
# The library's callers are the operator: their sources are trusted (the policy is frozen),
# all but link-local addresses, which no policy reaches.
_TRUSTED = SourcePolicy.trusted()
# Worth retrying: request timeout, rate limiting, and every server-side error. SourceRefused
# is a ValueError, deliberately outside this list: a refused redirect or address is refused
# again on every attempt, and retrying would only contact the redirecting server again.
_RETRY_STATUSES = frozenset({408, 429})
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError, IncompleteRead from raw reads
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download step.

    Attributes:
        sha256: Empty, or one expected SHA-256 hex digest per archive source, in
            source order (normalized to lowercase).
        max_member_bytes: Largest member accepted; bigger ones are rejected
            ``member_too_large``. Also bounds the memory one member takes.
        max_total_bytes: Cap on the bytes extracted from all sources together, each
            member counting its data plus ``archive.HEADER_BYTES`` and its path; crossing
            it aborts the run as an archive bomb.
        max_members: Cap on the members (rejects included) of all sources together;
            crossing it aborts the run before ``dest`` is touched.
        max_expansion_ratio: An archive whose extracted bytes (counted as for
            ``max_total_bytes``, plus the data of rejected tar members, which a tar
            stream inflates all the same) exceed this many times its own size, plus
            1 MiB, is refused as an archive bomb. Directories are exempt.
        max_download_bytes: Largest source file fetched (HTTP, S3 or local); checked
            on the announced size first and again on what arrives.
        shard_bytes: Target size of one Parquet shard, counted as for
            ``max_total_bytes`` (so zero-byte members still fill shards).
        row_group_rows: Rows per Parquet row group (downstream steps parallelize per
            row group).
        retries: HTTP retries after a failed attempt that made no progress.
        timeout_s: HTTP connect and read timeout.
        write_workers: Threads hashing row groups in parallel; memory holds at most
            ``write_workers + 2`` row groups (of ``row_group_rows`` rows, 32 MiB at most),
            whatever ``shard_bytes``.
        backoff_s: First HTTP retry delay; it doubles on each consecutive failure.
    """

    sha256: tuple[str, ...] = ()
    max_member_bytes: int = 256 * _MiB
    max_total_bytes: int = 64 * _GiB
    max_members: int = 1_000_000
    max_expansion_ratio: float = 100.0
    max_download_bytes: int = 32 * _GiB
    shard_bytes: int = 256 * _MiB
    row_group_rows: int = 128
    retries: int = 5
    timeout_s: float = 60.0
    write_workers: int = 4
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", _normalize_digests(self.sha256))
        _check_int("max_member_bytes", self.max_member_bytes, 1, _MAX_BINARY_BYTES)
        _check_int("max_total_bytes", self.max_total_bytes, 1)
        _check_int("max_members", self.max_members, 1)
        _check_number("max_expansion_ratio", self.max_expansion_ratio, positive=True)
        _check_int("max_download_bytes", self.max_download_bytes, 1)
        _check_int("shard_bytes", self.shard_bytes, 1, _MAX_BINARY_BYTES)
        _check_int("row_group_rows", self.row_group_rows, 1)
        _check_int("retries", self.retries, 0)
        _check_int("write_workers", self.write_workers, 1)
        _check_number("timeout_s", self.timeout_s, positive=True)
        _check_number("backoff_s", self.backoff_s, positive=False)


def _normalize_digests(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)  # one source, one digest: forgive the missing tuple
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"sha256 must be a list of hex digests, one per source; got {value!r}")
    digests = []
    for i, digest in enumerate(value):
        if not isinstance(digest, str):
            raise TypeError(f"sha256[{i}] must be a string, got {type(digest).__name__}")
        digest = digest.strip().lower()
        if not _HEX64.match(digest):
            raise ValueError(
                f"sha256[{i}]={digest!r} is not a SHA-256 digest (64 hex characters); "
                "md5 or sha1 sums are not accepted, compute `sha256sum` of a trusted copy"
            )
        digests.append(digest)
    return tuple(digests)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """A source made local: a (spooled) archive file or a directory."""

    uri: str
    local: Path
    format: str
    sha256: str | None
    bytes: int | None
    final_uri: str | None = None  # where HTTP redirects led (redacted)

    def manifest_entry(self) -> dict[str, Any]:
        entry = {"uri": self.uri, "format": self.format, "sha256": self.sha256, "bytes": self.bytes}
        if self.final_uri is not None:
            entry["final_uri"] = self.final_uri
        return entry

    def members(self) -> Iterator[archive.Member]:
        if self.format == "directory":
            return archive.iter_directory(self.local)
        return archive.iter_archive(self.local, self.format)


def _source_list(sources: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a URI or a list of URIs, got {type(sources).__name__}")
    out = []
    for src in sources:
        if not isinstance(src, (str, os.PathLike)) or not os.fspath(src):
            raise ValueError(f"every source must be a non-empty URI or path, got {src!r}")
        out.append(os.fspath(src))
    if not out:
        raise ValueError("no sources given: pass at least one archive URI or directory")
    return out


def _basename(uri: str) -> str:
    return Path(urlparse(uri).path).name or uri


def _check_outside_dest(uri: str, dest: str) -> None:
    """Refuses a storage source that ``OutputWriter.begin()`` would delete, or that would see the output."""
    if storage.serves(uri):
        contract.check_disjoint(dest, [uri], STEP)


def _hash_file(path: Path, label: str) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh, _byte_bar(label, path.stat().st_size) as bar:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest(), size


def _byte_bar(label: str, total: int | None) -> tqdm:
    # disable=None turns the bar off when stderr is not a terminal (pods, CI logs).
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None)


def _verify_digest(uri: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise ValueError(
            f"sha256 mismatch for {uri}: expected {expected}, got {actual}; the download is "
            "corrupt or the source changed. Nothing was written to dest."
        )


def _fetch(
    uri: str, expected: str | None, spool: Path, cfg: DownloadConfig, policy: SourcePolicy
) -> _Source:
    """Makes one source local, hashes it and checks its digest and format.

    Messages and the manifest name the source by :func:`storage.redact_uri`: a presigned
    URL's signature or a ``user:pass@`` never leaves this function.
    """
    shown = storage.redact_uri(uri)
    final = None
    if is_http(uri):
        spooler = _HttpSpooler(uri, spool, cfg, policy, pinned=expected is not None)
        digest, size = spooler.run()
        local = spool
        final = storage.redact_uri(spooler.final_url)
    elif storage.serves(uri) and storage.is_local(uri):
        local = storage.local_path(uri)
        if local.is_dir():
            if expected is not None:
                raise ValueError(
                    f"sha256 was given for {shown}, a directory; checksums apply to archive files only"
                )
            return _Source(shown, local, "directory", None, None)
        if not local.is_file():
            raise FileNotFoundError(
                f"download source {shown} does not exist (no file or directory at {local})"
            )
        _check_download_size(shown, local.stat().st_size, cfg)
        digest, size = _hash_file(local, f"hash {local.name}")
    elif storage.serves(uri):
        local = spool
        digest, size = _spool_object(uri, spool, cfg)
    else:
        schemes = ", ".join(f"{s}://" for s in storage.schemes())
        raise ValueError(f"unsupported source {shown!r}: use http(s)://, {schemes} or a local path")
    _verify_digest(shown, expected, digest)
    fmt = archive.detect_format(local, name=shown)
    return _Source(shown, local, fmt, digest, size, final_uri=final)


def _check_download_size(shown: str, size: int, cfg: DownloadConfig) -> None:
    if size > cfg.max_download_bytes:
        raise ValueError(
            f"download source {shown} is {size} bytes, more than max_download_bytes="
            f"{cfg.max_download_bytes}; raise max_download_bytes if it really is that large"
        )


def _spool_object(uri: str, spool: Path, cfg: DownloadConfig) -> tuple[str, int]:
    size = storage.size(uri)
    if size is None:
        raise FileNotFoundError(f"download source {uri} does not exist (no such object)")
    _check_download_size(uri, size, cfg)
    storage.download_file(uri, spool)
    _check_download_size(uri, spool.stat().st_size, cfg)  # the object may have changed since
    return _hash_file(spool, f"hash {_basename(uri)}")


class _Transient(Exception):
    """A failed HTTP attempt worth retrying; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _HttpSpooler:
    """Streams one URL into a local file while hashing, retrying and resuming.

    After a dropped connection the next request asks for the missing tail with
    ``Range`` (guarded by ``If-Range`` so a changed file is not stitched to an old
    prefix); a server answering 200 instead of 206 makes the download restart.
    Each attempt starts at ``url`` and follows redirects itself, checking every hop
    against ``policy`` before connecting (a presigned target may have expired).
    """

    url: str
    path: Path
    cfg: DownloadConfig
    policy: SourcePolicy
    pinned: bool
    final_url: str = ""
    have: int = 0
    total: int | None = None
    validator: str | None = None
    hasher: Any = field(default_factory=hashlib.sha256)

    def run(self) -> tuple[str, int]:
        failures = 0
        with (
            peer_checked_session(self.policy) as session,
            open(self.path, "wb") as fh,
            _byte_bar(f"fetch {_basename(self.url)}", None) as bar,
        ):
            session.headers["User-Agent"] = "imgpipe-download"
            while True:
                before = self.have
                try:
                    self._attempt(session, fh, bar)
                    return self.hasher.hexdigest(), self.have
                except (_Transient, *_TRANSIENT_ERRORS) as exc:
                    # A connection that keeps dropping but delivers bytes still converges
                    # (the file is finite), so only failures without progress count.
                    failures = 0 if self.have > before else failures + 1
                    if failures > self.cfg.retries:
                        raise ConnectionError(
                            f"downloading {storage.redact_uri(self.url)} failed {failures} times in a row without "
                            f"progress (retries={self.cfg.retries}): {exc}"
                        ) from exc
                    time.sleep(self._delay(failures, exc))

    def _delay(self, failures: int, exc: BaseException) -> float:
        backoff = self.cfg.backoff_s * 2 ** max(failures - 1, 0)
        hint = exc.retry_after if isinstance(exc, _Transient) else 0.0
        return min(max(backoff, hint), _MAX_BACKOFF_S)

    def _restart(self, fh: Any, bar: tqdm) -> None:
        fh.seek(0)
        fh.truncate()
        self.hasher = hashlib.sha256()
        self.have = 0
        bar.reset()

    def _headers(self) -> dict[str, str]:
        # identity: Range offsets count encoded bytes, and the digest is of the file as published.
        headers = {"Accept-Encoding": "identity"}
        if self.have:
            headers["Range"] = f"bytes={self.have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        return headers

    def _attempt(self, session: requests.Session, fh: Any, bar: tqdm) -> None:
        with self._open(session) as resp:
            if resp.status_code == 416 and self.have:
                if self._already_complete(resp):
                    return
                self._restart(fh, bar)
                raise _Transient("server refused the resume range; restarting from byte 0")
            self._check_status(resp)
            self._position(resp, fh, bar)
            for chunk in resp.raw.stream(_CHUNK, decode_content=False):
                fh.write(chunk)
                self.hasher.update(chunk)
                self.have += len(chunk)
                bar.update(len(chunk))
                self._check_size(self.have)
        if self.total is not None and self.have != self.total:
            raise _Transient(f"connection closed after {self.have} of {self.total} bytes")

    def _open(self, session: requests.Session) -> requests.Response:
        """The response at the end of the redirect chain from ``url``, body unread."""
        url = self.url
        self.policy.check_host(url)
        for hop in range(1, _MAX_REDIRECTS + 2):
            resp = session.get(
                url,
                headers=self._headers(),
                stream=True,
                timeout=self.cfg.timeout_s,
                allow_redirects=False,
            )
            if resp.status_code not in _REDIRECTS:
                self.final_url = url
                return resp
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise ValueError(
                    f"{storage.redact_uri(url)} answered HTTP {resp.status_code} without a Location"
                )
            if hop > _MAX_REDIRECTS:
                break
            target = urljoin(url, location)
            check_redirect(self.policy, url, target, pinned=self.pinned, hop=hop)
            url = target
        raise ValueError(
            f"downloading {storage.redact_uri(self.url)}: more than {_MAX_REDIRECTS} redirects "
            f"(last at {storage.redact_uri(url)})"
        )

    def _check_size(self, size: int) -> None:
        if size > self.cfg.max_download_bytes:
            raise ValueError(
                f"download source {storage.redact_uri(self.url)} is more than max_download_bytes="
                f"{self.cfg.max_download_bytes} bytes ({size} announced or received); raise "
                "max_download_bytes if it really is that large"
            )

    def _already_complete(self, resp: requests.Response) -> bool:
        # 416 to "bytes=N-" with "Content-Range: bytes */N": the previous attempt got everything.
        match = re.match(r"bytes \*/(\d+)", resp.headers.get("Content-Range", ""))
        return bool(match) and int(match.group(1)) == self.have

    def _check_status(self, resp: requests.Response) -> None:
        status = resp.status_code
        if status in (404, 410):
            raise FileNotFoundError(
                f"download source {storage.redact_uri(self.url)} not found (HTTP {status} {resp.reason})"
            )
        if status in _RETRY_STATUSES or status >= 500:
            raise _Transient(f"HTTP {status} {resp.reason}", _retry_after(resp))
        if status not in (200, 206):
            raise ValueError(
                f"downloading {storage.redact_uri(self.url)} failed with HTTP {status} {resp.reason}; "
                "check the URL and that it is publicly readable"
            )

    def _position(self, resp: requests.Response, fh: Any, bar: tqdm) -> None:
        """Lines the local file up with what the response body continues from."""
        if resp.status_code == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != self.have:
                self._restart(fh, bar)
                raise _Transient(
                    f"server resumed at an unexpected range {resp.headers.get('Content-Range')!r}"
                )
            self.total = int(match.group(2)) if match.group(2) != "*" else None
        else:
            if self.have:
                self._restart(fh, bar)  # the server ignored Range, or If-Range saw a new file
            length = resp.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
            etag = resp.headers.get("ETag", "")
            # Weak ETags cannot guard a byte range (RFC 9110 section 13.1.5).
            self.validator = (
                etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
            )
        if self.total is not None:
            self._check_size(self.total)
        bar.total = self.total
        bar.refresh()


def _retry_after(resp: requests.Response) -> float:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 0.0


# --------------------------------------------------------------------------- shards


def _shard_table(rows: Sequence[tuple[str, bytes]]) -> pa.Table:
    return pa.table(
        {
            "path": [path for path, _ in rows],
            "bytes": [data for _, data in rows],
            "size": [len(data) for _, data in rows],
            # Hashed here, in the writer threads: hashlib releases the GIL on big buffers.
            "sha256": [hashlib.sha256(data).hexdigest() for _, data in rows],
        },
        schema=SHARD_SCHEMA,
    )


# A row group is cut at row_group_rows rows or at this many bytes, whichever comes first, so
# that large images never make a row group (the unit of memory here and of work in clean) huge.
_ROW_GROUP_BYTES = 32 * _MiB


class _ShardWriter:
    """Streams rows into ~``shard_bytes`` shards, one row group at a time.

    Rows are cut into row groups (``row_group_rows`` rows or ``_ROW_GROUP_BYTES``); each
    row group is hashed and made a table in a pool thread (hashlib and Arrow release the
    GIL), at most ``write_workers`` at once, and appended to the open shard in order. A
    shard is committed when its members (header and path counted, as for
    ``max_total_bytes``) reach ``shard_bytes``. Memory holds at most ``write_workers + 2``
    row groups, whatever ``shard_bytes`` and the number of members.
    """

    def __init__(self, out: OutputWriter, cfg: DownloadConfig) -> None:
        self._out = out
        self._cfg = cfg
        self._pool = ThreadPoolExecutor(cfg.write_workers, thread_name_prefix="imgpipe-shard")
        self._pending: deque[Future[pa.Table]] = deque()
        self._rows: list[tuple[str, bytes]] = []
        self._group_bytes = 0
        self._shard_bytes = 0
        self._shard: tuple[contextlib.ExitStack, contract.ParquetSink] | None = None
        self.shards = 0

    def add(self, member: archive.Member, data: bytes) -> None:
        self._rows.append((member.path, data))
        self._group_bytes += len(data)
        # Header and path count too: a million empty members must still cut shards.
        self._shard_bytes += member.header_bytes + len(data)
        shard_full = self._shard_bytes >= self._cfg.shard_bytes
        if shard_full or len(self._rows) >= self._cfg.row_group_rows or self._group_bytes >= _ROW_GROUP_BYTES:
            self._submit(end_of_shard=shard_full)

    def _submit(self, end_of_shard: bool) -> None:
        if self._rows:
            self._pending.append(self._pool.submit(_shard_table, self._rows))
            self._rows, self._group_bytes = [], 0
        if end_of_shard:
            self._pending.append(_END_OF_SHARD)
            self._shard_bytes = 0
        while len(self._pending) > self._cfg.write_workers:
            self._write_next()

    def _write_next(self) -> None:
        head = self._pending.popleft()
        if head is _END_OF_SHARD:
            self._close_shard()
            return
        table = head.result()
        if self._shard is None:
            stack = contextlib.ExitStack()
            name = f"part-{self.shards:05d}.parquet"
            self.shards += 1
            # The contract's Parquet defaults leave the bytes column uncompressed, without
            # dictionary pages or statistics.
            self._shard = (stack, stack.enter_context(self._out.parquet_file(name, SHARD_SCHEMA)))
        self._shard[1].write(table)

    def _close_shard(self) -> None:
        if self._shard is not None:
            stack, self._shard = self._shard[0], None
            stack.close()  # commits the object and records it on the OutputWriter

    def close(self) -> None:
        """Writes the last rows and shard and waits for every write; re-raises the first failure."""
        self._submit(end_of_shard=True)
        while self._pending:
            self._write_next()
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drops queued work and the open shard (uncommitted)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._shard is not None:
            stack, self._shard = self._shard[0], None
            try:
                raise RuntimeError("download aborted")
            except RuntimeError as exc:
                # Handing an exception to storage.open_write drops the unfinished object.
                stack.__exit__(type(exc), exc, exc.__traceback__)


# Marks where a shard ends in _ShardWriter's queue of row groups.
_END_OF_SHARD: Any = object()


# --------------------------------------------------------------------------- extraction


class _SeenPaths:
    """The member paths seen so far, 16 bytes each: finds a duplicate path in a stream of millions.

    A set of the paths themselves costs about 150 bytes a member (the string and the set's
    slot), 150 MB at a million members. Each path is kept as its 128-bit BLAKE2b digest
    instead (a collision is as likely as guessing a random 128-bit key), recent ones in a
    small set, older ones in sorted NumPy runs merged as they double (a log-structured
    merge: each digest is re-sorted O(log n) times, a look-up searches O(log n) runs).
    """

    _RECENT = 1 << 16

    def __init__(self) -> None:
        self._recent: set[bytes] = set()
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._recent) + sum(len(run) for run in self._runs)

    def add(self, path: str) -> bool:
        """Adds ``path``; whether it had been added before."""
        key = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if key in self._recent or any(self._in_run(run, key) for run in self._runs):
            return True
        self._recent.add(key)
        if len(self._recent) >= self._RECENT:
            self._flush()
        return False

    @staticmethod
    def _in_run(run: np.ndarray, key: bytes) -> bool:
        # Every key is exactly 16 bytes, so NumPy's fixed-width comparison is exact.
        probe = np.array([key], dtype="S16")
        at = int(np.searchsorted(run, probe)[0])
        return at < len(run) and bool(run[at : at + 1] == probe)

    def _flush(self) -> None:
        run = np.sort(np.array(list(self._recent), dtype="S16"))
        self._recent = set()
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate([self._runs.pop(), run]))
        self._runs.append(run)


@dataclass
class _Extraction:
    """Running totals over all sources, and the caps on them."""

    cfg: DownloadConfig
    inputs: int = 0
    extracted: int = 0  # data bytes written (the manifest's bytes_extracted)
    charged: int = 0  # data plus header and path bytes, all sources: max_total_bytes
    expanded: int = 0  # the same for the current source, plus skipped tar data: the ratio
    rejects: list[Reject] = field(default_factory=list)
    seen: _SeenPaths = field(default_factory=lambda: _SeenPaths())

    def start(self, source: _Source) -> None:
        """Begins a source; refuses a zip whose index alone declares too many entries.

        The index counts directory entries too: they cost memory when it is parsed.
        """
        self.expanded = 0
        declared = archive.declared_members(source.local, source.format)
        if declared is not None and self.inputs + declared > self.cfg.max_members:
            raise ValueError(
                self._too_many(source, f"its index declares {declared} entries, directories included")
            )

    def admit(self, source: _Source, member: archive.Member) -> None:
        """Counts a member, read or rejected, with its header and path bytes."""
        self.inputs += 1
        if self.inputs > self.cfg.max_members:
            raise ValueError(self._too_many(source, f"at {member.path!r}"))
        self._charge(source, member, member.header_bytes)

    def screen(self, member: archive.Member) -> Reject | None:
        """The reject for a member that must not be read, else ``None``."""
        duplicate = self.seen.add(member.path)
        if member.reason is not None:
            return Reject(member.path, member.reason, member.detail)
        if duplicate:
            return Reject(member.path, DUPLICATE_MEMBER, "an earlier member has the same path")
        if member.size > self.cfg.max_member_bytes:
            return Reject(member.path, MEMBER_TOO_LARGE, _too_large(member.size, self.cfg))
        return None

    def count(self, source: _Source, member: archive.Member, size: int) -> None:
        """Counts the data bytes of a member that was read."""
        self.extracted += size
        self._charge(source, member, size)

    def skip(self, source: _Source, member: archive.Member) -> None:
        """Counts a rejected member: a tar stream inflates its data all the same."""
        if source.format.startswith("tar"):
            self._expand(source, member, member.size)

    def _charge(self, source: _Source, member: archive.Member, size: int) -> None:
        self.charged += size
        if self.charged > self.cfg.max_total_bytes:
            raise ValueError(
                f"refusing to extract more than max_total_bytes={self.cfg.max_total_bytes} bytes "
                f"(reached at {member.path!r} of {source.uri}); this looks like an archive bomb. "
                "Raise max_total_bytes if the data set really is that large. Nothing was committed."
            )
        self._expand(source, member, size)

    def _expand(self, source: _Source, member: archive.Member, size: int) -> None:
        self.expanded += size
        if source.bytes is None:  # a directory: its files are what they are
            return
        if self.expanded > self.cfg.max_expansion_ratio * source.bytes + _EXPANSION_SLACK:
            raise ValueError(
                f"{source.uri} expands to more than max_expansion_ratio={self.cfg.max_expansion_ratio} "
                f"times its {source.bytes} bytes (reached at {member.path!r}); this looks like an "
                "archive bomb. Raise max_expansion_ratio if it is genuine. Nothing was committed."
            )

    def _too_many(self, source: _Source, where: str) -> str:
        return (
            f"{source.uri} brings the member count over max_members={self.cfg.max_members} "
            f"({where}); this looks like an archive bomb. Raise max_members if the data set "
            "really has that many files. Nothing was committed."
        )


def _too_large(size: int, cfg: DownloadConfig) -> str:
    return f"{size} bytes > max_member_bytes={cfg.max_member_bytes}"


def _read_member(member: archive.Member, state: _Extraction) -> bytes | Reject:
    """The member's bytes, or the reject that keeps it out of the output."""
    reject = state.screen(member)
    if reject is not None:
        return reject
    try:
        return member.read(state.cfg.max_member_bytes)
    except archive.MemberTooLarge:
        # The header understated the size; the reader stopped at the limit.
        return Reject(
            member.path,
            MEMBER_TOO_LARGE,
            f"more than max_member_bytes={state.cfg.max_member_bytes} bytes",
        )


def _extract_source(source: _Source, state: _Extraction, shards: _ShardWriter) -> None:
    bar = tqdm(unit="member", desc=f"extract {_basename(source.uri)}", disable=None)
    state.start(source)
    try:
        with closing(source.members()) as members, bar:
            for member in members:
                state.admit(source, member)
                bar.update(1)
                outcome = _read_member(member, state)
                if isinstance(outcome, Reject):
                    state.rejects.append(outcome)
                    state.skip(source, member)
                    continue
                state.count(source, member, len(outcome))
                shards.add(member, outcome)
    except archive.ArchiveError as exc:
        raise archive.ArchiveError(f"{source.uri}: {exc}") from exc


class _Discard:
    """A shard sink that keeps nothing: what a dry run of the extraction writes to."""

    def add(self, member: archive.Member, data: bytes) -> None:
        """Drops the member."""


def _dry_run(sources: Sequence[_Source], cfg: DownloadConfig) -> int:
    """Reads every member as the extraction will, writing nothing; returns the members read.

    A truncated or corrupt archive, or one over a size cap, fails here, before the
    destination is touched: the previous committed output survives a bad download.
    """
    state = _Extraction(cfg)
    for source in sources:
        _extract_source(source, state, _Discard())  # type: ignore[arg-type]
    return state.inputs


def _extract_all(sources: Sequence[_Source], out: OutputWriter, cfg: DownloadConfig) -> _Extraction:
    state = _Extraction(cfg)
    shards = _ShardWriter(out, cfg)
    try:
        for source in sources:
            _extract_source(source, state, shards)
        shards.close()
    except BaseException:
        shards.abort()
        raise
    return state


def download(
    sources: str | os.PathLike[str] | Sequence[str],
    dest: str,
    cfg: DownloadConfig,
    *,
    policy: SourcePolicy = _TRUSTED,
) -> StepReport:
    """Pulls image archives (or directories) into ``dest`` as Parquet shards.

    Every source is fetched, its checksum verified and every member read once (a dry
    run) before ``dest`` is touched: a corrupt, truncated or oversized archive fails
    there and leaves the previous committed output as it was. Only then is ``dest``
    claimed (:func:`imgpipe.contract.claim`: it must be empty or a download output)
    and the new output written and committed.
    Re-running with the same sources and dest reproduces the same rows and shard names.

    Args:
        sources: One URI/path or a list; see the module docstring for the kinds.
        dest: The output prefix (``file://``, ``s3://`` or a local path).
        cfg: Step settings.
        policy: Where sources may come from. The default trusts the caller; a URI
            from someone else (a pipeline parameter) needs ``SourcePolicy.from_env()``.

    Returns:
        The committed step report; ``extra["sources"]`` lists each source's URI,
        format, SHA-256 and size, and for HTTP where redirects led (``final_uri``).

    Raises:
        ValueError: On a checksum mismatch, an unsupported or corrupt archive, a bad
            source or config, a source or redirect the policy refuses
            (:class:`imgpipe.data.sources.SourceRefused`), or when a size or count cap
            is exceeded.
        FileNotFoundError: If a source does not exist (including HTTP 404).
        ConnectionError: If an HTTP download keeps failing after ``cfg.retries`` retries.
    """
    if not isinstance(cfg, DownloadConfig):
        raise TypeError(f"cfg must be a DownloadConfig, got {type(cfg).__name__}")
    if not isinstance(policy, SourcePolicy):
        raise TypeError(f"policy must be a SourcePolicy, got {type(policy).__name__}")
    uris = _source_list(sources)
    if cfg.sha256 and len(cfg.sha256) != len(uris):
        raise ValueError(
            f"got {len(cfg.sha256)} sha256 digest(s) for {len(uris)} source(s); "
            "give one digest per source, in the same order, or none"
        )
    dest = storage.normalize_uri(dest)
    for uri in uris:
        _check_outside_dest(uri, dest)
    digests: list[str | None] = list(cfg.sha256) or [None] * len(uris)
    for uri, digest in zip(uris, digests, strict=True):
        policy.check_source(uri, pinned=digest is not None)
    phases = PhaseLog(STEP)
    with tempfile.TemporaryDirectory(prefix="imgpipe-download-") as spool_dir:
        fetched = [
            _fetch(uri, digest, Path(spool_dir) / f"source-{i:03d}", cfg, policy)
            for i, (uri, digest) in enumerate(zip(uris, digests, strict=True))
        ]
        phases.done("fetch", sources=len(fetched), bytes=sum(src.bytes or 0 for src in fetched))
        # Every source is local, verified and readable to its last member: only now may
        # the old output go.
        phases.done("dry run", members=_dry_run(fetched, cfg))
        out = OutputWriter(dest, STEP)
        out.begin()
        state = _extract_all(fetched, out, cfg)
        phases.done("extract", members=state.inputs, rejected=len(state.rejects), bytes=state.extracted)
    report = out.commit(
        inputs=state.inputs,
        rejects=state.rejects,
        config=cfg,
        extra={
            "sources": [src.manifest_entry() for src in fetched],
            "bytes_extracted": state.extracted,
        },
        upstream={"sources": [storage.redact_uri(u) for u in uris]},
    )
    phases.done("commit", outputs=report.outputs, rejected=report.rejected, files=len(report.files))
    return report
