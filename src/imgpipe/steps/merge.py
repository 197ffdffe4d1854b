"""The merge of a sharded clean: several shards' clean outputs into the one clean output resize reads.

    report = merge(["s3://b/run/shards/00000-of-00004/clean", ...], "s3://b/run/clean", CleanConfig(seed=1))

Each shard (:mod:`imgpipe.data.sharding`) was downloaded and cleaned in its own pod, so what
needs every image at once is settled here, from metadata first and then in one streaming pass:

* member paths: a path in more than one shard (two sources holding it, :mod:`imgpipe.steps.merge_rules`)
  is kept from the lowest shard that has it, the others are ``duplicate_member`` rejects, as in
  an unsharded download; this comes first, as the download's rule comes before clean's;
* labels: the union of the shards' classes, encoded as clean encodes them (the source's own
  class list first and whole, from the shards' ``class_order``), less a class that lost every image here;
* exact duplicates across shards (same sha256): the copy in the lowest shard is kept, the
  others are ``duplicate`` rejects, as within a shard;
* near-duplicates across shards (pHash within ``near_duplicate_distance``, mirrored too):
  rejected or grouped as ``near_duplicates`` says, as within a shard;
* the stratified split over all kept images (split_from ``random``, or ``source`` where the
  source gave none, without a previous run: a carried image keeps its split, and an official
  or source split is the release's, so then each shard's split stands), near-duplicate groups kept in one split;
* the shuffled ``order``: a seeded uniform interleaving of the shards' shuffled rows, which is
  itself a uniform shuffle of all rows.

Every input is accounted once: the shards' rejects are carried over and the merge's own are
added, so ``inputs == outputs + rejected`` over the union. Memory: about 80 bytes per image
for the metadata (sha256 prefix, path digest, hashes, label, split, place), plus one Parquet batch of each
shard while the rows stream into the output (at most clean's ``row_group_bytes`` each).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import commit, contract, storage
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.clean.decode import output_schema
from imgpipe.clean.neardup import group_representatives, hamming
from imgpipe.clean.review import NEAR_DUPLICATE, REPORTED
from imgpipe.clean.splits import split_codes
from imgpipe.config import config_record
from imgpipe.contract import Reject, StepReport
from imgpipe.data.extraction import DUPLICATE_MEMBER
from imgpipe.data.labels import encode_labels, merge_class_orders
from imgpipe.outcome import check_clean
from imgpipe.phases import PhaseLog
from imgpipe.steps.merge_rules import exact_duplicates, kept_classes, later_paths, path_keys
from imgpipe.writer import OutputWriter

__all__ = ["merge"]

STEP = "clean"  # the merged output is a clean output: resize reads it as it reads clean's

# Hex digits of the sha256 the exact-duplicate search compares (128 bits: no collision among 10^9 images).
_KEY_HEX = 32
_META_COLUMNS = ["path", "sha256", "label", "split", "phash", "phash_mirror"]
# Settings the shards must share: the merge applies them to all of them at once.
_SHARED = (
    "grayscale",
    "max_pixels",
    "min_side",
    "jpeg_quality",
    "formats",
    "split",
    "seed",
    "split_from",
    "near_duplicates",
    "near_duplicate_distance",
)


def _sha_keys(column: pa.ChunkedArray) -> np.ndarray:
    """The first :data:`_KEY_HEX` hex digits of every sha256, as fixed-width bytes (no Python object per row)."""
    out = []
    for chunk in column.chunks:
        chunk = chunk.cast(pa.large_string())
        if chunk.null_count:
            raise ValueError("a shard's clean output has rows without a sha256; it was not written by imgpipe's clean")
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        if len(chunk) and not np.all(np.diff(offsets) == 64):
            raise ValueError("a shard's clean output has a sha256 that is not 64 hex digits; it was not written by imgpipe's clean")
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, 64)[:, :_KEY_HEX]
        out.append(np.ascontiguousarray(data).view(f"S{_KEY_HEX}").ravel())
    return np.concatenate(out) if out else np.zeros(0, f"S{_KEY_HEX}")


class _Shard:
    """One shard's clean output: its manifest, files, and the metadata of its rows in file (``order``) order."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.manifest = contract.read_manifest(prefix, expect_step="clean")
        self.files = contract.data_files(prefix, self.manifest)
        self.classes = [str(c) for c in (self.manifest.get("extra") or {}).get("classes") or []]
        tables = []
        for uri in self.files:
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                tables.append(pq.read_table(fh, columns=_META_COLUMNS))
        meta = pa.concat_tables(tables) if tables else None
        self.rows = meta.num_rows if meta is not None else 0
        if self.rows != int(self.manifest.get("outputs") or 0):
            raise ValueError(f"shard {prefix} holds {self.rows} rows but its manifest says {self.manifest.get('outputs')}")
        if meta is None:
            self.keys, self.label, self.paths = np.zeros(0, f"S{_KEY_HEX}"), np.zeros(0, np.int32), path_keys(())
            self.split, self.phash, self.mirror = np.zeros(0, np.int8), np.zeros(0, np.uint64), np.zeros(0, np.uint64)
            return
        self.keys = _sha_keys(meta.column("sha256"))
        self.paths = path_keys(meta.column("path").to_pylist())
        self.label = meta.column("label").to_numpy().astype(np.int32)
        if len(self.label) and (self.label.min() < 0 or self.label.max() >= len(self.classes)):
            raise ValueError(f"shard {prefix} has labels outside its {len(self.classes)} classes")
        split = np.array(meta.column("split").to_pylist(), dtype=object)
        unknown = set(split.tolist()) - set(SPLITS)
        if unknown:
            raise ValueError(f"shard {prefix} has rows of unknown split(s) {sorted(unknown)[:3]}")
        self.split = np.zeros(len(split), np.int8)
        for j, name in enumerate(SPLITS):
            self.split[split == name] = j
        self.phash = meta.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
        self.mirror = meta.column("phash_mirror").to_numpy(zero_copy_only=False).astype(np.uint64)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Every row, in file order, one row group at a time (``ParquetFile.iter_batches`` reads a whole file ahead)."""
        for uri in self.files:
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(pf.metadata.num_row_groups):
                    yield from pf.read_row_group(rg, use_threads=False).to_batches()


class _Cursor:
    """A shard's rows in order, one at a time: the next kept one, the dropped ones set aside as rejects."""

    def __init__(self, shard: _Shard, dropped: np.ndarray, why: dict[int, tuple[str, str]], rejects: list[Reject]) -> None:
        self._batches, self._dropped, self._why, self._rejects = shard.batches(), dropped, why, rejects
        self._batch: pa.RecordBatch | None = None
        self._at = self._row = 0

    def _advance(self) -> pa.RecordBatch | None:
        """The next row as a one-row batch, or ``None`` at the end."""
        while self._batch is None or self._at >= self._batch.num_rows:
            self._batch = next(self._batches, None)
            self._at = 0
            if self._batch is None:
                return None
        row = self._batch.slice(self._at, 1)
        self._at += 1
        return row

    def next_kept(self) -> pa.RecordBatch:
        while True:
            row, position = self._advance(), self._row
            if row is None:
                raise ValueError("a shard's data files ended before its manifest's row count; was it changed after it was committed?")
            self._row += 1
            if not self._dropped[position]:
                return row
            reason, detail = self._why[position]
            self._rejects.append(Reject(row.column("path")[0].as_py(), reason, detail))

    def drain(self) -> None:
        """Sets aside the dropped rows after the last kept one."""
        while (row := self._advance()) is not None:
            position, self._row = self._row, self._row + 1
            if self._dropped[position]:
                reason, detail = self._why[position]
                self._rejects.append(Reject(row.column("path")[0].as_py(), reason, detail))


