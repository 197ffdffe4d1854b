"""A folder or bucket prefix holding a Hugging Face dataset: Parquet shards, or ``save_to_disk``'s Arrow files.

    layout = sniff_folder("s3://ml-data/beans/")     # None: loose images; FileNotFoundError: nothing there
    reader = HfFolderReader(shown, "s3://ml-data/beans/", layout, settings, spool_dir)

Told by content, not by the source's name:

* ``state.json`` files naming ``_data_files`` (``Dataset.save_to_disk``; a ``DatasetDict``
  has one folder per split, and a ``dataset_dict.json``): their Arrow stream files, features
  from the ``dataset_info.json`` beside them, the split from ``state.json``'s ``_split`` or
  the folder's name;
* ``*.parquet`` files (the Hub's layout, ``data/train-00000-of-00001.parquet`` and a
  ``README.md``, or any prefix of Parquet shards): every one in key order, class names from
  the README's YAML front matter when it has them (:mod:`imgpipe.data.readers.card`), else
  from each file's schema metadata, the split from the file's name
  (``train``/``validation``/``test``) or a ``split`` column;
* anything else: loose images (``None``).

A folder's own files are claims to check, not instructions: ``state.json``'s ``_data_files``
must name each data file once, by a plain name, among the files listed beside it (so no file
is read twice and the rows are the files' own); class names in the card or
``dataset_info.json`` pass the label gate (:func:`imgpipe.data.labelgate.check_class_list`);
the JSON files and the card are read up to :data:`MAX_META_BYTES` and :data:`MAX_CARD_BYTES`.
A data file of a local folder must be a regular file below the folder: a FIFO, device, socket
or a link out of the folder is refused before it is read.

Only the first :data:`SNIFF_OBJECTS` objects are looked at to tell a dataset from loose
images; a dataset's files are then listed whole. Files of a bucket are spooled to local
disk, one at a time, when first read, and kept for the extraction's second pass. In a
sharded download each file goes whole to the shard that owns its key.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe import storage
from imgpipe.data.archive import Member
from imgpipe.data.labelgate import check_class_list, describe
from imgpipe.data.readers.base import Reader, ReaderSettings
from imgpipe.data.readers.card import MAX_CARD_BYTES, card_class_names
from imgpipe.data.readers.hfparquet import HfArrowReader, HfParquetReader, HfTableReader, ImageFiles, is_parquet
from imgpipe.data.readers.hfschema import normalize_split, split_from_path

__all__ = ["SNIFF_OBJECTS", "MAX_META_BYTES", "Layout", "sniff_folder", "HfFolderReader"]

SNIFF_OBJECTS = 1000
# The largest state.json or dataset_info.json read: a few KB as datasets writes them, a few MB
# with the names of 100,000 classes.
MAX_META_BYTES = 16 << 20
_CARD = "README.md"
_STATE = "state.json"
_INFO = "dataset_info.json"


@dataclass(frozen=True)
class Layout:
    """What a folder holds as a Hugging Face dataset.

    Attributes:
        kind: ``hf-parquet`` (Parquet shards) or ``hf-arrow`` (``save_to_disk``).
        files: Data files relative to the folder, in read order.
        splits: Each file's split (``train``, ``val``, ``test``) or ``None``.
        features: Each file's ``datasets`` features (``dataset_info.json``), where known.
        card: The README's class names per column (the Hub's layout).
        ignored: Objects that are neither data files nor the dataset's metadata.
    """

    kind: str
    files: tuple[str, ...]
    splits: dict[str, str | None]
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ignored: int = 0


def sniff_folder(root: str) -> Layout | None:
    """The dataset a folder (``file://``) or bucket prefix holds, or ``None`` for loose images.

    Raises:
        FileNotFoundError: If nothing is there ("no images found").
        ValueError: If a ``state.json``, ``dataset_info.json`` or the card is not what
            ``datasets`` writes, or breaks a rule of the module docstring (one line naming the file).
    """
    prefix = storage.normalize_uri(root).rstrip("/") + "/"
    keys: list[str] = []
    looked = 0
    dataset = False
    for info in storage.iter_objects(prefix):
        key = info.uri[len(prefix) :]
        if not key or key.endswith("/") or any(part.startswith(".") for part in key.split("/")):
            continue  # folder markers, .gitattributes, .cache/huggingface
        keys.append(key)
        looked += 1
        dataset = dataset or _is_data_file(key)
        if looked >= SNIFF_OBJECTS and not dataset:
            return None
    if not keys:
        raise FileNotFoundError(
            f"no images found at {storage.redact_uri(prefix)}: it holds no files; point the source at the folder or prefix "
            "that holds the images or the dataset's files"
        )
    if not dataset:
        return None
    states = sorted(k for k in keys if posixpath.basename(k) == _STATE)
    return _arrow_layout(prefix, keys, states) if states else _parquet_layout(prefix, keys)


def _is_data_file(key: str) -> bool:
    return key.lower().endswith(".parquet") or posixpath.basename(key) == _STATE


def _arrow_layout(prefix: str, keys: list[str], states: list[str]) -> Layout:
    files: list[str] = []
    splits: dict[str, str | None] = {}
    features: dict[str, dict[str, Any]] = {}
    listed = set(keys)
    for state_key in states:
        folder = posixpath.dirname(state_key)
        state = _json(prefix, state_key)
        info_key = posixpath.join(folder, _INFO)
        feats = _features(prefix, info_key) if info_key in listed else {}
        split = normalize_split(state.get("_split")) or split_from_path(posixpath.join(folder, "x"))
        for key in _data_files(prefix, state_key, state, listed):
            files.append(key)
            splits[key], features[key] = split, feats
    used = {*files, *states, *(posixpath.join(posixpath.dirname(s), _INFO) for s in states), "dataset_dict.json", _CARD}
    return Layout("hf-arrow", tuple(files), splits, features, {}, sum(k not in used for k in keys))


def _data_files(prefix: str, state_key: str, state: dict[str, Any], listed: set[str]) -> list[str]:
    """The keys of the data files a ``state.json`` names: each once, by a plain file name, each listed beside it."""
    shown = storage.redact_uri(prefix + state_key)
    entries = state.get("_data_files") or []
    if not isinstance(entries, list):
        raise ValueError(f"{shown}: _data_files is {describe(entries)}; save_to_disk writes a list of {{'filename': ...}}")
    folder, keys = posixpath.dirname(state_key), []
    for i, entry in enumerate(entries):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
            raise ValueError(f"{shown}: _data_files[{i}] is no plain file name; save_to_disk writes names like data-00000-of-00001.arrow")
        key = posixpath.join(folder, name)
        if key in keys:
            raise ValueError(f"{shown}: _data_files[{i}] names {name!r} again; each data file is named once")
        if key not in listed:
            raise ValueError(f"{shown}: _data_files[{i}] names {name!r}, which is not a file of the folder")
        keys.append(key)
    return keys


def _features(prefix: str, info_key: str) -> dict[str, Any]:
    """The features of a ``dataset_info.json``, each ``ClassLabel``'s names through the label gate."""
    feats = _json(prefix, info_key).get("features") or {}
    if not isinstance(feats, dict):
        return {}
    shown = storage.redact_uri(prefix + info_key)
    for column, feature in feats.items():
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature:
            check_class_list(feature["names"], f"{shown}: ClassLabel names of column {column!r}")
    return feats


def _parquet_layout(prefix: str, keys: list[str]) -> Layout:
    files = tuple(k for k in keys if k.lower().endswith(".parquet"))
    card = card_class_names(_text(prefix, _CARD, MAX_CARD_BYTES), storage.redact_uri(prefix + _CARD)) if _CARD in keys else {}
    return Layout("hf-parquet", files, {k: split_from_path(k) for k in files}, {}, card, len(keys) - len(files) - (_CARD in keys))


def _text(prefix: str, key: str, limit: int) -> str:
    """The first ``limit`` bytes of a text file of the folder (a card's front matter is at its top)."""
    data, _ = storage.read_some(prefix + key, limit)
    return data.decode("utf-8", "replace")


def _json(prefix: str, key: str) -> dict[str, Any]:
    shown = storage.redact_uri(prefix + key)
    data, info = storage.read_some(prefix + key, MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES or info.size > MAX_META_BYTES:
        raise ValueError(f"{shown} is over {MAX_META_BYTES} bytes; datasets' save_to_disk writes a few KB")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{shown} is not JSON ({exc}); is this folder what datasets' save_to_disk wrote?") from None
    return value if isinstance(value, dict) else {}


class HfFolderReader(Reader):
    """The rows of every data file of a :class:`Layout`, file after file (each a :class:`HfTableReader`)."""

    def __init__(self, uri: str, root: str, layout: Layout, settings: ReaderSettings, spool: Path) -> None:
        self.uri, self.layout, self.settings, self.spool = uri, layout, settings, spool
        self.root = storage.normalize_uri(root).rstrip("/")
        self.kind = layout.kind
        self.files = [f for f in layout.files if settings.keeps(f)]
        self._local: dict[str, Path] = {}
        self._classes: tuple[str, ...] | None = None
        self._rows: dict[str, int] = {}

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "format": self.kind,
            "sha256": None,
            "bytes": None,
            "files": len(self.files),
            "ignored": self.layout.ignored,
            "classes": list(self._classes) if self._classes is not None else None,
            "splits": self._rows,
        }

    def members(self) -> Iterator[Member]:
        self._rows = {}
        for key in self.files:
            reader = self._open(key)
            if self._classes is None:
                self._classes = reader.names
            for member in reader.members():
                if member.reason is None:
                    name = member.split or "none"
                    self._rows[name] = self._rows.get(name, 0) + 1
                yield member

    def _open(self, key: str) -> HfTableReader:
        local = self._fetch(key)
        shown = f"{self.uri.rstrip('/')}/{key}"
        images = ImageFiles(self.root, posixpath.dirname(key), self.settings.policy)
        common: dict[str, Any] = {
            "max_member_bytes": self.settings.max_member_bytes,
            "stem": key.rsplit(".", 1)[0],
            "split": self.layout.splits.get(key),
            "card": self.layout.card,
            "features": self.layout.features.get(key),
            "images": images,
            "image_column": self.settings.image_column,
            "label_column": self.settings.label_column,
        }
        if self.kind == "hf-arrow":
            return HfArrowReader(shown, local, **common)
        if not is_parquet(local):
            raise ValueError(f"{shown} is named .parquet but is not Parquet (no PAR1 magic bytes); remove it or fix the upload")
        return HfParquetReader(shown, local, sha256=None, size=local.stat().st_size, **common)

    def _fetch(self, key: str) -> Path:
        """The file local: read in place from a folder (a regular file below it), spooled once from a bucket."""
        uri = f"{self.root}/{key}"
        if storage.is_local(uri):
            local, top = storage.local_path(uri), os.path.realpath(storage.local_path(self.root))
            shown = f"{self.uri.rstrip('/')}/{key}"
            if os.path.commonpath([os.path.realpath(local), top]) != top:
                raise ValueError(f"{shown} is a link that leads outside the dataset's folder; a data file is read only from below it")
            try:
                storage.check_regular(local)
            except storage.NotRegularFile as exc:
                raise ValueError(f"{shown} is a {exc.kind}, not a regular file; a data file is read only when it is one") from None
            return local
        if key not in self._local:
            size = storage.size(uri)
            if size is not None and size > self.settings.http.max_bytes:
                raise ValueError(
                    f"{self.uri.rstrip('/')}/{key} is {size} bytes, more than max_download_bytes={self.settings.http.max_bytes}; "
                    "raise max_download_bytes if it really is that large"
                )
            self.spool.mkdir(parents=True, exist_ok=True)
            local = self.spool / f"{len(self._local):05d}{Path(key).suffix}"
            storage.download_file(uri, local)
            self._local[key] = local
        return self._local[key]
