"""Which rows of a split each rank and worker reads, and in which order (torch-free).

A split of a committed resize output (``DATA/<split>/part-*.parquet``, see
:mod:`imgpipe.steps.resize`) is described from its manifest and Parquet footers alone
(:func:`describe_split`); the rest is pure functions of that metadata, the seed and the
epoch. Nothing here needs torch or reads a pixel (numpy and pyarrow only).
:mod:`imgpipe.train.loader` reads and decodes the rows these functions assign.

Partitioning. Each epoch the split's row groups are put in an order (a permutation
seeded with ``seed + epoch``, the same on every rank; file order for evaluation) and
their rows concatenated into one stream. The stream is cut rank-major: rank ``r`` takes
the ``r``-th of ``world_size`` equal contiguous ranges, and its worker ``w`` the
``w``-th of ``num_workers`` contiguous runs of whole batches within that. Ranks and
workers therefore read disjoint rows that together cover the split exactly once per
epoch; every rank gets the same number of batches and every worker the same number to
within one, and at most the two row groups at the ends of a range are shared with a
neighbour (read by both, each keeping its own rows). Training drops fewer than
``world_size`` rows per epoch to equalize the ranks, plus fewer than ``batch_size`` per
rank for the last partial batch; evaluation drops nothing.

Order. Within a worker, rows pass through a shuffle buffer driven by a generator seeded
with ``seed + epoch + rank + worker``. The order is computed from row-group metadata
alone (no pixels), which makes resuming cheap: :meth:`imgpipe.train.loader.ImageLoader.state_dict`
records the epoch and how many samples each worker has delivered, and a loader restored
from it skips exactly those (without reading rows it no longer needs) and delivers the
rest of the epoch in the same order, batch for batch, as an uninterrupted run
(:func:`next_partition` tells it which worker partition the round-robin continues with).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import contract, storage
from imgpipe.data.images import MAX_PIXELS
from imgpipe.data.labelgate import check_class_list
from imgpipe.resize.spec import CROP_FRACTION, MAX_ASPECT_LIMIT
from imgpipe.train.loader_config import LoaderConfig

__all__ = [
    "read_split_columns",
    "read_split_labels",
    "LABELS_FILE",
    "RowGroup",
    "Unit",
    "SplitInfo",
    "MAX_ROW_PIXELS",
    "read_labels",
    "split_names",
    "describe_split",
    "epoch_stream",
    "rank_range",
    "worker_batches",
    "assign_rows",
    "shuffle_order",
    "sample_seed",
    "sample_seeds",
    "epoch_order",
    "next_partition",
]

LABELS_FILE = contract.LABELS


# ----------------------------------------------------------------------------------------
# What a split holds (metadata only).


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a split.

    Attributes:
        file: URI of its file.
        row_group: Index within the file.
        rows: Row count.
        first_index: Index of its first row within the split (file order).
    """

    file: str
    row_group: int
    rows: int
    first_index: int


@dataclass(frozen=True)
class Unit:
    """The rows ``[start, stop)`` of row group ``group`` (an index into ``SplitInfo.row_groups``)."""

    group: int
    start: int
    stop: int


