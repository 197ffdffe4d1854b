"""Test HTTP servers on a thread, stopped in milliseconds.

    thread = serving.start(ThreadingHTTPServer(("127.0.0.1", 0), Handler)); ...; serving.stop(server, thread)
    serving.answer(handler, 200, body, {"ETag": etag})   # in a handler: status, headers, the body

``serve_forever`` looks for a shutdown request every ``poll_interval`` (0.5 s by default): a
test that stops its server would wait that long at every teardown.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler

# How often a serving thread looks for a shutdown request.
POLL_S = 0.02


def start(server: socketserver.BaseServer) -> threading.Thread:
    """Serves ``server`` on a daemon thread (its handler threads daemons too)."""
    if isinstance(server, socketserver.ThreadingMixIn):
        server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True)
    thread.start()
    return thread


def stop(server: socketserver.BaseServer, thread: threading.Thread | None = None) -> None:
    """Stops serving, closes the socket and waits for the thread."""
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout=10)


def answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    """Answers ``handler``'s request with ``status``, ``headers``, the body's length and the body."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
