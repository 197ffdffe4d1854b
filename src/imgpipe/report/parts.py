"""What every step's report is made of: a bounded reader of row groups, thumbnails, and the facts, metrics and tables all steps show.

with RowGroups(limits) as reader:          # every read within limits.read_bytes and limits.files
    rows, blob = rows_and_blobs(table, "image", "bytes")
thumb_tiles(items, limits); step_facts(manifest); rejects_tables(prefix, manifest, limits)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from imgpipe import contract, resources, storage
from imgpipe.data.images import ImageRejected, thumbnail
from imgpipe.report.output import (
    ReportLimits,
    Table,
    Tile,
)

__all__ = [
    "RowGroups",
    "rows_and_blobs",
    "data_files",
    "upstream",
    "thumb_tile",
    "thumb_tiles",
    "pixels_tile",
    "step_facts",
    "step_metrics",
    "RejectSample",
    "rejects_tables",
    "sample_table",
]

# Rejects never decoded again for a thumbnail: a decompression bomb, or an image whose
# decode hung or killed its process in clean, would do the same here; clean's own decoder
# (the same Pillow, imgpipe.data.images) already failed on the others, or refused their format
# (unsupported_format: no decoder of that format may see the file).
NEVER_DECODE = frozenset({"too_large", "decode_timeout", "decoder_killed", "not_an_image", "unsupported_format", "corrupt", "truncated"})


# Thumbnails clean's grid may always show, whatever thumb_share allows (tiny outputs).
MIN_THUMBS = 12


# Threads that decode thumbnails: Pillow releases the GIL while it decodes and resizes.
_THUMB_THREADS = 4


class RowGroups:
    """Reads a bounded sample of Parquet row groups: footers of few files, bytes within one budget."""

    def __init__(self, limits: ReportLimits) -> None:
        self.left = limits.read_bytes
        self._files_left = limits.files
        self._open: dict[str, pq.ParquetFile] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> RowGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.close()

    def file(self, uri: str) -> pq.ParquetFile | None:
        """The file's reader (its footer read once), or ``None`` past the file cap."""
        if uri not in self._open:
            if self._files_left < 1:
                return None
            self._files_left -= 1
            fs, path = storage.arrow_filesystem(uri)
            handle = fs.open_input_file(path)
            self._handles.append(handle)
            self._open[uri] = pq.ParquetFile(handle)
        return self._open[uri]

    def groups(self, uris: Sequence[str]) -> Iterator[tuple[str, int]]:
        """``(uri, row group)`` in file order, as far as the file cap reaches."""
        for uri in uris:
            pf = self.file(uri)
            if pf is None:
                return
            yield from ((uri, rg) for rg in range(pf.metadata.num_row_groups))

    def range_of(self, uri: str, rg: int, column: str) -> tuple[Any, Any] | None:
        """The min and max a row group's statistics record for ``column``, if they do."""
        meta = self._open[uri].metadata.row_group(rg)
        for j in range(meta.num_columns):
            chunk = meta.column(j)
            if chunk.path_in_schema == column and chunk.statistics is not None and chunk.statistics.has_min_max:
                return chunk.statistics.min, chunk.statistics.max
        return None

    def read(self, uri: str, rg: int, columns: Sequence[str]) -> pa.Table | None:
        """The row group's ``columns`` (those the file has), or ``None`` when over the byte budget."""
        pf = self._open[uri]
        present = [c for c in columns if c in pf.schema_arrow.names]
        meta = pf.metadata.row_group(rg)
        cost = sum(meta.column(j).total_compressed_size for j in range(meta.num_columns) if meta.column(j).path_in_schema.split(".")[0] in present)
        if cost > self.left:
            return None
        self.left -= cost
        return pf.read_row_group(rg, columns=present)


def rows_and_blobs(table: pa.Table, column: str, field: str | None = None) -> tuple[list[dict], Callable[[int], Any]]:
    """``table``'s rows without ``column``, and a getter of row i's ``column`` (its ``field``).

    A row group holds up to 64 MiB of images: only the rows a report uses become Python bytes.
    """
    values = table.column(column).combine_chunks()
    values = values.field(field) if field else values
    return table.drop_columns([column]).to_pylist(), lambda i: values[i].as_py()


def data_files(prefix: str, manifest: Mapping[str, Any]) -> list[str]:
    return [u for u in contract.data_files(prefix, manifest) if u.endswith(".parquet")]


def upstream(manifest: Mapping[str, Any], step: str) -> tuple[str | None, str]:
    """The committed upstream output of ``step`` this one was made from, or ``None`` and why not."""
    source = (manifest.get("upstream") or {}).get("source")
    if not source:
        return None, f"the manifest names no {step} output it was made from"
    try:
        contract.read_manifest(source, expect_step=step)
    except (ValueError, FileNotFoundError) as exc:
        return None, f"its {step} output is not readable any more ({exc})"
    return source, ""


