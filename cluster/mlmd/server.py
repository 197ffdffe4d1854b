"""ML Metadata's gRPC service over MLMD's own C++ store (PyPI's ``ml-metadata``).

No package ships upstream's ``metadata_store_server`` binary; ``ml-metadata``'s wheel carries the
same C++ ``MetadataStore`` it wraps, which takes each request by its RPC method's name, serialized.
This server forwards every ``ml_metadata.MetadataStoreService`` call to it unchanged (bytes in,
bytes out) and answers MLMD's own status code as the gRPC status, so KFP's Go client (driver,
launcher, API server) sees what it would from upstream's server. It takes upstream's flags, so
KFP's ``metadata-grpc-deployment`` runs it with its own arguments.

The store has one database connection; calls are serialized on it. A call that finds the
connection gone (the database restarted) is retried once on a new store.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop(5).wait()


if __name__ == "__main__":
    main()
