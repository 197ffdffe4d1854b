"""Bounded serving (issue 83): a body over the limit is refused with 413 before it is held, few are held at once,
and the runtime listens only where it was asked to.

The middleware (imgpipe.serving.limits) is checked on hand-made ASGI messages; then the real kserve
server (``python -m imgpipe.serving.runtime``, the serve venv) takes an over-limit body and 16
concurrent 50 MB bodies while its peak RSS (``VmHWM``) is read from /proc, and its listening
sockets are read from /proc/net/tcp*.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
from pathlib import Path

import pytest
import requests

from imgpipe.serving import triton as serving
from imgpipe.serving.limits import MIN_BODY_BYTES, RequestLimits, request_limit
from imgpipe.serving.model import MAX_IMAGES
from tests import serve_venv
from tests.test_serve_runtime import LOOPBACK_ONLY, needs_netns, trained  # noqa: F401 - the module's trained model

ROOT = Path(__file__).resolve().parents[1]
NAME = serving.MODEL_NAME
MiB = 1 << 20
# What the runtime's peak RSS may grow by while it refuses the bodies below (docs/serving.md).
OVER_LIMIT_RSS_BOUND = 64 * MiB
CONCURRENT_RSS_BOUND = 128 * MiB


# ----------------------------------------------------------------------------------------
# The middleware alone.


class _App:
    """An ASGI app that reads the whole body and answers its length."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _call(app, method="POST", length=None, chunks=(b"",)):
    """Runs one request through ``app``; returns (status, headers, body, the number of chunks it read)."""
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    scope = {"type": "http", "method": method, "path": "/v2/models/m/infer", "headers": headers}
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent, read = [], [0]

    async def receive():
        read[0] += 1
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, read[0]


def test_a_body_over_the_limit_is_refused_with_413_and_never_held():
    inner = _App()
    app = RequestLimits(inner, max_body=1000)
    status, _, body, read = _call(app, length=5000, chunks=[b"x" * 1000] * 5)
    assert status == 413 and "limit of 1000 bytes" in json.loads(body)["error"]
    assert inner.bodies == [] and read == 5  # read to its end (so the client sees the answer), and dropped
    # Without a length: counted as it comes, refused once past the limit.
    status, _, _, _ = _call(app, chunks=[b"x" * 600, b"x" * 600, b"x" * 600])
    assert status == 413 and inner.bodies == [] and app.refused["413"] == 2


def test_a_body_within_the_limit_reaches_the_app_whole():
    inner = _App()
    app = RequestLimits(inner, max_body=1000)
    assert _call(app, length=1000, chunks=[b"a" * 400, b"b" * 600])[:1] == (200,)
    assert _call(app, chunks=[b"a" * 10, b"b" * 10])[2] == b"20"
    assert inner.bodies == [b"a" * 400 + b"b" * 600, b"a" * 10 + b"b" * 10]


def test_reads_pass_and_a_bad_length_is_a_400():
    app = RequestLimits(_App(), max_body=10)
    assert _call(app, method="GET")[0] == 200
    assert _call(app, length="12x")[0] == 400


def test_more_requests_than_it_holds_at_once_get_503_with_retry_after():
    started, release = asyncio.Event(), None

    class Slow(_App):
        async def __call__(self, scope, receive, send):
            started.set()
            await release.wait()
            await super().__call__(scope, receive, send)

    async def main():
        nonlocal release
        release = asyncio.Event()
        app = RequestLimits(Slow(), max_body=100, max_inflight=1)

        async def one(out):
            queue = [{"type": "http.request", "body": b"x", "more_body": False}]

            async def receive():
                return queue.pop(0) if queue else {"type": "http.disconnect"}

            async def send(message):
                out.append(message)

            await app({"type": "http", "method": "POST", "headers": [(b"content-length", b"1")]}, receive, send)

        held, extra = [], []
        task = asyncio.create_task(one(held))
        await started.wait()
        await one(extra)  # the one too many: answered at once
        release.set()
        await task
        return held, extra, app

    held, extra, app = asyncio.run(main())
    assert held[0]["status"] == 200
    assert extra[0]["status"] == 503 and (b"retry-after", b"1") in extra[0]["headers"] and app.refused["503"] == 1


