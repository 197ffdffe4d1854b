"""Near-duplicate grouping: multi-index search and union-find against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.clean.neardup import MAX_DISTANCE, group_representatives, hamming


def brute_force(phash: np.ndarray, mirror: np.ndarray, t: int) -> np.ndarray:
    """Every pair compared: the smallest index of each connected component."""
    n = len(phash)
    label = np.arange(n)
    changed = True
    close = (hamming(phash[:, None], phash[None, :]) <= t) | (hamming(phash[:, None], mirror[None, :]) <= t)
    close |= close.T
    while changed:  # min-label propagation until stable
        new = np.array([label[close[i]].min(initial=label[i]) for i in range(n)])
        changed = not np.array_equal(new, label)
        label = new
    return label


def _clustered(rng: np.random.Generator, n: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes, a third of them copies of others with up to t + 2 bits flipped (some within t, some not)."""
    h = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    m = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    for i in range(n // 3, n):
        if rng.random() < 0.5:
            src = int(rng.integers(0, i))
            bits = rng.choice(64, size=int(rng.integers(0, t + 3)), replace=False)
            flip = np.uint64(sum(1 << int(b) for b in bits))
            # Near a hash, or near a mirrored hash.
            h[i] = (h[src] if rng.random() < 0.7 else m[src]) ^ flip
    return h, m


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("t", [0, 3, 6, 10])
def test_multi_index_grouping_equals_brute_force(seed, t):
    h, m = _clustered(np.random.default_rng([seed, t]), 300, t)
    assert np.array_equal(group_representatives(h, m, t), brute_force(h, m, t))


def test_chains_join_and_the_first_is_the_representative():
    base = np.uint64(0xF0F0F0F0F0F0F0F0)
    h = np.array([base ^ np.uint64(0b111), base, base ^ np.uint64(0b111000), np.uint64(0x0F0F0F0F0F0F0F0F)], np.uint64)
    m = np.full(4, np.uint64(0x123456789ABCDEF0))
    # 0-1 within 3 bits, 1-2 within 3 bits, 0-2 six bits apart: one group through the chain.
    assert group_representatives(h, m, 3).tolist() == [0, 0, 0, 3]
    assert group_representatives(h, m, 2).tolist() == [0, 1, 2, 3]


def test_mirrored_hash_joins():
    h = np.array([1, 2**40], np.uint64)
    m = np.array([2**40 + 1, 7], np.uint64)  # the first image mirrored is within 1 bit of the second
    assert group_representatives(h, m, 1).tolist() == [0, 0]


def test_identical_hashes_in_bulk_stay_cheap():
    h = np.zeros(20000, np.uint64)
    assert (group_representatives(h, h, 6) == 0).all()


@pytest.mark.parametrize("t", [-1, MAX_DISTANCE + 1])
def test_distance_out_of_range(t):
    with pytest.raises(ValueError, match="within 0..32"):
        group_representatives(np.zeros(2, np.uint64), np.zeros(2, np.uint64), t)
