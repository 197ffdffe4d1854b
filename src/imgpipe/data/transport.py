"""HTTP for the download step: one URL streamed to a local file with retries, resumes and checked redirects, or fetched whole.

    digest, size = HttpSpooler(url, path, HttpSettings(), policy, pinned=False).run()
    data = fetch_url(session, url, settings, policy, max_bytes)   # one object of a URI list

Every request starts at the URL and follows redirects by hand, checking each hop against
the :class:`~imgpipe.data.sources.SourcePolicy` before connecting. Throttling (408, 429),
server errors and dropped connections are retried with exponential backoff (the server's
``Retry-After`` honoured); a refusal never is.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import requests
import urllib3
from tqdm import tqdm

from imgpipe import storage
from imgpipe.data.sources import SourcePolicy, check_redirect, peer_checked_session

__all__ = [
    "HttpSettings",
    "Transient",
    "TRANSIENT_ERRORS",
    "HttpSpooler",
    "open_response",
    "check_url",
    "RedirectFailed",
    "FetchFailed",
    "fetch_url",
    "retry_after",
    "byte_bar",
    "basename",
    "HTTP_ERROR",
    "FETCH_TIMEOUT",
    "FETCH_FAILED",
    "TOO_LARGE",
    "REFUSED",
    "REDIRECT_REFUSED",
]

_CHUNK = 1 << 20
_MAX_BACKOFF_S = 60.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
# Worth retrying: request timeout, rate limiting, and every server-side error. SourceRefused
# is a ValueError, deliberately outside this list: a refused redirect or address is refused
# again on every attempt, and retrying would only contact the redirecting server again.
_RETRY_STATUSES = frozenset({408, 429})
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError, IncompleteRead from raw reads
    ConnectionError,
    TimeoutError,
)
_HTTP_SCHEMES = ("http", "https")
# urllib3 logs each request line, query included (at DEBUG: `imgpipe -v`); a presigned
# URL's signature must not reach the log that way.
logging.getLogger("urllib3.connectionpool").addFilter(storage.RedactingFilter())


@dataclass(frozen=True)
class HttpSettings:
    """How hard to try: ``retries`` after failures without progress, each ``timeout_s``, backoff from ``backoff_s``; ``max_bytes`` per file."""

    retries: int = 5
    timeout_s: float = 60.0
    backoff_s: float = 1.0
    max_bytes: int = 32 << 30


def basename(uri: str) -> str:
    """The last path segment of a URI, for progress bars and messages."""
    return Path(urlparse(uri).path).name or uri


def byte_bar(label: str, total: int | None) -> tqdm:
    """A byte progress bar; ``disable=None`` turns it off when stderr is not a terminal (pods, CI logs)."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None)


