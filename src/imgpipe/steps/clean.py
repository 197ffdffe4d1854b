"""The clean step: validate every image by a full decode, normalize, label, split, shuffle.

Reads a committed download output (``path``, ``bytes``, ``size``, ``sha256`` rows) and
writes Parquet shards whose rows are in a seeded random order, so that later steps
and the training loader can stream them sequentially and still see a shuffled set.

The work happens in three passes, each bounded in memory by one shard:

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

import contextlib
import gc
import json
import math
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from imgpipe import contract, resources, storage
from imgpipe.config import config_to_dict
from imgpipe.contract import OutputWriter, Reject, StepReport
from imgpipe.data.annotations import HeadBox, image_stem, read_head_boxes
from imgpipe.data.images import (
    DEFAULT_FORMATS,
    ImageRejected,
    check_formats,
    load_decoders,
    validate_and_normalize,
)
from imgpipe.data.labels import (
    Labeler,
    LabelSource,
    choose_label_source,
    encode_labels,
    read_label_csv,
)
from imgpipe.phases import PhaseLog

__all__ = [
    "CleanConfig",
    "DECODER_KILLED",
    "DECODE_TIMEOUT",
    "SPLITS",
    "OUTPUT_SCHEMA",
    "output_schema",
    "LABELS_FILE",
    "clean",
    "validate_task",
    "bucket_path",
    "stratified_split",
    "shuffled_order",
]

SPLITS = ("train", "val", "test")
LABELS_FILE = contract.LABELS
# Reject code of an image whose decoder killed its process twice, in the pool and alone;
# the other codes come from imgpipe.data.images, and no_label / duplicate from the plan.
DECODER_KILLED = "decoder_killed"
DECODE_TIMEOUT = "decode_timeout"

# How clean shares memory among its decode workers. A quarter stays with the step's own
# process (index, plan, shard writing) and the allocator's slack. Each worker costs a base
# before any image: the pages it dirties after the fork (interpreter, numpy, pyarrow,
# Pillow) and a row group of encoded input beside its normalized copy. A worker is worth
# starting only if it can still take a 12-megapixel photo (96 MiB at 8 bytes per pixel).
_MEMORY_HEADROOM = 0.25
_WORKER_BASE_BYTES = 128 << 20
_MIN_IMAGE_BYTES = 128 << 20
# Pool restarts in a row that a dead worker may cause without naming an image (it died
# reading or writing a row group): past this the cause is not one image, and the step fails.
_MAX_BARREN_RESTARTS = 2

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        # {bytes, path}: the Hugging Face `datasets` Image feature layout, which Ray and
        # pandas also read as-is; output_schema adds the features that name it an Image.
        contract.IMAGE_FIELD,
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        contract.LABEL_FIELD,
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("order", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        # Normalized (xmin, ymin, xmax, ymax) head box from the annotations, when given.
        pa.field("bbox", pa.list_(pa.float32())),
    ]
)


def output_schema(classes: Sequence[str]) -> pa.Schema:
    """The schema of the data files: :data:`OUTPUT_SCHEMA` with the ``datasets`` features of ``classes``."""
    return contract.with_hf_features(OUTPUT_SCHEMA, classes)


@dataclass(frozen=True)
class CleanConfig:
    """Settings of the clean step.

    Attributes:
        grayscale: Store single-channel ``L`` images instead of RGB.
        split: Train/val/test fractions; they must sum to 1 and train must be > 0.
        seed: Base seed for the split and the shuffled order.
        label_source: ``oxford`` (``Breed_Name_12.jpg``), ``folder`` (class per
            folder), ``csv`` (``labels_csv``), or ``auto`` (folder when images sit in
            several folders, else oxford).
        labels_csv: URI of a ``path,label`` CSV, for ``label_source='csv'``.
        max_pixels: Largest width*height accepted; larger is ``too_large``. The default
            is PIL's own decompression-bomb limit.
        min_side: Smallest width or height accepted; smaller is ``too_small``.
        jpeg_quality: Quality for JPEGs that normalization had to re-encode.
        formats: Image formats to decode, by Pillow's name in lowercase (any of
            :data:`imgpipe.data.images.DECODABLE_FORMATS`); a file whose signature names
            another format is rejected ``unsupported_format``, its plugin never run. Add
            ``jpeg2000`` (needs Pillow with OpenJPEG, as its wheels have), ``avif``,
            ``ico``, ``psd`` and others as needed; EPS is never decoded (Ghostscript).
        workers: Decode processes; 0 means one per CPU the container may use. Fewer start
            when the memory cannot hold that many (the manifest's ``decode_pool`` says how
            many did). 1 decodes in the step's own process, where an image that gets the
            process killed takes the step with it.
        image_timeout_s: Longest one image may take to decode and normalize; the
            worker past it is killed and the image is ``decode_timeout``. 0 means no
            limit.
        rows_per_shard: Rows per output Parquet shard.
        row_group_rows: Most rows per Parquet row group (the unit resize parallelizes on).
        row_group_bytes: Target bytes per row group: groups of large photos get fewer rows
            (down to 8), so a set of 12-megapixel images still spreads over all workers.
        annotations: Prefix of a committed download output of the Oxford-IIIT Pet
            ``annotations.tar.gz``; the head boxes in ``annotations/xmls/*.xml`` become
            the ``bbox`` column (resize's ``roi_crop`` uses it). Boxes annotated on an
            image of another size than the cleaned one are left out.
        skip_hashes_from: Prefix of a previous committed clean output (incremental
            re-runs). Images whose sha256 it holds are not decoded again: their rows
            are copied from it (bytes, size, mode, head box) and keep their split, so no
            image moves between train and test across runs. Everything else is cleaned
            as usual; labels and the shuffled order are computed over the union. The
            previous output must have been cleaned with the same image settings.
    """

    grayscale: bool = False
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    label_source: LabelSource = "auto"
    labels_csv: str | None = None
    max_pixels: int = 89_478_485
    min_side: int = 32
    jpeg_quality: int = 95
    formats: tuple[str, ...] = DEFAULT_FORMATS
    workers: int = 0
    image_timeout_s: float = 60.0
    rows_per_shard: int = 2048
    row_group_rows: int = 128
    row_group_bytes: int = 64 << 20
    annotations: str | None = None
    skip_hashes_from: str | None = None

    def __post_init__(self) -> None:
        if len(self.split) != 3 or any(f < 0 for f in self.split):
            raise ValueError(
                f"split must be three non-negative fractions (train,val,test), got {self.split}"
            )
        if not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"split fractions must sum to 1, got {self.split} (sum {sum(self.split)})"
            )
        if self.split[0] <= 0:
            raise ValueError("split: the train fraction must be > 0")
        if self.label_source not in ("auto", "oxford", "folder", "csv"):
            raise ValueError(
                f"label_source must be auto, oxford, folder or csv, got {self.label_source!r}"
            )
        if self.label_source == "csv" and not self.labels_csv:
            raise ValueError("label_source='csv' needs labels_csv, the URI of a path,label CSV")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ValueError("max_pixels and min_side must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")
        object.__setattr__(self, "formats", check_formats(self.formats))
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = all cores)")
        if self.image_timeout_s < 0:
            raise ValueError(f"image_timeout_s must be >= 0 (0 = no limit), got {self.image_timeout_s}")
        if self.rows_per_shard < 1 or self.row_group_rows < 1 or self.row_group_bytes < 1:
            raise ValueError("rows_per_shard, row_group_rows and row_group_bytes must be >= 1")


@dataclass(frozen=True)
class Placement:
    """Where a row goes if it decodes; decided from metadata before any decoding."""

    order: int
    label: int
    label_name: str
    split: str
    sha256: str
    carried: bool = False


@dataclass(frozen=True)
class RowResult:
    """Outcome of validating one input row (small: no image bytes)."""

    path: str
    reason: str | None = None
    detail: str = ""
    shard: int | None = None
    boxed: bool = False


@dataclass
class _Plan:
    """The metadata-only plan: placements of candidate rows and the rejects they imply."""

    classes: list[str]
    placements: dict[str, Placement] = field(default_factory=dict)
    # no_label / duplicate: these apply only to rows that decode (a decode failure wins).
    deferred: dict[str, Reject] = field(default_factory=dict)


@dataclass(frozen=True)
class _Task:
    """One unit of pool work: some row groups of the download output.

    Attributes:
        index: Names the task's bucket and marker files.
        units: ``(uri, row group)`` pairs to read.
        rows: Rows it will decode (for progress).
        only: Decode just this member (a suspect re-run alone).
        skip: Members already settled by a re-run alone.
    """

    index: int
    units: tuple[tuple[str, int], ...]
    rows: int
    only: str | None = None
    skip: frozenset[str] = frozenset()

    def wants(self, member: str) -> bool:
        return (self.only is None or member == self.only) and member not in self.skip


@dataclass(frozen=True)
class _DecodePool:
    """How many decode processes run, and the memory one image may take in each.

    Attributes:
        workers: Decode processes.
        max_decode_bytes: Per-image budget, ``None`` when the memory is unknown.
        memory: The memory divided among them, ``None`` when unknown.
    """

    workers: int
    max_decode_bytes: int | None
    memory: int | None


def _decode_pool(cpus: int, memory: int | None) -> _DecodePool:
    """Caps ``cpus`` workers to those ``memory`` can hold, and gives each image a budget."""
    if memory is None:
        return _DecodePool(cpus, None, None)
    usable = int(memory * (1 - _MEMORY_HEADROOM))
    workers = max(1, min(cpus, usable // (_WORKER_BASE_BYTES + _MIN_IMAGE_BYTES)))
    share = usable // workers
    # Below the base, the base is a guess worth less than trying: images get half the share.
    return _DecodePool(workers, max(share - _WORKER_BASE_BYTES, share // 2), memory)


def _init_worker(settings: storage.Settings, step_pid: int) -> None:
    """Pool initializer: the same storage settings as the parent; gone when the step is gone."""
    resources.die_with_parent(owner=step_pid)
    # What a decoder warns about (a bad TIFF tag, truncated EXIF) is in the reject detail or
    # harmless; from every worker it would only flood the step's log.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    storage.use_settings(settings)


_BUCKET_SUFFIX = ".arrow"


def bucket_path(bucket_dir: str | Path, shard: int, task: int) -> Path:
    """Local file holding one task's rows for one output shard.

    Buckets are Arrow IPC files, not Parquet: the step maps them into memory and reads
    them without decoding or copying, and the workers spend no time encoding them.
    """
    return Path(bucket_dir) / f"shard-{shard:05d}" / f"task-{task:05d}{_BUCKET_SUFFIX}"


def _read_bucket(path: Path) -> pa.Table:
    """A bucket file's rows, memory-mapped (no copy until they are reordered)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _drop_buckets(bucket_dir: str | Path, task: int) -> None:
    """Removes a task's bucket files: a killed task leaves unfinished ones."""
    for path in Path(bucket_dir).glob(f"shard-*/{bucket_path(bucket_dir, 0, task).name}"):
        path.unlink()