def _check_shards(prefixes: Sequence[str], shards: Sequence[_Shard], cfg: CleanConfig) -> None:
    mine = config_record(cfg)
    for prefix, shard in zip(prefixes, shards):
        theirs = shard.manifest.get("config") or {}
        differ = [k for k in _SHARED if k in theirs and theirs[k] != mine[k]]
        if differ:
            raise ValueError(f"shard {prefix} was cleaned with other {', '.join(differ)} than the merge's; clean every shard with one config")


def _paths_of(shards: Sequence[_Shard], wanted: dict[int, list[int]]) -> dict[tuple[int, int], str]:
    """The paths of a few rows (shard -> positions), read from the ``path`` column alone."""
    out: dict[tuple[int, int], str] = {}
    for k, positions in wanted.items():
        if not positions:
            continue
        paths = []
        for uri in shards[k].files:
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                paths.append(pq.read_table(fh, columns=["path"]).column("path"))
        column = pa.chunked_array([c for p in paths for c in p.chunks], pa.string())
        for pos in sorted(set(positions)):
            out[(k, pos)] = column[pos].as_py()
    return out


def _name(named: dict[tuple[int, int], str], row: int, shard_of: np.ndarray, start: np.ndarray) -> str:
    """The path of merged row ``row`` among those :func:`_paths_of` read."""
    k = int(shard_of[row])
    return named[(k, int(row - start[k]))]


