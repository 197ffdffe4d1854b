"""The clean step: validate every image by a full decode, normalize, label, split, shuffle.

    report = clean("s3://b/run/download", "s3://b/run/clean", CleanConfig(seed=1))

How it works in detail: docs/internals/steps.md, "imgpipe.steps.clean".
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgpipe import commit, contract, parquet, resources, storage
from imgpipe.clean.buckets import BUCKET_SUFFIX, bucket_path, read_bucket
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.clean.decode import ShardBuckets, decode_row, measure_row, output_schema, validate_task
from imgpipe.clean.plan import Index, OverriddenLabeler, Plan, build_labeler, plan_rows, read_index
from imgpipe.clean.pool import DecodePool, decode_pool, run_tasks
from imgpipe.clean.quality import MEASURES_VERSION, METRICS, Measures
from imgpipe.clean.review import Review, measures_current, review
from imgpipe.clean.tasks import ResultBuilder, Task, TaskResult, make_tasks
from imgpipe.config import config_record
from imgpipe.contract import Reject, StepReport
from imgpipe.data.annotations import HeadBox, image_stem, read_head_boxes, read_official_split
from imgpipe.data.images import ImageRejected, open_image
from imgpipe.outcome import check_clean
from imgpipe.phases import PhaseLog
from imgpipe.writer import OutputWriter

__all__ = ["LABELS_FILE", "clean"]

log = logging.getLogger(__name__)

LABELS_FILE = contract.LABELS


def _task_arguments(
    index: Index, plan: Plan, boxes: dict[str, HeadBox], cfg: CleanConfig, bucket_dir: Path, pool: DecodePool
) -> Callable[[Task], tuple]:
    """What :func:`imgpipe.clean.decode.validate_task` gets for a task: only its own rows' plan and boxes.

    Every task's arguments wait in the pool's queue until it runs, so they are arrays
    (about 14 bytes a row), not a Python object per row.
    """

    def task_args(task: Task) -> tuple:
        place = plan.of_units(task.units)
        task_boxes = {}
        if boxes:
            for unit in task.units:
                for path in index.paths.slice(unit.start, unit.rows).to_pylist():
                    if (stem := image_stem(path)) in boxes:
                        task_boxes[stem] = boxes[stem]
        return task, place, task_boxes, cfg, str(bucket_dir), pool.max_decode_bytes

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
    reviewed: Review,
) -> None:
    """Sorts each shard's buckets by order and writes the final shards, in parallel.

    Rows rejected during decoding leave gaps in the planned order; each shard renumbers
    its rows from the count of rows kept in the shards before it, so ``order`` is
    exactly ``0..n-1``. ``label_map`` re-indexes classes that lost every image;
    ``classes`` are the names of the re-indexed labels. The rows the review rejected
    (near-duplicates, blank images, outliers) are left out, and every row takes the split
    the review gives its planned order (:mod:`imgpipe.clean.review`).
    """
    split_names = pa.array(SPLITS)
    schema = output_schema(classes)
    offsets, running = {}, 0
    for shard in sorted(kept_per_shard):
        offsets[shard], running = running, running + kept_per_shard[shard]

    def write_one(part: int, shard: int) -> None:
        pieces = sorted(bucket_path(bucket_dir, shard, 0).parent.glob(f"task-*{BUCKET_SUFFIX}"))
        table = pa.concat_tables([read_bucket(p) for p in pieces])
        planned = table.column("order").to_numpy()
        by_order = pc.sort_indices(table.column("order")).to_numpy()
        by_order = by_order[~reviewed.dropped_by_order[planned[by_order]]]
        labels = label_map[table.column("label").to_numpy()[by_order]]
        splits = split_names.take(pa.array(reviewed.split_by_order[planned[by_order]]))
        start, group = offsets[shard], _row_group_size(table, cfg)
        rows_in_order = _RowGather(table)
        order_at, label_at = schema.get_field_index("order"), schema.get_field_index("label")
        split_at = schema.get_field_index("split")
        with out.parquet_file(f"part-{part:05d}.parquet", schema) as sink:
            for first in range(0, table.num_rows, group):
                rows = by_order[first : first + group]
                chunk = rows_in_order.table(rows, schema)
                chunk = chunk.set_column(order_at, schema.field(order_at), pa.array(np.arange(start + first, start + first + len(rows))))
                chunk = chunk.set_column(label_at, schema.field(label_at), pa.array(labels[first : first + group], parquet.LABEL_FIELD.type))
                chunk = chunk.set_column(split_at, schema.field(split_at), splits.slice(first, len(rows)))
                sink.write(chunk, row_group_size=len(rows))

    shards = sorted(s for s, n in kept_per_shard.items() if n)
    with ThreadPoolExecutor(max_workers=min(_WRITE_THREADS, resources.available_cpus(), max(1, len(shards)))) as pool:
        for fut in [pool.submit(write_one, part, shard) for part, shard in enumerate(shards)]:
            fut.result()


# Settings that change a cleaned row: a previous output made with others cannot be reused
# (formats too: a row kept as JPEG 2000 must not be carried into a run that refuses it).
_ROW_SETTINGS = ("grayscale", "max_pixels", "min_side", "jpeg_quality", "formats")


def _read_known(prefix: str, cfg: CleanConfig) -> tuple[list[str], pa.Table, bool]:
    """Data files, ``sha256`` and ``split`` of every row, and whether its measures are this version's, of a previous clean output."""
    manifest = contract.read_manifest(prefix, expect_step="clean")
    # As the manifest stores them (tuples as lists); an output written before a setting
    # existed was made with its default.
    current, default = config_record(cfg), config_record(CleanConfig())
    changed = [k for k in _ROW_SETTINGS if manifest["config"].get(k, default[k]) != current[k]]
    if changed:
        raise ValueError(f"skip_hashes_from={prefix} was cleaned with other {', '.join(changed)}; run a full clean instead")
    files = contract.data_files(prefix, manifest)
    tables = []
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            tables.append(pq.read_table(fh, columns=["sha256", "split"]))
    known = pa.concat_tables(tables) if tables else pa.table({"sha256": pa.array([], pa.string()), "split": pa.array([], pa.string())})
    current = measures_current(manifest.get("extra"))
    if not current:
        log.info("clean: %s holds measures of another version than %s: its carried rows are measured anew", prefix, MEASURES_VERSION)
    return files, known, current


