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
from imgpipe.clean.splits import given_codes, source_codes, split_codes
from imgpipe.contract import Reject
from imgpipe.data.annotations import image_stem
from imgpipe.data.labelgate import MAX_CLASSES, check_class_list
from imgpipe.data.labels import (
    BAD_LABEL,
    AutoLabeler,
    Labeler,
    auto_layout,
    check_class_name,
    encode_labels,
    nested_prefixes,
    read_label_csv,
    source_class_order,
)

__all__ = ["Unit", "Index", "Plan", "RowsPlan", "read_index", "shuffled_order", "build_labeler", "plan_rows"]

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
    splits: pa.Array | None = None  # the split the source gave each row (the download's split column), if it did

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
    pinned: int = 0  # the first classes are the source's own list: kept whole, with or without images
    source_split: dict[str, Any] | None = None  # what split_from=source found (imgpipe.clean.splits.source_codes)

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
    splits: list[pa.Array] = []
    start = 0
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            # Downloads of older runs have no label or split column.
            given = [c for c in ("label", "split") if c in pf.schema_arrow.names]
            for rg in range(pf.metadata.num_row_groups):
                meta = pf.read_row_group(rg, columns=["path", "sha256", *given], use_threads=False)
                units.append(Unit(uri, rg, start, meta.num_rows))
                # Large strings: at 100M images the paths alone pass 2 GiB, a string array's limit.
                paths.append(meta.column("path").combine_chunks().cast(pa.large_string()))
                hashes.append(meta.column("sha256").combine_chunks().cast(pa.large_string()))
                for name, into in (("label", labels), ("split", splits)):
                    column = meta.column(name).combine_chunks() if name in given else pa.nulls(meta.num_rows)
                    into.append(column.cast(pa.large_string()))
                start += meta.num_rows
    empty = pa.array([], pa.large_string())

    def any_given(arrays: list[pa.Array]) -> pa.Array | None:
        joined = pa.concat_arrays(arrays) if arrays else empty
        return joined if joined.null_count < len(joined) else None

    return Index(
        units,
        pa.concat_arrays(paths) if paths else empty,
        pa.concat_arrays(hashes) if hashes else empty,
        any_given(labels),
        any_given(splits),
    )


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The precomputed shuffled index: a seeded permutation of ``range(n)``."""
    return np.random.default_rng([seed, 0x5EED, 2]).permutation(n)


def build_labeler(cfg: CleanConfig, index: Index, sources: Sequence[dict[str, Any]] = ()) -> Labeler:
    """The labeler the config asks for, with ``label_overrides`` over it.

    ``sources`` are the download manifest's ``sources`` entries: the class list a source gives
    (a ``ClassLabel``'s names) sets the class order of the ``given`` and ``auto`` schemes, and
    the nested archives it lists let ``auto`` label their members by their class folder
    (:class:`~imgpipe.data.labels.AutoLabeler`, which decides per image).
    """
    order = _source_order(sources) if cfg.label_source in ("auto", "given") else ()
    if cfg.label_source == "csv":
        assert cfg.labels_csv is not None  # checked in CleanConfig
        base = Labeler("csv", read_label_csv(storage.read_bytes(cfg.labels_csv), f"labels_csv {storage.redact_uri(cfg.labels_csv)}"))
    elif cfg.label_source == "auto":
        base = AutoLabeler(auto_layout(_given_pairs(index)), nested_prefixes(sources), order)
    else:
        base = Labeler(cfg.label_source, class_order=order)
    if cfg.label_overrides:
        return OverriddenLabeler(
            base, read_label_csv(storage.read_bytes(cfg.label_overrides), f"label_overrides {storage.redact_uri(cfg.label_overrides)}")
        )
    return base


def _source_order(sources: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The sources' own class list, each source's list through the label gate (the manifest is a file, like any other).

    Raises:
        ValueError: Naming the source whose list breaks the rule
            (:func:`imgpipe.data.labelgate.check_class_list`), or when the lists together
            name more than :data:`~imgpipe.data.labelgate.MAX_CLASSES` classes.
    """
    for i, entry in enumerate(sources):
        if isinstance(entry, dict) and entry.get("classes") is not None:
            check_class_list(entry["classes"], f"the download manifest's sources[{i}] ({entry.get('uri')}) classes")
    order = source_class_order(sources)
    if len(order) > MAX_CLASSES:
        raise ValueError(f"the download manifest's sources name {len(order)} classes together; at most {MAX_CLASSES} are allowed")
    return order


def _given_pairs(index: Index) -> Iterator[tuple[str, str | None]]:
    """Every row's path and the label its source gave it, a batch at a time."""
    for lo in range(0, len(index.paths), _LABEL_BATCH):
        paths = index.paths.slice(lo, _LABEL_BATCH).to_pylist()
        given = index.labels.slice(lo, _LABEL_BATCH).to_pylist() if index.labels is not None else [None] * len(paths)
        yield from zip(paths, given)


class OverriddenLabeler(Labeler):
    """A labeler whose answers a reviewed ``path,label`` table replaces, counting what it replaced.

    Attributes:
        overrides: Path (or bare file name) -> label.
        applied: Paths whose label an override set.
    """

    def __init__(self, base: Labeler, overrides: dict[str, str]) -> None:
        super().__init__(base.source, base.csv_labels if base.source == "csv" else None, base.class_order)
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

    @property
    def folds_case(self) -> bool:
        return self.base.folds_case

    @property
    def resolved(self) -> str:
        return self.base.resolved

    def auto_counts(self) -> dict[str, int] | None:
        return self.base.auto_counts()

    def report(self) -> dict[str, Any]:
        """What the manifest records: how many overrides applied, and those that matched no image."""
        unmatched = sorted(set(self.overrides) - self.applied)
        return {"given": len(self.overrides), "applied": len(self.applied), "unmatched": len(unmatched), "unmatched_sample": unmatched[:20]}


def _label_rows(index: Index, by_path: np.ndarray, labeler: Labeler, deferred: dict[int, Reject]) -> tuple[np.ndarray, list[str]]:
    """Labels every row: a code into the returned names per row, -1 (and a ``no_label`` or ``bad_label`` reject) where none.

    Every class name is checked here, where clean first reads it, whatever gave it (a folder,
    an Oxford file name, a label CSV, an override, the source): one that no labels file,
    CSV or report could carry (:func:`imgpipe.data.labels.check_class_name`) is ``bad_label``.
    """
    codes = np.full(len(index), -1, dtype=np.int32)
    names: dict[str, int] = {}
    for lo in range(0, len(by_path), _LABEL_BATCH):
        rows = by_path[lo : lo + _LABEL_BATCH]
        given = index.labels.take(pa.array(rows)).to_pylist() if index.labels is not None else [None] * len(rows)
        for row, path, label in zip(rows.tolist(), index.paths.take(pa.array(rows)).to_pylist(), given):
            name = labeler(path, label)
            bad = check_class_name(name) if name is not None else None
            if name is None:
                deferred[row] = Reject(path, "no_label", labeler.describe_missing(path))
            elif bad is not None:
                deferred[row] = Reject(path, BAD_LABEL, bad)
            else:
                codes[row] = names.setdefault(name, len(names))
                if len(names) > MAX_CLASSES:
                    raise ValueError(
                        f"label_source {labeler.resolved} gives more than {MAX_CLASSES} distinct class names (the label gate's cap); "
                        "check that it reads the class from where the source keeps it (label_source, labels_csv)"
                    )
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
        official: Image stem -> ``trainval``/``test`` (``split_from: annotations``). Without it,
            ``split_from: source`` keeps the split the source gives (:mod:`imgpipe.clean.splits`).
    """
    n = len(index)
    deferred: dict[int, Reject] = {}
    by_path = pc.sort_indices(index.paths).to_numpy().astype(np.int64)
    name_codes, names = _label_rows(index, by_path, labeler, deferred)
    candidates = _first_of_each_hash(index, by_path[name_codes[by_path] >= 0], deferred)
    classes = encode_labels((names[c] for c in np.unique(name_codes[candidates]).tolist()), labeler.class_order, fold_case=labeler.folds_case)
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
    source_facts = None
    if official:
        splits[~carried] = _official_codes(index, candidates[~carried], label_ids[~carried], official, cfg)
    elif cfg.split_from == "source":
        fresh = candidates[~carried]
        given = index.splits.take(pa.array(fresh)).to_pylist() if index.splits is not None else [None] * len(fresh)
        codes = given_codes(index.paths.take(pa.array(fresh)).to_pylist(), given)
        splits[~carried], source_facts = source_codes(codes, label_ids[~carried], classes, cfg.split, cfg.seed)
    else:
        splits[~carried] = split_codes(label_ids[~carried], cfg.split, cfg.seed)
    plan = Plan(
        classes=classes,
        order=np.full(n, -1, dtype=np.int64),
        label=np.full(n, -1, dtype=np.int32),
        split=np.full(n, -1, dtype=np.int8),
        carried=np.zeros(n, dtype=bool),
        deferred=deferred,
        source_split=source_facts,
        pinned=len(labeler.class_order),
    )
    plan.order[candidates] = shuffled_order(len(candidates), cfg.seed)
    plan.label[candidates] = label_ids
    plan.split[candidates] = splits
    plan.carried[candidates] = carried
    return plan
