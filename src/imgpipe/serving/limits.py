"""Bounds for an HTTP server imgpipe starts: a body over the limit is refused before it is held, and few are held at once.

    app = RequestLimits(app, max_body=request_limit(card), max_inflight=4)   # any ASGI app

A request whose ``Content-Length`` is over ``max_body`` gets ``413`` without its body being
kept: the body is read and dropped chunk by chunk (up to :data:`DRAIN_BYTES`, so the client,
still sending, reads the answer instead of a reset), then the answer goes. A body
without a length is counted as it arrives and refused the same way once past the limit. At most
``max_inflight`` requests with a body are held at once; one more gets ``503`` with
``Retry-After`` at once. Reads (``GET``, ``HEAD``: health, metadata, metrics) pass untouched.
The server's memory is then bounded by about ``max_inflight x max_body`` (docs/serving.md).

Pure ASGI: it imports no server framework, so it is tested here on hand-made messages.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = ["RequestLimits", "request_limit", "MAX_INFLIGHT", "MIN_BODY_BYTES", "BYTES_PER_NUMBER", "DRAIN_BYTES"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Requests with a body held at once (decoding, preprocessing and the model run one at a time per thread).
MAX_INFLIGHT = 4
# The floor of the body limit: a few pictures as base64 JSON whatever the model's input size.
MIN_BODY_BYTES = 16 << 20
# A number of an FP32 tensor written as JSON text: "-0.12345678901234567," is 21 characters at most
# for a float32 printed as a double (numpy's tolist()).
BYTES_PER_NUMBER = 21
# How much of a refused body is still read (and dropped, a chunk at a time) before the answer, so that
# the client sees the 413; a longer one is answered at once and the connection closed.
DRAIN_BYTES = 1 << 30


def request_limit(card: Mapping[str, Any], images: int) -> int:
    """The largest body a request to this model can need: ``images`` prepared tensors (N x C x S x S) as JSON text.

    Pictures at the model's input size (the BYTES form, base64) take less than that; larger
    photos are for the client to scale, or for the server's ``--max_body_mb``.
    """
    size, channels = int(card["input"]["size"]), int(card["input"]["channels"])
    return max(MIN_BODY_BYTES, images * channels * size * size * BYTES_PER_NUMBER + (64 << 10))


class RequestLimits:
    """ASGI middleware: bodies over ``max_body`` refused with 413, at most ``max_inflight`` bodies held at once (503)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, max_body: int, max_inflight: int = MAX_INFLIGHT) -> None:
        if max_body < 1 or max_inflight < 1:
            raise ValueError(f"max_body and max_inflight must be >= 1, got {max_body} and {max_inflight}")
        self.app, self.max_body, self.max_inflight = app, max_body, max_inflight
        self.inflight = 0
        self.refused = {"413": 0, "503": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit()):
            await _answer(send, 400, f"Content-Length {length[:40]!r} is not a whole number")
            return
        if length is not None and int(length) > self.max_body:
            self.refused["413"] += 1
            if int(length) <= DRAIN_BYTES:
                await _drain(receive)
            await _answer(send, 413, self._too_large(int(length)))
            return
        if self.inflight >= self.max_inflight:
            self.refused["503"] += 1
            await _answer(send, 503, f"the server holds {self.max_inflight} requests already; try again shortly", {"retry-after": "1"})
            return
        self.inflight += 1
        try:
            body = await self._read(receive)
            if body is None:  # past the limit without a length: refused, nothing kept
                self.refused["413"] += 1
                await _answer(send, 413, self._too_large(None))
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.inflight -= 1

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` once it passes the limit (the rest is read and dropped up to the drain bound)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body"))
            if size > self.max_body:
                chunks.clear()
                if more and size <= DRAIN_BYTES:
                    await _drain(receive, size, DRAIN_BYTES)
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, length: int | None) -> str:
        size = f"of {length} bytes" if length is not None else "without a length, past it"
        return (
            f"the request body {size} is over this server's limit of {self.max_body} bytes "
            f"({self.max_body / (1 << 20):.1f} MiB: --max_body_mb); send fewer or smaller pictures per request"
        )


async def _drain(receive: Receive, read: int = 0, bound: int | None = None) -> None:
    """Reads the rest of a body and drops it, chunk by chunk (no more than ``bound`` bytes in all)."""
    more = True
    while more and (bound is None or read <= bound):
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        read += len(message.get("body", b""))
        more = bool(message.get("more_body"))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then waits on the real one (for the client leaving)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, error: str, headers: Mapping[str, str] | None = None) -> None:
    """The v2 protocol's error body (``{"error": ...}``) with ``status``; the connection closes after it."""
    payload = json.dumps({"error": error}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": base + extra})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