# A previous output's measures, carried with its rows where they are this version's; others are measured anew.
_MEASURE_COLUMNS = ["phash", "phash_mirror", *METRICS]


def _carried_measures(prev: dict, cfg: CleanConfig) -> Measures:
    """A carried row's hashes and quality metrics: its own columns, or measured from its stored image as a new row is.

    Raises:
        ImageRejected: If the stored image does not decode (the row is then decoded anew from the input).
    """
    if prev.get("phash") is not None and all(prev.get(m) is not None for m in METRICS):
        return Measures(prev["phash"], prev["phash_mirror"], np.array([prev[m] for m in METRICS], np.float32))
    return measure_row(decode_row(prev["image"]["bytes"], replace(cfg, formats=_CARRIED_FORMATS)))


# A carried row's bytes are stored unchanged, so they are JPEG or PNG (other formats are re-encoded).
_CARRIED_FORMATS = ("jpeg", "png")


def _recheck_carried(prev: dict, sha256: str, cfg: CleanConfig) -> str | None:
    """Why a previous output's row cannot be carried as it is (``None``: it can), without decoding it.

    The previous output is read back from storage, so it is untrusted: its bytes must be
    this run's own input (the sha256 the row is carried for) and their header must say
    what its columns say, within this run's ``max_pixels``. A row clean stored re-encoded
    fails the first check too; it is decoded anew from the input like any new row.
    """
    data = (prev.get("image") or {}).get("bytes") or b""
    if hashlib.sha256(data).hexdigest() != sha256:
        return "stored bytes are not this run's input (re-encoded, or altered)"
    try:
        with open_image(data, formats=_CARRIED_FORMATS, max_pixels=cfg.max_pixels) as img:
            seen = (img.width, img.height, img.mode, (img.format or "").lower())
    except ImageRejected as exc:
        return f"{exc.reason}: {exc.detail}"[:200]
    claimed = (prev["width"], prev["height"], prev["mode"], prev["format"])
    return None if seen == claimed else f"header says {seen}, the row says {claimed}"