def merge(shards: Sequence[str], dest: str, cfg: CleanConfig | None = None) -> StepReport:
    """Merges the clean outputs of a sharded run into one committed clean output at ``dest``.

    Args:
        shards: The shards' committed clean prefixes, in shard order.
        dest: Output prefix; any previous output there is replaced.
        cfg: The clean config every shard ran with (the split, seed and near-duplicate settings apply here too).

    Raises:
        ValueError: If a prefix is not a committed clean output, the shards were cleaned with
            other settings, or a shard's files disagree with its manifest.
    """
    cfg = cfg or CleanConfig()
    if isinstance(shards, str) or not shards:
        raise ValueError("merge needs a list of the shards' clean prefixes")
    prefixes = [storage.normalize_uri(p) for p in shards]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError("a shard's clean prefix is listed twice; every shard must be merged once")
    dest = storage.normalize_uri(dest)
    commit.check_disjoint(dest, prefixes, STEP)
    phases = PhaseLog("merge")
    parts = [_Shard(p) for p in prefixes]
    _check_shards(prefixes, parts, cfg)
    phases.done("read", shards=len(parts), rows=sum(s.rows for s in parts))

    # Every kept row of every shard, shard after shard, in each shard's order.
    orders = [(s.manifest.get("extra") or {}).get("class_order") or {} for s in parts]
    # A shard cleaned before class_order was recorded sorted its classes case-insensitively.
    source_order = merge_class_orders(o.get("source") for o in orders)
    fold_case = all(o.get("fold_case", True) for o in orders)
    classes = encode_labels((c for s in parts for c in s.classes), source_order, fold_case=fold_case)
    lookup = {c: i for i, c in enumerate(classes)}
    start = np.cumsum([0] + [s.rows for s in parts])
    keys = np.concatenate([s.keys for s in parts]) if parts else np.zeros(0, f"S{_KEY_HEX}")
    label = np.concatenate([np.array([lookup[c] for c in s.classes] or [0], np.int32)[s.label] for s in parts])
    split = np.concatenate([s.split for s in parts])
    phash, mirror = np.concatenate([s.phash for s in parts]), np.concatenate([s.mirror for s in parts])
    shard_rejects = [contract.read_rejects(p) for p in prefixes]
    same_path, path_lead = later_paths([s.paths for s in parts], [path_keys(t.column("path").to_pylist()) for t in shard_rejects])
    for s in parts:
        del s.keys, s.label, s.split, s.phash, s.mirror, s.paths
    n = len(keys)
    shard_of = np.repeat(np.arange(len(parts), dtype=np.int32), np.diff(start))
    dropped = np.zeros(n, bool)
    why: dict[int, tuple[str, str]] = {}
    wanted: dict[int, list[int]] = {k: [] for k in range(len(parts))}

    # Member paths first: a download would not have read the later copy at all.
    dropped[same_path] = True
    for g, lead in zip(same_path.tolist(), path_lead.tolist()):
        why[g] = (DUPLICATE_MEMBER, f"shard {lead} holds a member of the same path (the lowest shard's is kept)")
    alive = np.flatnonzero(~dropped)
    dup, dup_lead = exact_duplicates(keys[alive])
    dup, dup_lead = alive[dup], alive[dup_lead]
    for lead in dup_lead.tolist():
        wanted[int(shard_of[lead])].append(int(lead - start[shard_of[lead]]))
    dropped[dup] = True
    del keys

    # Near-duplicates among the rest, preferring the lower shard.
    members = leads = bits = np.zeros(0, np.int64)
    across = 0
    if cfg.near_duplicates != "off":
        alive = np.flatnonzero(~dropped)
        rep = group_representatives(phash[alive], mirror[alive], cfg.near_duplicate_distance)
        others = np.flatnonzero(rep != np.arange(len(alive)))
        members, leads = alive[others], alive[rep[others]]
        bits = np.minimum(hamming(phash[members], phash[leads]), hamming(phash[members], mirror[leads]))
        # Only groups that span shards are new: a shard settled its own.
        new = shard_of[members] != shard_of[leads]
        across = int(new.sum())
        if cfg.near_duplicates == "reject":
            members, leads, bits = members[new], leads[new], bits[new]
            dropped[members] = True
            for g in [*leads.tolist(), *members[:REPORTED].tolist()]:
                wanted[int(shard_of[g])].append(int(g - start[shard_of[g]]))
    del phash, mirror
    classes, label = kept_classes(classes, label, dropped, source_order)

    # The merged order: a seeded uniform interleaving of the shards' kept rows.
    kept_per = np.bincount(shard_of[~dropped], minlength=len(parts))
    seq = np.random.default_rng([cfg.seed, 0x5EED, 3]).permutation(np.repeat(np.arange(len(parts), dtype=np.int32), kept_per))
    merged = np.empty(len(seq), np.int64)
    for k in range(len(parts)):
        merged[seq == k] = np.flatnonzero((shard_of == k) & ~dropped)
    # A split the source gave (split_from source, in any shard) stands, as an official one does.
    source_given = any(((s.manifest.get("extra") or {}).get("source_split") or {}).get("used") for s in parts)
    global_split = not cfg.skip_hashes_from and (cfg.split_from == "random" or (cfg.split_from == "source" and not source_given))
    if global_split:
        split[merged] = split_codes(label[merged], cfg.split, cfg.seed)
    if cfg.near_duplicates == "group" and len(members):
        split[members] = split[leads]
    phases.done("plan", kept=len(merged), duplicates=len(dup), near_duplicates=across)

    # The reject details name the kept copy.
    named = _paths_of(parts, wanted)
    for g, lead in zip(dup.tolist(), dup_lead.tolist()):
        why[g] = ("duplicate", f"same bytes as {_name(named, lead, shard_of, start)}")
    if cfg.near_duplicates == "reject":
        for g, lead, b in zip(members.tolist(), leads.tolist(), bits.tolist()):
            why[int(g)] = (NEAR_DUPLICATE, f"{b} bits from {_name(named, lead, shard_of, start)} (pHash), which is kept")

    out = OutputWriter(dest, STEP)
    out.begin()
    rejects: list[Reject] = []
    for table in shard_rejects:
        rejects += [Reject(p, r, d) for p, r, d in zip(*(table.column(c).to_pylist() for c in ("path", "reason", "detail")))]
    merge_rejects: list[Reject] = []
    cursors = [
        _Cursor(s, dropped[start[k] : start[k + 1]], {g - int(start[k]): w for g, w in why.items() if shard_of[g] == k}, merge_rejects)
        for k, s in enumerate(parts)
    ]
    _write(out, cursors, seq, merged, label, split, classes, cfg)
    for cursor in cursors:
        cursor.drain()
    phases.done("write", kept=len(merged), rejected=len(merge_rejects))

    inputs = sum(int(s.manifest.get("inputs") or 0) for s in parts)
    counts = split[merged]
    tally = np.zeros((len(SPLITS), max(1, len(classes))), np.int64)
    np.add.at(tally, (counts.astype(np.int64), label[merged]), 1)
    per_class = Counter({c: int(tally[:, i].sum()) for i, c in enumerate(classes) if tally[:, i].any()})
    per_split_class = {s: {c: int(tally[j, i]) for i, c in enumerate(classes) if tally[j, i]} for j, s in enumerate(SPLITS)}
    names = json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2)
    storage.write_bytes(out.uri(contract.LABELS), names.encode())  # at rest: data (class names)
    extra = _summary(
        parts,
        prefixes,
        classes,
        counts,
        per_class,
        per_split_class,
        cfg,
        global_split,
        len(same_path),
        len(dup),
        across,
        members,
        leads,
        bits,
        named,
        shard_of,
        start,
    )
    report = out.commit(
        inputs=inputs,
        rejects=rejects + merge_rejects,
        config=cfg,
        extra=extra,
        upstream={"shards": prefixes, "step": "clean", "outputs": sum(s.rows for s in parts)},
    )
    phases.done("commit", outputs=report.outputs, rejected=report.rejected, files=len(report.files))
    check_clean(report, **cfg.outcome_limits())
    return report