def _marker_path(bucket_dir: str | Path, task: int) -> Path:
    return Path(bucket_dir) / "decoding" / f"task-{task:05d}"


class _Marker:
    """A file naming the member a task is decoding right now; empty between decodes.

    Two system calls per image and no sync: the page cache outlives a killed process, so
    the step reads what the worker last wrote.
    """

    def __init__(self, bucket_dir: str | Path, task: int) -> None:
        path = _marker_path(bucket_dir, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    @contextlib.contextmanager
    def naming(self, member: str) -> Iterator[None]:
        # The pid first: the step kills the process whose decode overran (the watchdog).
        os.pwrite(self._fd, f"{os.getpid()} {member}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        os.close(self._fd)


def _take_suspect(bucket_dir: str | Path, task: int) -> str | None:
    """The member a task's marker names (the one being decoded when its worker died), once.

    The marker is removed: should the task not start again before the next pool breaks,
    it must not name a member that is settled already.
    """
    path = _marker_path(bucket_dir, task)
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:  # the task never started
        return None
    path.unlink()
    return text.partition(" ")[2] or None


def _kill_overdue(bucket_dir: str | Path, tasks: Iterable[_Task], timeout_s: float) -> set[str]:
    """Kills each worker whose marker has named one member for longer than ``timeout_s``.

    Returns:
        The members whose decode was cut short.
    """
    overdue = set()
    if not timeout_s:
        return overdue
    now = time.time()
    for task in tasks:
        path = _marker_path(bucket_dir, task.index)
        try:
            if now - path.stat().st_mtime <= timeout_s:
                continue
            pid, _, member = path.read_bytes().decode().partition(" ")
        except (FileNotFoundError, ValueError):
            continue
        if member:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
            overdue.add(member)
    return overdue


def _box_for(member: str, width: int, height: int, boxes: dict[str, HeadBox]) -> list[float] | None:
    head = boxes.get(image_stem(member))
    if head is None or (head.width, head.height) != (width, height):
        return None
    return list(head.box)


class _ShardBuckets:
    """Per-shard Parquet writers of one task; rows are appended as they validate."""

    def __init__(self, bucket_dir: str, task: int, rows_per_shard: int) -> None:
        self.bucket_dir, self.task, self.rows_per_shard = bucket_dir, task, rows_per_shard
        self.pending: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}

    def add(self, member: str, img: Any, place: Placement, bbox: list[float] | None) -> int:
        shard = place.order // self.rows_per_shard
        cols = self.pending[shard]
        for key, value in (
            ("path", member),
            ("image", {"bytes": img.data, "path": member}),
            ("width", img.width),
            ("height", img.height),
            ("mode", img.mode),
            ("format", img.format),
            ("label", place.label),
            ("label_name", place.label_name),
            ("split", place.split),
            ("order", place.order),
            ("sha256", place.sha256),
            ("bbox", bbox),
        ):
            cols[key].append(value)
        return shard

    def flush(self) -> None:
        for shard, cols in self.pending.items():
            if shard not in self.writers:
                path = bucket_path(self.bucket_dir, shard, self.task)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.writers[shard] = pa.ipc.new_file(str(path), OUTPUT_SCHEMA)
            self.writers[shard].write_table(pa.table(cols, schema=OUTPUT_SCHEMA))
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        for writer in self.writers.values():
            writer.close()


def validate_task(
    task: _Task,
    placements: dict[str, Placement],
    boxes: dict[str, HeadBox],
    cfg: CleanConfig,
    bucket_dir: str,
    max_decode_bytes: int | None = None,
) -> list[RowResult]:
    """Decodes and normalizes the rows of some download row groups.

    Every row is fully decoded, whatever the plan says about it, so the reject reason
    follows one precedence everywhere. Usable rows that the plan places are appended to
    this task's bucket file of their output shard; only per-row results travel back.
    While a row decodes, the task's marker file names it.

    Args:
        task: The row groups to process.
        placements: Output placement of each candidate row in these row groups.
        boxes: Head boxes by image stem (may be empty).
        cfg: The clean config.
        bucket_dir: Local folder for the shard buckets and markers.
        max_decode_bytes: Memory one image may take to decode; ``None`` for no limit.

    Returns:
        One result per input row the task wants (not carried), in input order.
    """
    buckets = _ShardBuckets(bucket_dir, task.index, cfg.rows_per_shard)
    marker = _Marker(bucket_dir, task.index)
    results: list[RowResult] = []
    try:
        for uri, row_group in task.units:
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                table = pq.ParquetFile(fh).read_row_group(row_group, columns=["path", "bytes"])
            blobs = table.column("bytes")
            for i, member in enumerate(table.column("path").to_pylist()):
                if member in placements and placements[member].carried:
                    continue  # copied from the previous output by _carry_rows
                if not task.wants(member):
                    continue
                try:
                    with marker.naming(member):
                        img = validate_and_normalize(
                            blobs[i].as_py() or b"",
                            grayscale=cfg.grayscale,
                            max_pixels=cfg.max_pixels,
                            min_side=cfg.min_side,
                            jpeg_quality=cfg.jpeg_quality,
                            max_decode_bytes=max_decode_bytes,
                            formats=cfg.formats,
                        )
                except ImageRejected as exc:
                    results.append(RowResult(member, exc.reason, exc.detail[:500]))
                    continue
                except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one image, not the run
                    results.append(
                        RowResult(member, "corrupt", f"{type(exc).__name__}: {exc}"[:500])
                    )
                    continue
                place = placements.get(member)
                if place is None:
                    results.append(RowResult(member))  # decodes, but the plan rejects it
                    continue
                bbox = _box_for(member, img.width, img.height, boxes)
                results.append(
                    RowResult(
                        member, shard=buckets.add(member, img, place, bbox), boxed=bbox is not None
                    )
                )
            buckets.flush()
    finally:
        marker.close()
        buckets.close()
    return results


def _read_index(files: Sequence[str]) -> tuple[list[tuple[str, int, list[str]]], dict[str, str]]:
    """Reads paths and hashes of every row (no image bytes), by row group."""
    units: list[tuple[str, int, list[str]]] = []
    sha_by_path: dict[str, str] = {}
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            for rg in range(pf.metadata.num_row_groups):
                meta = pf.read_row_group(rg, columns=["path", "sha256"])
                paths = meta.column("path").to_pylist()
                sha_by_path.update(zip(paths, meta.column("sha256").to_pylist()))
                units.append((uri, rg, paths))
    return units, sha_by_path


def _make_tasks(units: Sequence[tuple[str, int, list[str]]], workers: int) -> list[_Task]:
    """Groups row groups into tasks: enough for load balance, few enough to bound bucket files.

    Bucket files number tasks x output shards, so tasks are capped at 8 per worker; at
    least 2 per worker keep both busy until the end.
    """
    total = sum(len(paths) for *_, paths in units)
    count = max(1, min(len(units), max(2 * workers, min(8 * workers, math.ceil(total / 256)))))
    target = math.ceil(total / count) if total else 1
    tasks: list[_Task] = []
    current: list[tuple[str, int]] = []
    rows = 0
    for uri, rg, paths in units:
        current.append((uri, rg))
        rows += len(paths)
        if rows >= target:
            tasks.append(_Task(len(tasks), tuple(current), rows))
            current, rows = [], 0
    if current:
        tasks.append(_Task(len(tasks), tuple(current), rows))
    return tasks


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """Assigns each item a split so every class follows ``fractions`` as closely as possible.

    Per class, counts come from the largest-remainder method (so they sum exactly),
    with at least one training item for any non-empty class; which items go where is
    drawn from a generator seeded with ``seed``.

    Args:
        labels: Class index per item, in a deterministic item order.
        fractions: One fraction per split in :data:`SPLITS`.
        seed: Base seed.

    Returns:
        The split name per item.
    """
    rng = np.random.default_rng([seed, 0x5EED, 1])
    labels_arr = np.asarray(labels)
    out = np.empty(len(labels_arr), dtype=object)
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
        for name, part in zip(SPLITS, np.split(perm, bounds)):
            out[part] = name
    return out.tolist()


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The precomputed shuffled index: a seeded permutation of ``range(n)``."""
    return np.random.default_rng([seed, 0x5EED, 2]).permutation(n)


def _build_labeler(cfg: CleanConfig, paths: Sequence[str]) -> Labeler:
    if cfg.label_source == "csv":
        assert cfg.labels_csv is not None  # checked in CleanConfig
        return Labeler("csv", read_label_csv(storage.read_bytes(cfg.labels_csv)))
    if cfg.label_source == "auto":
        return Labeler(choose_label_source(paths))
    return Labeler(cfg.label_source)


def _plan(
    sha_by_path: dict[str, str], labeler: Labeler, cfg: CleanConfig, known: dict[str, str] | None = None
) -> _Plan:
    """Labels, finds exact duplicates, splits and orders the rows, from metadata alone.

    Identical bytes decode identically, so duplicates can be settled before decoding:
    among labelled rows with the same sha256, the first path in sorted order is the
    candidate and the others are deferred ``duplicate`` rejects.
    """
    deferred: dict[str, Reject] = {}
    labelled: list[tuple[str, str, str]] = []
    for path in sorted(sha_by_path):
        name = labeler(path)
        if name is None:
            deferred[path] = Reject(path, "no_label", labeler.describe_missing(path))
        else:
            labelled.append((path, name, sha_by_path[path]))
    first_by_hash: dict[str, str] = {}
    candidates: list[tuple[str, str, str]] = []
    for path, name, sha in labelled:
        if sha in first_by_hash:
            deferred[path] = Reject(path, "duplicate", f"same bytes as {first_by_hash[sha]}")
        else:
            first_by_hash[sha] = path
            candidates.append((path, name, sha))
    classes = encode_labels(name for _, name, _ in candidates)
    index = {name: i for i, name in enumerate(classes)}
    label_ids = [index[name] for _, name, _ in candidates]
    known = known or {}
    fresh = [i for i, (_, _, sha) in enumerate(candidates) if sha not in known]
    fresh_splits = iter(stratified_split([label_ids[i] for i in fresh], cfg.split, cfg.seed))
    splits = [known[sha] if sha in known else next(fresh_splits) for _, _, sha in candidates]
    order = shuffled_order(len(candidates), cfg.seed)
    plan = _Plan(classes=classes, deferred=deferred)
    for (path, name, sha), lab, split, o in zip(candidates, label_ids, splits, order):
        plan.placements[path] = Placement(int(o), lab, name, split, sha, carried=sha in known)
    return plan


def _pool_context(uris: Iterable[str]) -> multiprocessing.context.BaseContext:
    """Fork where every input's backend survives a fork; else a forkserver with this module preloaded.

    An object store's client may keep threads that do not survive a fork (the child can
    deadlock on a lock one of them held: :func:`imgpipe.storage.fork_safe`), so such inputs
    get a forkserver, whose workers start in ~0.05 s each plus ~0.4 s once for the
    server, instead of ~0.5 s each for spawn. Local inputs take plain fork, which saves
    that ~0.4 s: a tenth of cleaning an Oxford-sized set on 2 cores.
    """
    if storage.fork_safe(uris):
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    # The server imports this module and runs import_before_fork once for all its workers.
    ctx.set_forkserver_preload([f"{__package__}._clean_forkserver"])
    return ctx


def _validate_all(
    tasks: Sequence[_Task],
    unit_paths: dict[tuple[str, int], list[str]],
    plan: _Plan,
    boxes: dict[str, HeadBox],
    cfg: CleanConfig,
    bucket_dir: Path,
    pool: _DecodePool,
) -> tuple[list[RowResult], int]:
    """Runs :func:`validate_task` over all tasks on the decode pool, with progress.

    A worker that dies costs the member it was decoding (see the module docstring).

    Returns:
        One result per row, and the next task index no bucket file uses.
    """
    results: dict[int, list[RowResult]] = {}

    def task_args(task: _Task) -> tuple:
        members = [p for uri, rg in task.units for p in unit_paths[(uri, rg)] if task.wants(p)]
        places = {p: plan.placements[p] for p in members if p in plan.placements}
        task_boxes = {image_stem(p): boxes[image_stem(p)] for p in places if image_stem(p) in boxes}
        return task, places, task_boxes, cfg, str(bucket_dir), pool.max_decode_bytes

    next_index = len(tasks)
    with tqdm(
        total=sum(t.rows for t in tasks), desc="clean: decode", unit="img", dynamic_ncols=True
    ) as bar:
        if cfg.workers == 1:
            for task in tasks:
                results[task.index] = validate_task(*task_args(task))
                bar.update(task.rows)
            return [r for i in sorted(results) for r in results[i]], next_index
        ctx = _pool_context(uri for t in tasks for uri, _ in t.units)
        import_before_fork()
        pending, barren = list(tasks), 0
        watch = _Watch(bucket_dir, cfg.image_timeout_s)
        while pending := _run_pool(pending, task_args, pool.workers, ctx, results, bar, watch):
            for task in pending:
                _drop_buckets(bucket_dir, task.index)
            named = {t.index: _take_suspect(bucket_dir, t.index) for t in pending}
            suspects = {index: member for index, member in named.items() if member is not None}
            for task in (t for t in pending if t.index in suspects):
                member = suspects[task.index]
                if member in watch.overdue:
                    # It overran the limit itself (the watchdog, not a neighbour's crash,
                    # ended its worker): a second full wait alone would tell nothing new.
                    results[next_index] = [RowResult(member, DECODE_TIMEOUT, watch.detail())]
                else:
                    solo = _Task(next_index, task.units, 1, only=member)
                    results[solo.index] = _settle_alone(task_args(solo), ctx, watch, pool)
                next_index += 1
                bar.update(1)
            barren = 0 if suspects else barren + 1
            if barren > _MAX_BARREN_RESTARTS:
                raise RuntimeError(
                    f"clean: decode workers died {barren} times in a row outside any image decode"
                    " (reading or writing row groups); give the step more memory or fewer workers"
                )
            # A restart repeats an unfinished task from its first row: one row group per
            # task bounds what each further hang or crash costs.
            pieces = []
            for task in (_without(t, suspects.get(t.index)) for t in pending):
                for unit in task.units:
                    rows = sum(task.wants(p) for p in unit_paths[unit])
                    pieces.append(replace(task, index=next_index, units=(unit,), rows=rows))
                    next_index += 1
            pending = pieces
    return [r for i in sorted(results) for r in results[i]], next_index


def _without(task: _Task, member: str | None) -> _Task:
    """``task`` skipping ``member``, once a run of its own settled it."""
    if member is None:
        return task
    return replace(task, rows=task.rows - 1, skip=task.skip | {member})


def import_before_fork() -> None:
    """Does here, once, the imports that every forked worker would otherwise do on first use.

    Called in the step before a fork pool starts, and in the forkserver (S3 inputs) by
    importing :mod:`imgpipe.steps._clean_forkserver`.

    Pillow loads its format plugins on the first open. pyarrow imports pandas, when it is
    installed, the first time it builds an array from Python values (to recognize pandas
    types): 0.3 s of CPU per process on this machine, paid by each worker on its first
    spill write. (The step's images do not install pandas; a development environment with
    Ray Data does.)
    """
    load_decoders()
    pa.array([0])


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keeps the collector off this process's objects while forked workers run.

    Forked workers share the parent's pages until something writes to them, and a
    collection in a worker writes to every tracked object it inherited (measured: 0.12 s
    of a 2.4 s decode pass on 2 cores). The objects are collectable again afterwards,
    unless the caller had frozen its heap itself: that is left as it was.
    """
    if gc.get_freeze_count():  # unfreezing would undo the caller's freeze too
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_pool(
    tasks: Sequence[_Task],
    task_args: Callable[[_Task], tuple],
    workers: int,
    ctx: multiprocessing.context.BaseContext,
    results: dict[int, list[RowResult]],
    bar: tqdm,
    watch: _Watch,
) -> list[_Task]:
    """Runs ``tasks`` on a fresh process pool into ``results``, killing overrunning decodes.

    Returns:
        The tasks left unfinished because a worker died (all that were not done by then).
    """
    unfinished: list[_Task] = []
    with _frozen_heap(), ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(storage.settings(), os.getpid()),
    ) as executor:
        futures = {}
        for task in tasks:
            try:
                futures[executor.submit(validate_task, *task_args(task))] = task
            except BrokenProcessPool:  # a worker died while tasks were still being handed out
                unfinished.append(task)
        running = set(futures)
        while running:
            done, running = wait(running, timeout=watch.poll_s, return_when=FIRST_COMPLETED)
            watch.overdue |= _kill_overdue(watch.bucket_dir, (futures[f] for f in running), watch.timeout_s)
            for fut in done:
                task = futures[fut]
                try:
                    results[task.index] = fut.result()
                except BrokenProcessPool:
                    unfinished.append(task)
                else:
                    bar.update(task.rows)
    return sorted(unfinished, key=lambda t: t.index)


