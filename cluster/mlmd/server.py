"""ML Metadata's gRPC service over MLMD's own C++ store (PyPI's ``ml-metadata``).

No package ships upstream's ``metadata_store_server`` binary; ``ml-metadata``'s wheel carries the
same C++ ``MetadataStore`` it wraps, which takes each request by its RPC method's name, serialized.
This server forwards every ``ml_metadata.MetadataStoreService`` call to it unchanged (bytes in,
bytes out) and answers MLMD's own status code as the gRPC status, so KFP's Go client (driver,
launcher, API server) sees what it would from upstream's server. It takes upstream's flags, so
KFP's ``metadata-grpc-deployment`` runs it with its own arguments.

The store has one database connection; calls are serialized on it. A call that finds the
connection gone (the database restarted) is retried once on a new store.

It also answers gRPC-Web on ``--grpc_web_port`` (9090), which KFP's UI speaks to upstream's
``metadata-envoy-service`` (an Envoy proxy translating it to gRPC): the same calls, framed as
gRPC-Web (binary or base64 text), so the UI's artifact and execution pages read the same store.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.server
import logging
import signal
import struct
import threading
from concurrent import futures

import grpc
from ml_metadata.metadata_store.pywrap.metadata_store_extension import metadata_store as cc
from ml_metadata.proto import metadata_store_pb2, metadata_store_service_pb2

SERVICE = "ml_metadata.MetadataStoreService"
# absl's status codes are gRPC's; these say the connection, not the request, failed.
UNAVAILABLE, INTERNAL = 14, 13
LOST = ("gone away", "Lost connection", "Can't connect", "connection")

log = logging.getLogger("mlmd")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpc_port", type=int, default=8080)
    p.add_argument("--mysql_config_host", default="")
    p.add_argument("--mysql_config_port", type=int, default=3306)
    p.add_argument("--mysql_config_database", default="metadb")
    p.add_argument("--mysql_config_user", default="root")
    p.add_argument("--mysql_config_password", default="")
    p.add_argument("--sqlite_filename_uri", default="", help="a SQLite file instead of MySQL (tests)")
    p.add_argument("--enable_database_upgrade", default="false")
    p.add_argument("--grpc_channel_arguments", default="", help="key=value,...: integers are passed to the server")
    p.add_argument("--grpc_web_port", type=int, default=9090, help="gRPC-Web for KFP's UI (0: none)")
    return p.parse_args(argv)


def connection_config(a: argparse.Namespace) -> metadata_store_pb2.ConnectionConfig:
    config = metadata_store_pb2.ConnectionConfig()
    if a.sqlite_filename_uri:
        config.sqlite.filename_uri = a.sqlite_filename_uri
        config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    else:
        m = config.mysql
        m.host, m.port, m.database, m.user, m.password = (
            a.mysql_config_host,
            a.mysql_config_port,
            a.mysql_config_database,
            a.mysql_config_user,
            a.mysql_config_password,
        )
        m.skip_db_creation = False
    return config


class Store:
    """The C++ store, one call at a time, made again when its connection is lost."""

    def __init__(self, config: metadata_store_pb2.ConnectionConfig, upgrade: bool) -> None:
        self._config = config.SerializeToString()
        options = metadata_store_pb2.MigrationOptions(enable_upgrade_migration=upgrade)
        self._migration = options.SerializeToString()
        self._lock = threading.Lock()
        self._store = self._open()

    def _open(self):
        return cc.CreateMetadataStore(self._config, self._migration)

    def call(self, method: str, request: bytes) -> tuple[bytes, str, int]:
        fn = getattr(cc, method)
        with self._lock:
            response, message, code = fn(self._store, request)
            text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
            if code in (UNAVAILABLE, INTERNAL) and any(s in text for s in LOST):
                log.warning("%s: the database connection is lost (%s); reconnecting", method, text)
                self._store = self._open()
                response, message, code = fn(self._store, request)
                text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        return response, text, code


def handler(store: Store) -> grpc.GenericRpcHandler:
    service = metadata_store_service_pb2.DESCRIPTOR.services_by_name["MetadataStoreService"]

    def unary(method: str):
        def serve(request: bytes, context: grpc.ServicerContext) -> bytes:
            if not hasattr(cc, method):
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not in ml-metadata's C++ store")
            try:
                response, message, code = store.call(method, request)
            except Exception as exc:  # the store could not be made again: the database is down
                log.error("%s: %s", method, exc)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the metadata database is unreachable: {exc}")
            if code != 0:
                context.abort(_status(code), message)
            return response

        # Bytes in, bytes out: the C++ store parses and serializes.
        return grpc.unary_unary_rpc_method_handler(serve)

    return grpc.method_handlers_generic_handler(SERVICE, {m.name: unary(m.name) for m in service.methods})


# A gRPC-Web message frame: a flag byte (0x80: trailers) and the length, big-endian.
_FRAME = struct.Struct(">BI")
_TRAILERS = 0x80
_MAX_REQUEST = 64 << 20


def grpc_web(store: Store, path: str, content_type: str, body: bytes) -> tuple[bytes, str]:
    """One gRPC-Web call (``POST /ml_metadata.MetadataStoreService/<Method>``): the response body and its content type.

    The status travels in a trailer frame, as the gRPC-Web protocol has it; ``-text`` content
    types are base64 both ways.
    """
    text = content_type.startswith("application/grpc-web-text")
    if text:
        body = base64.b64decode(body)
    service, _, method = path.lstrip("/").partition("/")
    code, message, response = 12, f"no method {path}", b""  # UNIMPLEMENTED
    if service == SERVICE and method.isidentifier() and hasattr(cc, method):
        if len(body) < _FRAME.size:
            code, message = 3, "the request has no gRPC-Web message frame"  # INVALID_ARGUMENT
        else:
            _, length = _FRAME.unpack_from(body)
            try:
                response, message, code = store.call(method, body[_FRAME.size : _FRAME.size + length])
            except Exception as exc:  # as the gRPC handler says it
                response, message, code = b"", f"the metadata database is unreachable: {exc}", UNAVAILABLE
    out = b"" if code != 0 else _FRAME.pack(0, len(response)) + response
    trailer = f"grpc-status:{code}\r\ngrpc-message:{message.replace(chr(13), ' ').replace(chr(10), ' ')}\r\n".encode()
    out += _FRAME.pack(_TRAILERS, len(trailer)) + trailer
    kind = "application/grpc-web-text+proto" if text else "application/grpc-web+proto"
    return (base64.b64encode(out) if text else out), kind


def grpc_web_server(store: Store, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP/1.1 server of :func:`grpc_web` calls (with the CORS answers a browser asks for)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _cors(self) -> None:
            self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin") or "*")
            self.send_header("Access-Control-Allow-Headers", "content-type,x-grpc-web,x-user-agent,grpc-timeout")
            self.send_header("Access-Control-Expose-Headers", "grpc-status,grpc-message")

        def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(204)
            self._cors()
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= _MAX_REQUEST:
                self.send_error(413)
                return
            body, kind = grpc_web(store, self.path, self.headers.get("Content-Type", ""), self.rfile.read(length))
            self.send_response(200)
            self._cors()
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("grpc-web: " + fmt, *args)

    return http.server.ThreadingHTTPServer(("", port), Handler)


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _channel_options(text: str) -> list[tuple[str, int | str]]:
    options = []
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options.append((key.strip(), int(value) if value.strip().lstrip("-").isdigit() else value.strip()))
    return options


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse(argv)
    store = Store(connection_config(a), a.enable_database_upgrade.lower() == "true")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_channel_options(a.grpc_channel_arguments))
    server.add_generic_rpc_handlers((handler(store),))
    server.add_insecure_port(f"[::]:{a.grpc_port}")
    server.start()
    where = a.sqlite_filename_uri or f"mysql://{a.mysql_config_host}:{a.mysql_config_port}/{a.mysql_config_database}"
    log.info("MetadataStoreService on :%d, store %s", a.grpc_port, where)
    web = grpc_web_server(store, a.grpc_web_port) if a.grpc_web_port else None
    if web is not None:
        threading.Thread(target=web.serve_forever, name="grpc-web", daemon=True).start()
        log.info("gRPC-Web (KFP's UI) on :%d", a.grpc_web_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    if web is not None:
        web.shutdown()
    server.stop(5).wait()


if __name__ == "__main__":
    main()