def _write(
    out: OutputWriter,
    cursors: list[_Cursor],
    seq: np.ndarray,
    merged: np.ndarray,
    label: np.ndarray,
    split: np.ndarray,
    classes: list[str],
    cfg: CleanConfig,
) -> None:
    """Streams the kept rows in the merged order into ``part-*.parquet`` files of ``rows_per_shard`` rows."""
    schema = output_schema(classes)
    at = {name: schema.get_field_index(name) for name in ("order", "label", "label_name", "split")}
    split_names = np.array(SPLITS, dtype=object)
    for part, first in enumerate(range(0, len(seq), cfg.rows_per_shard)):
        last = min(first + cfg.rows_per_shard, len(seq))
        with out.parquet_file(f"part-{part:05d}.parquet", schema) as sink:
            p = first
            while p < last:
                rows, size = [], 0
                while p < last and len(rows) < cfg.row_group_rows and (len(rows) < 8 or size < cfg.row_group_bytes):
                    row = cursors[int(seq[p])].next_kept()
                    size += row.column("image").field("bytes").nbytes
                    rows.append(row.select(schema.names))
                    p += 1
                lo = p - len(rows)
                g = merged[lo:p]
                chunk = pa.Table.from_batches([pa.RecordBatch.from_arrays(r.columns, schema=schema) for r in rows], schema=schema)
                chunk = chunk.set_column(at["order"], schema.field(at["order"]), pa.array(np.arange(lo, p), schema.field(at["order"]).type))
                chunk = chunk.set_column(at["label"], schema.field(at["label"]), pa.array(label[g], schema.field(at["label"]).type))
                chunk = chunk.set_column(
                    at["label_name"],
                    schema.field(at["label_name"]),
                    pa.array([classes[i] for i in label[g].tolist()], schema.field(at["label_name"]).type),
                )
                chunk = chunk.set_column(
                    at["split"], schema.field(at["split"]), pa.array(split_names[split[g]].tolist(), schema.field(at["split"]).type)
                )
                sink.write(chunk, row_group_size=len(rows))


