"""imgpipe.data.sources: which schemes, hosts and redirects a source may use (loopback only)."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imgpipe.data.sources import (
    SOURCE_LOCAL_ENV,
    SOURCE_NETWORKS_ENV,
    SourcePolicy,
    SourceRefused,
    check_redirect,
    peer_checked_session,
)
from tests import serving
from tests.helpers import forbid_metadata_connections

POD = SourcePolicy.from_env({})
METADATA_URL = "http://169.254.169.254/latest/meta-data/"
# Metadata addresses as an address, as IPv6 forms that lead to it, and AWS's IPv6 one.
METADATA_ADDRESSES = [
    "169.254.169.254",
    "169.254.0.1",
    "fe80::1",
    "fe80::1%eth0",
    "fd00:ec2::254",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
]
# The pipeline's policy with loopback listed in IMGPIPE_SOURCE_NETWORKS: the test servers are
# reachable, so only the link-local rule can refuse what the tests send there.
POLICIES = {
    "operator": SourcePolicy.trusted,
    "pipeline": lambda: SourcePolicy.from_env({SOURCE_NETWORKS_ENV: "127.0.0.0/8"}),
}


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # cloud metadata
        "127.0.0.1",
        "10.1.2.3",
        "100.64.0.1",  # carrier-grade NAT, not "private" to ipaddress but not global either
        "224.0.0.1",  # multicast passes is_global
        "0.0.0.0",
        "::1",
        "fe80::1%eth0",
        "fd00::1",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    ],
)
def test_the_pod_policy_refuses_internal_addresses(address: str) -> None:
    with pytest.raises(SourceRefused, match=SOURCE_NETWORKS_ENV):
        POD.check_address(address, "test")


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_the_pod_policy_allows_global_addresses(address: str) -> None:
    POD.check_address(address, "test")


def test_listed_networks_are_allowed_also_in_mapped_form() -> None:
    policy = SourcePolicy.from_env({SOURCE_NETWORKS_ENV: "127.0.0.1/32, fd00::/8"})
    assert policy.allowed_networks == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("fd00::/8"))
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "fd00::5"):
        policy.check_address(address, "test")
    with pytest.raises(SourceRefused):
        policy.check_address("127.0.0.2", "test")


def test_environment_values_are_checked() -> None:
    with pytest.raises(ValueError, match=f"{SOURCE_NETWORKS_ENV} must be comma-separated CIDR.*'10.0.0.0/33'"):
        SourcePolicy.from_env({SOURCE_NETWORKS_ENV: "10.0.0.0/33"})
    with pytest.raises(ValueError, match=f"{SOURCE_LOCAL_ENV}='maybe' must be 1"):
        SourcePolicy.from_env({SOURCE_LOCAL_ENV: "maybe"})
    assert SourcePolicy.from_env({SOURCE_LOCAL_ENV: "1"}).allow_local
    with pytest.raises(ValueError, match="remote schemes are"):
        SourcePolicy(schemes={"ftp"})


def test_schemes_under_each_policy() -> None:
    trusted = SourcePolicy.trusted()
    for uri in ("http://h.example/a.tar", "https://h.example/a.tar", "s3://b/k", "file:///data/a.tar", "./dir"):
        trusted.check_source(uri, pinned=False)
    POD.check_source("https://h.example/a.tar", pinned=False)
    POD.check_source("s3://b/k", pinned=False)
    POD.check_source("http://h.example/a.tar", pinned=True)
    with pytest.raises(SourceRefused, match="needs a sha256 pin"):
        POD.check_source("http://h.example/a.tar", pinned=False)
    with pytest.raises(SourceRefused, match="unsupported source"):
        trusted.check_source("ftp://h.example/a.tar", pinned=True)


def test_https_to_http_redirects_need_a_pin_even_for_the_operator() -> None:
    trusted = SourcePolicy.trusted()
    with pytest.raises(SourceRefused, match="redirect 2 .*downgrades https to http"):
        check_redirect(trusted, "https://a.example/x", "http://b.example/y", pinned=False, hop=2)
    # Allowed hops are resolved too (link-local is refused to the operator as well): an
    # address keeps this test off DNS.
    check_redirect(trusted, "https://a.example/x", "http://127.0.0.1/y", pinned=True, hop=2)
    with pytest.raises(SourceRefused, match="may only lead to http"):
        check_redirect(trusted, "https://a.example/x", "s3://bucket/key", pinned=True, hop=1)


# ------------------------------------------------------------------ link-local (cloud metadata)


@pytest.fixture
def no_metadata(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Connections to metadata addresses that were tried (each one failed the test instead)."""
    return forbid_metadata_connections(monkeypatch)


