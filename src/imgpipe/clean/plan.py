"""Clean's plan, from metadata alone: labels, exact duplicates, the stratified split, the shuffled order.

Nothing here decodes an image: identical bytes decode identically, so duplicates are
settled by sha256 before the decode pass, and a row's split and ``order`` are drawn from
generators seeded with the config's ``seed`` (:func:`stratified_split`, :func:`shuffled_order`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.contract import Reject
from imgpipe.data.labels import Labeler, choose_label_source, encode_labels, read_label_csv

__all__ = ["Placement", "Plan", "read_index", "stratified_split", "shuffled_order", "build_labeler", "plan_rows"]

@dataclass(frozen=True, slots=True)
class Placement:
    """Where a row goes if it decodes; decided from metadata before any decoding."""

    order: int
    label: int
    label_name: str
    split: str
    sha256: str
    carried: bool = False


@dataclass
class Plan:
    """The metadata-only plan: placements of candidate rows and the rejects they imply."""

    classes: list[str]
    placements: dict[str, Placement] = field(default_factory=dict)
    # no_label / duplicate: these apply only to rows that decode (a decode failure wins).
    deferred: dict[str, Reject] = field(default_factory=dict)


def read_index(files: Sequence[str]) -> tuple[list[tuple[str, int, list[str]]], dict[str, str]]:
    """Reads paths and hashes of every row (no image bytes), by row group."""
    units: list[tuple[str, int, list[str]]] = []
    sha_by_path: dict[str, str] = {}
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            for rg in range(pf.metadata.num_row_groups):
                meta = pf.read_row_group(rg, columns=["path", "sha256"])
                paths = meta.column("path").to_pylist()
                sha_by_path.update(zip(paths, meta.column("sha256").to_pylist()))
                units.append((uri, rg, paths))
    return units, sha_by_path


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """Assigns each item a split so every class follows ``fractions`` as closely as possible.

    Per class, counts come from the largest-remainder method (so they sum exactly),
    with at least one training item for any non-empty class; which items go where is
    drawn from a generator seeded with ``seed``.

    Args:
        labels: Class index per item, in a deterministic item order.
        fractions: One fraction per split in :data:`SPLITS`.
        seed: Base seed.

    Returns:
        The split name per item.
    """
    rng = np.random.default_rng([seed, 0x5EED, 1])
    labels_arr = np.asarray(labels)
    out = np.empty(len(labels_arr), dtype=object)
    for cls in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == cls)
        n = len(idx)
        exact = np.asarray(fractions, dtype=float) * n
        counts = np.floor(exact).astype(int)
        for j in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
            counts[j] += 1
        if counts[0] == 0 and n > 0:
            counts[int(np.argmax(counts))] -= 1
            counts[0] += 1
        perm = rng.permutation(idx)
        bounds = np.cumsum(counts)[:-1]
        for name, part in zip(SPLITS, np.split(perm, bounds)):
            out[part] = name
    return out.tolist()


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The precomputed shuffled index: a seeded permutation of ``range(n)``."""
    return np.random.default_rng([seed, 0x5EED, 2]).permutation(n)


def build_labeler(cfg: CleanConfig, paths: Sequence[str]) -> Labeler:
    if cfg.label_source == "csv":
        assert cfg.labels_csv is not None  # checked in CleanConfig
        return Labeler("csv", read_label_csv(storage.read_bytes(cfg.labels_csv)))
    if cfg.label_source == "auto":
        return Labeler(choose_label_source(paths))
    return Labeler(cfg.label_source)


def plan_rows(
    sha_by_path: dict[str, str], labeler: Labeler, cfg: CleanConfig, known: dict[str, str] | None = None
) -> Plan:
    """Labels, finds exact duplicates, splits and orders the rows, from metadata alone.

    Identical bytes decode identically, so duplicates can be settled before decoding:
    among labelled rows with the same sha256, the first path in sorted order is the
    candidate and the others are deferred ``duplicate`` rejects.
    """
    deferred: dict[str, Reject] = {}
    labelled: list[tuple[str, str, str]] = []
    for path in sorted(sha_by_path):
        name = labeler(path)
        if name is None:
            deferred[path] = Reject(path, "no_label", labeler.describe_missing(path))
        else:
            labelled.append((path, name, sha_by_path[path]))
    first_by_hash: dict[str, str] = {}
    candidates: list[tuple[str, str, str]] = []
    for path, name, sha in labelled:
        if sha in first_by_hash:
            deferred[path] = Reject(path, "duplicate", f"same bytes as {first_by_hash[sha]}")
        else:
            first_by_hash[sha] = path
            candidates.append((path, name, sha))
    classes = encode_labels(name for _, name, _ in candidates)
    index = {name: i for i, name in enumerate(classes)}
    # One string object per class, not one per row: the plan holds a placement per image.
    shared = {name: name for name in classes}
    label_ids = [index[name] for _, name, _ in candidates]
    known = known or {}
    fresh = [i for i, (_, _, sha) in enumerate(candidates) if sha not in known]
    fresh_splits = iter(stratified_split([label_ids[i] for i in fresh], cfg.split, cfg.seed))
    splits = [known[sha] if sha in known else next(fresh_splits) for _, _, sha in candidates]
    order = shuffled_order(len(candidates), cfg.seed)
    plan = Plan(classes=classes, deferred=deferred)
    for (path, name, sha), lab, split, o in zip(candidates, label_ids, splits, order):
        plan.placements[path] = Placement(int(o), lab, shared[name], split, sha, carried=sha in known)
    return plan
