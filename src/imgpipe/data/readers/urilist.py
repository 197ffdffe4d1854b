"""A list of image URIs with labels (CSV or JSON Lines, as labelling tools export them) as a source.

    reader = UriListReader(list_uri, local_copy, settings)

The list has a ``uri`` (or ``url``) column and an optional ``label`` column: a CSV with a
header row, or one JSON object per line. An entry is an ``https://`` or ``s3://`` URI, or a
path relative to the list (``images/cat/1.jpg`` beside ``s3://bucket/lists/train.csv``). Every
entry passes the same :class:`~imgpipe.data.sources.SourcePolicy` as an archive URL (a list
given as a pipeline parameter cannot make the pod read its own files or a link-local address),
and the redirect checks of :mod:`imgpipe.data.transport`.

An entry that fails is a reject with its reason, never the step's failure: ``bad_row`` (no URI,
not JSON, a URI that does not parse; the path names the line), ``source_refused``,
``redirect_refused``, ``http_error`` (the status), ``fetch_timeout``, ``fetch_failed`` (and any
other error while fetching it), ``member_too_large``, ``vanished``. Only a list that cannot be
read fails the step. A member's path is the entry's :func:`storage.uri_location`
(``bucket/key``, ``host[:port]/path``: never its userinfo or query) or the relative path as
written; a reject's detail passes through :func:`storage.redact_text`.
Entries are fetched ``settings.fetch_workers`` at once, in list order, the list read a line at a
time. In an incremental run an entry the previous run fetched is asked for again only
conditionally (``If-None-Match`` with its ETag; a HEAD for ``s3://``), and taken from the previous
output when unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import requests

from imgpipe import storage
from imgpipe.data import archive
from imgpipe.data.archive import Member
from imgpipe.data.readers.base import Reader, ReaderSettings, ordered_map
from imgpipe.data.readers.listing import VANISHED, fetched, read_object
from imgpipe.data.sources import SourceRefused, is_http, peer_checked_session
from imgpipe.data.transport import FETCH_FAILED, REFUSED, TOO_LARGE, FetchFailed, check_url, fetch_url

__all__ = ["BAD_ROW", "URI_COLUMNS", "looks_like_uri_list", "UriListReader"]

BAD_ROW = "bad_row"
URI_COLUMNS = ("uri", "url")
_PROBE_BYTES = 64 << 10
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # RFC 3986 section 3.1


def looks_like_uri_list(local: Path) -> str | None:
    """``csv`` or ``jsonl`` when a local file reads as a URI list (a header or first object naming a URI column), else ``None``."""
    with open(local, "rb") as fh:
        head = fh.read(_PROBE_BYTES)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        try:
            obj = json.loads(first)
        except ValueError:
            return None
        return "jsonl" if isinstance(obj, dict) and any(k in obj for k in URI_COLUMNS) else None
    header = next(csv.reader([first]), [])
    return "csv" if {h.strip().lower() for h in header} & set(URI_COLUMNS) else None


@dataclass(frozen=True)
class _Entry:
    line: int
    uri: str | None
    label: str | None
    problem: str | None = None


class UriListReader(Reader):
    """The entries of one URI list, fetched as its members."""

    kind = "urilist"

    def __init__(self, uri: str, local: Path, fmt: str, settings: ReaderSettings) -> None:
        self.list_uri = uri  # where relative entries are resolved (unredacted, never shown)
        self.uri, self.local, self.format, self.settings = storage.redact_uri(uri), local, fmt, settings
        self.entries = 0
        self._sessions = threading.local()

    @property
    def checked_in_advance(self) -> bool:
        return False

    def manifest_entry(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": f"{self.kind}/{self.format}", "sha256": None, "bytes": None, "entries": self.entries}

    def census(self) -> tuple[int, None]:
        """Entries in the list (its lines read, nothing fetched); their bytes are unknown until fetched."""
        count = sum(1 for _ in self._entries())
        self.entries = 0
        return count, None

    def members(self) -> Iterator[Member]:
        self.entries = 0
        return ordered_map(self._member, self._entries(), self.settings.fetch_workers)

    # ---------------------------------------------------------------- the list

    def _entries(self) -> Iterator[_Entry]:
        with open(self.local, encoding="utf-8-sig", errors="replace", newline="") as fh:
            rows = self._csv_rows(fh) if self.format == "csv" else self._jsonl_rows(fh)
            for entry in rows:
                if not self.settings.keeps(entry.uri if entry.uri is not None and entry.problem is None else f"#line-{entry.line}"):
                    continue  # another shard's
                self.entries += 1
                yield entry

    @staticmethod
    def _csv_rows(fh: io.TextIOBase) -> Iterator[_Entry]:
        reader = csv.DictReader(fh)
        columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        uri_col = next(columns[c] for c in URI_COLUMNS if c in columns)
        label_col = columns.get("label")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _Entry(reader.line_num, None, None, f"not readable CSV ({exc})")
                continue
            uri = (row.get(uri_col) or "").strip()
            label = (row.get(label_col) or "").strip() if label_col else ""
            yield _Entry(reader.line_num, uri or None, label or None, None if uri else "no URI in this row")

    @staticmethod
    def _jsonl_rows(fh: io.TextIOBase) -> Iterator[_Entry]:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield _Entry(lineno, None, None, "not a JSON object")
                continue
            if not isinstance(obj, dict):
                yield _Entry(lineno, None, None, "not a JSON object")
                continue
            uri = next((obj[k] for k in URI_COLUMNS if isinstance(obj.get(k), str) and obj[k].strip()), None)
            label = obj.get("label")
            label = str(label).strip() if isinstance(label, (str, int)) and not isinstance(label, bool) else None
            yield _Entry(lineno, uri.strip() if uri else None, label or None, None if uri else "no uri or url string")

    # ---------------------------------------------------------------- one entry

    def _member(self, entry: _Entry) -> Member:
        """One entry as a member, or as a reject with its reason: nothing about one entry fails the step."""
        where = f"{Path(urlparse(self.uri).path).name or 'list'}#line-{entry.line}"
        if entry.problem is not None or entry.uri is None:
            return Member(where, 0, BAD_ROW, f"line {entry.line}: {entry.problem}")
        try:
            resolved, path, problem = self._resolve(entry.uri)
        except ValueError as exc:  # check_url's: says what is wrong without the URI
            return Member(where, 0, BAD_ROW, f"line {entry.line}: {exc}")
        try:  # first: a refused URI is refused whatever its path looks like
            self.settings.policy.check_source(resolved, pinned=False)
        except SourceRefused as exc:
            return Member(path or where, 0, REFUSED, storage.redact_text(str(exc)))
        if problem is not None:
            return Member(path or where, 0, archive.UNSAFE_MEMBER if path else BAD_ROW, f"line {entry.line}: {problem}")
        try:
            return self._fetch(resolved, path, entry.label)
        except FetchFailed as exc:
            return Member(path, 0, exc.reason, storage.redact_text(exc.detail), label=entry.label)
        except Exception as exc:  # noqa: BLE001 - whatever one entry raises is that entry's reject
            return Member(path, 0, FETCH_FAILED, f"{type(exc).__name__}: {storage.redact_text(str(exc))[:200]}", label=entry.label)

    def _resolve(self, text: str) -> tuple[str, str, str | None]:
        """``(URI to fetch, member path, problem)`` of one entry.

        Raises:
            ValueError: For a URI that does not parse (:func:`check_url`).
        """
        scheme = _SCHEME.match(text)
        if scheme and len(scheme.group(0)) > 2:  # a URI (a one-letter "scheme" is a Windows drive, refused as a path below)
            check_url(text)
            shown = storage.uri_location(text).lstrip("/")  # file:///x/y: the path, made relative
            path, problem = archive.normalize_member_path(shown)
            return text, path, problem
        path, problem = archive.normalize_member_path(text)
        if problem is not None:
            return text, path, problem
        base = self.list_uri if is_http(self.list_uri) else storage.normalize_uri(self.list_uri)
        return urljoin(base, path) if is_http(base) else storage.join(base.rsplit("/", 1)[0], path), path, None

    def _fetch(self, uri: str, path: str, label: str | None) -> Member:
        carry, limit = self.settings.carry, self.settings.max_member_bytes
        known = carry.known(path) if carry is not None else None
        if is_http(uri):
            http = self.settings.http
            settings = http if http.max_bytes <= limit else type(http)(http.retries, http.timeout_s, http.backoff_s, limit)
            data, etag = fetch_url(self._session(), uri, settings, self.settings.policy, etag=known[1] if known else None)
            if data is None:  # 304: the previous run's bytes
                assert carry is not None and known is not None
                # A 304 says the server's object is unchanged, not that the recorded bytes are it:
                # carried only where the ETag is their MD5 (an S3-style one), else fetched.
                data = carry.take(path, known[0], etag, store_md5=True)
                if data is None:  # its copy failed the check: fetch it whole
                    data, etag = fetch_url(self._session(), uri, settings, self.settings.policy)
            return fetched(path, data or b"", etag=etag, label=label)
        info = storage.stat(uri) if known is not None else None  # a HEAD only where the previous run had it
        if info is not None and carry is not None and (data := carry.take(path, info.size, info.etag, store_md5=True)) is not None:
            return fetched(path, data, etag=info.etag, label=label)
        try:
            data, info = read_object(uri, limit)
        except archive.MemberTooLarge:
            raise FetchFailed(TOO_LARGE, f"more than max_member_bytes={limit}") from None
        except FileNotFoundError:
            raise FetchFailed(VANISHED, "no object there") from None
        except (OSError, ValueError) as exc:
            raise FetchFailed("fetch_failed", f"{type(exc).__name__}: {str(exc)[:200]}") from None
        except Exception as exc:  # noqa: BLE001 - boto3's errors, once its retries are spent, are this entry's reject
            raise FetchFailed("fetch_failed", f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return fetched(path, data, etag=info.etag, label=label)

    def _session(self) -> requests.Session:
        """One session per fetching thread (requests' sessions are not shared safely)."""
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = peer_checked_session(self.settings.policy)
            session.headers["User-Agent"] = "imgpipe-download"
        return session
