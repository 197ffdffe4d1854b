"""Another local user's tries at the local object store: standard library only, so any ``python3`` runs it as ``nobody``.

    python3 tests/kfp/intruder.py < plan.json     # prints one JSON list: each try and whether it got in

The plan names what the test found the store's own ``weed server`` process listening on
(its TCP addresses, all loopback, and its unix sockets), an object it holds and
the chunks (volume file ids) of that object, and files to read. A try "gets in" when the
store hands over or takes something: an HTTP answer below 400 to a request for an object,
a write or an upload ticket (``/dir/assign``); an HTTP/2 handshake on any port (gRPC is
HTTP/2: a port that completes one with a stranger serves its API, ``weed shell``
included); a connection to a unix socket; a file opened for reading. The test runs the
same functions with the store's keys, to show that each would see an open door.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import ssl
import sys

__all__ = ["attack", "h2_answers", "http_try", "unix_connects"]

TIMEOUT_S = 5.0
# The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def stranger_tls() -> ssl.SSLContext:
    """TLS as a stranger speaks it: no client certificate, and whatever the server presents accepted."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def http_try(
    host: str, port: int, method: str, path: str, body: bytes | None = None, tls: ssl.SSLContext | None = None, headers: dict | None = None
) -> tuple[int, bytes] | str:
    """One HTTP(S) request: ``(status, body)``, or why there was no answer."""
    if tls is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT_S, context=tls)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def h2_answers(host: str, port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Whether the port answers an HTTP/2 client preface with the server's SETTINGS frame.

    Over TLS if ``tls``: a context for this try alone (its ALPN is set here to h2).
    """
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as raw:
            if tls is not None:
                tls.set_alpn_protocols(["h2"])
                sock: socket.socket = tls.wrap_socket(raw, server_hostname=host)
            else:
                sock = raw
            sock.sendall(H2_PREFACE)
            head = b""
            while len(head) < 9:
                more = sock.recv(9 - len(head))
                if not more:
                    return False
                head += more
            return head[3] == 0x04  # the frame type of SETTINGS
    except (OSError, ssl.SSLError):
        return False


def unix_connects(path: str) -> bool:
    """Whether a connection to the unix socket ``path`` (``@name``: an abstract one) is taken."""
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError:
        return False
    return True


def _listable(path: str) -> bool:
    try:
        os.listdir(path)
    except OSError:
        return False
    return True


def _object_requests(plan: dict) -> list[tuple[str, str, bytes | None]]:
    """(method, path, body): reads and writes of an object as S3 path-style, the filer, the volume server and the master take them."""
    bucket, key = plan["bucket"], plan["key"]
    stranger = b"written by another local user"
    made_up = f"{plan['fids'][0].split(',')[0]},{secrets.token_hex(6)}"  # a file id a writer may choose itself
    tries: list[tuple[str, str, bytes | None]] = [
        ("GET", f"/{bucket}/{key}", None),  # S3, unsigned
        ("PUT", f"/{bucket}/intruder-s3", stranger),
        ("GET", f"/buckets/{bucket}/{key}", None),  # the filer
        ("GET", f"/buckets/{bucket}/{key}?metadata=true", None),
        ("PUT", f"/buckets/{bucket}/intruder-filer", stranger),
        ("POST", f"/buckets/{bucket}/intruder-filer-post", stranger),
        ("GET", "/etc/iam/identity.json", None),  # the identities, where the filer keeps them
        ("GET", "/dir/assign", None),  # the master: a file id and its write token
        ("POST", "/submit", stranger),
        ("PUT", f"/{made_up}", stranger),  # the volume server
        ("POST", f"/{made_up}", stranger),
    ]
    tries += [("GET", f"/{fid}", None) for fid in plan["fids"]]
    return tries


def attack(plan: dict) -> list[dict]:
    """Every try of the plan, each ``{"where", "what", "got_in", "detail"}``."""
    found: list[dict] = []
    for host, port in plan["tcp"]:
        if host not in LOOPBACK:
            raise ValueError(f"{host} is not a loopback address: the intruder tries only the test's own store")
        where = f"{host}:{port}"
        for scheme, tls in (("http", None), ("https", stranger_tls())):
            for method, path, body in _object_requests(plan):
                answer = http_try(host, port, method, path, body, tls)
                got_in = isinstance(answer, tuple) and answer[0] < 400
                detail = f"{answer[0]} {answer[1][:120]!r}" if isinstance(answer, tuple) else answer
                found.append({"where": where, "what": f"{scheme} {method} {path}", "got_in": got_in, "detail": detail})
            handshake = h2_answers(host, port, None if tls is None else stranger_tls())
            found.append({"where": where, "what": f"{scheme} HTTP/2 handshake", "got_in": handshake, "detail": ""})
    for path in plan["unix_sockets"]:
        found.append({"where": path, "what": "connect", "got_in": unix_connects(path), "detail": ""})
    for path in plan.get("files", []):
        found.append({"where": path, "what": "read", "got_in": _readable(path), "detail": ""})
    for path in plan.get("directories", []):
        found.append({"where": path, "what": "list", "got_in": _listable(path), "detail": ""})
    return found


if __name__ == "__main__":
    json.dump(attack(json.load(sys.stdin)), sys.stdout)
