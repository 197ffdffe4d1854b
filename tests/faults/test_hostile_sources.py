"""Hostile sources (issue 48): URI list entries that would end the step or leak a credential.

A real HTTP server on 127.0.0.1 serves the images, the bad redirects and (for the
credentials test) images only to a request with the right Basic auth and signature. The
download and clean steps run as library calls with local ``file://`` destinations; nothing
here deletes anything outside the test's own directory.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.report.steps import build_report
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from tests import serving
from tests.imagefactory import jpeg

pytestmark = pytest.mark.quick

FAST = DownloadConfig(retries=0, backoff_s=0.0, timeout_s=5.0, fetch_workers=4)
USER, PASSWORD = "reader", "imgpipe-list-password-93c1"
SIGNATURE, CREDENTIAL, TOKEN = "imgpipe-list-signature-4d7e", "AKIAIMGPIPELIST0815", "imgpipe-list-token-a2b9"
SECRETS = (PASSWORD, SIGNATURE, CREDENTIAL, TOKEN)
QUERY = f"X-Amz-Credential={CREDENTIAL}%2F20250101%2Fus-east-1&X-Amz-Signature={SIGNATURE}&Signature={SIGNATURE}&token={TOKEN}"


class _Site:
    """Images under ``/img/``, the same behind Basic auth and a signature under ``/private/``, and redirects that cannot be followed."""

    REDIRECTS = {
        "/loop.jpg": (302, "/loop.jpg"),
        "/ping.jpg": (302, "/pong.jpg"),
        "/pong.jpg": (307, "/ping.jpg"),
        "/no-location.jpg": (302, None),
        "/bad-location.jpg": (301, "http://[bad"),
        "/bad-port.jpg": (301, "http://example.com:99999/a.jpg"),
        "/moved/dog-9.jpg": (302, "/img/dog-9.jpg"),
    }

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                if url.path in site.REDIRECTS:
                    status, location = site.REDIRECTS[url.path]
                    self.send_response(status)
                    if location is not None:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = url.path
                if path.startswith("/private/"):
                    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                    if self.headers.get("Authorization") != basic or parse_qs(url.query).get("X-Amz-Signature") != [SIGNATURE]:
                        self.send_error(403)
                        return
                    path = "/img/" + path.removeprefix("/private/")
                body = site.bodies.get(path)
                if body is None:
                    self.send_error(404)
                    return
                serving.answer(self, 200, body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        for c, label in enumerate(("cat", "dog")):
            for i in range(10):
                # Distinct seeds (hash() of a str changes from process to process: two could collide).
                self.bodies[f"/img/{label}-{i}.jpg"] = jpeg(64, 48, seed=100 * c + i)


@pytest.fixture
def site(monkeypatch) -> Iterator[_Site]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = _Site()
    thread = serving.start(s.server)
    yield s
    serving.stop(s.server, thread)


def _rows(prefix: str) -> dict[str, dict]:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["path", "label"]) for u in contract.data_files(prefix)]
    return {r["path"]: r for r in pa.concat_tables(tables).to_pylist()} if tables else {}


def _rejects(prefix: str) -> dict[str, tuple[str, str]]:
    return {r["path"]: (r["reason"], r["detail"]) for r in contract.read_rejects(prefix).to_pylist()}


def _write_list(tmp_path: Path, lines: list[str]) -> str:
    listed = tmp_path / "train.csv"
    listed.write_text("uri,label\n" + "\n".join(lines) + "\n")
    return str(listed)


def test_each_bad_entry_or_redirect_is_one_reject_and_the_step_completes(site, tmp_path):
    base = f"http://{site.host}"
    good = [f"{base}/img/{label}-{i}.jpg,{label}" for label in ("cat", "dog") for i in range(9)]
    bad = {  # line -> (entry, path of its reject, reason)
        "malformed ipv6": ("http://[::1/x.jpg", "train.csv#line-{n}", "bad_row"),
        "port out of range": ("http://example.com:99999/a.jpg", "train.csv#line-{n}", "bad_row"),
        "port not a number": ("http://127.0.0.1:http/a.jpg", "train.csv#line-{n}", "bad_row"),
        "no host": ("http:///nohost.jpg", "train.csv#line-{n}", "bad_row"),
        "label too long": ("http://" + "a" * 64 + ".example/x.jpg", "train.csv#line-{n}", "bad_row"),
        "blank in host": ("http://exa mple.com/x.jpg", "train.csv#line-{n}", "bad_row"),
        "redirect loop": (f"{base}/loop.jpg", f"{site.host}/loop.jpg", "redirect_refused"),
        "two-hop loop": (f"{base}/ping.jpg", f"{site.host}/ping.jpg", "redirect_refused"),
        "302 without Location": (f"{base}/no-location.jpg", f"{site.host}/no-location.jpg", "redirect_refused"),
        "Location http://[bad": (f"{base}/bad-location.jpg", f"{site.host}/bad-location.jpg", "redirect_refused"),
        "Location with a bad port": (f"{base}/bad-port.jpg", f"{site.host}/bad-port.jpg", "redirect_refused"),
        "not there": (f"{base}/img/none.jpg", f"{site.host}/img/none.jpg", "http_error"),
        "closed port": ("http://127.0.0.1:1/a.jpg", "127.0.0.1:1/a.jpg", "fetch_failed"),
    }
    lines = list(good)
    lines.insert(3, f"{base}/moved/dog-9.jpg,dog")  # a redirect that is fine
    expected: dict[str, str] = {}
    for entry, path, reason in bad.values():
        lines.append(f'"{entry}",cat')
        expected[path.format(n=len(lines) + 1)] = reason  # +1: the header line
    report = download(_write_list(tmp_path, lines), str(tmp_path / "out" / "download"), FAST)

    kept, refused = _rows(report.dest), _rejects(report.dest)
    assert set(kept) == {f"{site.host}/img/{label}-{i}.jpg" for label in ("cat", "dog") for i in range(9)} | {f"{site.host}/moved/dog-9.jpg"}
    assert {p: r for p, (r, _) in refused.items()} == expected
    details = {p: d for p, (_, d) in refused.items()}
    assert "more than 5 redirects" in details[f"{site.host}/loop.jpg"]
    assert "without a Location" in details[f"{site.host}/no-location.jpg"]
    assert "Invalid IPv6 URL" in details[f"{site.host}/bad-location.jpg"]
    assert all(d.startswith(f"line {p.split('-')[-1]}: not a usable URL") for p, d in details.items() if p.startswith("train.csv#"))
    assert report.inputs == len(lines) == report.outputs + report.rejected == len(kept) + len(refused)


def test_no_credential_of_a_list_entry_is_persisted_shown_or_logged(site, tmp_path, capfd, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)  # urllib3's request lines (imgpipe -v) included
    for name in ("urllib3", "urllib3.connectionpool"):  # whatever an earlier test in this worker set on them
        caplog.set_level(logging.DEBUG, logger=name)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
    private = [f"http://{USER}:{PASSWORD}@{site.host}/private/{label}-{i}.jpg?{QUERY},{label}" for label in ("cat", "dog") for i in range(10)]
    failing = [
        f"http://{USER}:{PASSWORD}@{site.host}/private/none.jpg?{QUERY},cat",  # 404
        f"http://{USER}:{PASSWORD}@127.0.0.1:1/a.jpg?{QUERY},cat",  # connection refused: urllib3 names the URL
        f"http://{USER}:{PASSWORD}@{site.host}/loop.jpg?{QUERY},cat",  # a redirect loop
        f'"http://{USER}:{PASSWORD}@[::1/x.jpg?{QUERY}",cat',  # does not parse
        f"http://{USER}:{PASSWORD}@{site.host}:99999/a.jpg?{QUERY},cat",
    ]
    listed = _write_list(tmp_path, private + failing)
    out = tmp_path / "out"
    downloaded = download(listed, str(out / "download"), FAST)
    cleaned = clean(downloaded.dest, str(out / "clean"), CleanConfig(workers=1))
    for step in ("download", "clean"):  # the pages `imgpipe report` and the components write
        shown = build_report(str(out / step))
        (tmp_path / "pages").mkdir(exist_ok=True)
        (tmp_path / "pages" / f"{step}.html").write_text(shown.html())
        (tmp_path / "pages" / f"{step}.txt").write_text(shown.text())

    kept = _rows(downloaded.dest)
    assert set(kept) == {f"{site.host}/private/{label}-{i}.jpg" for label in ("cat", "dog") for i in range(10)}, "the images were fetched"
    assert {r for r, _ in _rejects(downloaded.dest).values()} == {"http_error", "fetch_failed", "redirect_refused", "bad_row"}
    assert cleaned.outputs == 20
    files = [p for p in [*out.rglob("*"), *(tmp_path / "pages").iterdir()] if p.is_file()]
    assert {p.suffix for p in files} >= {".parquet", ".json", ".html", ".yaml", ".txt"}
    logs = capfd.readouterr()
    seen = {str(p): p.read_bytes() for p in files}
    seen["captured output"] = (logs.out + logs.err).encode()
    seen["captured log records"] = caplog.text.encode()
    assert "GET /private/" in caplog.text, "urllib3's request lines were captured"
    hits = [f"{secret} in {where}" for where, blob in seen.items() for secret in SECRETS if secret.encode() in blob]
    assert not hits, hits
