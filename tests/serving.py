"""Test HTTP servers on a thread, stopped in milliseconds.

    thread = serving.start(ThreadingHTTPServer(("127.0.0.1", 0), Handler)); ...; serving.stop(server, thread)

``serve_forever`` looks for a shutdown request every ``poll_interval`` (0.5 s by default): a
test that stops its server would wait that long at every teardown.
"""

from __future__ import annotations

import socketserver
import threading

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