class Transient(Exception):
    """A failed HTTP attempt worth retrying; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class HttpSpooler:
    """Streams one URL into a local file while hashing, retrying and resuming.

    After a dropped connection the next request asks for the missing tail with
    ``Range`` (guarded by ``If-Range`` so a changed file is not stitched to an old
    prefix); a server answering 200 instead of 206 makes the download restart.
    Each attempt starts at ``url`` and follows redirects itself, checking every hop
    against ``policy`` before connecting (a presigned target may have expired).
    """

    url: str
    path: Path
    cfg: HttpSettings
    policy: SourcePolicy
    pinned: bool
    final_url: str = ""
    have: int = 0
    total: int | None = None
    validator: str | None = None
    hasher: Any = field(default_factory=hashlib.sha256)

    def run(self) -> tuple[str, int]:
        failures = 0
        with (
            peer_checked_session(self.policy) as session,
            open(self.path, "wb") as fh,  # at rest: the downloaded source (data)
            byte_bar(f"fetch {basename(self.url)}", None) as bar,
        ):
            session.headers["User-Agent"] = "imgpipe-download"
            while True:
                before = self.have
                try:
                    self._attempt(session, fh, bar)
                    return self.hasher.hexdigest(), self.have
                except (Transient, *TRANSIENT_ERRORS) as exc:
                    # A connection that keeps dropping but delivers bytes still converges
                    # (the file is finite), so only failures without progress count.
                    failures = 0 if self.have > before else failures + 1
                    if failures > self.cfg.retries:
                        raise ConnectionError(
                            f"downloading {storage.redact_uri(self.url)} failed {failures} times in a row without "
                            f"progress (retries={self.cfg.retries}): {storage.redact_text(str(exc))}"
                        ) from None
                    time.sleep(self._delay(failures, exc))

    def _delay(self, failures: int, exc: BaseException) -> float:
        backoff = self.cfg.backoff_s * 2 ** max(failures - 1, 0)
        hint = exc.retry_after if isinstance(exc, Transient) else 0.0
        return min(max(backoff, hint), _MAX_BACKOFF_S)

    def _restart(self, fh: Any, bar: tqdm) -> None:
        fh.seek(0)
        fh.truncate()
        self.hasher = hashlib.sha256()
        self.have = 0
        bar.reset()

    def _headers(self) -> dict[str, str]:
        # identity: Range offsets count encoded bytes, and the digest is of the file as published.
        headers = {"Accept-Encoding": "identity"}
        if self.have:
            headers["Range"] = f"bytes={self.have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        return headers

    def _attempt(self, session: requests.Session, fh: Any, bar: tqdm) -> None:
        with self._open(session) as resp:
            if resp.status_code == 416 and self.have:
                if self._already_complete(resp):
                    return
                self._restart(fh, bar)
                raise Transient("server refused the resume range; restarting from byte 0")
            self._check_status(resp)
            self._position(resp, fh, bar)
            for chunk in resp.raw.stream(_CHUNK, decode_content=False):
                fh.write(chunk)
                self.hasher.update(chunk)
                self.have += len(chunk)
                bar.update(len(chunk))
                self._check_size(self.have)
        if self.total is not None and self.have != self.total:
            raise Transient(f"connection closed after {self.have} of {self.total} bytes")

    def _open(self, session: requests.Session) -> requests.Response:
        """The response at the end of the redirect chain from ``url``, body unread."""
        resp, self.final_url = open_response(
            session, self.url, self.policy, headers=self._headers(), timeout_s=self.cfg.timeout_s, pinned=self.pinned
        )
        return resp

    def _check_size(self, size: int) -> None:
        if size > self.cfg.max_bytes:
            raise ValueError(
                f"download source {storage.redact_uri(self.url)} is more than max_download_bytes="
                f"{self.cfg.max_bytes} bytes ({size} announced or received); raise "
                "max_download_bytes if it really is that large"
            )

    def _already_complete(self, resp: requests.Response) -> bool:
        # 416 to "bytes=N-" with "Content-Range: bytes */N": the previous attempt got everything.
        match = re.match(r"bytes \*/(\d+)", resp.headers.get("Content-Range", ""))
        return bool(match) and int(match.group(1)) == self.have

    def _check_status(self, resp: requests.Response) -> None:
        status = resp.status_code
        if status in (404, 410):
            raise FileNotFoundError(f"download source {storage.redact_uri(self.url)} not found (HTTP {status} {resp.reason})")
        if status in _RETRY_STATUSES or status >= 500:
            raise Transient(f"HTTP {status} {resp.reason}", retry_after(resp))
        if status not in (200, 206):
            raise ValueError(
                f"downloading {storage.redact_uri(self.url)} failed with HTTP {status} {resp.reason}; check the URL and that it is publicly readable"
            )

    def _position(self, resp: requests.Response, fh: Any, bar: tqdm) -> None:
        """Lines the local file up with what the response body continues from."""
        if resp.status_code == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != self.have:
                self._restart(fh, bar)
                raise Transient(f"server resumed at an unexpected range {resp.headers.get('Content-Range')!r}")
            self.total = int(match.group(2)) if match.group(2) != "*" else None
        else:
            if self.have:
                self._restart(fh, bar)  # the server ignored Range, or If-Range saw a new file
            length = resp.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
            etag = resp.headers.get("ETag", "")
            # Weak ETags cannot guard a byte range (RFC 9110 section 13.1.5).
            self.validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
        if self.total is not None:
            self._check_size(self.total)
        bar.total = self.total
        bar.refresh()


def retry_after(resp: requests.Response) -> float:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 0.0


def check_url(url: str) -> None:
    """Refuses a URL that cannot be fetched as written: one that does not parse, a port out of range, an http(s) URL without a usable host.

    Raises:
        ValueError: Saying what is wrong, without the URL (it may carry credentials).
    """
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises for a port past 65535 or one that is not a number
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535"
        raise ValueError(f"not a usable URL ({exc})") from None
    if parsed.scheme.lower() not in _HTTP_SCHEMES:
        return
    host = parsed.hostname
    if not host:
        raise ValueError("not a usable URL (it names no host)")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return  # an address written out
    except ValueError:
        pass
    try:
        host.encode("idna")  # what the resolver is asked: labels of 1 to 63 characters
    except UnicodeError:
        raise ValueError(f"not a usable URL (host {host[:80]!r} is not a valid host name)") from None
    if any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError(f"not a usable URL (host {host[:80]!r} holds blanks or control characters)")


class RedirectFailed(ValueError):
    """A redirect that cannot be followed: a loop or too many hops, no ``Location``, or a ``Location`` that is not a usable URL."""


def open_response(
    session: requests.Session, url: str, policy: SourcePolicy, *, headers: dict[str, str], timeout_s: float, pinned: bool
) -> tuple[requests.Response, str]:
    """The response at the end of the redirect chain from ``url`` (body unread), and the URL that gave it.

    Raises:
        SourceRefused: If the host or a redirect's target is outside ``policy``.
        RedirectFailed: For a redirect without a Location, one whose Location is not a
            usable URL, or more than five.
    """
    first = url
    policy.check_host(url)
    for hop in range(1, _MAX_REDIRECTS + 2):
        resp = session.get(url, headers=headers, stream=True, timeout=timeout_s, allow_redirects=False)
        if resp.status_code not in _REDIRECTS:
            return resp, url
        location = resp.headers.get("Location")
        resp.close()
        if not location:
            raise RedirectFailed(f"{storage.redact_uri(url)} answered HTTP {resp.status_code} without a Location")
        if hop > _MAX_REDIRECTS:
            break
        try:
            target = urljoin(url, location)
            check_url(target)
        except ValueError as exc:
            raise RedirectFailed(f"{storage.redact_uri(url)} answered HTTP {resp.status_code} with a Location that is {exc}") from None
        check_redirect(policy, url, target, pinned=pinned, hop=hop)
        url = target
    raise RedirectFailed(
        f"downloading {storage.redact_uri(first)}: more than {_MAX_REDIRECTS} redirects, a loop or a chain too long "
        f"(last at {storage.redact_uri(url)})"
    )


class FetchFailed(Exception):
    """One object that could not be fetched: ``reason`` is the reject code, ``detail`` says why (never the body)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# Reject codes of an object that could not be fetched.
