"""The clean step: validate every image by a full decode, normalize, label, split, shuffle.

Reads a committed download output (``path``, ``bytes``, ``size``, ``sha256`` rows) and
writes Parquet shards whose rows are in a seeded random order, so that later steps
and the training loader can stream them sequentially and still see a shuffled set.

The work happens in three passes:

1. **validate** (process pool, all cores): each task decodes one Parquet row group,
   writes the usable images to a local spill file and returns only small per-row
   results; the bytes never cross the process boundary.
2. **plan** (main process, metadata only): labels, exact-duplicate removal, the
   stratified split and the shuffled ``order``.
3. **write**: spill rows are bucketed by output shard, each bucket is sorted by
   ``order`` and written to the destination, then the output is committed.

Memory: the pool gets at most one worker per CPU (:func:`resources.available_cpus`) and
no more than the memory (:func:`resources.usable_memory`) can hold, and each image a
budget: one that would need more to decode is ``too_large`` before it is decoded
(:func:`imgpipe.data.images.decode_bytes` estimates from its header).

A decoder that kills its process anyway (the OOM killer's SIGKILL, a crash in a C
library) costs one image, not the step: each worker names the member it is decoding in a
marker file; when a worker dies, the member each unfinished task names is decoded again
alone, in a process of its own, and becomes a ``decoder_killed`` reject if that dies too;
then the unfinished tasks run again without those members. A decode that takes longer
than ``image_timeout_s`` (a decoder looping on a hostile file) is ended from outside:
the step kills the worker its marker names, and the image becomes ``decode_timeout``.
After a restart every unfinished task covers one row group, so each further loss
repeats little work.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgpipe import contract, resources, storage
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.clean.decode import ShardBuckets, output_schema, validate_task
from imgpipe.clean.plan import Plan, build_labeler, plan_rows, read_index
from imgpipe.clean.pool import (
    BUCKET_SUFFIX,
    DecodePool,
    RowResult,
    Task,
    bucket_path,
    decode_pool,
    make_tasks,
    read_bucket,
    run_tasks,
)
from imgpipe.config import config_to_dict
from imgpipe.contract import OutputWriter, Reject, StepReport
from imgpipe.data.annotations import HeadBox, image_stem, read_head_boxes
from imgpipe.phases import PhaseLog

__all__ = ["LABELS_FILE", "clean"]

LABELS_FILE = contract.LABELS


def _task_arguments(
    plan: Plan, boxes: dict[str, HeadBox], cfg: CleanConfig, bucket_dir: Path, pool: DecodePool, unit_paths: dict[tuple[str, int], list[str]]
) -> Callable[[Task], tuple]:
    """What :func:`imgpipe.clean.decode.validate_task` gets for a task: only its own rows' placements and boxes."""

    def task_args(task: Task) -> tuple:
        members = [p for uri, rg in task.units for p in unit_paths[(uri, rg)] if task.wants(p)]
        places = {p: plan.placements[p] for p in members if p in plan.placements}
        task_boxes = {image_stem(p): boxes[image_stem(p)] for p in places if image_stem(p) in boxes}
        return task, places, task_boxes, cfg, str(bucket_dir), pool.max_decode_bytes

    return task_args


