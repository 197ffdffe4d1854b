"""Where the download step may fetch from: a policy on source URIs and the hosts they reach.

A source URI typed by the operator (``imgpipe download``, library callers) is trusted
(:meth:`SourcePolicy.trusted`). One that arrives as a pipeline parameter is not: whoever
can start a run could otherwise make the pod read its own files, or reach the cloud
metadata service (``169.254.169.254``), the cluster's services or the object store's
internal endpoint, directly or through an HTTP redirect. The kfp component therefore
uses :meth:`SourcePolicy.from_env`: https and s3, plain http only with a sha256 pin,
no local files or directories unless :data:`SOURCE_LOCAL_ENV` says so, and only
globally routable addresses unless :data:`SOURCE_NETWORKS_ENV` lists more.

Link-local addresses (:data:`LINK_LOCAL_NETWORKS`) are refused under every policy, the
operator's included, and no allow-list re-allows them: that is where clouds serve
instance metadata and its credentials (``169.254.169.254``, AWS's ``fd00:ec2::254``), and
no image archive lives there. An operator's ``imgpipe download https://host/x`` that
a compromised host redirects to ``http://169.254.169.254/latest/meta-data/`` would
otherwise copy the node's credentials into the dataset.

Addresses are checked twice: every address a host name resolves to, before connecting,
and the address the socket actually connected to, before the request is sent (a name
that resolves differently the second time, DNS rebinding, is caught there).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import requests
import urllib3

from imgpipe import storage
from imgpipe.config_flags import env_flag
from imgpipe.readpolicy import SOURCE_LOCAL_ENV

__all__ = [
    "is_http",
    "LINK_LOCAL_NETWORKS",
    "SOURCE_LOCAL_ENV",
    "SOURCE_NETWORKS_ENV",
    "REMOTE_SCHEMES",
    "SourcePolicy",
    "SourceRefused",
    "check_redirect",
    "peer_checked_session",
]

SOURCE_NETWORKS_ENV = "IMGPIPE_SOURCE_NETWORKS"
REMOTE_SCHEMES = frozenset({"http", "https", "s3"})
# Schemes an HTTP redirect may lead to; requests could not fetch any other, but a
# Location: file:///etc/passwd deserves a clear refusal, not an InvalidSchema.
_HTTP_SCHEMES = frozenset({"http", "https"})
# Embedded IPv4 addresses: IPv6 forms that a gateway turns into an IPv4 connection.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ANY_ADDRESS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)
# Never reachable, whatever the policy: the link-local ranges, where AWS, GCP, Azure and
# OCI serve instance metadata (169.254.169.254), and AWS's IPv6 metadata address, which
# sits in fd00::/8 (unique local) rather than fe80::/10 (docs.aws.amazon.com/AWSEC2/latest/
# UserGuide/instancedata-data-retrieval.html).
LINK_LOCAL_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)


class SourceRefused(ValueError):
    """A source URI, redirect or address that the :class:`SourcePolicy` does not allow."""


@dataclass(frozen=True)
class SourcePolicy:
    """What sources the download step may read.

    Attributes:
        schemes: Remote schemes allowed (a subset of :data:`REMOTE_SCHEMES`).
        pin_required: Schemes of ``schemes`` allowed only with a sha256 pin: plain
            http can be altered in transit, a pin makes that harmless.
        allow_local: Whether ``file://`` URIs, plain paths and directories are allowed.
        allowed_networks: Networks reachable besides globally routable addresses
            (``ipaddress`` ``is_global``); ``0.0.0.0/0`` and ``::/0`` allow any.
    """

    schemes: frozenset[str] = REMOTE_SCHEMES
    pin_required: frozenset[str] = frozenset()
    allow_local: bool = True
    allowed_networks: tuple[IPNetwork, ...] = _ANY_ADDRESS

    def __post_init__(self) -> None:
        for name in ("schemes", "pin_required"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"SourcePolicy.{name} must be a collection of scheme names, got {value!r}")
            object.__setattr__(self, name, frozenset(v.lower() for v in value))
        unknown = sorted(self.schemes - REMOTE_SCHEMES)
        if unknown:
            raise ValueError(
                f"SourcePolicy.schemes has {unknown}; remote schemes are {sorted(REMOTE_SCHEMES)} (local files are allowed with allow_local=True)"
            )
        if not self.pin_required <= self.schemes:
            raise ValueError("SourcePolicy.pin_required must be a subset of SourcePolicy.schemes")
        if not isinstance(self.allow_local, bool):
            raise TypeError(f"SourcePolicy.allow_local must be a bool, got {self.allow_local!r}")
        networks = tuple(self.allowed_networks)
        if not all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) for n in networks):
            raise TypeError("SourcePolicy.allowed_networks must hold ipaddress.ip_network objects")
        _check_not_link_local(networks)
        object.__setattr__(self, "allowed_networks", networks)

    @classmethod
    def trusted(cls) -> SourcePolicy:
        """Everything but link-local addresses: for sources the operator typed (the CLI, library callers).

        Loopback and private addresses stay allowed (a local mirror, ``imgpipe run``'s
        servers); link-local ones never are (see the module docstring).
        """
        return cls()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SourcePolicy:
        """The policy for sources that arrive as pipeline parameters (the kfp component).

        https and s3; http only with a sha256 pin; local files and directories only
        when :data:`SOURCE_LOCAL_ENV` is ``1``; globally routable addresses plus the
        comma-separated CIDR networks in :data:`SOURCE_NETWORKS_ENV`.

        Raises:
            ValueError: If either variable holds something unreadable.
        """
        env = os.environ if environ is None else environ
        return cls(
            schemes=REMOTE_SCHEMES,
            pin_required=frozenset({"http"}),
            allow_local=env_flag(env, SOURCE_LOCAL_ENV),
            allowed_networks=_env_networks(env, SOURCE_NETWORKS_ENV),
        )

    def check_source(self, uri: str, *, pinned: bool) -> None:
        """Refuses a source whose scheme (or locality) the policy does not allow.

        Raises:
            SourceRefused: With what to change to have it allowed.
        """
        scheme = urlparse(uri).scheme.lower()
        shown = storage.redact_uri(uri)
        if scheme in ("", "file"):
            if not self.allow_local:
                raise SourceRefused(
                    f"source {shown} is a local path, which this pipeline does not read: local files "
                    f"and directories need {SOURCE_LOCAL_ENV}=1 in the step's environment"
                )
            return
        if scheme not in REMOTE_SCHEMES:
            raise SourceRefused(f"unsupported source {shown!r}: use http(s)://, s3://, file:// or a local path")
        literal = _literal_address(urlparse(uri).hostname)
        if scheme in _HTTP_SCHEMES and literal is not None:
            # An address written in the URL needs no lookup: refuse it before any source is
            # fetched, and before the scheme or pin (the address is the graver matter).
            self.check_address(literal, f"source {shown}")
        if scheme not in self.schemes:
            raise SourceRefused(f"source {shown}: scheme {scheme!r} is not allowed here; use one of {sorted(self.schemes)}")
        if scheme in self.pin_required and not pinned:
            raise SourceRefused(
                f"source {shown}: plain {scheme} needs a sha256 pin (its bytes can be altered in transit); give the archive's sha256 or use https"
            )

    def check_host(self, url: str) -> None:
        """Refuses a URL whose host resolves to any address outside the policy.

        Runs under every policy: even the operator's may not reach a link-local address.

        Raises:
            SourceRefused: If an address is not allowed.
            ConnectionError: If the host name does not resolve (worth a retry).
        """
        parsed = urlparse(url)
        host = parsed.hostname
        if not host:
            raise SourceRefused(f"{storage.redact_uri(url)} names no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectionError(f"cannot resolve {host!r} of {storage.redact_uri(url)}: {exc}") from exc
        for info in infos:
            self.check_address(info[4][0], storage.redact_uri(url))

    def check_address(self, address: str, what: str) -> None:
        """Refuses an IP address (text, as a socket reports it) outside the policy.

        Raises:
            SourceRefused: Naming ``what`` and the address.
        """
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
        if _is_link_local(ip):
            embedded = _embedded_ipv4(ip)
            shown = f"{ip} (which leads to {embedded})" if embedded is not None else str(ip)
            raise SourceRefused(
                f"{what} reaches {shown}, a link-local address, where clouds serve instance metadata and "
                f"credentials (169.254.169.254, fd00:ec2::254): no download source may reach one, "
                f"under any policy, and {SOURCE_NETWORKS_ENV} cannot allow it"
            )
        if self._allows(ip):
            return
        raise SourceRefused(
            f"{what} reaches {ip}, which is not a globally routable address; sources may not reach "
            f"loopback, link-local (cloud metadata), private or reserved addresses. To allow it, add "
            f"its network to {SOURCE_NETWORKS_ENV} (comma-separated CIDRs)"
        )

    def _allows(self, ip: IPAddress) -> bool:
        candidates = [ip]
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            candidates = [embedded]  # judged by where it really leads
        return all(_is_public(c) or any(c in net for net in self.allowed_networks) for c in candidates)


def _is_link_local(ip: IPAddress) -> bool:
    """Whether ``ip``, or the IPv4 address an IPv6 form of it leads to, is in :data:`LINK_LOCAL_NETWORKS`."""
    candidates = [ip, _embedded_ipv4(ip)]
    return any(c is not None and c in net for c in candidates for net in LINK_LOCAL_NETWORKS)


def _literal_address(host: str | None) -> str | None:
    """``host`` if it is an IP address written out (``169.254.169.254``, ``fe80::1%eth0``)."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name; check_host resolves it before connecting
    return host