HTTP_ERROR = "http_error"
FETCH_TIMEOUT = "fetch_timeout"
FETCH_FAILED = "fetch_failed"
TOO_LARGE = "member_too_large"
REFUSED = "source_refused"
REDIRECT_REFUSED = "redirect_refused"


def fetch_url(
    session: requests.Session, url: str, settings: HttpSettings, policy: SourcePolicy, *, pinned: bool = False, etag: str | None = None
) -> tuple[bytes | None, str | None]:
    """One whole object over HTTP(S), at most ``settings.max_bytes``, retried as :class:`HttpSpooler` retries.

    With ``etag`` (the one a previous run recorded) the request is conditional: ``(None, etag)``
    when the server answers 304 Not Modified, nothing transferred.

    Returns:
        ``(bytes, the response's ETag or None)``.

    Raises:
        FetchFailed: With :data:`HTTP_ERROR` (a status that is not worth retrying, or one that
            stayed after the retries), :data:`FETCH_TIMEOUT`, :data:`FETCH_FAILED` (connections
            that kept failing, a URL requests cannot send), :data:`TOO_LARGE`, :data:`REFUSED`
            (the policy) or :data:`REDIRECT_REFUSED` (:class:`RedirectFailed`). Details pass
            through :func:`storage.redact_text`.
    """
    from imgpipe.data.sources import SourceRefused

    failures = 0
    while True:
        try:
            return _fetch_once(session, url, settings, policy, pinned, etag)
        except SourceRefused as exc:
            raise FetchFailed(REFUSED, storage.redact_text(str(exc))) from None
        except RedirectFailed as exc:
            raise FetchFailed(REDIRECT_REFUSED, storage.redact_text(str(exc))) from None
        except (Transient, *TRANSIENT_ERRORS) as exc:
            failures += 1
            if failures > settings.retries:
                timeout = isinstance(exc, (requests.Timeout, TimeoutError, urllib3.exceptions.TimeoutError))
                reason = FETCH_TIMEOUT if timeout else HTTP_ERROR if str(exc).startswith("HTTP ") else FETCH_FAILED
                raise FetchFailed(reason, f"{storage.redact_text(str(exc))[:200]} ({failures} attempts)") from None
        except (requests.RequestException, ValueError) as exc:  # InvalidURL and kin: sending it again changes nothing
            raise FetchFailed(FETCH_FAILED, f"{type(exc).__name__}: {storage.redact_text(str(exc))[:200]}") from None
            hint = exc.retry_after if isinstance(exc, Transient) else 0.0
            time.sleep(min(max(settings.backoff_s * 2 ** (failures - 1), hint), _MAX_BACKOFF_S))


def _fetch_once(
    session: requests.Session, url: str, settings: HttpSettings, policy: SourcePolicy, pinned: bool, etag: str | None
) -> tuple[bytes | None, str | None]:
    headers = {"Accept-Encoding": "identity", **({"If-None-Match": etag} if etag else {})}
    resp, _final = open_response(session, url, policy, headers=headers, timeout_s=settings.timeout_s, pinned=pinned)
    with resp:
        status = resp.status_code
        if status == 304 and etag:
            return None, etag
        if status in _RETRY_STATUSES or status >= 500:
            raise Transient(f"HTTP {status} {resp.reason}", retry_after(resp))
        if status != 200:
            raise FetchFailed(HTTP_ERROR, f"HTTP {status} {resp.reason}")
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > settings.max_bytes:
            raise FetchFailed(TOO_LARGE, f"{length} bytes announced > {settings.max_bytes}")
        chunks, have = [], 0
        for chunk in resp.raw.stream(_CHUNK, decode_content=False):
            have += len(chunk)
            if have > settings.max_bytes:
                raise FetchFailed(TOO_LARGE, f"more than {settings.max_bytes} bytes")
            chunks.append(chunk)
        if length.isdigit() and have != int(length):
            raise Transient(f"connection closed after {have} of {length} bytes")
        return b"".join(chunks), resp.headers.get("ETag") or None
