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
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from imgpipe import contract, storage
from imgpipe.contract import OutputWriter, Reject, StepReport
from imgpipe.images import ImageRejected, validate_and_normalize
from imgpipe.labels import Labeler, LabelSource, choose_label_source, encode_labels, read_label_csv

__all__ = [
    "CleanConfig",
    "SPLITS",
    "OUTPUT_SCHEMA",
    "LABELS_FILE",
    "clean",
    "validate_row_group",
    "stratified_split",
    "shuffled_order",
]

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.json"

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        # {bytes, path}: the Hugging Face `datasets` Image feature layout, which Ray and
        # pandas also read as-is.
        pa.field("image", IMAGE_TYPE, nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("order", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)
_SPILL_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("data", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mode", pa.string()),
        pa.field("format", pa.string()),
    ]
)


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
        workers: Decode processes; 0 means one per CPU core.
        rows_per_shard: Rows per output Parquet shard.
        row_group_rows: Rows per Parquet row group (the unit readers parallelize on).
    """

    grayscale: bool = False
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    label_source: LabelSource = "auto"
    labels_csv: str | None = None
    max_pixels: int = 89_478_485
    min_side: int = 32
    jpeg_quality: int = 95
    workers: int = 0
    rows_per_shard: int = 2048
    row_group_rows: int = 128

    def __post_init__(self) -> None:
        if len(self.split) != 3 or any(f < 0 for f in self.split):
            raise ValueError(f"split must be three non-negative fractions (train,val,test), got {self.split}")
        if not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1, got {self.split} (sum {sum(self.split)})")
        if self.split[0] <= 0:
            raise ValueError("split: the train fraction must be > 0")
        if self.label_source not in ("auto", "oxford", "folder", "csv"):
            raise ValueError(f"label_source must be auto, oxford, folder or csv, got {self.label_source!r}")
        if self.label_source == "csv" and not self.labels_csv:
            raise ValueError("label_source='csv' needs labels_csv, the URI of a path,label CSV")
        if self.max_pixels < 1 or self.min_side < 1:
            raise ValueError("max_pixels and min_side must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = all cores)")
        if self.rows_per_shard < 1 or self.row_group_rows < 1:
            raise ValueError("rows_per_shard and row_group_rows must be >= 1")


@dataclass(frozen=True)
class RowResult:
    """Outcome of validating one input row (small: no image bytes)."""

    path: str
    sha256: str
    reason: str | None = None
    detail: str = ""
    spill: str | None = None


@dataclass
class _Plan:
    """Where each kept row goes; built from metadata only."""

    classes: list[str]
    rows: dict[str, tuple[int, int, str, str, str]] = field(default_factory=dict)  # path -> (order, label, name, split, sha)
    rejects: list[Reject] = field(default_factory=list)


def _init_worker(s3_options: storage.S3Options, max_pixels: int) -> None:
    """Pool initializer: the same storage settings as the parent, PIL's bomb limit raised to ours."""
    from PIL import Image

    storage.configure_s3(**s3_options.__dict__)
    # PIL refuses images above 2x MAX_IMAGE_PIXELS by itself; keep that from overriding a
    # user's larger max_pixels (ours is checked before any pixel is decoded).
    Image.MAX_IMAGE_PIXELS = max(max_pixels, 89_478_485)


