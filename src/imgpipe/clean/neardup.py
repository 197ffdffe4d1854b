"""Near-duplicate groups of 64-bit perceptual hashes, without comparing every pair.

Two images are near-duplicates when their pHashes differ in at most ``t`` bits, or the
hash of one differs from the mirrored hash of the other in at most ``t`` bits; a group is
a connected component of that relation (union-find), so a chain of near-duplicates is one
group. :func:`group_representatives` returns each image's group as the smallest index in
it: the caller lists the images in the order it wants them kept.

Search is multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space
with multi-index hashing", CVPR 2012): the 64 bits are cut into ``m`` blocks; two hashes
within ``t`` bits agree within ``t // m`` bits on at least one block (pigeonhole), so each
block is a sorted table probed with every key within ``t // m`` bits of the query's
block, and only those candidates are compared in full (popcount). ``m = t + 1`` is the
exact-match special case; :func:`_blocks` picks the ``m`` with the fewest expected probes
and candidates for the number of hashes (at 128k hashes and t = 6, 4 blocks of 16 bits
probed at radius 1 compare ~20x fewer candidates than 7 exact blocks of 9 bits).
Everything is NumPy arrays; candidates are expanded in batches of at most
:data:`_BATCH`, so memory stays bounded however clustered the hashes are.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np

__all__ = ["MAX_DISTANCE", "hamming", "group_representatives"]

# Largest Hamming distance accepted: two unrelated 64-bit hashes differ in 32 bits on
# average, so past that a "near-duplicate" says nothing, and the index degenerates.
MAX_DISTANCE = 32

# Candidate pairs expanded at once (16 bytes each for the indices, and their hashes).
_BATCH = 1 << 20


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 arrays ``a`` and ``b``, elementwise."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int64)


def _blocks(n: int, t: int) -> list[tuple[int, int]]:
    """``(shift, bits)`` of the blocks that minimize probes x candidates for ``n`` hashes within ``t``."""

    def cost(m: int) -> float:
        bits = 64 // m
        probes = sum(math.comb(bits, i) for i in range(t // m + 1))
        return m * probes * (1 + n / 2.0**bits)

    m = min(range(1, t + 2), key=cost)
    sizes = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    shifts = np.cumsum([0] + sizes[:-1]).tolist()
    return list(zip(shifts, sizes))


def _masks(bits: int, radius: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``radius`` bits set."""
    out = [0]
    for r in range(1, radius + 1):
        out += [sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), r)]
    return np.array(out, dtype=np.uint64)


def _pairs(queries: np.ndarray, table: np.ndarray, t: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs ``(query index, table index)`` within ``t`` bits, in batches; a pair may repeat."""
    blocks = _blocks(len(table), t)
    radius = t // len(blocks)
    for shift, bits in blocks:
        mask = np.uint64((1 << bits) - 1)
        keys = (table >> np.uint64(shift)) & mask
        by_key = np.argsort(keys, kind="stable")
        sorted_keys = keys[by_key]
        q_keys = (queries >> np.uint64(shift)) & mask
        for probe in _masks(bits, radius):
            wanted = q_keys ^ probe
            lo = np.searchsorted(sorted_keys, wanted, "left")
            counts = np.searchsorted(sorted_keys, wanted, "right") - lo
            hits = np.flatnonzero(counts)
            if not len(hits):
                continue
            lo, counts = lo[hits], counts[hits]
            ends = np.cumsum(counts)
            total = int(ends[-1])
            for start in range(0, total, _BATCH):
                flat = np.arange(start, min(start + _BATCH, total))
                which = np.searchsorted(ends, flat, "right")
                q, d = hits[which], by_key[lo[which] + flat - (ends[which] - counts[which])]
                close = hamming(queries[q], table[d]) <= t
                yield q[close], d[close]


def _find(parent: np.ndarray) -> np.ndarray:
    """Every node's root (pointer jumping until each points at a root); ``parent[i] <= i`` always."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``parent`` with the components of ``a[k]`` and ``b[k]`` merged; a root hooks under the smaller root."""
    while len(a):
        parent = _find(parent)
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        # Several edges may hook one root: the smallest target wins this round, the rest the next.
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
    return _find(parent)


def group_representatives(phash: np.ndarray, mirror: np.ndarray, t: int) -> np.ndarray:
    """The smallest index of each hash's near-duplicate group (its own index when it has none).

    Args:
        phash: uint64 pHash per image, in the order the images are preferred.
        mirror: uint64 pHash of each image mirrored.
        t: Largest Hamming distance of near-duplicates, 0..:data:`MAX_DISTANCE`.

    Raises:
        ValueError: If ``t`` is out of range or the arrays differ in length.
    """
    if not 0 <= t <= MAX_DISTANCE:
        raise ValueError(f"near-duplicate distance must be within 0..{MAX_DISTANCE}, got {t}")
    if len(phash) != len(mirror):
        raise ValueError(f"{len(phash)} hashes but {len(mirror)} mirrored hashes")
    n = len(phash)
    if not n:
        return np.zeros(0, np.int64)
    phash, mirror = phash.astype(np.uint64), mirror.astype(np.uint64)
    # Images with the same pair of hashes are one group with the same neighbours: search once.
    pair = np.stack([phash, mirror], axis=1).view([("h", np.uint64), ("m", np.uint64)]).ravel()
    _, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    keys_h, keys_m = phash[first], mirror[first]
    k = len(first)
    parent = np.arange(k)
    # The table holds every key's hash (0..k-1) and its mirrored hash (k..2k-1).
    for q, d in _pairs(keys_h, np.concatenate([keys_h, keys_m]), t):
        d = d % k
        other = q != d
        parent = _union(parent, q[other], d[other])
    root = parent[inverse]
    smallest = np.full(k, n, np.int64)
    np.minimum.at(smallest, root, np.arange(n))
    return smallest[root]