def _check_not_link_local(networks: tuple[IPNetwork, ...]) -> None:
    """Refuses an allow-list entry that lies inside a link-local range.

    A wider entry (``0.0.0.0/0``, ``fd00::/8``) is fine: the link-local part of it stays
    refused by :meth:`SourcePolicy.check_address`. One that holds nothing else can only be
    an attempt to reach the metadata service, so it is an error rather than a silent no-op.
    """
    for net in networks:
        for link_local in LINK_LOCAL_NETWORKS:
            if net.version == link_local.version and net.subnet_of(link_local):  # type: ignore[arg-type]
                raise ValueError(
                    f"allowed network {net} ({SOURCE_NETWORKS_ENV}) lies inside link-local {link_local}, "
                    "where clouds serve instance metadata and credentials; link-local addresses are "
                    "never reachable from a download, so remove it"
                )


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 IPv6 address leads to."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(ip: IPAddress) -> bool:
    # is_global alone lets multicast through (224/4 is not "private" to ipaddress).
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _env_networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{name} must be comma-separated CIDR networks such as 10.0.0.0/8,fd00::/8; {item.strip()!r}: {exc}") from None
    return tuple(networks)


def is_http(uri: str) -> bool:
    """Whether ``uri`` is fetched over HTTP(S) (every other source is read through :mod:`imgpipe.storage`)."""
    return urlparse(uri).scheme.lower() in _HTTP_SCHEMES


