"""The one redaction: what a configured secret looks like, cut from every text and value imgpipe shows or keeps.

    redact_uri("https://u:pw@host/a.csv?sig=x")   # 'https://host/a.csv (credentials and query removed)'
    redact_text(log_line)                         # every URI in it, every secret the environment holds
    redact_value({"clean": {"label_overrides": uri}})   # the same over a config's plain data

Logs (:class:`RedactingFilter`), error messages and every file a run writes
(:func:`imgpipe.storage.write_text`, :func:`imgpipe.storage.write_json`) go through it. A secret
is: a URI's userinfo, query, fragment and parameters (presigned signatures, tokens, passwords);
the value of an environment variable whose name says it holds one (``AWS_SECRET_ACCESS_KEY``,
``*_TOKEN``, ``*_PASSWORD``, ...); and the value after a header or a key that names one
(``Authorization: Bearer ...``, ``password=...``, ``"token": "..."``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

__all__ = ["redact_uri", "uri_location", "redact_text", "redact_value", "secret_name", "RedactingFilter"]

# What stands where a secret was.
REDACTED = "(redacted)"
# An environment variable whose name says it holds a secret (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# LABEL_STUDIO_API_KEY, KFP_TOKEN, MODEL_REGISTRY_PASSWORD, ...). The access key id is one too:
# with the secret key it is the credential, and a log has no need of it.
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY|AUTHORIZATION|(?:^|[_-])AUTH(?:[_-]|$)", re.IGNORECASE
)
# Shorter values are no credential (a flag, a count) and would cut ordinary words out of the text.
_MIN_SECRET_CHARS = 8
# A header or key that names a secret, its separator, an optional scheme word, then the value.
_KEYED_SECRET = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[_-]?key|(?:access[_-]|refresh[_-]|id[_-]|session[_-]|bearer[_-])?token"
    r"|password|passwd|secret(?:[_-]access)?[_-]?key|client[_-]secret|signature)"
    r"(\"?'?\s*[:=]\s*\"?'?)((?:bearer|basic|token)\s+)?"
    r"(?!(?:null|true|false|none|\d+(?:\.\d+)?)\b)(?!\(redacted\))([^\s\"',;&{\[\]}()]+)"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# A query without its URI: a "?" after a path, then key=value (urllib3's "url: /a.jpg?X-Amz-Signature=...").
# A "?" in a word ("what?", a class named "a?b") is no query.
_QUERY_IN_TEXT = re.compile(r"(?<=[^\s?])\?(?!\(query removed\))(?=[\w.~%-]+=)[^\s'\"<>()]+")


def redact_uri(uri: str | os.PathLike[str]) -> str:
    """``uri`` as it may be persisted or logged: without userinfo, query or fragment.

    Presigned URLs carry their signature and access key in the query, ``user:pass@``
    URLs their password; neither may reach a manifest, an artifact or a log. What
    remains names the object well enough to find it. Never raises: a URI that does not
    parse (``http://u:p@[::1/x``, a port past 65535) is cut by hand the same way.
    """
    text = os.fspath(uri)
    scheme = text.split(":", 1)[0].lower() if _SCHEME.match(text) else ""
    if not scheme or scheme == "file":
        return text
    location, hidden = _location(text)
    return f"{scheme}://{location}" + (" (credentials and query removed)" if hidden else "")


def uri_location(uri: str) -> str:
    """``host[:port]/path`` of a URI: what :func:`redact_uri` keeps of it, without the scheme.

    What a member named after its URI is called (``example.com:8080/img/a.jpg``): userinfo,
    query and fragment never reach it. Never raises.
    """
    return _location(uri)[0]


def secret_name(name: str) -> bool:
    """Whether a variable, header or key named ``name`` holds a secret (``AWS_SECRET_ACCESS_KEY``, ``token``)."""
    return bool(_SECRET_NAME.search(name)) or bool(_KEYED_SECRET.fullmatch(f"{name}=x"))


def _environment_secrets(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``(value, name)`` of each secret the environment holds, the longest first (one may contain another)."""
    environ = os.environ if environ is None else environ
    found = [(v, k) for k, v in environ.items() if len(v) >= _MIN_SECRET_CHARS and _SECRET_NAME.search(k)]
    return sorted(found, key=lambda item: -len(item[0]))


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line, a file's contents) with every secret in it cut.

    Every URI passes through :func:`redact_uri`; a query written without its URI (urllib3's
    ``Max retries exceeded with url: /a.jpg?X-Amz-Signature=...``) is cut as well; the value of
    every secret environment variable becomes ``$NAME``; the value after a header or key that
    names a secret becomes ``(redacted)``.
    """
    for value, name in _environment_secrets():
        if value in text:
            text = text.replace(value, f"(${name})")
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    text = _QUERY_IN_TEXT.sub("?(query removed)", text)
    return _KEYED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{REDACTED}", text)


def redact_value(value: Any) -> Any:
    """``value`` (a config's plain data, a manifest, a payload) with every string through :func:`redact_text`,
    and the value under a key that names a secret (``token``, ``password``, ``headers.Authorization``) cut whole.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(v, str) and v and secret_name(str(k)) else redact_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that passes each record's message through :func:`redact_text` (urllib3's request lines carry queries)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact_text(message)
        if shown != message:
            record.msg, record.args = shown, ()
        return True


def _location(text: str) -> tuple[str, bool]:
    """``(host[:port]/path, whether anything was cut)`` of a URI; by hand where it does not parse."""
    try:
        parsed = urlparse(text)
    except ValueError:  # "Invalid IPv6 URL": the same cut, by hand
        rest = text.split("://", 1)[-1]
        kept = re.split(r"[?#;]", rest, maxsplit=1)[0]
        authority, slash, path = kept.partition("/")
        return authority.rpartition("@")[2] + slash + path, kept != rest or "@" in authority
    hidden = bool("@" in parsed.netloc or parsed.query or parsed.fragment or parsed.params)
    return parsed.netloc.rpartition("@")[2] + parsed.path, hidden