def test_the_limit_is_what_64_prepared_tensors_of_the_cards_size_take():
    small = {"input": {"size": 16, "channels": 3}}
    large = {"input": {"size": 224, "channels": 3}}
    assert request_limit(small, MAX_IMAGES) == MIN_BODY_BYTES
    assert request_limit(large, MAX_IMAGES) > MAX_IMAGES * 3 * 224 * 224 * len("-0.12345678901234567,") - 1
    with pytest.raises(ValueError):
        RequestLimits(_App(), max_body=0)


# ----------------------------------------------------------------------------------------
# The real server.


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _listening(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket ``pid`` listens on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                if width == 8:
                    shown = socket.inet_ntoa(bytes.fromhex(address)[::-1])
                else:
                    shown = socket.inet_ntop(socket.AF_INET6, b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)))
                found.append((shown, int(port, 16)))
    return found


@pytest.fixture(scope="module")
def runtime(trained):  # noqa: F811 - the fixture imported above
    """The runtime with its defaults (no --host, no --enable_grpc): its process, URL and start-up line."""
    if not LOOPBACK_ONLY:
        pytest.skip("run under scripts/in-loopback-netns (make test does)")
    log = trained["root"] / "limits.log"
    with serve_venv.runtime(trained["repository"], log) as (proc, url, port):
        yield proc, url, port, log


def _tensor_request(trained) -> dict:  # noqa: F811
    size = trained["card"]["input"]["size"]
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, size, size], "data": [0.0] * (3 * size * size)}]}


@needs_netns
def test_it_listens_on_loopback_alone_with_no_grpc_and_says_so(runtime):
    proc, _, port, log = runtime
    assert _listening(proc.pid) == [("127.0.0.1", port)]
    said = log.read_text()
    assert f"on http://127.0.0.1:{port} (v2), no gRPC" in said and f"request bodies up to {MIN_BODY_BYTES / MiB:.1f} MiB, 4 at once" in said


@needs_netns
def test_an_over_limit_body_gets_413_before_it_is_held(runtime, trained, record_property):  # noqa: F811
    proc, url, port, _ = runtime
    infer = f"{url}/v2/models/{NAME}/infer"
    assert requests.post(infer, json=_tensor_request(trained), timeout=60).status_code == 200  # warm: the baseline is a served request
    before = _peak_rss(proc.pid)
    body = b'{"inputs": [' + b" " * (200 * MiB) + b"]}"
    response = requests.post(infer, data=body, headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 413 and "over this server's limit" in response.json()["error"]
    # A length past anything it would read: answered at once, nothing read.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {10 << 30}\r\n\r\n".encode())
        assert s.recv(200).startswith(b"HTTP/1.1 413")
    grew = _peak_rss(proc.pid) - before
    record_property("peak_rss_growth_mib", round(grew / MiB, 1))
    print(f"refusing a 200 MB body: peak RSS +{grew / MiB:.1f} MiB")
    assert grew < OVER_LIMIT_RSS_BOUND, f"peak RSS grew by {grew / MiB:.0f} MiB refusing a 200 MB body"
    assert requests.post(infer, json=_tensor_request(trained), timeout=60).status_code == 200


@needs_netns
def test_sixteen_concurrent_50_mb_bodies_are_all_refused_and_the_server_stays_healthy(runtime, trained, record_property):  # noqa: F811
    proc, url, _, _ = runtime
    infer = f"{url}/v2/models/{NAME}/infer"
    body = b'{"inputs": [' + b" " * (50 * MiB) + b"]}"
    before = _peak_rss(proc.pid)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: requests.post(infer, data=body, timeout=300).status_code, range(16)))
    grew = _peak_rss(proc.pid) - before
    record_property("peak_rss_growth_mib", round(grew / MiB, 1))
    print(f"refusing 16 concurrent 50 MB bodies: peak RSS +{grew / MiB:.1f} MiB")
    assert statuses == [413] * 16
    assert grew < CONCURRENT_RSS_BOUND, f"peak RSS grew by {grew / MiB:.0f} MiB refusing 16 x 50 MB"
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert requests.post(infer, json=_tensor_request(trained), timeout=60).status_code == 200
