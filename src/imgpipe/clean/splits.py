"""Splits: the stratified random draw, and the split a source already gives (``split_from: source``).

    codes = split_codes(labels, cfg.split, cfg.seed)    # stratified, seeded

    given = given_codes(paths, column)      # int8 per row: an index into SPLITS, -1 where none
    codes, facts = source_codes(given, labels, classes, cfg.split, cfg.seed)

A row's split comes from the download's ``split`` column (the Hub's ``data/test-*`` files, a
``split`` column in the source), else from a folder of its path named for a split (``train``,
``training``, ``val``, ``valid``, ``validation``, ``dev``, ``test``, ``testing``; any case), as
torchvision's and Keras' folder layouts and the Hub's ``imagefolder`` name them. A split the
source gives is kept as it is; one it lacks (a source with train and test only has no val) is
carved from the source's train images, stratified, in the ratio the config's fractions give;
rows without a split get the stratified random split. A source that names no val and no test
is split at random, as if it gave nothing.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from imgpipe.clean.config import SPLITS

__all__ = ["SPLIT_NAMES", "split_codes", "stratified_split", "split_of", "given_codes", "source_codes"]

# Names sources give a split -> imgpipe's split.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_TRAIN, _VAL, _TEST = (SPLITS.index(s) for s in ("train", "val", "test"))


def split_codes(labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assigns each item a split so every class follows ``fractions`` as closely as possible.

    Per class, counts come from the largest-remainder method (so they sum exactly),
    with at least one training item for any non-empty class. Where that leaves a split
    whose fraction asks for at least half an item over the whole set with none (a few
    images per class round every class's test share down to 0), the class closest to
    owing it one gives one training item to it. Which items go where is drawn from a
    generator seeded with ``seed``.

    Args:
        labels: Class index per item, in a deterministic item order.
        fractions: One fraction per split in :data:`SPLITS`.
        seed: Base seed.

    Returns:
        The split per item, as an index into :data:`SPLITS` (int8).
    """
    rng = np.random.default_rng([seed, 0x5EED, 1])
    labels_arr = np.asarray(labels)
    out = np.empty(len(labels_arr), dtype=np.int8)
    groups = [np.flatnonzero(labels_arr == cls) for cls in np.unique(labels_arr)]
    shares = np.asarray(fractions, dtype=float)
    exact = np.array([shares * len(idx) for idx in groups]).reshape(len(groups), len(shares))
    counts = np.floor(exact).astype(int)
    for k, idx in enumerate(groups):
        for j in np.argsort(-(exact[k] - counts[k]), kind="stable")[: len(idx) - counts[k].sum()]:
            counts[k, j] += 1
        if counts[k, 0] == 0 and len(idx) > 0:
            counts[k, int(np.argmax(counts[k]))] -= 1
            counts[k, 0] += 1
    for j in range(1, len(shares)):
        if counts[:, j].sum() == 0 and shares[j] * len(labels_arr) >= 0.5:
            owing = np.where(counts[:, 0] > 1, exact[:, j] - counts[:, j], -np.inf)
            if len(owing) and np.isfinite(owing.max()):
                k = int(np.argmax(owing))
                counts[k, 0] -= 1
                counts[k, j] += 1
    for k, idx in enumerate(groups):
        perm = rng.permutation(idx)
        for code, part in enumerate(np.split(perm, np.cumsum(counts[k])[:-1])):
            out[part] = code
    return out


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """:func:`split_codes` as split names."""
    return [SPLITS[c] for c in split_codes(labels, fractions, seed).tolist()]


def split_of(path: str, given: str | None = None) -> str | None:
    """The split ``given`` names (a source's split column), else the first folder of ``path`` named for one."""
    if given:
        return SPLIT_NAMES.get(given.strip().lower())
    for part in posixpath.dirname(path).split("/"):
        split = SPLIT_NAMES.get(part.lower())
        if split is not None:
            return split
    return None


def given_codes(paths: Iterable[str], given: Iterable[str | None]) -> np.ndarray:
    """Per row, the index into :data:`SPLITS` of the split its source gives, -1 where none."""
    return np.array([SPLITS.index(s) if (s := split_of(p, g)) else -1 for p, g in zip(paths, given)], dtype=np.int8)


def source_codes(
    given: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    fractions: Sequence[float],
    seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The split of each row: the source's where it gives one, carved or random where not.

    Args:
        given: Per row, :func:`given_codes`' answer.
        labels: Per row, its class index into ``classes``.
        classes: Class names in label order (for the report).
        fractions: The config's train/val/test fractions.
        seed: Base seed of the random parts.

    Returns:
        The split codes, and what the manifest records: how many rows the source split,
        which splits were carved from its train rows, and the classes a source split lacks.
    """
    has = {int(c) for c in np.unique(given) if c >= 0}
    facts: dict[str, Any] = {"given": {SPLITS[c]: int((given == c).sum()) for c in sorted(has)}, "carved": [], "missing_classes": {}}
    if not has & {_VAL, _TEST}:
        facts["used"] = False
        return split_codes(labels, fractions, seed), facts
    facts["used"] = True
    codes = np.full(len(given), -1, dtype=np.int8)
    codes[given >= 0] = given[given >= 0]
    carved = [c for c in (_VAL, _TEST) if c not in has and fractions[c] > 0]
    from_train = given == _TRAIN
    if carved:
        share = [fractions[c] if c == _TRAIN or c in carved else 0.0 for c in range(len(SPLITS))]
        total = sum(share)
        codes[from_train] = split_codes(labels[from_train], [f / total for f in share], seed)
        facts["carved"] = [SPLITS[c] for c in carved]
    rest = given < 0
    codes[rest] = split_codes(labels[rest], fractions, seed)
    present = set(np.unique(labels).tolist())
    for c in sorted(has):
        lacking = sorted(present - set(np.unique(labels[given == c]).tolist()))
        if lacking:
            facts["missing_classes"][SPLITS[c]] = [classes[i] for i in lacking[:50]]
    return codes, facts
