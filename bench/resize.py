"""Benchmark: the resize step against the baseline recipe, the decode floor and a process pool.

All rows of one set are measured in one run, on the same JPEG bytes, with the methods
interleaved in every repeat so that load from other processes falls on all of them alike;
the tables report medians and the ratios between methods. Sets are real photographs (see
``bench/photos.py``) at about 0.2, 3 and 12 megapixels.

* **ours**: :func:`imgpipe.steps.resize.resize` end to end on ``file://`` (Parquet read in
  the Ray tasks, resize, output Parquet written by the driver), with the default config
  and with ``concurrency`` = all CPUs. The input is clean's layout with row groups of
  ``ceil(count / (workers * --tasks-per-cpu))`` rows, so a small set still makes several
  tasks (the step runs one task per row group).
* **baseline (bytes)**: ``ray.data.read_binary_files`` on the same JPEGs as files, then
  PIL decode + torchvision ``Resize(256)`` + ``CenterCrop(224)`` per image in
  ``map_batches``; **baseline (read_images)**: ``ray.data.read_images`` (full decode in
  the read tasks) + the same transforms in ``map``. Same local Ray; as many blocks and
  rows per batch as our tasks have.
* **decode floor**: only the reduced-scale JPEG decode our fast path picks (``Image.draft``
  at that scale, no resize), in a ``multiprocessing`` pool of all cores.
* **process pool**: a plain ``multiprocessing.Pool`` of all cores mapping
  :func:`imgpipe.resize.ops.resize_image` over the bytes and returning the pixels.
* **process-pool step**: the resize step's own work on a ``multiprocessing.Pool`` instead
  of Ray (:func:`pool_step`): the same row groups, task body, driver loop (rejects, sorted
  shards per split, hashed as written) and commit. It is the baseline for what Ray itself
  costs, where the plain process pool above reads nothing and writes nothing.

Ray runs are steady state in two senses, both reported: *warm* (Ray started once, every
method run once untimed first, so start-up, imports and first-task warm-up are excluded,
but Ray Data's per-execution start-up of a few tenths of a second is included) and
*after the first batch* (rows after the first output batch over the time from its
arrival to the last). Pools are started and warmed outside the timing.

Cold (``--cold``, what a pod pays): each set once more, each method in a fresh process timed
from outside: ``imgpipe resize SOURCE DEST`` (imports, its own local Ray, the run, the commit)
against a fresh process that reads the same clean output and maps ``resize_image`` over it in
a ``multiprocessing.Pool`` (imports, pool start, reading, resizing), and against a fresh
process running the process-pool step (the same output, committed). The fixed cost of each is
its cold time less ``images / steady rate`` (the steady rates measured above), i.e. what it
pays before and around the work itself.

Per-image CPU time: one process, no Ray, ``time.process_time`` per piece (full decode,
draft decode, ``resize_image``, the reference, the baseline recipe, and ``resize_image``
at a smaller DRAFT_MARGIN with its difference from the reference).

Peak memory: the resize step (default config, its own Ray) runs on 2,000 and on 20,000
small photos in clean's default layout, each count in a fresh driver process, while a
thread samples the summed RSS and PSS of the driver and all its descendants (Ray's GCS,
the raylet with the object store, the workers) from ``/proc``.

Needs the ``bench`` extra (scikit-image, scikit-learn for the photos). Run inside the
loopback-only namespace (Ray binds the external interface otherwise)::

    scripts/in-loopback-netns .venv/bin/python bench/resize.py [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import Photo, photo_set  # noqa: E402
from proctree import process_tree  # noqa: E402

import imgpipe.steps.resize as resize_step  # noqa: E402
from imgpipe import contract  # noqa: E402
from imgpipe.clean.config import CleanConfig  # noqa: E402
from imgpipe.clean.decode import OUTPUT_SCHEMA  # noqa: E402
from imgpipe.resize.ops import _decode, _open, resize_image, resize_image_reference
from imgpipe.resize.spec import DRAFT_MARGIN, ResizeConfig, ResizeSpec, plan_geometry
from imgpipe.resize.task import TaskOutput, TaskResult, run_task
from imgpipe.resources import available_cpus  # noqa: E402
from imgpipe.steps.resize import resize
from imgpipe.writer import OutputWriter  # noqa: E402


@dataclass(frozen=True)
class SetSpec:
    """One photo set: its label, image count and pixel size."""

    label: str
    count: int
    width: int
    height: int


# ----------------------------------------------------------------------------------------
# Inputs.


def write_clean_output(dest: Path, photos: Sequence[Photo], row_group_rows: int, rows_per_shard: int) -> str:
    """Commits a clean-shaped output (``OUTPUT_SCHEMA``, one ``train`` split) holding ``photos``."""
    out = OutputWriter(str(dest), "clean")
    out.begin()
    classes = sorted({p.source for p in photos})
    for k, start in enumerate(range(0, len(photos), rows_per_shard)):
        chunk = photos[start : start + rows_per_shard]
        columns = {
            "path": [p.name for p in chunk],
            "image": [{"bytes": p.data, "path": p.name} for p in chunk],
            "width": pa.array([p.width for p in chunk], pa.int32()),
            "height": pa.array([p.height for p in chunk], pa.int32()),
            "mode": ["RGB"] * len(chunk),
            "format": ["JPEG"] * len(chunk),
            "label": pa.array([classes.index(p.source) for p in chunk], pa.int32()),
            "label_name": [p.source for p in chunk],
            "split": ["train"] * len(chunk),
            "order": pa.array(range(start, start + len(chunk)), pa.int64()),
            "sha256": [hashlib.sha256(p.data).hexdigest() for p in chunk],
        }
        # Optional columns of clean's schema that these photos lack (e.g. ``bbox``) stay null.
        table = pa.table(
            {f.name: columns.get(f.name, pa.nulls(len(chunk), f.type)) for f in OUTPUT_SCHEMA},
            schema=OUTPUT_SCHEMA,
        )
        out.write_table(f"train/part-{k:05d}.parquet", table, row_group_size=row_group_rows)
    out.commit(
        inputs=len(photos),
        rejects=[],
        config={"generated_by": "bench/resize.py"},
        extra={"classes": classes, "num_classes": len(classes)},
    )
    return out.dest


def write_files(folder: Path, photos: Sequence[Photo]) -> str:
    """Writes the photos as plain ``.jpg`` files, for the baseline's readers."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in photos:
        (folder / p.name).write_bytes(p.data)
    return str(folder)