@pytest.fixture
def metadata_redirector() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 that answers every GET with a 302 to the metadata service."""

    log: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            log.append(self.path)
            self.send_response(302)
            self.send_header("Location", METADATA_URL)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = serving.start(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        serving.stop(server, thread)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("address", METADATA_ADDRESSES)
def test_no_policy_reaches_a_link_local_address(policy: str, address: str) -> None:
    with pytest.raises(SourceRefused, match=r"^test reaches \S+( \(which leads to 169\.254\.\S+\))?, a link-local address"):
        POLICIES[policy]().check_address(address, "test")


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "192.168.1.5", "fd00::1", "8.8.8.8"])
def test_the_operator_still_reaches_loopback_and_private_addresses(address: str) -> None:
    SourcePolicy.trusted().check_address(address, "test")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("uri", ["http://[fe80::1]/x", "http://[fd00:ec2::254]/", METADATA_URL, "https://169.254.169.254/x"])
def test_a_link_local_literal_is_refused_as_a_source(policy: str, uri: str, no_metadata: list) -> None:
    with pytest.raises(SourceRefused, match=rf"^source {re.escape(uri)} reaches .*, a link-local address") as info:
        POLICIES[policy]().check_source(uri, pinned=False)
    assert "\n" not in str(info.value), "one line"
    assert no_metadata == []


@pytest.mark.parametrize("policy", POLICIES)
def test_a_host_name_resolving_to_link_local_is_refused_before_connecting(policy: str, monkeypatch: pytest.MonkeyPatch, no_metadata: list) -> None:
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return real("169.254.169.254" if host == "metadata.example" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    POLICIES[policy]().check_source("https://metadata.example/x", pinned=False)  # a name: no verdict yet
    with pytest.raises(SourceRefused, match=r"https://metadata\.example/x reaches 169\.254\.169\.254, a link-local"):
        POLICIES[policy]().check_host("https://metadata.example/x")
    assert no_metadata == []


@pytest.mark.parametrize("policy", POLICIES)
def test_a_redirect_to_the_metadata_service_is_refused_naming_its_target(
    policy: str, metadata_redirector: tuple[str, list[str]], no_metadata: list
) -> None:
    base, log = metadata_redirector
    chosen = POLICIES[policy]()
    with peer_checked_session(chosen) as session:
        resp = session.get(base + "/archive.tar.gz", allow_redirects=False, timeout=5)
    assert resp.status_code == 302 and resp.headers["Location"] == METADATA_URL
    with pytest.raises(
        SourceRefused, match=rf"^redirect 1 from {re.escape(base)}/archive\.tar\.gz to {re.escape(METADATA_URL)} refused: .*, a link-local address"
    ):
        check_redirect(chosen, base + "/archive.tar.gz", resp.headers["Location"], pinned=True, hop=1)
    assert log == ["/archive.tar.gz"] and no_metadata == []


def test_the_peer_check_refuses_a_link_local_peer_under_the_operators_policy(
    metadata_redirector: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name that passed the lookup but whose connection landed on a link-local address (DNS
    # rebinding): the socket reports its peer as 169.254.169.254; the request must never go out.
    base, log = metadata_redirector
    port = int(base.rsplit(":", 1)[1])
    real = socket.socket.getpeername

    def landed_on_metadata(sock: socket.socket):  # noqa: ANN202
        peer = real(sock)
        return ("169.254.169.254", 80) if tuple(peer[:2]) == ("127.0.0.1", port) else peer

    monkeypatch.setattr(socket.socket, "getpeername", landed_on_metadata)
    with (
        peer_checked_session(SourcePolicy.trusted()) as session,
        pytest.raises(SourceRefused, match=r"the connection to 127\.0\.0\.1 reaches 169\.254\.169\.254, a link-local"),
    ):
        session.get(base + "/x", allow_redirects=False, timeout=5)
    assert log == []


def test_the_allow_list_cannot_reallow_link_local_addresses() -> None:
    for listed in ("169.254.169.254/32", "169.254.0.0/16", "fe80::/64", "fd00:ec2::254/128"):
        with pytest.raises(ValueError, match=rf"allowed network {re.escape(listed)} \({SOURCE_NETWORKS_ENV}\) lies inside link-local"):
            SourcePolicy.from_env({SOURCE_NETWORKS_ENV: listed})
    # Wider networks are accepted, and everything in them but the link-local part is reachable.
    wide = SourcePolicy.from_env({SOURCE_NETWORKS_ENV: "0.0.0.0/0, ::/0, fd00::/8, 169.0.0.0/8"})
    for address in ("10.0.0.1", "fd00::5", "169.1.2.3"):
        wide.check_address(address, "test")
    for address in METADATA_ADDRESSES:
        with pytest.raises(SourceRefused, match="a link-local address.*cannot allow it"):
            wide.check_address(address, "test")
