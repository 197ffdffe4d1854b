"""imgpipe.sources: which schemes, hosts and redirects a source may use (no network needed)."""

from __future__ import annotations

import ipaddress

import pytest

from imgpipe.sources import (
    SOURCE_LOCAL_ENV,
    SOURCE_NETWORKS_ENV,
    SourcePolicy,
    SourceRefused,
    check_redirect,
)

POD = SourcePolicy.from_env({})


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
    assert not trusted.restricts_addresses and POD.restricts_addresses


def test_https_to_http_redirects_need_a_pin_even_for_the_operator() -> None:
    trusted = SourcePolicy.trusted()
    with pytest.raises(SourceRefused, match="redirect 2 .*downgrades https to http"):
        check_redirect(trusted, "https://a.example/x", "http://b.example/y", pinned=False, hop=2)
    check_redirect(trusted, "https://a.example/x", "http://b.example/y", pinned=True, hop=2)
    with pytest.raises(SourceRefused, match="may only lead to http"):
        check_redirect(trusted, "https://a.example/x", "s3://bucket/key", pinned=True, hop=1)