# ----------------------------------------------------------------------------------------
# Process-pool work (module level, so spawned workers can import it).

_SPEC = ResizeSpec()


def decode_floor(data: bytes) -> int:
    """The floor's work: the fast path's reduced-scale decode of one JPEG, no resize."""
    img = _open(data)
    geometry = plan_geometry(img.width, img.height, _SPEC)
    img, _ = _decode(img, geometry, _SPEC.fast_decode, DRAFT_MARGIN)
    return img.width


def resize_one(data: bytes) -> bytes:
    """The process pool's work: our per-image function, returning the pixels as Ray's tasks do."""
    return resize_image(data, _SPEC).tobytes()


def draft_scale(data: bytes) -> float:
    """The decode scale the fast path picks for one JPEG (1, 1/2, 1/4 or 1/8)."""
    img = _open(data)
    geometry = plan_geometry(img.width, img.height, _SPEC)
    _, scale = _decode(img, geometry, _SPEC.fast_decode, DRAFT_MARGIN)
    return scale


def time_pool(pool: Any, fn: Callable[[bytes], Any], blobs: Sequence[bytes], workers: int) -> float:
    chunksize = max(1, len(blobs) // (workers * 8))
    t0 = time.perf_counter()
    results = pool.map(fn, blobs, chunksize=chunksize)
    elapsed = time.perf_counter() - t0
    assert len(results) == len(blobs)
    return elapsed


# ----------------------------------------------------------------------------------------
# Ray work.


def baseline_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The baseline recipe on encoded bytes: PIL decode, Resize(256), CenterCrop(224)."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    out = np.empty(len(batch["bytes"]), dtype=object)
    for i, data in enumerate(batch["bytes"]):
        with Image.open(io.BytesIO(data)) as img:
            out[i] = np.asarray(transform(img.convert("RGB")))
    return {"image": np.stack(out) if len(out) else np.zeros((0, 224, 224, 3), np.uint8)}


def baseline_row(row: dict[str, Any]) -> dict[str, Any]:
    """The baseline recipe on ``read_images`` rows (already decoded): Resize(256), CenterCrop(224)."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    return {"image": np.asarray(transform(Image.fromarray(row["image"])))}


Clock = list[tuple[float, int]]  # (perf_counter at a batch's arrival in the driver, its rows)


def run_baseline_bytes(ray: Any, folder: str, blocks: int, batch: int, clock: Clock) -> int:
    ds = ray.data.read_binary_files(folder, override_num_blocks=blocks).map_batches(baseline_batch, batch_format="numpy", batch_size=batch)
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clock.append((time.perf_counter(), len(batch["image"])))
        rows += len(batch["image"])
    return rows


def run_baseline_read_images(ray: Any, folder: str, blocks: int, clock: Clock) -> int:
    ds = ray.data.read_images(folder, mode="RGB", override_num_blocks=blocks).map(baseline_row)
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clock.append((time.perf_counter(), len(batch["image"])))
        rows += len(batch["image"])
    return rows


def timed_results(results: Iterable[TaskResult], clock: Clock) -> Iterator[TaskResult]:
    """Passes task results on, recording when each reaches the driver and how many rows it covers."""
    for result in results:
        clock.append((time.perf_counter(), result.rows))
        yield result


@contextlib.contextmanager
def batch_clock(clock: Clock) -> Iterator[None]:
    """Records when each task's result reaches the resize step's driver.

    Bench-only instrumentation: the step reads Ray's results through the module-level
    ``_ray_results``, so wrapping that name timestamps them without touching the step's code.
    """
    original = resize_step._ray_results
    resize_step._ray_results = lambda ds: timed_results(original(ds), clock)
    try:
        yield
    finally:
        resize_step._ray_results = original


def run_ours(source: str, dest: str, cfg: ResizeConfig, clock: Clock) -> int:
    with batch_clock(clock):
        report = resize(source, dest, cfg)
    if report.rejected:
        raise RuntimeError(f"resize rejected {report.rejected} bench images: {report.rejects_by_reason}")
    return report.outputs


def _pool_step_task(args: tuple[int, list[tuple[str, int]], TaskOutput]) -> TaskResult:
    """One planned task through the step's own task body, in a pool process (see pool_step)."""
    task, units, out = args
    return run_task(task, units, **resize_step.task_arguments(ResizeConfig(), out))


def pool_step(source: str, dest: str, pool: Any, clock: Clock) -> int:
    """The resize step's work on a ``multiprocessing`` pool instead of Ray: the baseline for Ray.

    The same plan of tasks, task body (read, decode, resize, write the task's own files,
    hashed as written), driver loop (files and rejects recorded) and commit as
    :func:`imgpipe.steps.resize.resize` with the default config; only the executor differs.
    """
    cfg = ResizeConfig()
    manifest = contract.read_manifest(source, expect_step="clean")
    items = resize_step.list_row_groups(contract.data_files(source, manifest))
    tasks = resize_step.plan_tasks(items)
    schema = resize_step.output_schema(cfg.format, manifest["extra"].get("classes"))
    out = OutputWriter(dest, "resize")
    out.begin()
    task_out = TaskOutput(out.dest, out.attempt, schema, cfg.rows_per_shard, cfg.row_group_rows)
    inputs = sum(i["rows"] for i in items)
    results = pool.imap(_pool_step_task, [(i, units, task_out) for i, units in enumerate(tasks)])
    got = resize_step.collect_results(timed_results(results, clock), out, inputs, len(tasks))
    return out.commit(inputs=inputs, rejects=got.rejects, config=cfg).outputs


# ----------------------------------------------------------------------------------------
# Memory: RSS/PSS of this process and all its descendants.


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of this process tree until stopped; keeps the peaks."""

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_rss_kib = self.peak_pss_kib = self.peak_driver_kib = self.peak_procs = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            pids = process_tree(me)
            rss = pss = 0
            for pid in pids:
                r, p = _rss_pss_kib(pid)
                rss, pss = rss + r, pss + p
                if pid == me:
                    self.peak_driver_kib = max(self.peak_driver_kib, r)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.samples += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def tree_memory_kib() -> tuple[int, int]:
    """Summed RSS and PSS of this process and its descendants, now."""
    rss = pss = 0
    for pid in process_tree(os.getpid()):
        r, p = _rss_pss_kib(pid)
        rss, pss = rss + r, pss + p
    return rss, pss


def memory_run(source: str, dest: str) -> dict[str, Any]:
    """One peak-memory measurement: the resize step with defaults, starting its own Ray."""
    rss_before, pss_before = tree_memory_kib()
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    outputs = run_ours(source, dest, ResizeConfig(), [])
    elapsed = time.perf_counter() - t0
    sampler.stop()
    return {
        "outputs": outputs,
        "seconds": round(elapsed, 2),
        "rss_before_mib": round(rss_before / 1024),
        "pss_before_mib": round(pss_before / 1024),
        "peak_rss_mib": round(sampler.peak_rss_kib / 1024),
        "peak_pss_mib": round(sampler.peak_pss_kib / 1024),
        "peak_driver_rss_mib": round(sampler.peak_driver_kib / 1024),
        "processes": sampler.peak_procs,
        "samples": sampler.samples,
    }


def measure_memory(root: Path, counts: Sequence[int], width: int, height: int, distinct: int, seed: int) -> list[dict[str, Any]]:
    """Peak memory of the resize step per image count, each in a fresh driver process.

    The input uses clean's default layout (shard and row-group sizes) and repeats
    ``distinct`` photos under new names. Each count runs in its own Python process, so
    no count inherits the heap high-water mark of an earlier one.
    """
    pool = photo_set(distinct, width, height, seed=seed + 99)
    defaults = CleanConfig()
    results = []
    for n in counts:
        photos = [Photo(f"{p.source}_{i:06d}.jpg", p.source, p.width, p.height, p.data) for i, p in ((i, pool[i % distinct]) for i in range(n))]
        source = write_clean_output(root / f"mem-clean-{n}", photos, defaults.row_group_rows, defaults.rows_per_shard)
        del photos
        dest = root / f"mem-resize-{n}"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-run", source, str(dest)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        result = {"images": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
        result["img_s"] = round(n / result["seconds"], 1)
        results.append(result)
        print(f"memory: {result}", file=sys.stderr, flush=True)
        shutil.rmtree(dest)  # 3 GB of pixels at 20,000 images
        shutil.rmtree(source.removeprefix("file://"), ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------
# Per-image CPU time, one process, no Ray: where the time goes.

PER_IMAGE_PASSES = 9
# The train split's default storage (ResizeConfig.train_mode): the whole picture.
_WHOLE = ResizeSpec(mode="whole")


def baseline_one(data: bytes, transform: Any) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(transform(img.convert("RGB")))


def full_decode(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.width


def per_image_cpu(photos: Sequence[Photo], repeats: int = PER_IMAGE_PASSES) -> dict[str, Any]:
    """CPU ms per image (best of ``repeats`` interleaved passes, ``time.process_time``) of each piece.

    CPU time of one process is far less disturbed by other load than wall time, so these
    show the per-image work each method does, free of Ray and pool effects. Also the mean
    absolute difference (grey levels) of the fast path from the full-decode reference, for
    the default ``short-side-crop`` and for ``whole`` (the train split's default).
    """
    # As the step runs it (resize_batch): one OpenCV thread per process. OpenCV's own pool
    # would add its threads' CPU time to this process's and overstate the work.
    import cv2

    cv2.setNumThreads(1)
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    blobs = [p.data for p in photos]

    def mad(spec: ResizeSpec) -> float:
        pairs = [(resize_image(b, spec), resize_image_reference(b, spec)) for b in blobs]
        return float(np.mean([np.abs(a.astype(np.int16) - r.astype(np.int16)).mean() for a, r in pairs]))

    methods: dict[str, Callable[[bytes], Any]] = {
        "full decode": full_decode,
        "draft decode (floor)": decode_floor,
        "resize_image": resize_one,
        "resize_image_reference": lambda b: resize_image_reference(b, _SPEC),
        "baseline PIL + torchvision": lambda b: baseline_one(b, transform),
        "resize_image whole": lambda b: resize_image(b, _WHOLE),
    }
    # Interleaved: every pass times each method once, so a slow spell of the machine
    # (frequency, a neighbour's load) falls on all of them alike and the ratios hold.
    best = dict.fromkeys(methods, math.inf)
    for fn in methods.values():
        fn(blobs[0])
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.process_time()
            for b in blobs:
                fn(b)
            best[name] = min(best[name], time.process_time() - t0)
    row: dict[str, Any] = {name: 1000 * t / len(blobs) for name, t in best.items()}
    row.update({"mad": mad(_SPEC), "mad whole": mad(_WHOLE), "draft": sorted({draft_scale(b) for b in blobs})})
    return row


def print_per_image(per_image: dict[str, dict[str, Any]], images: int) -> None:
    print(f"Per-image CPU time, one process, no Ray (ms, best of {PER_IMAGE_PASSES} interleaved passes over {images} images):")
    print()
    print(
        "| set | full decode | draft decode (floor) | resize_image | resize_image_reference "
        "| baseline PIL + torchvision | speed-up vs baseline | speed vs floor | MAD vs reference "
        "| draft | `whole` mode | its speed vs floor | its MAD |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for label, r in per_image.items():
        ours, whole = r["resize_image"], r["resize_image whole"]
        base, floor = r["baseline PIL + torchvision"], r["draft decode (floor)"]
        drafts = ", ".join(f"1/{round(1 / v)}" for v in r["draft"])
        print(
            f"| {label} | {r['full decode']:.1f} | {floor:.1f} | {ours:.2f} "
            f"| {r['resize_image_reference']:.1f} | {base:.1f} | {base / ours:.2f} | {floor / ours:.2f} "
            f"| {r['mad']:.2f} | {drafts} | {whole:.2f} | {floor / whole:.2f} | {r['mad whole']:.2f} |"
        )
    print()


# ----------------------------------------------------------------------------------------
# The run.


def parse_set(text: str) -> SetSpec:
    """``LABEL:COUNT:WIDTHxHEIGHT``, e.g. ``3MP:60:2000x1500``."""
    label, count, size = text.split(":")
    width, height = size.lower().split("x")
    return SetSpec(label, int(count), int(width), int(height))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=parse_set,
        help="LABEL:COUNT:WxH, repeatable (default: 0.2MP:300:516x388, 3MP:60:2000x1500, 12MP:20:4000x3000)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method and set (median)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="pool processes and Ray CPUs")
    parser.add_argument(
        "--tasks-per-cpu",
        type=int,
        default=4,
        help="row groups per CPU in our input (rows per row group = ceil(count / (workers * this)))",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-read-images", action="store_true", help="skip the read_images baseline")
    parser.add_argument(
        "--memory-counts",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=[2000, 20000],
        help="image counts for the peak-memory runs, comma separated ('' skips them)",
    )
    parser.add_argument("--memory-size", default="320x240", help="WxH of the memory runs' photos")
    parser.add_argument(
        "--per-image",
        type=int,
        default=20,
        help="images per set for the one-process CPU-time table (0 skips it)",
    )
    parser.add_argument(
        "--per-image-only",
        action="store_true",
        help="only the CPU-time table: no Ray, pools, memory",
    )
    parser.add_argument("--cold", action="store_true", help="also time each set's step and pool in fresh processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-run", nargs=2, metavar=("SOURCE", "DEST"), help=argparse.SUPPRESS)
    parser.add_argument("--pool-run", nargs=2, metavar=("SOURCE", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--pool-step-run", nargs=3, metavar=("SOURCE", "DEST", "WORKERS"), help=argparse.SUPPRESS)
    return parser


OURS = "ours: resize() step, default config"
BASE_BYTES = "baseline: read_binary_files + PIL + torchvision"
BASE_IMAGES = "baseline: read_images + torchvision"
POOL_STEP = "process-pool step: the same step, Pool instead of Ray"


def ours_all_cpus(workers: int) -> str:
    return f"ours: resize() step, concurrency={workers}"


def floor_name(workers: int) -> str:
    return f"decode floor: draft decode only, Pool({workers})"


def pool_name(workers: int) -> str:
    return f"process pool: resize_image, Pool({workers})"


def steady_rate(t0: float, clock: Clock) -> tuple[float, float | None]:
    """Time to the first batch, and images/s from the first batch's arrival to the last's.

    The rate counts the rows that arrived after the first batch, so it leaves out Ray
    Data's per-execution start-up and the first task's latency; None with a single batch.
    """
    first_t, first_rows = clock[0]
    rows = sum(r for _, r in clock) - first_rows
    span = clock[-1][0] - first_t
    return first_t - t0, (rows / span if rows and span > 0 else None)


def measure_set(
    ray: Any,
    root: Path,
    s: SetSpec,
    photos: Sequence[Photo],
    args: argparse.Namespace,
    mp_pool: Any,
) -> dict[str, Any]:
    blobs = [p.data for p in photos]
    rg_rows = max(1, math.ceil(s.count / (args.workers * args.tasks_per_cpu)))
    # The baselines get as many read blocks (= tasks) as our input has row groups, and
    # map_batches batches of that size: Ray Data's own choice for a few dozen files can be
    # a single block, and a larger batch_size coalesces blocks, i.e. fewer parallel tasks.
    blocks = math.ceil(s.count / rg_rows)
    source = write_clean_output(root / f"{s.label}-clean", photos, rg_rows, rows_per_shard=2048)
    folder = write_files(root / f"{s.label}-files", photos)
    dest = str(root / f"{s.label}-resize")
    scales = sorted({draft_scale(b) for b in blobs})

    ray_methods: dict[str, Callable[[Clock], int]] = {
        OURS: lambda c: run_ours(source, dest, ResizeConfig(), c),
        ours_all_cpus(args.workers): lambda c: run_ours(source, dest, ResizeConfig(concurrency=args.workers), c),
        BASE_BYTES: lambda c: run_baseline_bytes(ray, folder, blocks, rg_rows, c),
        POOL_STEP: lambda c: pool_step(source, str(root / f"{s.label}-pool-step"), mp_pool, c),
    }
    if not args.no_read_images:
        ray_methods[BASE_IMAGES] = lambda c: run_baseline_read_images(ray, folder, blocks, c)
    pool_methods = {floor_name(args.workers): decode_floor, pool_name(args.workers): resize_one}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*ray_methods, *pool_methods]}

    for rep in range(args.repeats + 1):  # round 0 warms everything up, untimed
        for name, fn in pool_methods.items():
            elapsed = time_pool(mp_pool, fn, blobs, args.workers)
            if rep:
                runs[name].append({"total_s": elapsed, "steady_img_s": s.count / elapsed})
        for name, ray_fn in ray_methods.items():
            clock: Clock = []
            t0 = time.perf_counter()
            rows = ray_fn(clock)
            elapsed = time.perf_counter() - t0
            if rows != s.count:
                raise RuntimeError(f"{name} returned {rows} rows for {s.count} images")
            first_s, steady = steady_rate(t0, clock)
            if rep:
                runs[name].append({"total_s": elapsed, "first_batch_s": first_s, "steady_img_s": steady})
        print(
            f"{s.label}: round {rep} done, load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )

    methods: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        total = statistics.median(r["total_s"] for r in rs)
        steadies = [r["steady_img_s"] for r in rs if r["steady_img_s"] is not None]
        firsts = [r["first_batch_s"] for r in rs if "first_batch_s" in r]
        methods[name] = {
            "median_s": total,
            "img_s": s.count / total,
            "steady_img_s": statistics.median(steadies) if steadies else None,
            "first_batch_s": statistics.median(firsts) if firsts else None,
            "runs": rs,
        }
    return {
        "set": s.label,
        "source": source,
        "images": s.count,
        "width": s.width,
        "height": s.height,
        "megapixels": round(s.width * s.height / 1e6, 2),
        "mean_jpeg_kb": round(sum(len(b) for b in blobs) / len(blobs) / 1e3, 1),
        "row_group_rows": rg_rows,
        "draft_scales": scales,
        "methods": methods,
    }


def summarize(results: list[dict[str, Any]], workers: int, read_images: bool) -> list[dict[str, Any]]:
    """The target checks: one row per (set, ratio), on warm whole runs and from the first batch.

    "Warm" is a whole timed run after an untimed one (Ray up, workers warm; Ray Data's
    per-execution start-up included); "steady" is the rate after the first output batch.
    Pools have no start-up inside their timing, so both use their one rate.
    """
    speedup = {"0.2MP": 1.25, "3MP": 2.5, "12MP": 3.0}
    checks: list[dict[str, Any]] = []

    def rate(r: dict[str, Any], name: str, key: str) -> float | None:
        m = r["methods"][name]
        return m["img_s"] if key == "img_s" or name.startswith(("decode", "process")) else m[key]

    def check(r: dict[str, Any], a: str, b: str, what: str, target: float | None) -> None:
        row: dict[str, Any] = {"set": r["set"], "check": what, "target": target}
        for key, tag in (("img_s", "warm"), ("steady_img_s", "steady")):
            va, vb = rate(r, a, key), rate(r, b, key)
            row[tag] = None if va is None or vb is None else va / vb
            row[f"met_{tag}"] = None if target is None or row[tag] is None else row[tag] >= target
        checks.append(row)

    for r in results:
        bases = [BASE_BYTES] + ([BASE_IMAGES] if read_images else [])
        fastest = max(bases, key=lambda b: r["methods"][b]["img_s"])
        large = r["set"] in ("3MP", "12MP")
        for ours, tag in ((OURS, "default"), (ours_all_cpus(workers), f"concurrency={workers}")):
            check(r, ours, fastest, f"ours ({tag}) / fastest baseline", speedup.get(r["set"]))
            check(
                r,
                ours,
                floor_name(workers),
                f"ours ({tag}) / decode floor",
                0.85 if large else None,
            )
            check(r, ours, pool_name(workers), f"ours ({tag}) / process pool", 0.85)
            check(r, ours, POOL_STEP, f"ours ({tag}) / process-pool step", 0.85)
        check(r, pool_name(workers), floor_name(workers), "process pool / decode floor (no Ray)", None)
    return checks


def print_tables(
    env: dict[str, Any],
    results: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    memory: list[dict[str, Any]],
    repeats: int,
) -> None:
    load = ", ".join(f"{v:.2f}" for v in env["loadavg_start"])
    print(f"{env['workers']} workers on {env['cpus_available']} CPUs; 1-min load average at start {load}")
    print()
    print(
        f"| set | images | px | JPEG KB | draft | method | images/s (warm run) "
        f"| images/s (after 1st batch) | 1st batch (s) | s (median of {repeats}) |"
    )
    print("| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        scales = ", ".join(f"1/{round(1 / v)}" for v in r["draft_scales"])
        for name, m in r["methods"].items():
            steady = "" if m["steady_img_s"] is None else f"{m['steady_img_s']:.1f}"
            first = "" if m["first_batch_s"] is None else f"{m['first_batch_s']:.2f}"
            print(
                f"| {r['set']} | {r['images']} | {r['width']}x{r['height']} | {r['mean_jpeg_kb']:.0f} "
                f"| {scales} | {name} | {m['img_s']:.1f} | {steady} | {first} | {m['median_s']:.2f} |"
            )
    print()
    print("| set | ratio | warm | steady | target | met (warm / steady) |")
    print("| --- | --- | ---: | ---: | --- | --- |")

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    def verdict(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "**no**")

    for c in checks:
        target = "(info)" if c["target"] is None else f">= {c['target']:g}"
        met = "" if c["target"] is None else f"{verdict(c['met_warm'])} / {verdict(c['met_steady'])}"
        print(f"| {c['set']} | {c['check']} | {fmt(c['warm'])} | {fmt(c['steady'])} | {target} | {met} |")
    if memory:
        print()
        print("| images | s | images/s | peak RSS sum (MiB) | peak PSS sum (MiB) | PSS before (MiB) | peak driver RSS (MiB) | processes |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for m in memory:
            print(
                f"| {m['images']} | {m['seconds']:.1f} | {m['img_s']:.1f} | {m['peak_rss_mib']} "
                f"| {m['peak_pss_mib']} | {m['pss_before_mib']} | {m['peak_driver_rss_mib']} | {m['processes']} |"
            )
        first, last = memory[0], memory[-1]
        print()
        for key in ("peak_rss_mib", "peak_pss_mib", "peak_driver_rss_mib"):
            ratio = last[key] / first[key]
            verdict = "met" if ratio <= 1.25 else "NOT met"
            print(f"- {key}: {last['images']} vs {first['images']} images = {ratio:.2f}x (target <= 1.25: {verdict})")


def pool_run(source: str, workers: int) -> int:
    """The cold process pool's child: read the clean output, resize every image in a Pool."""
    from imgpipe import contract, storage

    blobs = []
    for uri in contract.data_files(source):
        table = pa.parquet.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image"])
        blobs.extend(row["bytes"] for row in table.column("image").to_pylist())
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return len(pool.map(resize_one, blobs, chunksize=max(1, len(blobs) // (workers * 8))))


def measure_cold(root: Path, r: dict[str, Any], workers: int) -> dict[str, Any]:
    """One fresh ``imgpipe resize`` and one fresh pool process on a set's clean output (see the docstring)."""
    source, dest = r["source"], str(root / f"{r['set']}-cold")
    timings = {}
    for name, cmd in (
        ("step", [sys.executable, "-m", "imgpipe.cli", "resize", source, dest]),
        ("pool", [sys.executable, __file__, "--pool-run", source, str(workers)]),
        ("pool_step", [sys.executable, __file__, "--pool-step-run", source, dest, str(workers)]),
    ):
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        timings[name] = time.perf_counter() - t0
    steady_step = r["methods"][OURS]["steady_img_s"] or r["methods"][OURS]["img_s"]
    steady_pool = r["methods"][pool_name(workers)]["img_s"]
    fixed_step = timings["step"] - r["images"] / steady_step
    fixed_pool = timings["pool"] - r["images"] / steady_pool
    pool_step_rate = r["methods"][POOL_STEP]["img_s"]
    fixed_pool_step = timings["pool_step"] - r["images"] / pool_step_rate
    return {
        "pool_step_cold_s": timings["pool_step"],
        "pool_step_fixed_s": fixed_pool_step,
        "fixed_over_pool_step_s": fixed_step - fixed_pool_step,
        "set": r["set"],
        "images": r["images"],
        "step_cold_s": timings["step"],
        "pool_cold_s": timings["pool"],
        "step_fixed_s": fixed_step,
        "pool_fixed_s": fixed_pool,
        "fixed_over_pool_s": fixed_step - fixed_pool,
        "steady_step_over_pool": steady_step / steady_pool,
        "cold_step_over_pool": timings["pool"] / timings["step"],
    }


def print_cold(cold: list[dict[str, Any]]) -> None:
    print("\nCold, a fresh process each (as a pod runs it):\n")
    print(
        "| set | images | `imgpipe resize` cold s | pool cold s | process-pool step cold s | step / pool speed, cold | step fixed cost s "
        "| pool fixed cost s | fixed cost over the pool s | fixed cost over the process-pool step s | step / pool, steady |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cold:
        print(
            f"| {c['set']} | {c['images']} | {c['step_cold_s']:.2f} | {c['pool_cold_s']:.2f} | {c['pool_step_cold_s']:.2f} "
            f"| {c['cold_step_over_pool']:.2f} | {c['step_fixed_s']:.2f} | {c['pool_fixed_s']:.2f} | **{c['fixed_over_pool_s']:.2f}** "
            f"| **{c['fixed_over_pool_step_s']:.2f}** | **{c['steady_step_over_pool']:.2f}** |"
        )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.memory_run:  # the child process of measure_memory
        print(json.dumps(memory_run(*args.memory_run)))
        return 0
    if args.pool_run:  # the child process of measure_cold
        print(pool_run(args.pool_run[0], int(args.pool_run[1])))
        return 0
    if args.pool_step_run:  # the child process of measure_cold
        source, dest, workers = args.pool_step_run
        with multiprocessing.get_context("fork").Pool(int(workers)) as pool:
            print(pool_step(source, dest, pool, []))
        return 0
    sets = args.sets or [
        parse_set("0.2MP:300:516x388"),
        parse_set("3MP:60:2000x1500"),
        parse_set("12MP:20:4000x3000"),
    ]
    import PIL.features
    import ray
    from ray.data import DataContext

    env = {
        "cpus_available": available_cpus(),
        "workers": args.workers,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "pillow": Image.__version__,
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "loadavg_start": os.getloadavg(),
    }
    print(f"environment: {env}", file=sys.stderr, flush=True)
    photos = {s.label: photo_set(s.count, s.width, s.height, seed=args.seed) for s in sets}
    per_image = {}
    if args.per_image:
        for s in sets:
            per_image[s.label] = per_image_cpu(photos[s.label][: args.per_image])
            print(f"per-image {s.label}: {per_image[s.label]}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    if not args.per_image_only:
        with tempfile.TemporaryDirectory(prefix="imgpipe-bench-resize-") as tmp:
            root = Path(tmp)
            ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
            DataContext.get_current().enable_progress_bars = False
            ctx = multiprocessing.get_context("spawn")
            try:
                with ctx.Pool(args.workers) as mp_pool:
                    for s in sets:
                        results.append(measure_set(ray, root, s, photos[s.label], args, mp_pool))
            finally:
                ray.shutdown()
            env["loadavg_after_throughput"] = os.getloadavg()
            if args.cold:
                cold = [measure_cold(root, r, args.workers) for r in results]
            if args.memory_counts:
                w, h = (int(v) for v in args.memory_size.lower().split("x"))
                memory = measure_memory(root, args.memory_counts, w, h, distinct=200, seed=args.seed)
    env["loadavg_end"] = os.getloadavg()
    checks = summarize(results, args.workers, not args.no_read_images)
    print(f"environment: {env}", file=sys.stderr)
    if per_image:
        print_per_image(per_image, args.per_image)
    if results:
        print_tables(env, results, checks, memory, args.repeats)
    if cold:
        print_cold(cold)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "per_image_cpu_ms": per_image,
                    "sets": results,
                    "checks": checks,
                    "memory": memory,
                    "cold": cold,
                },
                indent=2,
                default=float,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
