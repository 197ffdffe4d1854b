"""WebDataset shards as a source: tar files whose consecutive members are the parts of one sample.

    reader = WebDatasetReader(uri, local_tar, fmt, max_member_bytes=...)
    expand_braces("s3://b/train-{000000..000099}.tar")   # the shard URIs, in order

A sample is the run of members sharing a key: the member path up to the first ``.`` of its
file name (``n01440764/10026.jpg`` and ``n01440764/10026.cls`` are sample ``n01440764/10026``),
as the WebDataset format defines it. Its image is the part with an image extension; its class
comes from ``.cls`` (the class index, as text), else a ``.json``'s ``label``/``class``/``cls``,
else ``.txt``. Each sample is one input: a member named after its image, or a reject
(``sample_without_image``, ``no_label``); parts other than the image and its class are ignored.
A tar whose first members pair an image with a class part is taken as WebDataset
(:func:`looks_like_webdataset`); so is every shard of a brace-expanded list.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgpipe.data import archive
from imgpipe.data.archive import Member
from imgpipe.data.readers.base import Reader
from imgpipe.data.readers.listing import fetched

__all__ = ["IMAGE_EXTENSIONS", "LABEL_EXTENSIONS", "NO_IMAGE", "NO_LABEL", "expand_braces", "sample_key", "looks_like_webdataset", "WebDatasetReader"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm")
LABEL_EXTENSIONS = ("cls", "json", "txt")
NO_IMAGE = "sample_without_image"
NO_LABEL = "no_label"
# A class part is a few bytes; a bigger one is no label.
_MAX_LABEL_BYTES = 64 << 10
_PROBE_MEMBERS = 32
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# More shards than this in one URI is a typo (or an attack on the step's memory).
MAX_SHARDS = 1_000_000


def expand_braces(uri: str) -> list[str]:
    """The URIs a WebDataset shard pattern names: ``{000..099}`` ranges (zero padding kept), nested left to right.

    Raises:
        ValueError: For a descending range or more than :data:`MAX_SHARDS` URIs.
    """
    match = _BRACE.search(uri)
    if match is None:
        return [uri]
    lo, hi = match.group(1), match.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"shard range {match.group(0)} in {uri!r} counts down")
    width = len(lo) if lo.startswith("0") else 0
    count = int(hi) - int(lo) + 1
    rest = expand_braces(uri[match.end() :])
    if count * len(rest) > MAX_SHARDS:
        raise ValueError(f"{uri!r} names more than {MAX_SHARDS} shards")
    return [f"{uri[: match.start()]}{n:0{width}d}{tail}" for n in range(int(lo), int(hi) + 1) for tail in rest]


def sample_key(path: str) -> tuple[str, str]:
    """``(key, extension)`` of a sample part: the path up to the first dot of its file name, and what follows (lower case)."""
    folder, name = posixpath.split(path)
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def looks_like_webdataset(local: Path, fmt: str) -> bool:
    """Whether a tar's first members pair an image with a class part under one key."""
    if not fmt.startswith("tar"):
        return False
    parts: dict[str, set[str]] = {}
    try:
        for i, member in enumerate(archive.iter_archive(local, fmt)):
            if i >= _PROBE_MEMBERS:
                break
            key, ext = sample_key(member.path)
            parts.setdefault(key, set()).add(ext)
    except (archive.ArchiveError, ValueError):
        return False  # a corrupt tar is the archive reader's to report, naming the source
    return any(exts & set(IMAGE_EXTENSIONS) and exts & set(LABEL_EXTENSIONS) for exts in parts.values())


class WebDatasetReader(Reader):
    """The samples of one WebDataset shard."""

    kind = "webdataset"
    streams_skipped = True

    def __init__(self, uri: str, local: Path, fmt: str, *, sha256: str | None, size: int | None, max_member_bytes: int) -> None:
        self.uri, self.local, self.format = uri, local, fmt
        self.sha256, self.bytes, self.max_member_bytes = sha256, size, max_member_bytes

    def manifest_entry(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": f"{self.kind}/{self.format}", "sha256": self.sha256, "bytes": self.bytes}

    def members(self) -> Iterator[Member]:
        key, parts = None, {}
        for member in archive.iter_archive(self.local, self.format):
            if member.reason is not None:
                yield member  # an unsafe entry is its own reject, whatever sample it claims
                continue
            this, ext = sample_key(member.path)
            if this != key and key is not None:
                yield self._sample(key, parts)
                parts = {}
            key = this
            if ext in IMAGE_EXTENSIONS or ext in LABEL_EXTENSIONS:
                parts.setdefault(ext, self._read(member, ext))
        if key is not None:
            yield self._sample(key, parts)

    def _read(self, member: Member, ext: str) -> Member:
        """The part's bytes in hand (the tar stream moves on), or its reject."""
        limit = _MAX_LABEL_BYTES if ext in LABEL_EXTENSIONS else self.max_member_bytes
        try:
            return fetched(member.path, member.read(limit))
        except archive.MemberTooLarge:
            return Member(member.path, member.size, "member_too_large", f"more than {limit} bytes")

    def _sample(self, key: str, parts: dict[str, Member]) -> Member:
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            return Member(key, 0, NO_IMAGE, f"parts {sorted(parts)} hold no image ({', '.join(IMAGE_EXTENSIONS)})")
        if image.reason is not None:
            return image
        label = _label(parts)
        if label is None:
            return Member(image.path, image.size, NO_LABEL, f"no readable class in {sorted(set(parts) & set(LABEL_EXTENSIONS)) or 'the sample'}")
        return fetched(image.path, image.read(self.max_member_bytes), label=label)


def _label(parts: dict[str, Member]) -> str | None:
    """The sample's class: ``.cls``, else a ``.json``'s label field, else ``.txt``; ``None`` if none reads."""
    for ext in LABEL_EXTENSIONS:
        part = parts.get(ext)
        if part is None or part.reason is not None:
            continue
        text = part.read(_MAX_LABEL_BYTES).decode("utf-8", "replace").strip()
        if ext == "json":
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            value = next((obj[k] for k in ("label", "class", "cls") if isinstance(obj, dict) and k in obj), None)
            text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if text and "\n" not in text:
            return text
    return None
