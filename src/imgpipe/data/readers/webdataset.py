"""WebDataset shards as a source: tar files whose consecutive members are the parts of one sample.

    reader = WebDatasetReader(uri, local_tar, fmt, max_member_bytes=..., label_key="", class_names=())
    expand_braces("s3://b/train-{000000..000099}.tar")   # the shard URIs, in order

A sample is the run of members sharing a key: the member path up to the first ``.`` of its
file name (``n01440764/10026.jpg`` and ``n01440764/10026.cls`` are sample ``n01440764/10026``),
as the WebDataset format defines it. Its image is the part with an image extension. Its class
comes from a label part only, never from a caption:

* ``.cls``: an integer, the class index itself; its name is ``class_names[index]`` when the
  run names the classes, else the integer as text; an index that is no integer, or not below
  the number of ``class_names`` (below the label gate's cap without them), is that sample's
  ``bad_label`` (:func:`imgpipe.data.labelgate.class_index`), never the shard's failure;
* else a ``.json``'s ``label``, ``class`` or ``cls`` (an integer there is an index, as in ``.cls``);
* or the part ``label_key`` names: ``txt`` or ``caption.txt`` (the part's text is the class),
  ``PART:KEY`` for a key of a JSON part (``json:category``).

An img2dataset shard (``jpg``, a caption ``txt``, a ``json`` of url and caption) has no label
part: each of its samples is a ``no_label`` reject whose detail names the parts found and the
setting to use. Each sample is one input: a member named after its image, or a reject
(``sample_without_image``, ``no_label``, ``bad_label``); other parts are ignored. A tar whose
first members pair an image with a ``cls``, ``json`` or ``txt`` part is taken as WebDataset
(:func:`looks_like_webdataset`); so is every shard of a brace-expanded list. The manifest entry
records the class list (``classes``) where the run names the classes (``class_names``), so
clean gives class ``i`` index ``i``; integer classes without names are the indices present,
which clean orders by value.
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
from imgpipe.data.labelgate import class_index
from imgpipe.data.labels import BAD_LABEL
from imgpipe.data.readers.base import Reader
from imgpipe.data.readers.listing import fetched

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "JSON_LABEL_KEYS",
    "NO_IMAGE",
    "NO_LABEL",
    "expand_braces",
    "sample_key",
    "parse_label_key",
    "looks_like_webdataset",
    "WebDatasetReader",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm")
# The parts a class is read from by default, in this order (a caption ``txt`` only when named).
LABEL_EXTENSIONS = ("cls", "json")
JSON_LABEL_KEYS = ("label", "class", "cls")
# Parts that, beside an image under one key, mark a tar as WebDataset (img2dataset's too).
_SAMPLE_PARTS = ("cls", "json", "txt")
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


def parse_label_key(label_key: str) -> tuple[str, str]:
    """``(part, json key)`` of a ``label_key`` setting.

    ``""`` -> ``("", "")`` (the defaults), ``txt`` -> ``("txt", "")``, ``json:category`` -> ``("json", "category")``.

    Raises:
        ValueError: For an image part, a part with a path or spaces, or an empty key after ``:``.
    """
    if not isinstance(label_key, str):
        raise TypeError(f"label_key must be a string (a sample part like txt, or PART:KEY), got {type(label_key).__name__}")
    part, colon, key = label_key.strip().partition(":")
    part = part.strip().lower().lstrip(".")
    if colon and not (part and key.strip()):
        raise ValueError(f"label_key {label_key!r}: PART:KEY needs both, like json:category")
    if not part and not colon:
        return "", ""
    if not part or "/" in part or any(c.isspace() for c in part):
        raise ValueError(f"label_key {label_key!r} is not a sample part: name an extension such as txt, caption.txt or json:category")
    if part in IMAGE_EXTENSIONS:
        raise ValueError(f"label_key {label_key!r} names the image part; name the part that holds the class (cls, json, txt)")
    return part, key.strip()


def looks_like_webdataset(local: Path, fmt: str) -> bool:
    """Whether a tar's first members pair an image with a ``cls``, ``json`` or ``txt`` part (``caption.txt`` too) under one key."""
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
    return any(exts & set(IMAGE_EXTENSIONS) and any(e.rsplit(".", 1)[-1] in _SAMPLE_PARTS for e in exts) for exts in parts.values())