@dataclass
class _Watch:
    """The per-image time limit: where the markers are, the limit, and who overran it."""

    bucket_dir: Path
    timeout_s: float
    overdue: set[str] = field(default_factory=set)

    def detail(self) -> str:
        return f"decoding took longer than image_timeout_s={self.timeout_s:g} s; its worker was killed"

    @property
    def poll_s(self) -> float:
        return min(1.0, self.timeout_s / 4) if self.timeout_s else 1.0


def _settle_alone(
    args: tuple, ctx: multiprocessing.context.BaseContext, watch: _Watch, pool: _DecodePool
) -> list[RowResult]:
    """Decodes a suspect alone: its result, or ``decoder_killed`` / ``decode_timeout`` if it fails again.

    Args:
        args: :func:`validate_task`'s arguments, for a task of one member (``only``).
        ctx: Multiprocessing context of the pool.
        watch: The time limit; its ``bucket_dir`` holds the bucket files and marker
            (removed if the process dies).
        pool: The decode pool, for the budget the detail names.

    Raises:
        RuntimeError: If the process died outside the decode: not the image's doing.
    """
    solo: _Task = args[0]
    assert solo.only is not None, "a suspect runs alone"
    bucket_dir = watch.bucket_dir
    outcome = _run_alone(args, ctx, watch)
    if not isinstance(outcome, int):
        return outcome
    _drop_buckets(bucket_dir, solo.index)
    if solo.only in watch.overdue and outcome == -signal.SIGKILL:
        _take_suspect(bucket_dir, solo.index)
        return [RowResult(solo.only, DECODE_TIMEOUT, watch.detail())]
    if _take_suspect(bucket_dir, solo.index) is None:
        raise RuntimeError(
            f"clean: the process decoding {solo.only} alone {_exit_text(outcome)} outside the"
            " decode (reading or writing its row group); give the step more memory"
        )
    if pool.max_decode_bytes is None:
        need = "more memory than the process could get"
    else:
        need = (
            f"more memory than the per-image budget of {pool.max_decode_bytes} bytes,"
            " which its header's estimate fitted"
        )
    detail = (
        f"the process decoding it {_exit_text(outcome)} in the pool and again alone;"
        f" it likely needs {need} (the OOM killer sends SIGKILL)"
    )
    return [RowResult(solo.only, DECODER_KILLED, detail)]


