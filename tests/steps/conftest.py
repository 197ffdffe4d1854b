"""Shared fixtures of the step tests: a scripted HTTP server on 127.0.0.1 for the download step's sources, clean's and train's inputs."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.train.config import TrainConfig
from tests import imagefactory as f
from tests import serving

# --------------------------------------------------------------------------- local HTTP server


@dataclass
class Route:
    """How the test server answers one path."""

    body: bytes
    fail_first: int = 0  # answer 503 to this many requests first
    drop_first: int = 0  # then cut this many responses off halfway through the body
    ranges: bool = True  # honour Range with 206 (False: always send the whole body)
    length: bool = True  # send Content-Length (False: the body ends when the connection closes)
    redirect: str = ""  # answer 302 to this Location instead
    seen_ranges: list[str | None] = field(default_factory=list)


@dataclass
class HttpServer:
    base: str
    routes: dict[str, Route]
    log: list[str]


def _handler(routes: dict[str, Route], log: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: the server closes the connection after each response, so writing less
        # than Content-Length is seen by the client as a connection dropped mid-body.
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            log.append(self.path)
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route.seen_ranges.append(self.headers.get("Range"))
            hit = len(route.seen_ranges)
            if route.redirect:
                self.send_response(302)
                self.send_header("Location", route.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if hit <= route.fail_first:
                self.send_error(503)
                return
            start = 0
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if match and route.ranges:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
            else:
                self.send_response(200)
            body = route.body[start:]
            if route.length:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            if hit <= route.fail_first + route.drop_first:
                body = body[: len(body) // 2]
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpServer]:
    """A real HTTP server on 127.0.0.1 in a thread; tests register routes on it."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    routes: dict[str, Route] = {}
    log: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(routes, log))
    thread = serving.start(server)
    try:
        yield HttpServer(f"http://127.0.0.1:{server.server_address[1]}", routes, log)
    finally:
        serving.stop(server, thread)


# --------------------------------------------------------------------------- clean's inputs and outputs

CLASSES = ["Bengal", "Siamese", "beagle"]


def good_members(per_class: int = 10) -> dict[str, bytes]:
    return {
        f"images/{name}_{i}.jpg": f.jpeg(80 + 4 * i, 64 + 2 * c, seed=100 * c + i) for c, name in enumerate(CLASSES) for i in range(1, per_class + 1)
    }


def read_output(prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in contract.data_files(prefix)])


# --------------------------------------------------------------------------- train's config and data
# torch and the train step are imported where they are used: the other steps' tests need neither.

COUNTS = {"train": 32, "val": 8, "test": 8}


def tiny(**overrides) -> TrainConfig:
    """A fast, fully specified config: tiny_cnn, batches of 8, no worker processes."""
    values = {
        "model": "tiny_cnn",
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_fraction": 0.2,
        "num_workers": 0,
        "shuffle_buffer": 16,
        "device": "cpu",
        # Every epoch, as the test asks: its tiny sets reach a perfect validation in an epoch
        # or two, where early stopping (the recipes' patience) would end the run.
        "patience": 0,
        # A checkpoint after every epoch, as the resume tests expect (the default waits a minute).
        "checkpoint_every_s": 0,
        **overrides,
    }
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.train.test_loader import write_resize_output

    root = tmp_path_factory.mktemp("train-data")
    return write_resize_output("file://" + str(root / "resize"), counts=COUNTS, size=32, row_group_rows=4)


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def train_preempted_at(epoch: int, data: str, out: str, cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs ``train`` until the node is preempted as ``epoch`` starts (a KeyboardInterrupt), as a killed pod stops."""
    from imgpipe.steps import train as train_mod
    from imgpipe.steps.train import train

    real = train_mod.train_one_epoch

    def preempted(run, at):
        if at == epoch:
            raise KeyboardInterrupt("node preempted")
        return real(run, at)

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "train_one_epoch", preempted)
        with pytest.raises(KeyboardInterrupt):
            train(data, out, cfg)