def validate_row_group(shard_uri: str, row_group: int, cfg: CleanConfig, spill_path: str) -> list[RowResult]:
    """Decodes and normalizes one row group of a download shard.

    Usable images go to a local Parquet spill file at ``spill_path``; only per-row
    results travel back to the caller.

    Args:
        shard_uri: A download Parquet shard.
        row_group: Index of the row group to process.
        cfg: The clean config.
        spill_path: Local file for the normalized images.

    Returns:
        One result per input row, in input order.
    """
    fs, path = storage.arrow_filesystem(shard_uri)
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(row_group, columns=["path", "bytes", "sha256"])
    results: list[RowResult] = []
    spill: dict[str, list] = {name: [] for name in _SPILL_SCHEMA.names}
    paths = table.column("path").to_pylist()
    shas = table.column("sha256").to_pylist()
    blobs = table.column("bytes")
    for i, (member, sha) in enumerate(zip(paths, shas)):
        data = blobs[i].as_py() or b""
        try:
            img = validate_and_normalize(
                data,
                grayscale=cfg.grayscale,
                max_pixels=cfg.max_pixels,
                min_side=cfg.min_side,
                jpeg_quality=cfg.jpeg_quality,
            )
        except ImageRejected as exc:
            results.append(RowResult(member, sha, exc.reason, exc.detail[:500]))
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one image, not the run
            results.append(RowResult(member, sha, "corrupt", f"{type(exc).__name__}: {exc}"[:500]))
            continue
        for name, value in zip(_SPILL_SCHEMA.names, (member, img.data, img.width, img.height, img.mode, img.format)):
            spill[name].append(value)
        results.append(RowResult(member, sha, spill=spill_path))
    pq.write_table(pa.table(spill, schema=_SPILL_SCHEMA), spill_path, compression="none")
    return results


def _row_groups(files: Sequence[str]) -> list[tuple[str, int, int]]:
    tasks = []
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
        tasks.extend((uri, rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups))
    return tasks


def _validate_all(tasks: list[tuple[str, int, int]], cfg: CleanConfig, spill_dir: Path) -> list[RowResult]:
    """Runs :func:`validate_row_group` over all tasks on all cores, with progress."""
    workers = cfg.workers or os.cpu_count() or 1
    total = sum(n for *_, n in tasks)
    results: list[list[RowResult]] = [[] for _ in tasks]
    with tqdm(total=total, desc="clean: decode", unit="img", dynamic_ncols=True) as bar:
        if workers == 1 or len(tasks) <= 1:
            for i, (uri, rg, n) in enumerate(tasks):
                results[i] = validate_row_group(uri, rg, cfg, str(spill_dir / f"spill-{i:06d}.parquet"))
                bar.update(n)
        else:
            # Not plain fork: the parent may hold boto3/pyarrow/tqdm threads, and forking a
            # process with live threads can deadlock the child. A forkserver with this
            # module preloaded starts workers in ~0.05 s each instead of ~0.5 s for spawn.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            with ProcessPoolExecutor(
                max_workers=min(workers, len(tasks)),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(storage.configure_s3(), cfg.max_pixels),
            ) as pool:
                futures = {
                    pool.submit(validate_row_group, uri, rg, cfg, str(spill_dir / f"spill-{i:06d}.parquet")): (i, n)
                    for i, (uri, rg, n) in enumerate(tasks)
                }
                for fut in as_completed(futures):
                    i, n = futures[fut]
                    results[i] = fut.result()
                    bar.update(n)
    return [r for group in results for r in group]


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


def _plan(results: list[RowResult], labeler: Labeler, cfg: CleanConfig) -> _Plan:
    """Labels, removes exact duplicates, splits and orders the valid rows."""
    rejects: list[Reject] = [Reject(r.path, r.reason, r.detail) for r in results if r.reason]
    labelled: list[tuple[str, str, str]] = []
    for r in results:
        if r.reason:
            continue
        name = labeler(r.path)
        if name is None:
            rejects.append(Reject(r.path, "no_label", labeler.describe_missing(r.path)))
        else:
            labelled.append((r.path, name, r.sha256))
    labelled.sort()
    first_by_hash: dict[str, str] = {}
    kept: list[tuple[str, str, str]] = []
    for path, name, sha in labelled:
        if sha in first_by_hash:
            rejects.append(Reject(path, "duplicate", f"same bytes as {first_by_hash[sha]}"))
        else:
            first_by_hash[sha] = path
            kept.append((path, name, sha))
    classes = encode_labels(name for _, name, _ in kept)
    index = {name: i for i, name in enumerate(classes)}
    label_ids = [index[name] for _, name, _ in kept]
    splits = stratified_split(label_ids, cfg.split, cfg.seed)
    order = shuffled_order(len(kept), cfg.seed)
    plan = _Plan(classes=classes, rejects=rejects)
    for (path, name, sha), lab, split, o in zip(kept, label_ids, splits, order):
        plan.rows[path] = (int(o), lab, name, split, sha)
    return plan


