"""What the resize benchmarks share: the input sets written as clean's output or as files, the
per-image functions the pools map, the step timed batch by batch, and the methods' names.

source = write_clean_output(root / "clean", photos, row_group_rows, rows_per_shard)
images = run_ours(source, dest, ResizeConfig(executor="ray"), clock)   # clock: (arrival, rows) per batch
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]
from photos import Photo  # noqa: E402

import imgpipe.steps.resize as resize_step  # noqa: E402
from imgpipe.clean.decode import OUTPUT_SCHEMA  # noqa: E402
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.ops import _decode, _draft, _open, resize_image
from imgpipe.resize.spec import DRAFT_MARGIN, ResizeSpec, plan_geometry
from imgpipe.resize.task import TaskResult
from imgpipe.steps.resize import resize
from imgpipe.writer import OutputWriter  # noqa: E402

__all__ = [
    "SetSpec",
    "write_clean_output",
    "write_files",
    "SPEC",
    "decode_floor",
    "resize_one",
    "draft_scale",
    "region_decode",
    "time_pool",
    "Clock",
    "timed_results",
    "batch_clock",
    "run_ours",
    "OURS",
    "OURS_POOL",
    "BASE_BYTES",
    "BASE_IMAGES",
    "POOL_STEP",
    "ours_all_cpus",
    "floor_name",
    "pool_name",
]


@dataclass(frozen=True)
class SetSpec:
    """One photo set: its label, image count and pixel size."""

    label: str
    count: int
    width: int
    height: int


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
        config={"generated_by": "bench/steps/resize.py"},
        extra={"classes": classes, "num_classes": len(classes)},
    )
    return out.dest


def write_files(folder: Path, photos: Sequence[Photo]) -> str:
    """Writes the photos as plain ``.jpg`` files, for the baseline's readers."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in photos:
        (folder / p.name).write_bytes(p.data)
    return str(folder)


SPEC = ResizeSpec()


def decode_floor(data: bytes) -> int:
    """The floor's work: the fast path's reduced-scale decode of one JPEG, no resize."""
    img = _open(data, SPEC.max_pixels)
    geometry = plan_geometry(img.width, img.height, SPEC)
    img, _ = _decode(img, geometry, SPEC.fast_decode, DRAFT_MARGIN)
    return img.width


def resize_one(data: bytes) -> bytes:
    """The process pool's work: our per-image function, returning the pixels as Ray's tasks do."""
    return resize_image(data, SPEC).tobytes()


def region_decode(data: bytes, num: int | None = None) -> int:
    """The floor's scale (or ``num``/8), decoding only the box the resize reads (imgpipe.data.jpeg_region).

    What a region decode would leave of the floor: the rows above the box are still
    entropy-decoded, so at 1/4 and 1/8 (where the IDCT is a few coefficients) it saves little.
    ``num=1`` on the whole picture is libjpeg's least work for a JPEG: entropy decoding, DC only.
    """
    from imgpipe.data.jpeg_region import decode_box

    img = _open(data, SPEC.max_pixels)
    geometry = plan_geometry(img.width, img.height, SPEC)
    shape = (img.height, img.width, 1 if img.mode == "L" else 3)
    if num is None:
        num = round(8 * _draft(img, geometry, SPEC.fast_decode, DRAFT_MARGIN))  # Pillow's draft picks it, decoding nothing
        x0, y0, x1, y1 = geometry.box
        box = (math.floor(x0), math.floor(y0), min(shape[1], math.ceil(x1)), min(shape[0], math.ceil(y1)))
    else:
        box = (0, 0, shape[1], shape[0])
    return decode_box(data, shape, box, num).shape[1]


def draft_scale(data: bytes) -> float:
    """The decode scale the fast path picks for one JPEG (1, 1/2, 1/4 or 1/8)."""
    img = _open(data, SPEC.max_pixels)
    geometry = plan_geometry(img.width, img.height, SPEC)
    _, scale = _decode(img, geometry, SPEC.fast_decode, DRAFT_MARGIN)
    return scale


def time_pool(pool: Any, fn: Callable[[bytes], Any], blobs: Sequence[bytes], workers: int) -> float:
    chunksize = max(1, len(blobs) // (workers * 8))
    t0 = time.perf_counter()
    results = pool.map(fn, blobs, chunksize=chunksize)
    elapsed = time.perf_counter() - t0
    assert len(results) == len(blobs)
    return elapsed


Clock = list[tuple[float, int]]  # (perf_counter at a batch's arrival in the driver, its rows)


def timed_results(results: Iterable[TaskResult], clock: Clock) -> Iterator[TaskResult]:
    """Passes task results on, recording when each reaches the driver and how many rows it covers."""
    for result in results:
        clock.append((time.perf_counter(), result.rows))
        yield result


@contextlib.contextmanager
def batch_clock(clock: Clock) -> Iterator[None]:
    """Records when each task's result reaches the resize step's driver, on Ray or on its pool.

    Bench-only instrumentation: the step reads Ray's results through the module-level
    ``_ray_results`` and the pool's through ``pool_results``, so wrapping those names
    timestamps them without touching the step's code.
    """
    ray_results, pool_results = resize_step._ray_results, resize_step.pool_results

    @contextlib.contextmanager
    def timed_pool(*args: Any, **kwargs: Any) -> Iterator[Iterator[TaskResult]]:
        with pool_results(*args, **kwargs) as results:
            yield timed_results(results, clock)

    resize_step._ray_results = lambda ds: timed_results(ray_results(ds), clock)
    resize_step.pool_results = timed_pool
    try:
        yield
    finally:
        resize_step._ray_results, resize_step.pool_results = ray_results, pool_results


def run_ours(source: str, dest: str, cfg: ResizeConfig, clock: Clock) -> int:
    with batch_clock(clock):
        report = resize(source, dest, cfg)
    if report.rejected:
        raise RuntimeError(f"resize rejected {report.rejected} bench images: {report.rejects_by_reason}")
    return report.outputs


# The step on each executor: Ray (what the warm checks against Ray Data's recipe measure,
# and what auto picks where Ray runs already, as in this benchmark) and its own pool.
OURS = "ours: resize() step on Ray (executor=ray)"


OURS_POOL = "ours: resize() step on its process pool (executor=pool)"


BASE_BYTES = "baseline: read_binary_files + PIL + torchvision"


BASE_IMAGES = "baseline: read_images + torchvision"


POOL_STEP = "process-pool step: the same step, Pool instead of Ray"


def ours_all_cpus(workers: int) -> str:
    return f"ours: resize() step on Ray, concurrency={workers}"


def floor_name(workers: int) -> str:
    return f"decode floor: draft decode only, Pool({workers})"


def pool_name(workers: int) -> str:
    return f"process pool: resize_image, Pool({workers})"