# The most pixels a row of any split may hold, whatever its manifest declares: the largest image
# decoded anywhere unless told otherwise (8192 x 8192 rows fit). A row past it is never decoded.
MAX_ROW_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class SplitInfo:
    """A split of a committed resize output, described from its metadata.

    Attributes:
        data: The resize output prefix.
        split: Split name (``train``, ``val``, ``test``).
        format: ``raw`` (``pixels`` column) or ``jpeg`` (``image`` column).
        row_groups: Every row group of the split's files, in manifest order.
        height: Image height the manifest declares (``size``; for a ``whole`` split, the
            first row's, as a nominal figure only: rows vary).
        width: Image width, likewise.
        channels: Channels of the first row (1 or 3).
        size: The side the resize step made for models (its manifest's ``size``): every
            row's side, or for a ``whole`` split the side readers crop to.
        whole: Rows are whole pictures of varying size (resize mode ``whole``); a reader
            crops each one (RandomResizedCrop for training, a centre crop for evaluation).
        max_aspect: ``whole`` rows' cap of the long side, as a multiple of the short side's
            target (the manifest's ``max_aspect``).
    """

    data: str
    split: str
    format: Literal["raw", "jpeg"]
    row_groups: tuple[RowGroup, ...]
    height: int
    width: int
    channels: int
    size: int = 0
    whole: bool = False
    max_aspect: float = MAX_ASPECT_LIMIT

    @property
    def num_samples(self) -> int:
        """Rows in the split."""
        return sum(g.rows for g in self.row_groups)

    def refuse_size(self, height: int, width: int) -> str | None:
        """Why a row of ``height x width`` (its image header's) cannot belong to this split, or ``None``.

        The bound is what the resize output's manifest declares (``size``, the split's mode
        and ``max_aspect``), never another row, plus :data:`MAX_ROW_PIXELS`.

        Returns:
            ``not_as_declared`` with the detail for a row of another geometry than the split's,
            ``too_large`` for one past the absolute cap, or ``None`` for a row that fits.
        """
        if not self.whole:
            ok = (height, width) == (self.size, self.size)
            declared = f"{self.size}x{self.size}"
        else:
            # resize's whole mode: short side at most size / CROP_FRACTION, long side at most
            # max_aspect times that (imgpipe.resize.spec.plan_geometry).
            short_target = round(self.size / CROP_FRACTION)
            long_cap = max(short_target, round(self.max_aspect * short_target))
            ok = 1 <= min(height, width) <= short_target and max(height, width) <= long_cap
            declared = f"at most {short_target} by {long_cap}"
        if not ok:
            return f"not_as_declared: {width}x{height}, the {self.split} split holds {declared}"
        if height * width > MAX_ROW_PIXELS:
            return f"too_large: {width}x{height} is over {MAX_ROW_PIXELS} pixels"
        return None


def read_split_columns(info: SplitInfo, columns: Sequence[str]) -> pa.Table:
    """``columns`` of every row of a split, in file order (the loader's row indexes); no image bytes."""
    tables = []
    for uri in dict.fromkeys(g.file for g in info.row_groups):
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            tables.append(pq.read_table(fh, columns=list(columns)))
    if not tables:
        raise ValueError(f"split {info.split} of {info.data} has no data files")
    return pa.concat_tables(tables)


def read_split_labels(info: SplitInfo) -> np.ndarray:
    """The ``label`` of every row of a split, in file order."""
    return read_split_columns(info, ["label"]).column("label").to_numpy()