def _summary(
    parts: Sequence[_Shard],
    prefixes: Sequence[str],
    classes: list[str],
    splits: np.ndarray,
    per_class: Counter[str],
    per_split_class: dict[str, dict[str, int]],
    cfg: CleanConfig,
    global_split: bool,
    duplicate_paths: int,
    duplicates: int,
    across: int,
    members: np.ndarray,
    leads: np.ndarray,
    bits: np.ndarray,
    named: dict[tuple[int, int], str],
    shard_of: np.ndarray,
    start: np.ndarray,
) -> dict[str, Any]:
    """The manifest's ``extra``: clean's keys (the report reads them) and what the merge did."""
    extras = [s.manifest.get("extra") or {} for s in parts]
    flagged: dict[str, dict[str, Any]] = {}
    for e in extras:
        for reason, f in ((e.get("quality") or {}).get("flagged") or {}).items():
            into = flagged.setdefault(reason, {"count": 0, "paths": []})
            into["count"] += int(f.get("count") or 0)
            into["paths"] = (into["paths"] + list(f.get("paths") or []))[:REPORTED]
    shard_pairs = [pair for e in extras for pair in (e.get("near_duplicates") or {}).get("pairs") or []]
    merge_pairs = []
    if cfg.near_duplicates == "reject":
        for g, lead, b in list(zip(members.tolist(), leads.tolist(), bits.tolist()))[:REPORTED]:
            merge_pairs.append([_name(named, lead, shard_of, start), _name(named, g, shard_of, start), b])
    return {
        "label_source": _label_source(extras),
        "label_auto": _sum_counts(e.get("label_auto") for e in extras),
        "class_order": {
            "source": list(merge_class_orders((e.get("class_order") or {}).get("source") for e in extras)) or None,
            "fold_case": all((e.get("class_order") or {}).get("fold_case", True) for e in extras),
        },
        "split_from": cfg.split_from,
        "classes": classes,
        "num_classes": len(classes),
        "splits": {s: int((splits == j).sum()) for j, s in enumerate(SPLITS)},
        "per_class": dict(sorted(per_class.items())),
        "per_split_class": per_split_class,
        "carried": sum(int(e.get("carried") or 0) for e in extras),
        "carried_from": cfg.skip_hashes_from,
        "quality": {"per_shard": True, "flagged": flagged},
        "near_duplicates": {
            "mode": cfg.near_duplicates,
            "distance": cfg.near_duplicate_distance,
            "groups": sum(int((e.get("near_duplicates") or {}).get("groups") or 0) for e in extras) + int(len(np.unique(leads))),
            "pairs": (shard_pairs + merge_pairs)[:REPORTED],
        },
        "merge": {
            "shards": [
                {"prefix": p, "inputs": s.manifest.get("inputs"), "outputs": s.rows, "rejected": s.manifest.get("rejected")}
                for p, s in zip(prefixes, parts)
            ],
            "duplicate_paths_across_shards": duplicate_paths,
            "duplicates_across_shards": duplicates,
            "near_duplicates_across_shards": across,
            "split": "stratified over all shards" if global_split else "each shard's (carried or official splits are kept)",
        },
    }


def _label_source(extras: Sequence[dict[str, Any]]) -> str | None:
    """The shards' ``label_source``: theirs when they agree, else ``auto`` (each shard's ``auto`` chose for its own images)."""
    found = {e.get("label_source") for e in extras if e.get("label_source")}
    return found.pop() if len(found) == 1 else ("auto" if found else None)


def _sum_counts(counts: Iterator[dict[str, int] | None]) -> dict[str, int] | None:
    """The shards' ``label_auto`` counts added up; ``None`` when no shard ran ``auto``."""
    total: Counter[str] = Counter()
    seen = False
    for c in counts:
        if c:
            seen = True
            total.update({k: int(v) for k, v in c.items()})
    return dict(total) if seen else None