def check_redirect(policy: SourcePolicy, current: str, target: str, *, pinned: bool, hop: int) -> None:
    """Refuses an HTTP redirect from ``current`` to ``target`` (hop number ``hop``).

    Only http(s) targets are followed; https to http needs a pin whatever the policy
    (the operator asked for TLS); then the target is checked like a source.

    Raises:
        SourceRefused: Naming the hop.
        ConnectionError: If the target's host does not resolve.
    """
    where = f"redirect {hop} from {storage.redact_uri(current)} to {storage.redact_uri(target)}"
    scheme = urlparse(target).scheme.lower()
    if scheme not in _HTTP_SCHEMES:
        raise SourceRefused(f"{where} refused: a redirect may only lead to http(s), not {scheme!r}")
    if urlparse(current).scheme.lower() == "https" and scheme == "http" and not pinned:
        raise SourceRefused(f"{where} refused: it downgrades https to http and no sha256 pin was given")
    try:
        policy.check_source(target, pinned=pinned)
        policy.check_host(target)
    except SourceRefused as exc:
        raise SourceRefused(f"{where} refused: {exc}") from None


def peer_checked_session(policy: SourcePolicy) -> requests.Session:
    """A requests session that checks each new connection's peer address before using it.

    The check runs in ``connect()``, right after the TCP (and TLS) handshake and before
    the request is written, under every policy (link-local addresses are refused to all).
    Connections through a proxy are not checked: their peer is the proxy, which then
    decides what may be reached. The session never follows a redirect itself (callers follow
    them by hand, each hop checked by :func:`check_redirect`).
    """
    session = _NoRedirectSession()
    session.mount("http://", _PeerCheckedAdapter(policy.check_address))
    session.mount("https://", _PeerCheckedAdapter(policy.check_address))
    return session


class _NoRedirectSession(requests.Session):
    """A session for which no response is a redirect.

    requests prepares a redirect's next request (``Response.next``) even with
    ``allow_redirects=False``, and a ``Location`` that does not parse (``http://[bad``)
    then raises out of ``get``, before the caller sees the response it could reject.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


def _checked_connection(base: type, check: Callable[[str, str], None]) -> type:
    class Connection(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            super().connect()
            if getattr(self, "proxy", None):
                return
            try:
                peer = self.sock.getpeername()[0]
            except (AttributeError, OSError) as exc:
                self.close()
                # Fail closed: a connection whose peer cannot be read is not used.
                raise SourceRefused(f"cannot verify the address of {self.host}: {exc}") from exc
            try:
                check(peer, f"the connection to {self.host}")
            except SourceRefused:
                self.close()
                raise

    return Connection


class _PeerCheckedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connection pools make peer-checked connections."""

    def __init__(self, check: Callable[[str, str], None]) -> None:
        self._check = check
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)

        class HTTPPool(urllib3.HTTPConnectionPool):
            ConnectionCls = _checked_connection(urllib3.connection.HTTPConnection, self._check)

        class HTTPSPool(urllib3.HTTPSConnectionPool):
            ConnectionCls = _checked_connection(urllib3.connection.HTTPSConnection, self._check)

        self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}
