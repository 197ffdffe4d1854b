"""Clean's task: decode and normalize the rows of some row groups, into the output shards' buckets.

:func:`validate_task` runs in the decode pool's workers (:mod:`imgpipe.clean.pool`): every
row is fully decoded (:func:`imgpipe.data.images.validate_and_normalize`), usable rows the
plan places are measured while decoded (:func:`imgpipe.clean.quality.measure`: perceptual
hashes and quality metrics) and appended to the task's bucket file of their output shard,
and only what the task settled goes back to the step, as arrays
(:class:`imgpipe.clean.tasks.TaskResult`, hashes and metrics included).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import parquet, storage
from imgpipe.clean.buckets import Marker, bucket_path
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.clean.plan import RowsPlan
from imgpipe.clean.quality import MEASURE_SIDE, METRICS, Measures, measure
from imgpipe.clean.tasks import ResultBuilder, Task, TaskResult
from imgpipe.data.annotations import HeadBox, image_stem
from imgpipe.data.images import ImageRejected, NormalizedImage, validate_and_normalize

__all__ = ["OUTPUT_SCHEMA", "output_schema", "ShardBuckets", "decode_row", "measure_row", "validate_task"]

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        # {bytes, path}: the Hugging Face `datasets` Image feature layout, which Ray and
        # pandas also read as-is; output_schema adds the features that name it an Image.
        parquet.IMAGE_FIELD,
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        parquet.LABEL_FIELD,
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("order", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        # Normalized (xmin, ymin, xmax, ymax) head box from the annotations, when given.
        pa.field("bbox", pa.list_(pa.float32())),
        # 64-bit pHash of the image and of its mirror image (imgpipe.clean.quality), which
        # near-duplicate search compares; carried rows bring theirs along.
        pa.field("phash", pa.uint64()),
        pa.field("phash_mirror", pa.uint64()),
        # Quality measures on a fixed-size grey thumbnail (imgpipe.clean.quality.measure).
        *(pa.field(name, pa.float32()) for name in METRICS),
    ]
)


def output_schema(classes: Sequence[str]) -> pa.Schema:
    """The schema of the data files: :data:`OUTPUT_SCHEMA` with the ``datasets`` features of ``classes``."""
    return parquet.with_hf_features(OUTPUT_SCHEMA, classes)


def decode_row(data: bytes, cfg: CleanConfig, max_decode_bytes: int | None = None) -> NormalizedImage:
    """One input's full validation and normalization as clean does it, its pixels decoded for measuring only.

    A JPEG kept as it is comes back as its luma at a reduced DCT scale (``reduce_to``:
    :data:`imgpipe.clean.quality.MEASURE_SIDE`); :func:`measure_row` measures either kind.

    Raises:
        ImageRejected: With the reject reason and detail.
    """
    return validate_and_normalize(
        data,
        grayscale=cfg.grayscale,
        max_pixels=cfg.max_pixels,
        min_side=cfg.min_side,
        jpeg_quality=cfg.jpeg_quality,
        max_decode_bytes=max_decode_bytes,
        formats=cfg.formats,
        reduce_to=MEASURE_SIDE,
    )


def measure_row(img: NormalizedImage) -> Measures:
    """The measures of a :func:`decode_row` result, over the part of its pixels the image covers."""
    assert img.pixels is not None  # validate_and_normalize always returns the decoded pixels
    return measure(img.pixels, (img.width * img.scale, img.height * img.scale))


def _box_for(member: str, width: int, height: int, boxes: dict[str, HeadBox]) -> list[float] | None:
    head = boxes.get(image_stem(member))
    if head is None or (head.width, head.height) != (width, height):
        return None
    return list(head.box)


class ShardBuckets:
    """Per-shard Parquet writers of one task; rows are appended as they validate."""

    def __init__(self, bucket_dir: str, task: int, rows_per_shard: int) -> None:
        self.bucket_dir, self.task, self.rows_per_shard = bucket_dir, task, rows_per_shard
        self.pending: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}

    def add(self, member: str, img: Any, place: RowsPlan, at: int, sha256: str, bbox: list[float] | None, measures: Measures) -> int:
        """Appends a normalized image and its measures as row ``at`` of ``place`` says; returns its output shard."""
        order, label = int(place.order[at]), int(place.label[at])
        shard = order // self.rows_per_shard
        cols = self.pending[shard]
        for key, value in (
            ("path", member),
            ("image", {"bytes": img.data, "path": member}),
            ("width", img.width),
            ("height", img.height),
            ("mode", img.mode),
            ("format", img.format),
            ("label", label),
            ("label_name", place.classes[label]),
            ("split", SPLITS[place.split[at]]),
            ("order", order),
            ("sha256", sha256),
            ("bbox", bbox),
            ("phash", measures.phash),
            ("phash_mirror", measures.phash_mirror),
            *zip(METRICS, measures.metrics.tolist()),
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
    task: Task,
    place: RowsPlan,
    boxes: dict[str, HeadBox],
    cfg: CleanConfig,
    bucket_dir: str,
    max_decode_bytes: int | None = None,
) -> TaskResult:
    """Decodes and normalizes the rows of some download row groups.

    Every row is fully decoded, whatever the plan says about it, so the reject reason
    follows one precedence everywhere. Usable rows that the plan places are appended to
    this task's bucket file of their output shard; only per-row results travel back.
    While a row decodes, the task's marker file names it.

    Args:
        task: The row groups to process.
        place: The plan of every row of the task's row groups, in order.
        boxes: Head boxes by image stem (may be empty).
        cfg: The clean config.
        bucket_dir: Local folder for the shard buckets and markers.
        max_decode_bytes: Memory one image may take to decode; ``None`` for no limit.

    Returns:
        What the task settled: every input row it wants (not carried), in input order.
    """
    buckets = ShardBuckets(bucket_dir, task.index, cfg.rows_per_shard)
    marker = Marker(bucket_dir, task.index)
    results = ResultBuilder()
    offset = 0  # entry in ``place`` of the unit's first row
    try:
        for unit in task.units:
            fs, path = storage.arrow_filesystem(unit.uri)
            with fs.open_input_file(path) as fh:
                table = pq.ParquetFile(fh).read_row_group(unit.row_group, columns=["path", "bytes", "sha256"])
            blobs, hashes = table.column("bytes"), table.column("sha256")
            for i, member in enumerate(table.column("path").to_pylist()):
                row, at = unit.start + i, offset + i
                if place.carried[at] or not task.wants(row):
                    continue  # carried rows are copied from the previous output by _carry_rows
                try:
                    with marker.naming(row, member):
                        img = decode_row(blobs[i].as_py() or b"", cfg, max_decode_bytes)
                except ImageRejected as exc:
                    results.failed(row, exc.reason, exc.detail[:500])
                    continue
                except Exception as exc:  # noqa: BLE001 - a decoder bug must cost one image, not the run
                    results.failed(row, "corrupt", f"{type(exc).__name__}: {exc}"[:500])
                    continue
                if place.order[at] < 0:
                    results.settled(row)  # decodes, but the plan rejects it
                    continue
                bbox = _box_for(member, img.width, img.height, boxes)
                measures = measure_row(img)
                shard = buckets.add(member, img, place, at, hashes[i].as_py(), bbox, measures)
                results.settled(row, shard, bbox is not None, measures)
            buckets.flush()
            offset += unit.rows
    finally:
        marker.close()
        buckets.close()
    return results.build()
