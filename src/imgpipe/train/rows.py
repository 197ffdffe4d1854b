"""A split's rows read and decoded: row groups of the resize output's Parquet as ``H x W x C`` uint8 arrays.

    reader = RowGroupReader(info, cache=None); rows = reader.read(info.row_groups[0]); images = decode_raw(rows)
    images = read_samples(info, 8)                    # the first images, for figures
    batch = decode_jpeg_batch(jpegs, 3, "cuda")       # nvJPEG on the GPU

The loader (:mod:`imgpipe.train.loader`) reads and decodes through this module; how it
reads (memory maps, views of Arrow's buffers, the row cache) is in docs/internals.md,
"imgpipe.train.loader".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from imgpipe import storage
from imgpipe.train.partition import RowGroup, SplitInfo
from imgpipe.train.rowcache import RowCache

__all__ = [
    "Row",
    "RowGroupReader",
    "refuse_row",
    "binary_views",
    "decode_raw",
    "decode_jpeg_cpu",
    "decode_jpeg_for_box",
    "decode_jpeg_batch",
    "jpeg_tensor",
    "read_samples",
    "read_rows",
]

log = logging.getLogger(__name__)


@dataclass
class Row:
    label: int
    data: np.ndarray  # uint8, a view of the row group's Arrow buffer (no copy)
    shape: tuple[int, int, int]


def binary_views(array: Any) -> list[np.ndarray]:
    """Each value of an Arrow binary array as a uint8 view of its data buffer: no copy per row.

    The views keep the buffer (and so the row group) alive until the last one is dropped.
    """
    if array.null_count:
        raise ValueError("an image column holds nulls; the resize step never writes them (is this a resize output?)")
    _, offsets, data = array.buffers()
    width = 8 if str(array.type) in ("large_binary", "large_string") else 4
    starts = np.frombuffer(offsets, dtype=np.int64 if width == 8 else np.int32)[array.offset : array.offset + len(array) + 1]
    flat = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return [flat[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


class RowGroupReader:
    """Reads row groups of a split's files, keeping each file's footer open; through ``cache`` when there is one.

    After each read the file's pages go back to the page cache (:mod:`imgpipe.storage.arrow_input`):
    the reader's resident memory does not grow with the split.
    """

    def __init__(self, info: SplitInfo, cache: RowCache | None = None) -> None:
        self.info = info
        self.cache = cache
        self.column = "pixels" if info.format == "raw" else "image"
        self._files: dict[str, tuple[pq.ParquetFile, storage.ArrowInput]] = {}

    def _table(self, group: RowGroup) -> Any:
        key = (group.file, group.row_group)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            return cached
        opened = self._files.get(group.file)  # opened here, lazily: in the worker, after any fork
        if opened is None:
            source = storage.open_arrow_input(group.file)
            opened = self._files[group.file] = (pq.ParquetFile(source.file), source)
        pf, source = opened
        try:
            # One thread: Arrow's pool would compete with the loader's own workers (and reads a
            # row group of one large column 4x slower here).
            table = pf.read_row_group(group.row_group, columns=["label", "height", "width", "channels", self.column], use_threads=False)
        finally:
            source.release()
        return table if self.cache is None else self.cache.put(key, table)

    def read(self, group: RowGroup) -> list[Row]:
        def once() -> list[Row]:
            table = self._table(group)
            column = table.column(self.column)
            payload = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # combining copies even one chunk
            if self.info.format == "jpeg":
                payload = payload.field("bytes")
            return [
                Row(label, data, (h, w, c))
                for label, data, h, w, c in zip(
                    table.column("label").to_pylist(),
                    binary_views(payload),
                    table.column("height").to_pylist(),
                    table.column("width").to_pylist(),
                    table.column("channels").to_pylist(),
                )
            ]

        return storage.with_retries(once, attempts=3, describe=f"reading row group {group.row_group} of {group.file}")

    def close(self) -> None:
        for pf, source in self._files.values():
            with contextlib.suppress(Exception):
                pf.close()
            with contextlib.suppress(Exception):
                source.close()
        self._files.clear()


def refuse_row(info: SplitInfo, row: Row) -> str | None:
    """Why ``row`` must not be decoded, as ``reason: detail``, or ``None``: its bytes are bounded first.

    A row read back from storage is untrusted, its columns included. Its image's own size
    (a JPEG's header, read without decoding; a raw row's byte count) must agree with its
    columns, and that size with what the split's manifest declares
    (:meth:`imgpipe.train.partition.SplitInfo.refuse_size`), so a forged row whose columns
    agree with a huge header is refused unread. Reasons: ``unreadable`` (no JPEG header, or
    raw bytes of another length), ``not_as_declared`` and ``too_large``.
    """
    height, width, channels = row.shape
    refused = info.refuse_size(height, width)
    if refused is not None:
        return refused
    if info.format == "raw":
        if row.data.size != height * width * channels:
            return f"unreadable: {row.data.size} bytes, its row says {width}x{height}x{channels}"
        return None
    import simplejpeg

    try:
        header_height, header_width, _, _ = simplejpeg.decode_jpeg_header(row.data)
    except ValueError as exc:
        return f"unreadable: no JPEG header ({exc})"
    if (header_height, header_width) != (height, width):
        return f"not_as_declared: a {header_width}x{header_height} JPEG, its row says {width}x{height}"
    return None


def decode_raw(rows: Sequence[Row]) -> list[np.ndarray]:
    """Raw rows as ``H x W x C`` uint8 views of their bytes (read-only, no copy)."""
    return [r.data.reshape(r.shape) for r in rows]


def jpeg_tensor(row: Row) -> torch.Tensor:
    return torch.from_numpy(row.data.copy())  # a writable copy: torch warns on a read-only buffer


def decode_jpeg_cpu(rows: Sequence[Row]) -> list[np.ndarray]:
    """JPEG rows decoded into ``H x W x C`` uint8 arrays.

    simplejpeg: libjpeg-turbo with its accurate IDCT, torchvision's ``decode_jpeg`` pixels
    (``tests/train/test_loader.py``), decoded straight into ``H x W x C`` from the row's
    bytes without holding the GIL (torchvision's ``C x H x W`` needed a second copy).

    A file read back from storage is untrusted: its header must give the size its row
    records before anything is decoded (a JPEG larger than its row is refused unread).

    Raises:
        ValueError: For bytes that are not a JPEG, or one of another size than its row's.
    """
    import simplejpeg

    decoded = []
    for r in rows:
        height, width, _, _ = simplejpeg.decode_jpeg_header(r.data)
        if (height, width) != r.shape[:2]:
            raise ValueError(f"a JPEG row holds a {width}x{height} image, its row says {r.shape[1]}x{r.shape[0]}; is this a resize output?")
        decoded.append(simplejpeg.decode_jpeg(r.data, colorspace="GRAY" if r.shape[2] == 1 else "RGB"))
    return decoded


def decode_jpeg_for_box(
    data: np.ndarray, shape: tuple[int, int, int], box: tuple[int, int, int, int], out_size: tuple[int, int], keep: float
) -> np.ndarray:
    """The pixels of ``box`` (``x1, y1, x2, y2`` of the full image) of a JPEG, decoded only as large and as far as ``out_size`` needs.

    libjpeg-turbo decodes at the smallest of its ``n/8`` DCT scales that keeps the box at
    least ``keep`` times ``out_size`` (height, width), with the box's edges rounded outwards
    (under one reduced pixel); the caller's resize then shrinks it by ``keep`` or more, which
    smooths what the DCT's scaling leaves. Where no scale below 1 keeps that, the box is
    decoded at full size: the pixels of a whole decode cut to the box, exactly. Either way
    only the box's rows and columns are decoded (:func:`imgpipe.data.jpeg_region.decode_box`).
    ``shape`` is the row's, which its header was checked against (:func:`refuse_row`); the
    decoder reads only ``data``, the row's own bytes.

    Raises:
        ValueError: For bytes the decoder refuses (corrupt or truncated).
    """
    from imgpipe.data.jpeg_region import decode_box, reduced_scale

    return decode_box(data, shape, box, reduced_scale(shape[0], shape[1], box, out_size, keep))


def decode_jpeg_batch(jpegs: Sequence[torch.Tensor], channels: int, device: torch.device | str) -> torch.Tensor:
    """Decodes a batch of JPEG byte tensors on ``device`` (nvJPEG on CUDA) into ``B x C x H x W`` uint8.

    On CUDA the device's queued work is drained first. nvJPEG's hardware engine (A100, H100,
    H200: baseline JPEGs) writes its output before the work already queued on the stream
    has run, and the caching allocator hands the decoder blocks that queued kernels (the
    last training step's) still read: without the barrier those kernels read pixels, and
    training turned NaN within three steps on an H200 (docs/benchmarks.md, "GPU"; the
    same report upstream: pytorch/vision#9606, meta-pytorch/torchcodec#1634). The cost is
    that the decode no longer overlaps the previous step (not measured apart from the decode).

    Raises:
        ValueError: If the images differ in size (resize makes them equal; mixing
            sizes means the data is not a resize output).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        images = decode_jpeg(list(jpegs), mode=mode, device=device)
    else:
        images = [decode_jpeg(j, mode=mode) for j in jpegs]
    if len({tuple(i.shape) for i in images}) != 1:
        raise ValueError("JPEG batch holds images of different sizes; train expects a resize output")
    return torch.stack(images)


def read_samples(info: SplitInfo, count: int) -> list[np.ndarray]:
    """The first ``count`` images of a split in file order, as ``H x W x C`` uint8 arrays (for figures)."""
    reader = RowGroupReader(info)
    rows: list[Row] = []
    try:
        for group in info.row_groups:
            rows.extend(reader.read(group)[: count - len(rows)])
            if len(rows) >= count:
                break
    finally:
        reader.close()
    images = decode_raw(rows) if info.format == "raw" else decode_jpeg_cpu(rows)
    return [np.array(img) for img in images]  # writable copies


def read_rows(info: SplitInfo, indexes: Sequence[int]) -> list[np.ndarray]:
    """The images at ``indexes`` (positions in the split, file order), as ``H x W x C`` uint8 arrays.

    Reads only the row groups that hold them (for figures of chosen images).
    """
    starts = np.array([g.first_index for g in info.row_groups])
    wanted: dict[int, list[int]] = {}
    for i in indexes:
        wanted.setdefault(int(np.searchsorted(starts, i, side="right") - 1), []).append(int(i))
    reader = RowGroupReader(info)
    found: dict[int, Row] = {}
    try:
        for g, members in wanted.items():
            group = info.row_groups[g]
            rows = reader.read(group)
            for i in members:
                found[i] = rows[i - group.first_index]
    finally:
        reader.close()
    picked = [found[int(i)] for i in indexes]
    images = decode_raw(picked) if info.format == "raw" else decode_jpeg_cpu(picked)
    return [np.array(img) for img in images]