def _carry_rows(
    files: Sequence[str], index: Index, plan: Plan, bucket_dir: Path, task: int, cfg: CleanConfig, measured: bool = True
) -> tuple[TaskResult, Counter[str]]:
    """Copies the carried rows that pass :func:`_recheck_carried` into the shard buckets, placed anew.

    One previous file is read at a time; its rows are matched to the carried ones by
    sha256 in Arrow (a clean output holds each sha256 once). A row that fails the
    re-check, or that the previous output lacks, is no longer carried (``plan.carried``
    is cleared for it), so the decode pass that runs next decodes it from this run's input.
    ``measured``: the output's measure columns are this version's (:data:`MEASURES_VERSION`);
    otherwise every carried row is measured anew from its stored image.

    Returns:
        What was carried, and how many rows were refused, by why.
    """
    carried = np.flatnonzero(plan.carried)
    hashes = index.sha256.take(pa.array(carried))
    columns = ["image", "width", "height", "mode", "format", "sha256", "bbox"]
    found = np.zeros(len(carried), dtype=bool)
    refused: Counter[str] = Counter()
    buckets = ShardBuckets(str(bucket_dir), task, cfg.rows_per_shard)
    results = ResultBuilder()
    try:
        for uri in files:
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                reused = _MEASURE_COLUMNS if measured and set(_MEASURE_COLUMNS) <= set(pf.schema_arrow.names) else []
                table = pf.read(columns=columns + reused)
            at = pc.index_in(table.column("sha256").cast(hashes.type), value_set=hashes).fill_null(-1).to_numpy()
            matched = np.flatnonzero(at >= 0)
            place = plan.of_rows(carried[at[matched]])
            for k, prev in enumerate(table.take(pa.array(matched)).to_pylist()):
                row = int(carried[at[matched[k]]])
                found[at[matched[k]]] = True
                problem = _recheck_carried(prev, index.sha256[row].as_py(), cfg)
                if problem is not None:
                    refused[problem.split(" (")[0].split(":")[0]] += 1
                    plan.carried[row] = False
                    continue
                img = SimpleNamespace(data=prev["image"]["bytes"], **{f: prev[f] for f in ("width", "height", "mode", "format")})
                try:
                    measures = _carried_measures(prev, cfg)
                except ImageRejected as exc:
                    refused[f"stored image does not decode ({exc.reason})"] += 1
                    plan.carried[row] = False
                    continue
                shard = buckets.add(index.path(row), img, place, k, prev["sha256"], prev["bbox"], measures)
                results.settled(row, shard, prev["bbox"] is not None, measures)
            buckets.flush()
    finally:
        buckets.close()
    if not found.all():
        refused["missing from the previous output"] += int((~found).sum())
        plan.carried[carried[~found]] = False
    if refused:
        log.warning("clean: %d carried row(s) of %s are decoded anew instead: %s", sum(refused.values()), cfg.skip_hashes_from, dict(refused))
    return results.build(), refused


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


