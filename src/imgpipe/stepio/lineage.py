"""Which dataset a model belongs to: ``latest`` and the promotion gate, one per dataset and class set.

    key = lineage_key(sources_of(train_prefix, made_from, policy), read_card(train_prefix)["classes"])
    record_uri(data_root, key)  # {data_root}/latest/<name>-<sources digest>-<classes digest>.json

A model trained on a team's own photos must be compared with that dataset's previous model, not
with the sample's or another team's in the same data root. A lineage is the download's sources (as
its manifest records them, redacted) and the model's class names in order: a new class starts a
new lineage, and new images in the same source continue one. ``{data_root}/latest.json`` still
names the newest promotion of any lineage (what a reader of one model per data root expects);
``latest/`` holds one record per lineage, which the gate and ``previous_run_prefix=latest`` read.
How it fits the rest: docs/internals/kubeflow.md, "imgpipe.stepio.artifacts".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from imgpipe import contract, storage
from imgpipe.readpolicy import ReadPolicy

__all__ = [
    "LATEST_DIR",
    "dataset_sources",
    "lineage_key",
    "newest_for_sources",
    "read_record",
    "record_uri",
    "sources_key",
    "sources_of",
    "sources_of_cleans",
    "sources_of_downloads",
]

LATEST_DIR = "latest"
# A lineage's readable part: the last segment of its first source, in plain characters.
_NAME = re.compile(r"[^a-z0-9]+")
_NAME_CHARS = 32


def dataset_sources(uris: Iterable[str]) -> list[str]:
    """The sources that name a dataset: each as a manifest records it (redacted, no trailing slash), sorted."""
    return sorted({storage.redact_uri(str(u)).rstrip("/") for u in uris if str(u)})


def _digest(value: Any, chars: int) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()[:chars]


def sources_key(sources: Sequence[str]) -> str:
    """The part of a lineage's key its sources make: ``<name>-<digest>``."""
    if not sources:
        raise ValueError("a dataset needs at least one source to be named")
    last = sources[0].rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    name = _NAME.sub("-", last.lower().rsplit(".", 1)[0] if "." in last else last.lower()).strip("-")[:_NAME_CHARS] or "dataset"
    return f"{name}-{_digest(list(sources), 10)}"


def lineage_key(sources: Sequence[str], classes: Sequence[str]) -> str:
    """One dataset and class set: ``<name>-<sources digest>-<classes digest>`` (a file name)."""
    if not classes:
        raise ValueError("a lineage needs the model's classes")
    return f"{sources_key(sources)}-{_digest([str(c) for c in classes], 6)}"


def record_uri(data_root: str, key: str) -> str:
    """Where the lineage ``key``'s latest record lives under ``data_root``."""
    return storage.join(storage.normalize_uri(data_root), LATEST_DIR, f"{key}.json")


def read_record(uri: str) -> dict[str, Any] | None:
    """A latest record (``latest.json`` or a lineage's), or ``None`` when there is none.

    Raises:
        ValueError: If it is not a record imgpipe wrote (naming the file, not its content).
    """
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_bytes(uri))
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("prefixes", {}), dict):
        raise ValueError(f"{uri} is not a record imgpipe wrote (a JSON object with 'prefixes'); remove it or restore it")
    return record


def newest_for_sources(data_root: str, sources: Sequence[str]) -> dict[str, Any] | None:
    """The newest record of any class set of the dataset ``sources`` name (what an incremental run continues)."""
    folder = storage.join(storage.normalize_uri(data_root), LATEST_DIR)
    stem = sources_key(sources) + "-"
    found = [o.uri for o in storage.list_objects(folder) if o.uri.rsplit("/", 1)[-1].startswith(stem) and o.uri.endswith(".json")]
    records = [r for r in (read_record(u) for u in found) if r is not None]
    return max(records, key=lambda r: str(r.get("finished_at") or ""), default=None)


def sources_of_downloads(prefixes: Iterable[str]) -> list[str]:
    """The dataset the committed download outputs ``prefixes`` were fetched from, as their manifests record it."""
    found: list[str] = []
    for prefix in prefixes:
        found += [str(u) for u in (contract.read_manifest(prefix, expect_step="download").get("upstream") or {}).get("sources") or []]
    return dataset_sources(found)


def sources_of_cleans(prefixes: Iterable[str], policy: ReadPolicy) -> list[str]:
    """The dataset the committed clean outputs ``prefixes`` (a run's shards) were made from.

    Raises:
        ReadRefused: If a manifest names a download output outside ``policy`` (read back from storage: untrusted).
    """
    downloads = []
    for prefix in prefixes:
        source = (contract.read_manifest(policy.check("a clean output", str(prefix)), expect_step="clean").get("upstream") or {}).get("source")
        downloads.append(policy.check("the download output a clean output names", str(source or "")))
    return sources_of_downloads(downloads)


def sources_of(made_from: Mapping[str, str], policy: ReadPolicy) -> list[str]:
    """The sources of the dataset a train output was made from (``made_from``: its prefixes by step).

    A clean output merged from shards names its shards' clean outputs; their downloads' sources
    together are the dataset's.

    Raises:
        ValueError: If neither a download nor a merged clean output names them.
        ReadRefused: If a manifest names a prefix outside ``policy``.
    """
    if "download" in made_from:
        return sources_of_downloads([made_from["download"]])
    clean = made_from.get("clean")
    shards = (contract.read_manifest(clean).get("upstream") or {}).get("shards") if clean else None
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"cannot tell which dataset {clean or 'the model'} comes from: no download output is named upstream")
    return sources_of_cleans(shards, policy)
