"""Clean's plan, from metadata alone: labels, exact duplicates, the stratified split, the shuffled order.

Nothing here decodes an image: identical bytes decode identically, so duplicates are
settled by sha256 before the decode pass, and a row's split and ``order`` are drawn from
generators seeded with the config's ``seed`` (:func:`stratified_split`, :func:`shuffled_order`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.contract import Reject
from imgpipe.data.annotations import image_stem
from imgpipe.data.labels import Labeler, choose_label_source, encode_labels, read_label_csv

__all__ = ["Unit", "Index", "Plan", "RowsPlan", "read_index", "split_codes", "stratified_split", "shuffled_order", "build_labeler", "plan_rows"]

# Rows labelled per batch: the paths of one batch are Python strings for a moment, never
# all of them at once.
_LABEL_BATCH = 4096


@dataclass(frozen=True, slots=True)
class Unit:
    """One row group of the download output, and where its rows sit in the :class:`Index`.

    Attributes:
        uri: The data file.
        row_group: Its row group.
        start: Index position of the row group's first row.
        rows: Rows in the row group.
    """

    uri: str
    row_group: int
    start: int
    rows: int

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.rows)


@dataclass(frozen=True)
class Index:
    """Path and sha256 of every input row, as Arrow arrays in input order.

    A row is named by its position here everywhere in the step: the index holds no
    Python object per row (about 100 bytes an image in Arrow buffers, where a dict of
    strings took 0.5 KB and left the allocator's arenas fragmented after it was freed).
    """

    units: list[Unit]
    paths: pa.Array
    sha256: pa.Array
    labels: pa.Array | None = None  # what the source labelled each row (the download's label column), if it did

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, row: int) -> str:
        return self.paths[int(row)].as_py()

    def iter_paths(self) -> Iterator[str]:
        """Every path in index order, a batch at a time."""
        for lo in range(0, len(self.paths), _LABEL_BATCH):
            yield from self.paths.slice(lo, _LABEL_BATCH).to_pylist()


@dataclass
class Plan:
    """The metadata-only plan, one array entry per input row (index position).

    Attributes:
        classes: Class names, in label order.
        order: The row's place in the shuffled output, -1 for a row the plan does not place.
        label: Class index of a placed row.
        split: Index into :data:`SPLITS` of a placed row.
        carried: Placed rows copied from a previous output instead of decoded.
        deferred: ``no_label`` / ``duplicate`` rejects by row; they apply only to rows
            that decode (a decode failure wins).
    """

    classes: list[str]
    order: np.ndarray
    label: np.ndarray
    split: np.ndarray
    carried: np.ndarray
    deferred: dict[int, Reject] = field(default_factory=dict)

    @property
    def planned(self) -> int:
        return int((self.order >= 0).sum())

    def of_rows(self, rows: np.ndarray) -> RowsPlan:
        """The plan of ``rows`` (index positions), in that order."""
        return RowsPlan(tuple(self.classes), self.order[rows], self.label[rows], self.split[rows], self.carried[rows])

    def of_units(self, units: Sequence[Unit]) -> RowsPlan:
        """The plan of every row of ``units``, in order."""
        return self.of_rows(np.concatenate([np.arange(u.start, u.start + u.rows) for u in units] or [np.zeros(0, np.int64)]))


@dataclass(frozen=True)
class RowsPlan:
    """The plan of some rows (a decode task's row groups): what a worker needs, as arrays."""

    classes: tuple[str, ...]
    order: np.ndarray
    label: np.ndarray
    split: np.ndarray
    carried: np.ndarray


def read_index(files: Sequence[str]) -> Index:
    """Reads paths, hashes and given labels of every row (no image bytes), by row group."""
    units: list[Unit] = []
    paths: list[pa.Array] = []
    hashes: list[pa.Array] = []
    labels: list[pa.Array] = []
    start = 0
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            labelled = "label" in pf.schema_arrow.names  # downloads of older runs have no label column
            for rg in range(pf.metadata.num_row_groups):
                meta = pf.read_row_group(rg, columns=["path", "sha256", *(["label"] if labelled else [])], use_threads=False)
                units.append(Unit(uri, rg, start, meta.num_rows))
                # Large strings: at 100M images the paths alone pass 2 GiB, a string array's limit.
                paths.append(meta.column("path").combine_chunks().cast(pa.large_string()))
                hashes.append(meta.column("sha256").combine_chunks().cast(pa.large_string()))
                given = meta.column("label").combine_chunks() if labelled else pa.nulls(meta.num_rows)
                labels.append(given.cast(pa.large_string()))
                start += meta.num_rows
    empty = pa.array([], pa.large_string())
    given = pa.concat_arrays(labels) if labels else empty
    return Index(
        units,
        pa.concat_arrays(paths) if paths else empty,
        pa.concat_arrays(hashes) if hashes else empty,
        given if given.null_count < len(given) else None,
    )


def split_codes(labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assigns each item a split so every class follows ``fractions`` as closely as possible.

    Per class, counts come from the largest-remainder method (so they sum exactly),
    with at least one training item for any non-empty class; which items go where is
    drawn from a generator seeded with ``seed``.

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
        for code, part in enumerate(np.split(perm, bounds)):
            out[part] = code
    return out


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """:func:`split_codes` as split names."""
    return [SPLITS[c] for c in split_codes(labels, fractions, seed).tolist()]


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The precomputed shuffled index: a seeded permutation of ``range(n)``."""
    return np.random.default_rng([seed, 0x5EED, 2]).permutation(n)


def build_labeler(cfg: CleanConfig, index: Index) -> Labeler:
    """The labeler the config asks for (``auto`` chooses from the index's paths), with ``label_overrides`` over it."""
    if cfg.label_source == "csv":
        assert cfg.labels_csv is not None  # checked in CleanConfig
        base = Labeler("csv", read_label_csv(storage.read_bytes(cfg.labels_csv), f"labels_csv {storage.redact_uri(cfg.labels_csv)}"))
    elif cfg.label_source == "auto":
        base = Labeler(choose_label_source(index.iter_paths(), given=index.labels is not None))
    else:
        base = Labeler(cfg.label_source)
    if cfg.label_overrides:
        return OverriddenLabeler(
            base, read_label_csv(storage.read_bytes(cfg.label_overrides), f"label_overrides {storage.redact_uri(cfg.label_overrides)}")
        )
    return base


class OverriddenLabeler(Labeler):
    """A labeler whose answers a reviewed ``path,label`` table replaces, counting what it replaced.

    Attributes:
        overrides: Path (or bare file name) -> label.
        applied: Paths whose label an override set.
    """

    def __init__(self, base: Labeler, overrides: dict[str, str]) -> None:
        super().__init__(base.source, base.csv_labels if base.source == "csv" else None)
        self.base, self.overrides = base, overrides
        self.applied: set[str] = set()

    def __call__(self, path: str, given: str | None = None) -> str | None:
        key = path if path in self.overrides else posixpath.basename(path)
        if key in self.overrides:
            self.applied.add(key)
            return self.overrides[key]
        return self.base(path, given)

    def describe_missing(self, path: str) -> str:
        return self.base.describe_missing(path)

    def report(self) -> dict[str, Any]:
        """What the manifest records: how many overrides applied, and those that matched no image."""
        unmatched = sorted(set(self.overrides) - self.applied)
        return {"given": len(self.overrides), "applied": len(self.applied), "unmatched": len(unmatched), "unmatched_sample": unmatched[:20]}


def _label_rows(index: Index, by_path: np.ndarray, labeler: Labeler, deferred: dict[int, Reject]) -> tuple[np.ndarray, list[str]]:
    """Labels every row: a code into the returned names per row, -1 (and a ``no_label`` reject) where none."""
    codes = np.full(len(index), -1, dtype=np.int32)
    names: dict[str, int] = {}
    for lo in range(0, len(by_path), _LABEL_BATCH):
        rows = by_path[lo : lo + _LABEL_BATCH]
        given = index.labels.take(pa.array(rows)).to_pylist() if index.labels is not None else [None] * len(rows)
        for row, path, label in zip(rows.tolist(), index.paths.take(pa.array(rows)).to_pylist(), given):
            name = labeler(path, label)
            if name is None:
                deferred[row] = Reject(path, "no_label", labeler.describe_missing(path))
            else:
                codes[row] = names.setdefault(name, len(names))
    return codes, list(names)


def _first_of_each_hash(index: Index, labelled: np.ndarray, deferred: dict[int, Reject]) -> np.ndarray:
    """The first row of ``labelled`` (rows in path order) per sha256; the others become ``duplicate`` rejects."""
    if not len(labelled):
        return labelled
    hashes = index.sha256.take(pa.array(labelled))
    rank = pa.array(np.arange(len(labelled)))
    first = pa.table({"sha256": hashes, "rank": rank}).group_by("sha256").aggregate([("rank", "min")])
    group = pc.index_in(hashes, value_set=first.column("sha256").combine_chunks()).to_numpy()
    first_rank = first.column("rank_min").to_numpy()[group]
    is_first = first_rank == np.arange(len(labelled))
    for k in np.flatnonzero(~is_first).tolist():
        original = index.path(labelled[first_rank[k]])
        deferred[int(labelled[k])] = Reject(index.path(labelled[k]), "duplicate", f"same bytes as {original}")
    return labelled[is_first]


def _official_codes(index: Index, rows: np.ndarray, labels: np.ndarray, official: dict[str, str], cfg: CleanConfig) -> np.ndarray:
    """Splits of ``rows`` from the release's lists: test.txt -> test, trainval.txt -> train/val (stratified), else random."""
    which = np.array([official.get(image_stem(p), "") for p in index.paths.take(pa.array(rows)).to_pylist()] or [""], dtype=object)[: len(rows)]
    codes = np.empty(len(rows), dtype=np.int8)
    test, trainval = which == "test", which == "trainval"
    codes[test] = SPLITS.index("test")
    head = cfg.split[0] + cfg.split[1]
    codes[trainval] = split_codes(labels[trainval], (cfg.split[0] / head, cfg.split[1] / head, 0.0), cfg.seed)
    rest = ~(test | trainval)
    codes[rest] = split_codes(labels[rest], cfg.split, cfg.seed)
    return codes


def plan_rows(index: Index, labeler: Labeler, cfg: CleanConfig, known: pa.Table | None = None, official: dict[str, str] | None = None) -> Plan:
    """Labels, finds exact duplicates, splits and orders the rows, from metadata alone.

    Identical bytes decode identically, so duplicates can be settled before decoding:
    among labelled rows with the same sha256, the first path in sorted order is the
    candidate and the others are deferred ``duplicate`` rejects.

    Args:
        index: Every input row's path and sha256.
        labeler: Gives a row's class name from its path.
        cfg: The clean config (split fractions, seed).
        known: ``sha256`` and ``split`` of a previous output's rows: a candidate found there
            keeps its split and is carried instead of decoded.
        official: Image stem -> ``trainval``/``test`` (``split_from: annotations``).
    """
    n = len(index)
    deferred: dict[int, Reject] = {}
    by_path = pc.sort_indices(index.paths).to_numpy().astype(np.int64)
    name_codes, names = _label_rows(index, by_path, labeler, deferred)
    candidates = _first_of_each_hash(index, by_path[name_codes[by_path] >= 0], deferred)
    classes = encode_labels(names[c] for c in np.unique(name_codes[candidates]).tolist())
    to_label = np.array([classes.index(name) if name in classes else -1 for name in names] or [0], dtype=np.int32)
    label_ids = to_label[name_codes[candidates]]
    carried = np.zeros(len(candidates), dtype=bool)
    splits = np.empty(len(candidates), dtype=np.int8)
    if known is not None and known.num_rows:
        at = pc.index_in(index.sha256.take(pa.array(candidates)), value_set=known.column("sha256").combine_chunks().cast(pa.large_string()))
        at = at.fill_null(-1).to_numpy()
        carried = at >= 0
        known_codes = np.array([SPLITS.index(s) for s in known.column("split").to_pylist()], dtype=np.int8)
        splits[carried] = known_codes[at[carried]]
    if official:
        splits[~carried] = _official_codes(index, candidates[~carried], label_ids[~carried], official, cfg)
    else:
        splits[~carried] = split_codes(label_ids[~carried], cfg.split, cfg.seed)
    plan = Plan(
        classes=classes,
        order=np.full(n, -1, dtype=np.int64),
        label=np.full(n, -1, dtype=np.int32),
        split=np.full(n, -1, dtype=np.int8),
        carried=np.zeros(n, dtype=bool),
        deferred=deferred,
    )
    plan.order[candidates] = shuffled_order(len(candidates), cfg.seed)
    plan.label[candidates] = label_ids
    plan.split[candidates] = splits
    plan.carried[candidates] = carried
    return plan