def _tally(settled: TaskResult, index: Index, plan: Plan) -> _Tally:
    """Counts the outcome of every row: rejects (decode failures first, then the plan's), kept rows by shard, split and class.

    A class whose every image failed to decode is dropped from the label space, unless it is
    one of the source's own classes (``plan.pinned``: their indices stay the source's);
    ``label_map`` re-indexes the planned labels to the kept classes (-1 for a dropped one).
    """
    rejects = [Reject(index.path(row), reason, detail) for row, (reason, detail) in settled.failures.items()]
    decoded = np.zeros(len(index), dtype=bool)
    decoded[settled.rows] = True
    decoded[list(settled.failures)] = False
    rejects += [reject for row, reject in plan.deferred.items() if decoded[row]]
    written = settled.shard >= 0
    kept_rows = settled.rows[written]
    kept_per_shard = Counter(dict(zip(*(a.tolist() for a in np.unique(settled.shard[written], return_counts=True)))))
    width = max(1, len(plan.classes))
    pairs, counts = np.unique(plan.split[kept_rows].astype(np.int64) * width + plan.label[kept_rows], return_counts=True)
    split_class: Counter[tuple[str, str]] = Counter(
        {(SPLITS[p // width], plan.classes[p % width]): n for p, n in zip(pairs.tolist(), counts.tolist())}
    )
    labels = set(np.unique(plan.label[kept_rows]).tolist())
    carried, boxed = int(plan.carried[kept_rows].sum()), int(settled.boxed.sum())
    classes = [c for i, c in enumerate(plan.classes) if i in labels or i < plan.pinned]
    label_map = np.array([classes.index(c) if c in classes else -1 for c in plan.classes] or [0], dtype=np.int32)
    split_counts: Counter[str] = Counter()
    class_counts: Counter[str] = Counter()
    for (split, name), n in split_class.items():
        split_counts[split] += n
        class_counts[name] += n
    return _Tally(
        inputs=len(settled),
        rejects=rejects,
        kept=sum(kept_per_shard.values()),
        kept_per_shard=kept_per_shard,
        classes=classes,
        label_map=label_map,
        split_counts=split_counts,
        class_counts=class_counts,
        split_class_counts=split_class,
        carried=carried,
        rows_with_bbox=boxed,
    )


def clean(source: str, dest: str, cfg: CleanConfig | None = None, *, whole: bool = True) -> StepReport:
    """Runs the clean step from a committed download output to a committed clean output.

    Args:
        source: Prefix of a committed download output.
        dest: Output prefix; any previous output there is replaced.
        cfg: Step settings; defaults when omitted.
        whole: Whether ``source`` is the whole dataset. One shard's share (a sharded run)
            may keep no image of a class, or nothing at all: the merge checks the whole.

    Returns:
        The step report (also written as ``manifest.json``).

    Raises:
        UncommittedOutputError: If ``source`` is not a committed output.
        ValueError: If ``source`` is not a download output, or the config is unusable.
        DegenerateOutput: If the committed output kept no image, or left a class or a split
            below its minimum (``min_images_per_class``, ``min_images_per_split``).
    """
    cfg = cfg or CleanConfig()
    resources.use_system_allocator()
    phases = PhaseLog("clean")
    source, dest = storage.normalize_uri(source), storage.normalize_uri(dest)
    inputs = [source] + [u for u in (cfg.labels_csv, cfg.label_overrides, cfg.annotations, cfg.skip_hashes_from) if u]
    commit.check_disjoint(dest, inputs, "clean")
    manifest = contract.read_manifest(source, expect_step="download")
    index = read_index(contract.data_files(source, manifest))
    labeler = build_labeler(cfg, index, (manifest.get("extra") or {}).get("sources") or [])
    known_files, known, measured = _read_known(cfg.skip_hashes_from, cfg) if cfg.skip_hashes_from else ([], None, True)
    official = read_official_split(cfg.annotations) if cfg.split_from == "annotations" and cfg.annotations else None
    plan = plan_rows(index, labeler, cfg, known, official)
    known_rows = known.num_rows if known is not None else 0
    source_split = plan.source_split
    for split, lacking in ((source_split or {}).get("missing_classes") or {}).items():
        log.warning("the source's %s split has no image of %d class(es): %s", split, len(lacking), ", ".join(lacking[:10]))
    phases.done("plan", rows=len(index), classes=len(plan.classes), planned=plan.planned, known=known_rows)
    boxes, bad_boxes = read_head_boxes(cfg.annotations) if cfg.annotations else ({}, {})
    pool = decode_pool(cfg.workers or resources.available_cpus(), resources.usable_memory())
    tasks = make_tasks(index.units, pool.workers)
    out = OutputWriter(dest, "clean")
    out.begin()
    with tempfile.TemporaryDirectory(prefix="imgpipe-clean-") as tmp:
        bucket_dir = Path(tmp)
        # Carried first: a row that fails its re-check is decoded by the decode pass instead.
        carried_rows, refused = _carry_rows(known_files, index, plan, bucket_dir, len(tasks), cfg, measured) if known_rows else (None, Counter())
        args = _task_arguments(index, plan, boxes, cfg, bucket_dir, pool)
        settled, _ = run_tasks(
            tasks,
            validate_task,
            args,
            bucket_dir,
            pool,
            in_process=cfg.workers == 1,
            timeout_s=cfg.image_timeout_s,
            first_free=len(tasks) + 1,
        )
        phases.done("decode", rows=len(settled), failed=len(settled.failures), workers=pool.workers)
        if carried_rows is not None:
            settled = TaskResult.concat([settled, carried_rows])
        reviewed = review(settled, index, plan, cfg)
        tally = _tally(reviewed.settled, index, plan)
        tally.rejects += reviewed.rejects
        summary = reviewed.summary
        # The per-row arrays (index, plan, results: about 170 bytes an image) are done with:
        # freed here, the write pass's shards do not come on top of them (the review's
        # split and drop per planned order, 2 bytes an image, stay for the write pass).
        reviewed = replace(reviewed, settled=None)
        del settled, args, index, plan, known
        resources.return_freed_memory()
        _write_shards(bucket_dir, tally.kept_per_shard, tally.label_map, out, cfg, tally.classes, reviewed)
        # The review's time counts in the write phase (milliseconds at 4k images, seconds at 128k).
        phases.done(
            "write",
            kept=tally.kept,
            rejected=len(tally.rejects),
            shards=len(tally.kept_per_shard),
            near_duplicate_groups=summary["near_duplicates"]["groups"],
            flagged=sum(f["count"] for f in summary["quality"]["flagged"].values()),
        )
    classes = tally.classes
    storage.write_bytes(
        out.uri(LABELS_FILE),
        json.dumps({str(i): n for i, n in enumerate(classes)}, indent=2).encode(),  # at rest: data (class names)
    )
    report = out.commit(
        inputs=tally.inputs,
        rejects=tally.rejects,
        config=cfg,
        extra={
            "label_source": labeler.resolved,
            # label_source auto decides per image: how many each scheme labelled (None for a fixed scheme).
            "label_auto": labeler.auto_counts(),
            # How the class indices were ordered: the source's own list (kept whole), and whether
            # the other names sort case-insensitively (Oxford breeds); the merge of shards reuses it.
            "class_order": {"source": list(labeler.class_order) or None, "fold_case": labeler.folds_case},
            "split_from": cfg.split_from,
            "source_split": source_split,
            "label_overrides": labeler.report() if isinstance(labeler, OverriddenLabeler) else None,
            "classes": classes,
            "num_classes": len(classes),
            "splits": {name: tally.split_counts.get(name, 0) for name in SPLITS},
            "per_class": dict(sorted(tally.class_counts.items())),
            # Class histograms per split (the step's report draws them from here).
            "per_split_class": {s: dict(sorted((name, n) for (split, name), n in tally.split_class_counts.items() if split == s)) for s in SPLITS},
            "decode_pool": {
                "workers": pool.workers,
                "memory": pool.memory,
                "max_decode_bytes": pool.max_decode_bytes,
            },
            "carried": tally.carried,
            "carried_from": cfg.skip_hashes_from,
            # Rows of that output that failed their re-check (bytes, header), decoded anew instead.
            "carried_refused": dict(sorted(refused.items())),
            # Quality measures, outlier flags and near-duplicate groups (imgpipe.clean.review).
            **summary,
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
    if whole:
        check_clean(report, **cfg.outcome_limits())
    return report