def thumb_tile(data: bytes | None, caption: str, limits: ReportLimits) -> Tile:
    if data is None:
        return Tile(None, caption)
    try:
        return Tile(thumbnail(data, limits.thumb_side, limits.max_pixels), caption)
    except ImageRejected as exc:
        return Tile(None, f"{caption}: does not decode ({exc.reason})")


def thumb_tiles(items: Sequence[tuple[bytes | None, str]], limits: ReportLimits) -> list[Tile]:
    """Thumbnails of encoded images (``(bytes, caption)`` each), in order, on the step's CPUs."""
    threads = min(_THUMB_THREADS, resources.available_cpus(), max(1, len(items)))
    if threads == 1:
        return [thumb_tile(data, caption, limits) for data, caption in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="imgpipe-thumb") as pool:
        return list(pool.map(lambda item: thumb_tile(*item, limits), items))


def pixels_tile(row: Mapping[str, Any], caption: str, limits: ReportLimits) -> Tile:
    """A resize output row's picture: raw ``pixels`` (HWC uint8) or a JPEG ``image``."""
    if row.get("pixels") is None:
        return thumb_tile((row.get("image") or {}).get("bytes"), caption, limits)
    shape = (int(row["height"]), int(row["width"]), int(row["channels"]))
    pixels = np.frombuffer(row["pixels"], dtype=np.uint8)
    if pixels.size != math.prod(shape) or shape[2] not in (1, 3):
        return Tile(None, f"{caption}: {pixels.size} bytes do not make {shape[0]}x{shape[1]}x{shape[2]}")
    array = pixels.reshape(shape)
    picture = Image.fromarray(array[:, :, 0] if shape[2] == 1 else array, "L" if shape[2] == 1 else "RGB")
    picture.thumbnail((limits.thumb_side, limits.thumb_side), Image.Resampling.BILINEAR)
    return Tile(picture, caption)


def step_facts(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("step", manifest.get("step")),
        ("prefix", manifest.get("dest")),
        ("created", manifest.get("created_at", "")),
        ("inputs", int(manifest["inputs"])),
        ("outputs", int(manifest["outputs"])),
        ("rejected", int(manifest["rejected"])),
        ("seconds", float(manifest.get("seconds") or 0.0)),
    ]


def step_metrics(manifest: Mapping[str, Any], **more: float) -> dict[str, float]:
    counts = {k: float(manifest[k]) for k in ("inputs", "outputs", "rejected")}
    counts["seconds"] = float(manifest.get("seconds") or 0.0)
    reasons = {f"rejected_{r}": float(n) for r, n in sorted((manifest.get("rejects_by_reason") or {}).items())}
    return {**counts, **{k: float(v) for k, v in more.items()}, **reasons}


@dataclass(frozen=True)
class RejectSample:
    """What a report shows of an output's rejects table, without a Python object per reject.

    Attributes:
        total: Rows of the table.
        reasons: Its reasons.
        rows: The first ``per_reason`` rows of each reason (``path``, ``reason``, ``detail``), in table order.
    """

    total: int = 0
    reasons: frozenset[str] = frozenset()
    rows: tuple[dict[str, Any], ...] = ()


def rejects_tables(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, per_reason: int = 0) -> tuple[list[Table], RejectSample]:
    """Rejects by reason (from the manifest) and the first rejected rows; returns them and a :class:`RejectSample`.

    The table is read as Arrow columns and only the rows shown become Python objects: a clean
    output of 128,000 images had 7,421 rejects.
    """
    by_reason = sorted((manifest.get("rejects_by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    tables = [Table("Rejects by reason", ("reason", "count"), tuple(by_reason))]
    if not manifest.get("rejected"):
        return tables, RejectSample()
    table = contract.read_rejects(prefix).select(["path", "reason", "detail"])
    if not table.num_rows:
        return tables, RejectSample()
    listing = table.slice(0, limits.table_rows).to_pylist()
    rows = tuple((r["path"], r["reason"], r["detail"] or "") for r in listing)
    note = f"first {len(rows)} of {table.num_rows}" if table.num_rows > len(rows) else ""
    tables.append(Table("Rejected", ("path", "reason", "detail"), rows, note=note))
    # The reasons as one list of strings, not Arrow's compute functions (filter, unique, take):
    # their first call costs the process about 47 MB (its thread pool and kernels).
    heads: dict[str, list[int]] = {}
    for i, reason in enumerate(table.column("reason").to_pylist()):
        head = heads.setdefault(reason, [])
        if len(head) < per_reason:
            head.append(i)
    picked = sorted(i for head in heads.values() for i in head)
    rows = tuple(table.slice(i, 1).to_pylist()[0] for i in picked)  # slices, not take(): a compute function
    return tables, RejectSample(table.num_rows, frozenset(heads), rows)


def sample_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], limits: ReportLimits) -> Table:
    shown = tuple(tuple(r.get(c) for c in columns) for r in rows[: limits.table_rows])
    return Table(title, tuple(columns), shown, note="a sample of the first row groups")