def _exit_text(exit_code: int) -> str:
    """``multiprocessing``'s exit code in words: negative is the signal that ended the process."""
    if exit_code >= 0:
        return f"ended with exit status {exit_code}"
    try:
        return f"was killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"was killed by signal {-exit_code}"


def _run_alone(
    args: tuple, ctx: multiprocessing.context.BaseContext, watch: _Watch
) -> list[RowResult] | int:
    """Runs one :func:`validate_task` in a process of its own: its results, or its exit code.

    A bare process rather than a one-worker pool: a pool reports a dead worker without
    its exit code, which the reject detail names. The time limit applies as in the pool.
    """
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_task_process, args=(send, storage.settings(), os.getpid(), args), daemon=True
    )
    proc.start()
    send.close()  # now only the child holds the sending end: its death reads as EOF
    try:
        while not receive.poll(watch.poll_s):
            watch.overdue |= _kill_overdue(watch.bucket_dir, [args[0]], watch.timeout_s)
        kind, value = receive.recv()
    except EOFError:
        kind, value = "died", None
    finally:
        receive.close()
        proc.join()
    if kind == "error":
        raise RuntimeError(f"clean: re-running one image alone failed:\n{value}")
    return value if kind == "ok" else proc.exitcode


def _task_process(send: Any, settings: storage.Settings, step_pid: int, args: tuple) -> None:
    """Body of :func:`_run_alone`'s process: runs the task and sends back its outcome."""
    _init_worker(settings, step_pid)
    try:
        outcome: tuple[str, Any] = ("ok", validate_task(*args))
    except Exception:  # noqa: BLE001 - sent back, so the step fails as it would in the pool
        outcome = ("error", traceback.format_exc())
    send.send(outcome)
    send.close()


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
        pieces = sorted(bucket_path(bucket_dir, shard, 0).parent.glob(f"task-*{_BUCKET_SUFFIX}"))
        table = pa.concat_tables([_read_bucket(p) for p in pieces])
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
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(shards)))) as pool:
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


