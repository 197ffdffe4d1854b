"""A fault-injecting HTTP proxy in front of the local S3 server.

It forwards every request to the real server (SeaweedFS, on loopback) unchanged, Host
header included, so SigV4 signatures stay valid, and, for a seeded fraction of
requests, answers in one of the ways a real S3 misbehaves:

* ``slowdown``: ``503 SlowDown`` with S3's XML error body (throttling);
* ``reset``: the connection is reset (TCP RST) before any response byte;
* ``stall``: the response is held back for ``stall_s`` seconds, then forwarded.

It can also *hold* the requests of one method whose path matches a pattern until the
test lets them go, which is how a test kills a step while it commits, or starts a
second writer while the first one is committing.

A request that repeats one that was faulted (same method and path) counts as a retry.

In **policy mode** (``policy=PrefixPolicy(bucket, prefix)``) it also answers as
SeaweedFS 4.00 does for a Kubeflow profile's key, whose identity may read, write,
list and delete only below ``mlpipeline/private/<namespace>/`` (what KFP 2.15 and
2.16 install: their profile controller, kubeflow/pipelines 2.15.0
``manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py``,
makes one SeaweedFS identity per profile namespace with actions on that prefix): ``403 AccessDenied`` for the bulk
``POST /bucket?delete`` (authorized against the bucket, not the keys:
seaweedfs/seaweedfs 4.00 ``weed/s3api/s3api_server.go`` routes ``?delete`` through
``iam.Auth`` with the bucket as the resource, ``weed/s3api/auth_credentials.go``
matches it against ``bucket/prefix/*`` and fails; fixed in 4.32), and for any
request whose key, or listing prefix, lies outside the granted prefix.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from tests import serving

FAULT_KINDS = ("slowdown", "reset", "stall")
_SLOWDOWN_BODY = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'
_ACCESS_DENIED_BODY = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
# Hop-by-hop headers (RFC 9110 section 7.6.1) and the ones rewritten here.
_DROP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "content-length"}


# The prefix a Kubeflow profile's key is granted in KFP's bucket (namespace imgpipe-dev).
NAMESPACE_PREFIX = "private/imgpipe-dev/"


@dataclass(frozen=True)
class PrefixPolicy:
    """What one key may do: everything below ``prefix`` of ``bucket``, no bulk deletes."""

    bucket: str
    prefix: str  # e.g. "private/imgpipe-dev/", with its trailing slash

    def denies(self, method: str, path: str) -> str | None:
        """Why a request is refused (``"bulk_delete"``, ``"outside_prefix"``), ``None`` if allowed."""
        parsed = urlparse(path)
        bucket, _, key = unquote(parsed.path).lstrip("/").partition("/")
        query = parse_qs(parsed.query, keep_blank_values=True)
        if bucket != self.bucket:
            return "outside_prefix"
        if not key:
            if method == "POST" and "delete" in query:
                return "bulk_delete"
            listed = query.get("prefix", [""])[0]
            if method == "GET" and listed.startswith(self.prefix):
                return None  # ListObjects(V2) below the granted prefix
            return "outside_prefix"
        return None if key.startswith(self.prefix) else "outside_prefix"


@dataclass
class FaultStats:
    """What the proxy saw: requests forwarded, faulted or denied by kind, and retries of faulted ones."""

    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    retries: int = 0
    denied: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "faults": sum(self.faults.values()),
            **{f"faults_{k}": self.faults.get(k, 0) for k in FAULT_KINDS},
            "retries": self.retries,
            "denied_bulk_delete": self.denied.get("bulk_delete", 0),
            "denied_outside_prefix": self.denied.get("outside_prefix", 0),
        }


class FaultProxy:
    """Runs the proxy on 127.0.0.1 in a background thread.

    Args:
        upstream: The real S3 endpoint, ``http://127.0.0.1:PORT``.
        rate: Fraction of requests to fault.
        seed: Seed of the fault sequence.
        stall_s: How long a stalled response is held.
        policy: Answer like SeaweedFS 4.00 for a key limited to this prefix (policy mode).
    """

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, stall_s: float = 1.0, policy: PrefixPolicy | None = None) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.policy = policy
        self.rate = rate
        self.stall_s = stall_s
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._faulted: set[tuple[str, str]] = set()
        self._hold: tuple[str, re.Pattern] | None = None
        self.held = threading.Event()  # set when a request matching the hold pattern arrived
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread = serving.start(self._server)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        serving.stop(self._server, self._thread)

    def hold(self, pattern: str, method: str = "PUT") -> None:
        """Holds ``method`` requests whose path matches ``pattern`` (a regex) until :meth:`release`."""
        self._hold = (method, re.compile(pattern))
        self.held.clear()
        self._release.clear()

    def release(self) -> None:
        self._hold = None
        self._release.set()

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats.requests += 1
            key = (method, path)
            if key in self._faulted:
                self.stats.retries += 1
                self._faulted.discard(key)
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(FAULT_KINDS)
            self.stats.faults[kind] += 1
            if kind != "stall":
                self._faulted.add(key)
            return kind

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response_only(status, reason)
                for name, value in headers:
                    if name.lower() not in _DROP:
                        self.send_header(name, value)
                # HEAD: no body, but the length of the one a GET would get
                length = next((v for k, v in headers if k.lower() == "content-length"), "0") if self.command == "HEAD" else str(len(body))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._send(resp.status, resp.reason, resp.getheaders(), data)
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                why = proxy.policy.denies(self.command, self.path) if proxy.policy else None
                if why:
                    with proxy._lock:
                        proxy.stats.requests += 1
                        proxy.stats.denied[why] += 1
                    self._send(403, "Forbidden", [("Content-Type", "application/xml")], _ACCESS_DENIED_BODY)
                    return
                hold = proxy._hold
                if hold is not None and self.command == hold[0] and hold[1].search(self.path):
                    proxy.held.set()
                    proxy._release.wait()
                kind = proxy._decide(self.command, self.path)
                if kind == "reset":
                    self._reset()
                    return
                if kind == "slowdown":
                    self._send(503, "Slow Down", [("Content-Type", "application/xml")], _SLOWDOWN_BODY)
                    return
                if kind == "stall":
                    time.sleep(proxy.stall_s)
                self._forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


def prefix_policy(bucket_uri: str) -> PrefixPolicy:
    """The policy of a profile's key in ``bucket_uri`` (``s3://name``): :data:`NAMESPACE_PREFIX` only."""
    return PrefixPolicy(bucket_uri.removeprefix("s3://"), NAMESPACE_PREFIX)