def read_labels(data: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Class names by index, from ``__imgpipe__/labels.json`` (``{"0": name, ...}``) of a resize output.

    Falls back to the manifest's ``extra.classes`` when the file is absent.

    Raises:
        ValueError: If neither names any class, the indices are not 0..N-1, or the names break
            the label gate's rule (:func:`imgpipe.data.labelgate.check_class_list`).
    """
    data = storage.normalize_uri(data)
    uri = contract.side_file(data, LABELS_FILE)
    if uri is not None:
        raw = json.loads(storage.read_bytes(uri))
        try:
            by_index = {int(k): v for k, v in raw.items()}
        except (AttributeError, ValueError) as exc:
            raise ValueError(f'{uri} must map class indices to names, e.g. {{"0": "cat"}}') from exc
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{uri} must number its classes 0..N-1, got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
    else:
        manifest = manifest or contract.read_manifest(data)
        names = manifest.get("extra", {}).get("classes") or []
    if not names:
        raise ValueError(f"{data} names no classes (no {LABELS_FILE}, no classes in its manifest)")
    return list(check_class_list(names, uri or f"{data}'s manifest"))


def split_names(data: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Splits that have at least one data file in a committed resize output.

    Args:
        data: The resize output.
        manifest: Its manifest when the caller has read it already (read once, passed down).
    """
    manifest = manifest or contract.read_manifest(data, expect_step="resize")
    return sorted({f["name"].split("/", 1)[0] for f in manifest["files"] if "/" in f["name"] and f["rows"]})


def describe_split(data: str, split: str, manifest: Mapping[str, Any] | None = None) -> SplitInfo:
    """Lists a split's row groups and image geometry from Parquet footers.

    Raises:
        UncommittedOutputError: If ``data`` is not committed.
        ValueError: If ``data`` is not a resize output or holds no rows for ``split``.
    """
    data = storage.normalize_uri(data)
    manifest = manifest or contract.read_manifest(data, expect_step="resize")
    files = contract.data_files(data, manifest, select=lambda f: f["name"].startswith(split + "/") and bool(f["rows"]))
    if not files:
        raise ValueError(f"{data} holds no rows for split {split!r}; splits present: {split_names(data)}")
    fs, _ = storage.arrow_filesystem(files[0])
    groups: list[RowGroup] = []
    first_index = 0
    fmt: str | None = None
    geometry: tuple[int, int, int] | None = None
    for uri in files:
        with fs.open_input_file(storage.arrow_path(uri)) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            file_fmt = "raw" if "pixels" in names else "jpeg" if "image" in names else None
            if file_fmt is None or (fmt is not None and file_fmt != fmt):
                raise ValueError(f"{uri} has neither a 'pixels' nor an 'image' column, or mixes formats")
            fmt = file_fmt
            for rg in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(rg).num_rows
                if not rows:  # valid Parquet (the audit's folds write them): nothing to read
                    continue
                if geometry is None:
                    first = pf.read_row_group(rg, columns=["height", "width", "channels"]).slice(0, 1).to_pylist()[0]
                    geometry = (int(first["height"]), int(first["width"]), int(first["channels"]))
                groups.append(RowGroup(uri, rg, rows, first_index))
                first_index += rows
    if fmt is None or geometry is None:
        raise ValueError(f"{data}: the {split} split's files hold no rows, although its manifest counts some; the output is damaged: make it again")
    extra = manifest.get("extra") or {}
    whole = (extra.get("split_modes") or {}).get(split, extra.get("mode")) == "whole"
    # The split's geometry is what resize declared, not what a (possibly forged) first row says.
    size = extra.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 8192:
        raise ValueError(f"{data}: its manifest declares no image size (extra.size, 1..8192), got {size!r}; is this a resize output?")
    if geometry[2] not in (1, 3):
        raise ValueError(f"{data}: rows of split {split!r} have {geometry[2]} channels; a resize output holds 1 or 3")
    max_aspect = float(extra.get("max_aspect") or MAX_ASPECT_LIMIT)
    height, width = geometry[:2] if whole else (size, size)
    return SplitInfo(
        data,
        split,
        fmt,
        tuple(groups),
        height,
        width,
        geometry[2],
        size=size,
        whole=whole,
        max_aspect=min(max_aspect, MAX_ASPECT_LIMIT),  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------------------
# Partitioning and order: pure functions of metadata, seed and epoch.


def epoch_stream(groups: Sequence[RowGroup], *, epoch: int, seed: int, shuffle: bool) -> list[Unit]:
    """The split's row groups, whole, in this epoch's order (the same on every rank)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(groups)) if shuffle else np.arange(len(groups))
    return [Unit(int(i), 0, groups[int(i)].rows) for i in order]


def rank_range(total: int, rank: int, world_size: int, *, drop_remainder: bool) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of a stream of ``total`` rows.

    With ``drop_remainder`` every rank gets ``total // world_size`` rows (the last
    ``total % world_size`` are left out); otherwise the first ranks get one more.
    """
    base, extra = divmod(total, world_size)
    if drop_remainder:
        return rank * base, (rank + 1) * base
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def worker_batches(samples: int, batch_size: int, parts: int, *, drop_last: bool) -> list[int]:
    """Batches each of ``parts`` workers delivers from ``samples`` rows: equal to within one."""
    total = samples // batch_size if drop_last else -(-samples // batch_size)
    return [total // parts + (1 if w < total % parts else 0) for w in range(parts)]


def _slice_stream(stream: Sequence[Unit], start: int, stop: int) -> list[Unit]:
    """The pieces of ``stream`` (concatenated) that cover rows ``[start, stop)``."""
    out, offset = [], 0
    for unit in stream:
        size = unit.stop - unit.start
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            out.append(Unit(unit.group, unit.start + lo - offset, unit.start + hi - offset))
        offset += size
        if offset >= stop:
            break
    return out


def assign_rows(
    groups: Sequence[RowGroup],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    batch_size: int,
    rank: int,
    world_size: int,
    part: int,
    parts: int,
) -> list[Unit]:
    """The row ranges one worker (``part`` of ``parts``) of one rank reads this epoch, in stream order."""
    stream = epoch_stream(groups, epoch=epoch, seed=seed, shuffle=shuffle)
    total = sum(g.rows for g in groups)
    r0, r1 = rank_range(total, rank, world_size, drop_remainder=drop_last)
    batches = worker_batches(r1 - r0, batch_size, parts, drop_last=drop_last)
    w0 = r0 + batch_size * sum(batches[:part])
    w1 = min(r1, w0 + batch_size * batches[part])
    return _slice_stream(stream, w0, w1)


def shuffle_order(indices: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``buffer`` rows emits ``indices`` in.

    Rows enter in stream order; once the buffer is full, each new row replaces a
    uniformly chosen buffered row, which is emitted. The rest drains in random order.
    """
    n = len(indices)
    if buffer <= 1 or n <= 1:
        return indices.copy()
    size = min(buffer, n)
    buf = indices[:size].copy()
    out = np.empty(n, dtype=indices.dtype)
    picks = rng.integers(0, size, size=n - size)
    for k, (j, incoming) in enumerate(zip(picks.tolist(), indices[size:].tolist())):
        out[k] = buf[j]
        buf[j] = incoming
    out[n - size :] = buf[rng.permutation(size)]
    return out


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def sample_seeds(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """The transform seeds (int64, >= 0) of the samples at ``indices`` (positions in the split) in ``epoch``.

    SplitMix64 (Steele, Lea and Flood 2014) over the sample's index, started from a
    ``SeedSequence`` of ``(seed, epoch)``: one vectorized step for a whole batch (a
    ``SeedSequence`` per sample cost 15 us of Python each), and seeds as well mixed.
    """
    base = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return (splitmix64(base, np.asarray(indices, dtype=np.int64).astype(np.uint64)) >> np.uint64(1)).astype(np.int64)


def splitmix64(state: np.uint64, steps: np.ndarray) -> np.ndarray:
    """SplitMix64's outputs number ``steps`` (0 = the first) from ``state``, vectorized (uint64 arrays wrap silently)."""
    z = state + (steps + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The transform seed of sample ``index`` (its position in the split) in ``epoch`` (:func:`sample_seeds`)."""
    return int(sample_seeds(seed, epoch, [index])[0])


def epoch_order(info: SplitInfo, cfg: LoaderConfig, epoch: int, rank: int, world_size: int, part: int, parts: int) -> tuple[list[Unit], np.ndarray]:
    """What worker partition ``part`` of ``parts`` of one rank reads in ``epoch``.

    Returns:
        Its row ranges in stream order (:func:`assign_rows`), and the split indices
        of its rows in delivery order (after the shuffle buffer when ``cfg.shuffle``).
    """
    mine = assign_rows(
        info.row_groups,
        epoch=epoch,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        drop_last=cfg.drop_last,
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world_size,
        part=part,
        parts=parts,
    )
    stream = [np.arange(u.start, u.stop) + info.row_groups[u.group].first_index for u in mine]
    indices = np.concatenate(stream) if stream else np.empty(0, dtype=np.int64)
    if cfg.shuffle:
        rng = np.random.default_rng([cfg.seed, epoch, rank, part])
        indices = shuffle_order(indices, cfg.shuffle_buffer, rng)
    return mine, indices


def next_partition(batches: Sequence[int], consumed: Sequence[int], batch_size: int) -> int:
    """The partition the DataLoader would have served next, given what each has delivered.

    A multi-worker DataLoader hands out batches round-robin over the workers that still
    have data (in-order mode). Restarted, it begins at worker 0; the dataset rotates its
    worker-to-partition map by the returned offset so the round-robin continues as before.
    """
    taken = [0] * len(batches)
    goal = [-(-c // batch_size) for c in consumed]
    produced, w = 0, 0
    while produced < sum(goal):
        if taken[w] < batches[w]:
            taken[w] += 1
            produced += 1
        w = (w + 1) % len(batches)
    if taken != goal:
        raise ValueError(f"loader state {list(consumed)} does not match this epoch's partitions {list(batches)}")
    for step in range(len(batches)):
        p = (w + step) % len(batches)
        if taken[p] < batches[p]:
            return p
    return 0