def _carry_rows(files: Sequence[str], plan: _Plan, bucket_dir: Path, task: int, cfg: CleanConfig) -> list[RowResult]:
    """Copies the carried rows from the previous output into the shard buckets, placed anew."""
    by_sha = {p.sha256: (path, p) for path, p in plan.placements.items() if p.carried}
    buckets = _ShardBuckets(str(bucket_dir), task, cfg.rows_per_shard)
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
    units, sha_by_path = _read_index(contract.data_files(source, manifest))
    labeler = _build_labeler(cfg, list(sha_by_path))
    known_files, known = _read_known(cfg.skip_hashes_from, cfg) if cfg.skip_hashes_from else ([], {})
    plan = _plan(sha_by_path, labeler, cfg, known)
    phases.done("plan", rows=len(sha_by_path), classes=len(plan.classes), planned=len(plan.placements), known=len(known))
    boxes, bad_boxes = read_head_boxes(cfg.annotations) if cfg.annotations else ({}, {})
    pool = _decode_pool(cfg.workers or resources.available_cpus(), resources.usable_memory())
    tasks = _make_tasks(units, pool.workers)
    out = OutputWriter(dest, "clean")
    out.begin()
    with tempfile.TemporaryDirectory(prefix="imgpipe-clean-") as tmp:
        bucket_dir = Path(tmp)
        unit_paths = {(uri, rg): paths for uri, rg, paths in units}
        results, free_index = _validate_all(tasks, unit_paths, plan, boxes, cfg, bucket_dir, pool)
        phases.done("decode", rows=len(results), failed=sum(bool(r.reason) for r in results), workers=pool.workers)
        if known:
            results += _carry_rows(known_files, plan, bucket_dir, free_index, cfg)
        rejects = [Reject(r.path, r.reason, r.detail) for r in results if r.reason]
        rejects += [
            plan.deferred[r.path] for r in results if not r.reason and r.path in plan.deferred
        ]
        kept = [plan.placements[r.path] for r in results if r.shard is not None]
        kept_per_shard = Counter(r.shard for r in results if r.shard is not None)
        # A class whose every image failed to decode is dropped from the label space.
        classes = [c for i, c in enumerate(plan.classes) if any(p.label == i for p in kept)]
        label_map = np.array(
            [classes.index(c) if c in classes else -1 for c in plan.classes] or [0], dtype=np.int32
        )
        _write_shards(bucket_dir, kept_per_shard, label_map, out, cfg, classes)
        phases.done("write", kept=len(kept), rejected=len(rejects), shards=len(kept_per_shard))
    storage.write_bytes(
        out.uri(LABELS_FILE),
        json.dumps({str(i): n for i, n in enumerate(classes)}, indent=2).encode(),
    )
    split_counts = Counter(p.split for p in kept)
    class_counts = Counter(p.label_name for p in kept)
    report = out.commit(
        inputs=len(results),
        rejects=rejects,
        config=cfg,
        extra={
            "label_source": labeler.source,
            "classes": classes,
            "num_classes": len(classes),
            "splits": {name: split_counts.get(name, 0) for name in SPLITS},
            "per_class": dict(sorted(class_counts.items())),
            # Class histograms per split (the step's report draws them from here).
            "per_split_class": {s: dict(sorted(Counter(p.label_name for p in kept if p.split == s).items())) for s in SPLITS},
            "decode_pool": {
                "workers": pool.workers,
                "memory": pool.memory,
                "max_decode_bytes": pool.max_decode_bytes,
            },
            "carried": sum(p.carried for p in kept),
            "carried_from": cfg.skip_hashes_from,
            "annotations": {
                "boxes_read": len(boxes),
                "rows_with_bbox": sum(r.boxed for r in results),
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
