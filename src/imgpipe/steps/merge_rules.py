"""The rules an unsharded run applies with every input at hand, applied by the merge across shards.

    keys = path_keys(table.column("path").to_pylist())        # one shard's kept rows
    rows, first = later_paths([keys0, keys1], [rejected0, rejected1])
    dup, lead = exact_duplicates(sha_keys)
    classes, label = kept_classes(classes, label, dropped, source_order)

An unsharded download reads each member path once: a later member of a path already seen
(kept or rejected) is a ``duplicate_member`` reject (:mod:`imgpipe.data.extraction`). Shards
split the inputs by name, but two sources can hold one path (an archive goes whole to one
shard, a prefix's object to the shard of its key), so each shard sees only its own copy and
:func:`imgpipe.steps.merge.merge` settles the rest here: the copy in the lowest shard that has
the path stands, a kept row of the same path in a higher shard is rejected. Paths are held as
their 128-bit BLAKE2b digests (16 bytes a row), as :class:`~imgpipe.data.extraction.SeenPaths`
holds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["path_keys", "later_paths", "exact_duplicates", "kept_classes"]


def path_keys(paths: Iterable[str]) -> np.ndarray:
    """The 128-bit digest of every path, as fixed-width bytes (``S16``)."""
    digests = [hashlib.blake2b(p.encode("utf-8", "surrogateescape"), digest_size=16).digest() for p in paths]
    return np.array(digests, dtype="S16") if digests else np.zeros(0, "S16")


def later_paths(kept: Sequence[np.ndarray], rejected: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Kept rows whose path a lower shard holds (kept or rejected), and that lowest shard of each.

    Args:
        kept: Per shard, the :func:`path_keys` of its kept rows (rows number on across shards,
            shard after shard).
        rejected: Per shard, the :func:`path_keys` of its rejects.

    Returns:
        The rows (positions in the concatenation of ``kept``) and the lowest shard holding each one's path.
    """
    if len(kept) != len(rejected):
        raise ValueError(f"{len(kept)} shards of kept paths but {len(rejected)} of rejected ones")
    keys = np.concatenate([*kept, *rejected]) if kept else np.zeros(0, "S16")
    shard = (
        np.concatenate([np.full(len(k), i, np.int32) for i, k in enumerate(kept)] + [np.full(len(r), i, np.int32) for i, r in enumerate(rejected)])
        if kept
        else np.zeros(0, np.int32)
    )
    order = np.lexsort((shard, keys))  # by path, then shard: each path's lowest shard first
    ranked = keys[order]
    starts = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1] if len(keys) else np.zeros(0, np.int64)
    lowest = np.empty(len(keys), np.int32)
    lowest[order] = np.repeat(shard[order[starts]], np.diff(np.r_[starts, len(keys)]))
    rows = sum(len(k) for k in kept)
    later = np.flatnonzero(lowest[:rows] < shard[:rows])
    return later, lowest[later]


def exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose key an earlier row has (the lowest shard's copy is kept), and that earlier row of each."""
    order = np.argsort(keys, kind="stable")  # equal keys stay in row order: the first is the kept one
    ranked = keys[order]
    starts = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1] if len(keys) else np.zeros(0, np.int64)
    first = np.repeat(order[starts], np.diff(np.r_[starts, len(keys)]))  # per position in ``order``
    later = first != order
    return order[later], first[later]


def kept_classes(classes: list[str], label: np.ndarray, dropped: np.ndarray, source_order: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The classes that kept an image (and the source's own, which keep their place), labels re-indexed to them, as clean does."""
    used = set(np.unique(label[~dropped]).tolist())
    pinned = set(source_order)
    kept = [i for i, c in enumerate(classes) if i in used or c in pinned]
    if len(kept) == len(classes):
        return classes, label
    remap = np.full(max(1, len(classes)), -1, np.int32)
    remap[kept] = np.arange(len(kept), dtype=np.int32)
    return [classes[i] for i in kept], remap[label]