def _bucket_spills(spills: Sequence[str], plan: _Plan, cfg: CleanConfig, bucket_dir: Path) -> list[Path]:
    """Redistributes kept spill rows into one local file per output shard (by ``order``)."""
    n_shards = max(1, math.ceil(len(plan.rows) / cfg.rows_per_shard)) if plan.rows else 0
    paths = [bucket_dir / f"bucket-{k:05d}.parquet" for k in range(n_shards)]
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for spill in spills:
            table = pq.read_table(spill)
            cols: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for i, member in enumerate(table.column("path").to_pylist()):
                if member not in plan.rows:
                    continue  # no_label or duplicate
                order, lab, name, split, sha = plan.rows[member]
                c = cols[order // cfg.rows_per_shard]
                c["row"].append(i)
                for key, value in (("order", order), ("label", lab), ("label_name", name), ("split", split), ("sha256", sha)):
                    c[key].append(value)
            for k, c in cols.items():
                part = table.take(pa.array(c.pop("row"), type=pa.int64()))
                out = _to_output(part, c)
                if k not in writers:
                    writers[k] = pq.ParquetWriter(paths[k], OUTPUT_SCHEMA, compression="none")
                writers[k].write_table(out)
    finally:
        for w in writers.values():
            w.close()
    return paths


def _to_output(spill: pa.Table, meta: dict[str, list]) -> pa.Table:
    image = pa.StructArray.from_arrays(
        [spill.column("data").combine_chunks(), spill.column("path").combine_chunks()], fields=list(IMAGE_TYPE)
    )
    return pa.table(
        {
            "path": spill.column("path"),
            "image": image,
            "width": spill.column("width"),
            "height": spill.column("height"),
            "mode": spill.column("mode"),
            "format": spill.column("format"),
            "label": pa.array(meta["label"], pa.int32()),
            "label_name": pa.array(meta["label_name"], pa.string()),
            "split": pa.array(meta["split"], pa.string()),
            "order": pa.array(meta["order"], pa.int64()),
            "sha256": pa.array(meta["sha256"], pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )


def _write_shards(buckets: Sequence[Path], out: OutputWriter, cfg: CleanConfig) -> None:
    def write_one(k: int, bucket: Path) -> None:
        table = pq.read_table(bucket).sort_by("order")
        out.write_table(f"part-{k:05d}.parquet", table, row_group_size=cfg.row_group_rows)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for fut in [pool.submit(write_one, k, b) for k, b in enumerate(buckets) if b.exists()]:
            fut.result()


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
    source, dest = storage.normalize_uri(source), storage.normalize_uri(dest)
    contract.check_disjoint(dest, [source] + ([cfg.labels_csv] if cfg.labels_csv else []), "clean")
    manifest = contract.read_manifest(source, expect_step="download")
    files = contract.data_files(source, manifest)
    tasks = _row_groups(files)
    out = OutputWriter(dest, "clean")
    out.begin()
    with tempfile.TemporaryDirectory(prefix="imgpipe-clean-") as tmp:
        tmp_dir = Path(tmp)
        results = _validate_all(tasks, cfg, tmp_dir)
        labeler = _build_labeler(cfg, [r.path for r in results if not r.reason])
        plan = _plan(results, labeler, cfg)
        spills = sorted({r.spill for r in results if r.spill})
        buckets = _bucket_spills(spills, plan, cfg, tmp_dir)
        _write_shards(buckets, out, cfg)
    storage.write_bytes(
        out.uri(LABELS_FILE), json.dumps({str(i): n for i, n in enumerate(plan.classes)}, indent=2).encode()
    )
    split_counts = Counter(v[3] for v in plan.rows.values())
    class_counts = Counter(v[2] for v in plan.rows.values())
    return out.commit(
        inputs=len(results),
        rejects=plan.rejects,
        config=cfg,
        extra={
            "label_source": labeler.source,
            "classes": plan.classes,
            "num_classes": len(plan.classes),
            "splits": {s: split_counts.get(s, 0) for s in SPLITS},
            "per_class": dict(sorted(class_counts.items())),
        },
        upstream={"source": source, "step": manifest.get("step"), "outputs": manifest.get("outputs")},
    )