def _row_group_size(table: pa.Table, cfg: CleanConfig) -> int:
    """Rows per row group: ``row_group_rows``, fewer when images are large (at least 8)."""
    if table.num_rows == 0:
        return cfg.row_group_rows
    image_bytes = sum(chunk.field("bytes").nbytes for chunk in table.column("image").chunks)
    mean_bytes = max(1, image_bytes // table.num_rows)
    return max(1, min(cfg.row_group_rows, max(8, cfg.row_group_bytes // mean_bytes)))


class _RowGather:
    """Rows of a memory-mapped table in any order, as zero-copy one-row slices.

    Gathering rows into new arrays (``Table.take``) copies every image, and on a chunked
    table Arrow first concatenates the whole column, once per call: two full copies of a
    shard into freshly faulted memory, the largest cost of the write pass. The Parquet
    writer copies each slice into its pages anyway, so the rows are handed to it in place.
    Every row group is built the same way, from one-row slices, so the file's bytes depend
    only on its rows, not on how the spill files were chunked.
    """

    def __init__(self, table: pa.Table) -> None:
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])

    def table(self, rows: np.ndarray, schema: pa.Schema) -> pa.Table:
        """The rows at positions ``rows``, in that order, as a table of ``schema``."""
        rows = rows.astype(np.int64)  # sort_indices gives uint64, which mixes with int64 as float
        batch_of = np.searchsorted(self._starts, rows, side="right") - 1
        offsets = rows - self._starts[batch_of]
        slices = [self._batches[b].slice(o, 1) for b, o in zip(batch_of.tolist(), offsets.tolist())]
        return pa.Table.from_batches(slices, schema=schema)


# Shards written at once. Each maps its spill files (one shard: rows_per_shard images) and
# gathers them in order, so this times a shard is the write pass's memory; more threads
# than CPUs only add to it (the gather and the hashing are CPU work).
_WRITE_THREADS = 4


def _write_shards(
    bucket_dir: Path,
    kept_per_shard: dict[int, int],
    label_map: np.ndarray,
    out: OutputWriter,
    cfg: CleanConfig,
    classes: Sequence[str],
) -> None:
    """Sorts each shard's buckets by order and writes the final shards, in parallel.

    Rows rejected during decoding leave gaps in the planned order; each shard renumbers
    its rows from the count of rows kept in the shards before it, so ``order`` is
    exactly ``0..n-1``. ``label_map`` re-indexes classes that lost every image;
    ``classes`` are the names of the re-indexed labels.
    """
    schema = output_schema(classes)
    offsets, running = {}, 0
    for shard in sorted(kept_per_shard):
        offsets[shard], running = running, running + kept_per_shard[shard]

    def write_one(part: int, shard: int) -> None:
        pieces = sorted(bucket_path(bucket_dir, shard, 0).parent.glob(f"task-*{BUCKET_SUFFIX}"))
        table = pa.concat_tables([read_bucket(p) for p in pieces])
        by_order = pc.sort_indices(table.column("order")).to_numpy()
        labels = label_map[table.column("label").to_numpy()[by_order]]
        start, group = offsets[shard], _row_group_size(table, cfg)
        rows_in_order = _RowGather(table)
        order_at, label_at = schema.get_field_index("order"), schema.get_field_index("label")
        with out.parquet_file(f"part-{part:05d}.parquet", schema) as sink:
            for first in range(0, table.num_rows, group):
                rows = by_order[first : first + group]
                chunk = rows_in_order.table(rows, schema)
                chunk = chunk.set_column(order_at, schema.field(order_at), pa.array(np.arange(start + first, start + first + len(rows))))
                chunk = chunk.set_column(label_at, schema.field(label_at), pa.array(labels[first : first + group], contract.LABEL_FIELD.type))
                sink.write(chunk, row_group_size=len(rows))

    shards = sorted(s for s, n in kept_per_shard.items() if n)
    with ThreadPoolExecutor(max_workers=min(_WRITE_THREADS, resources.available_cpus(), max(1, len(shards)))) as pool:
        for fut in [pool.submit(write_one, part, shard) for part, shard in enumerate(shards)]:
            fut.result()


# Settings that change a cleaned row: a previous output made with others cannot be reused
# (formats too: a row kept as JPEG 2000 must not be carried into a run that refuses it).
_ROW_SETTINGS = ("grayscale", "max_pixels", "min_side", "jpeg_quality", "formats")


def _read_known(prefix: str, cfg: CleanConfig) -> tuple[list[str], dict[str, str]]:
    """Data files and sha256 -> split of a previous clean output (metadata columns only)."""
    manifest = contract.read_manifest(prefix, expect_step="clean")
    # As the manifest stores them (tuples as lists); an output written before a setting
    # existed was made with its default.
    current, default = config_to_dict(cfg), config_to_dict(CleanConfig())
    changed = [k for k in _ROW_SETTINGS if manifest["config"].get(k, default[k]) != current[k]]
    if changed:
        raise ValueError(
            f"skip_hashes_from={prefix} was cleaned with other {', '.join(changed)}; run a full clean instead"
        )
    files = contract.data_files(prefix, manifest)
    known: dict[str, str] = {}
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            table = pq.read_table(fh, columns=["sha256", "split"])
        known.update(zip(table.column("sha256").to_pylist(), table.column("split").to_pylist()))
    return files, known


def _carry_rows(files: Sequence[str], plan: Plan, bucket_dir: Path, task: int, cfg: CleanConfig) -> list[RowResult]:
    """Copies the carried rows from the previous output into the shard buckets, placed anew."""
    by_sha = {p.sha256: (path, p) for path, p in plan.placements.items() if p.carried}
    buckets = ShardBuckets(str(bucket_dir), task, cfg.rows_per_shard)
    results: list[RowResult] = []
    try:
        for uri in files:
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                table = pq.read_table(fh, columns=["image", "width", "height", "mode", "format", "sha256", "bbox"])
            for row in table.to_pylist():
                if row["sha256"] not in by_sha:
                    continue
                member, place = by_sha.pop(row["sha256"])
                img = SimpleNamespace(data=row["image"]["bytes"], **{k: row[k] for k in ("width", "height", "mode", "format")})
                shard = buckets.add(member, img, place, row["bbox"])
                results.append(RowResult(member, shard=shard, boxed=row["bbox"] is not None))
            buckets.flush()
    finally:
        buckets.close()
    assert not by_sha, f"{len(by_sha)} carried rows missing from the previous output"
    return results


@dataclass
class _Tally:
    """What the step keeps of the per-image results once they are counted: no per-image record."""

    inputs: int
    rejects: list[Reject]
    kept: int
    kept_per_shard: Counter[int]
    classes: list[str]
    label_map: np.ndarray
    split_counts: Counter[str]
    class_counts: Counter[str]
    split_class_counts: Counter[tuple[str, str]]
    carried: int
    rows_with_bbox: int


def _tally(results: Sequence[RowResult], plan: Plan) -> _Tally:
    """Counts the outcome of every row: rejects (decode failures first, then the plan's), kept rows by shard, split and class.

    A class whose every image failed to decode is dropped from the label space; ``label_map``
    re-indexes the planned labels to the kept classes (-1 for a dropped one).
    """
    rejects = [Reject(r.path, r.reason, r.detail) for r in results if r.reason]
    rejects += [plan.deferred[r.path] for r in results if not r.reason and r.path in plan.deferred]
    kept_per_shard: Counter[int] = Counter()
    split_class: Counter[tuple[str, str]] = Counter()
    labels: set[int] = set()
    carried = boxed = 0
    for r in results:
        boxed += r.boxed
        if r.shard is None:
            continue
        place = plan.placements[r.path]
        kept_per_shard[r.shard] += 1
        split_class[(place.split, place.label_name)] += 1
        labels.add(place.label)
        carried += place.carried
    classes = [c for i, c in enumerate(plan.classes) if i in labels]
    label_map = np.array([classes.index(c) if c in classes else -1 for c in plan.classes] or [0], dtype=np.int32)
    split_counts: Counter[str] = Counter()
    class_counts: Counter[str] = Counter()
    for (split, name), n in split_class.items():
        split_counts[split] += n
        class_counts[name] += n
    return _Tally(
        inputs=len(results), rejects=rejects, kept=sum(kept_per_shard.values()), kept_per_shard=kept_per_shard,
        classes=classes, label_map=label_map, split_counts=split_counts, class_counts=class_counts,
        split_class_counts=split_class, carried=carried, rows_with_bbox=boxed,
    )  # fmt: skip


def clean(source: str, dest: str, cfg: CleanConfig | None = None) -> StepReport:
    """Runs the clean step from a committed download output to a committed clean output.

    Args:
        source: Prefix of a committed download output.
        dest: Output prefix; any previous output there is replaced.
        cfg: Step settings; defaults when omitted.

    Returns:
        The step report (also written as ``manifest.json``).

    Raises:
        UncommittedOutputError: If ``source`` is not a committed output.
        ValueError: If ``source`` is not a download output, or the config is unusable.
    """
    cfg = cfg or CleanConfig()
    phases = PhaseLog("clean")
    source, dest = storage.normalize_uri(source), storage.normalize_uri(dest)
    inputs = [source] + [u for u in (cfg.labels_csv, cfg.annotations, cfg.skip_hashes_from) if u]
    contract.check_disjoint(dest, inputs, "clean")
    manifest = contract.read_manifest(source, expect_step="download")
    units, sha_by_path = read_index(contract.data_files(source, manifest))
    labeler = build_labeler(cfg, list(sha_by_path))
    known_files, known = _read_known(cfg.skip_hashes_from, cfg) if cfg.skip_hashes_from else ([], {})
    plan = plan_rows(sha_by_path, labeler, cfg, known)
    phases.done("plan", rows=len(sha_by_path), classes=len(plan.classes), planned=len(plan.placements), known=len(known))
    boxes, bad_boxes = read_head_boxes(cfg.annotations) if cfg.annotations else ({}, {})
    pool = decode_pool(cfg.workers or resources.available_cpus(), resources.usable_memory())
    tasks = make_tasks(units, pool.workers)
    out = OutputWriter(dest, "clean")
    out.begin()
    with tempfile.TemporaryDirectory(prefix="imgpipe-clean-") as tmp:
        bucket_dir = Path(tmp)
        unit_paths = {(uri, rg): paths for uri, rg, paths in units}
        args = _task_arguments(plan, boxes, cfg, bucket_dir, pool, unit_paths)
        results, free_index = run_tasks(
            tasks, validate_task, args, unit_paths, bucket_dir, pool, in_process=cfg.workers == 1, timeout_s=cfg.image_timeout_s
        )
        phases.done("decode", rows=len(results), failed=sum(bool(r.reason) for r in results), workers=pool.workers)
        if known:
            results += _carry_rows(known_files, plan, bucket_dir, free_index, cfg)
        tally = _tally(results, plan)
        # The per-image records (index, plan, results: about 0.5 KB an image) are done with:
        # freed here, the write pass's shards do not come on top of them.
        del results, args, unit_paths, units, sha_by_path, plan, known
        _write_shards(bucket_dir, tally.kept_per_shard, tally.label_map, out, cfg, tally.classes)
        phases.done("write", kept=tally.kept, rejected=len(tally.rejects), shards=len(tally.kept_per_shard))
    classes = tally.classes
    storage.write_bytes(
        out.uri(LABELS_FILE),
        json.dumps({str(i): n for i, n in enumerate(classes)}, indent=2).encode(),
    )
    report = out.commit(
        inputs=tally.inputs,
        rejects=tally.rejects,
        config=cfg,
        extra={
            "label_source": labeler.source,
            "classes": classes,
            "num_classes": len(classes),
            "splits": {name: tally.split_counts.get(name, 0) for name in SPLITS},
            "per_class": dict(sorted(tally.class_counts.items())),
            # Class histograms per split (the step's report draws them from here).
            "per_split_class": {
                s: dict(sorted((name, n) for (split, name), n in tally.split_class_counts.items() if split == s)) for s in SPLITS
            },
            "decode_pool": {
                "workers": pool.workers,
                "memory": pool.memory,
                "max_decode_bytes": pool.max_decode_bytes,
            },
            "carried": tally.carried,
            "carried_from": cfg.skip_hashes_from,
            "annotations": {
                "boxes_read": len(boxes),
                "rows_with_bbox": tally.rows_with_bbox,
                "unusable_xml": dict(sorted(bad_boxes.items())[:100]),
            }
            if cfg.annotations
            else None,
        },
        upstream={
            "source": source,
            "step": manifest.get("step"),
            "outputs": manifest.get("outputs"),
        },
    )
    phases.done("commit", outputs=report.outputs, rejected=report.rejected, files=len(report.files))
    return report