class WebDatasetReader(Reader):
    """The samples of one WebDataset shard.

    Attributes:
        label_part: The part the class is read from (empty: ``cls``, else ``json``).
        json_key: The key of a JSON part holding the class (empty: ``label``, ``class``, ``cls``).
        class_names: Names of the integer classes, by index.
    """

    kind = "webdataset"
    streams_skipped = True

    def __init__(
        self,
        uri: str,
        local: Path,
        fmt: str,
        *,
        sha256: str | None,
        size: int | None,
        max_member_bytes: int,
        label_key: str = "",
        class_names: tuple[str, ...] = (),
    ) -> None:
        self.uri, self.local, self.format = uri, local, fmt
        self.sha256, self.bytes, self.max_member_bytes = sha256, size, max_member_bytes
        self.label_part, self.json_key = parse_label_key(label_key)
        self.class_names = tuple(class_names)
        self._parts = (self.label_part,) if self.label_part else LABEL_EXTENSIONS

    def manifest_entry(self) -> dict[str, Any]:
        entry = {"uri": self.uri, "format": f"{self.kind}/{self.format}", "sha256": self.sha256, "bytes": self.bytes}
        if self.class_names:
            entry["classes"] = list(self.class_names)
        return entry

    def members(self) -> Iterator[Member]:
        try:
            yield from self._samples()
        except archive.ArchiveError as exc:
            raise archive.ArchiveError(f"{self.uri}: {exc}") from None

    def _samples(self) -> Iterator[Member]:
        key, parts, seen, first = None, {}, set(), ""
        for member in archive.iter_archive(self.local, self.format):
            if member.reason is not None:
                yield member  # an unsafe entry is its own reject, whatever sample it claims
                continue
            this, ext = sample_key(member.path)
            if this != key and key is not None:
                yield self._sample(key or first, parts, seen)
                parts, seen = {}, set()
            if this != key:
                first = member.path  # names a sample whose key is empty (a member named .cls)
            key = this
            seen.add(ext)
            if ext in IMAGE_EXTENSIONS or ext in self._parts:
                parts.setdefault(ext, self._read(member, ext))
        if key is not None:
            yield self._sample(key or first, parts, seen)

    def _read(self, member: Member, ext: str) -> Member:
        """The part's bytes in hand (the tar stream moves on), or its reject."""
        limit = _MAX_LABEL_BYTES if ext in self._parts else self.max_member_bytes
        try:
            return fetched(member.path, member.read(limit))
        except archive.MemberTooLarge:
            return Member(member.path, member.size, "member_too_large", f"more than {limit} bytes")

    def _sample(self, key: str, parts: dict[str, Member], seen: set[str]) -> Member:
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            return Member(key, 0, NO_IMAGE, f"parts {sorted(seen)} hold no image ({', '.join(IMAGE_EXTENSIONS)})")
        if image.reason is not None:
            return image
        label, why, bad = self._label(parts)
        if label is None and bad:
            return Member(image.path, image.size, BAD_LABEL, why)
        if label is None:
            return Member(image.path, image.size, NO_LABEL, f"{why}; the sample's parts are {sorted(seen)}. {self._fix()}")
        return fetched(image.path, image.read(self.max_member_bytes), label=label)

    def _fix(self) -> str:
        """What a user can set to read the class, for a ``no_label`` detail."""
        if self.label_part:
            return f"Fix the sample's .{self.label_part} part, or set label_key to the part that holds the class"
        return (
            "A caption is not a class: set label_key to the part that holds the class "
            "(label_key: txt takes each .txt as its class, label_key: json:KEY a key of the .json)"
        )

    def _label(self, parts: dict[str, Member]) -> tuple[str | None, str, bool]:
        """The sample's class from its label part, or ``None``, why it has none, and whether a part gave a bad one."""
        why = f"no .{self.label_part} part" if self.label_part else "no class part (.cls, or a .json with label, class or cls)"
        for ext in self._parts:
            part = parts.get(ext)
            if part is None:
                continue
            if part.reason is not None:
                why = f"its .{ext} part is unreadable ({part.reason}: {part.detail})"
                continue
            text = part.read(_MAX_LABEL_BYTES).decode("utf-8", "replace").strip()
            kind = ext.rsplit(".", 1)[-1]
            if kind == "json" or self.json_key:
                label, why, bad = self._from_json(ext, text)
            elif kind == "cls":
                label, why, bad = self._indexed(text, ext) if text else (None, f"its .{ext} part is empty", False)
            else:
                label, why, bad = (text, "", False) if text and "\n" not in text else (None, f"its .{ext} part is empty or more than one line", False)
            if label is not None or bad:
                return label, why, bad
        return None, why, False

    def _from_json(self, ext: str, text: str) -> tuple[str | None, str, bool]:
        keys = (self.json_key,) if self.json_key else JSON_LABEL_KEYS
        try:
            obj = json.loads(text)
        except ValueError:
            return None, f"its .{ext} part is not JSON", False
        value = next((obj[k] for k in keys if isinstance(obj, dict) and k in obj), None)
        if isinstance(value, int) and not isinstance(value, bool):
            return self._indexed(value, ext)
        if isinstance(value, str) and value.strip() and "\n" not in value.strip():
            return value.strip(), "", False
        if value is None:
            return None, f"its .{ext} part has no key {' or '.join(keys)}", False
        return None, f"its .{ext} part's {next(k for k in keys if k in obj)} is not a class name or index", True

    def _indexed(self, value: int | str, ext: str) -> tuple[str | None, str, bool]:
        """An integer class: its name in ``class_names``, else the integer as text; else why not (a ``bad_label``)."""
        declared = len(self.class_names) if self.class_names else None
        index, why = class_index(value, declared, f"its .{ext} class index")
        if index is None:
            return None, why, True
        return (self.class_names[index] if self.class_names else str(index)), "", False
