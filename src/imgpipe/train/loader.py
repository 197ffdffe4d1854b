"""Streaming training input: the resize step's Parquet shards as a torch ``IterableDataset``.

    loader = ImageLoader(info, LoaderConfig(batch_size=128, seed=0), transform=tf, rank=0, world_size=1); loader.set_epoch(epoch)

How it works in detail: docs/internals/train.md, "imgpipe.train.loader".
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgpipe import resources, storage

# The settings are torch-free (imgpipe.train.config); re-exported here.
from imgpipe.train.loader_config import TRIM_EVERY_BATCHES, LoaderConfig

# Which rows, in which order: torch-free (imgpipe.train.partition); re-exported here.
from imgpipe.train.partition import (
    SplitInfo,
    Unit,
    epoch_order,
    next_partition,
    rank_range,
    sample_seeds,
    worker_batches,
)
from imgpipe.train.rowcache import RowCache, cache_budget
from imgpipe.train.rows import Row, RowGroupReader, decode_jpeg_cpu, decode_raw, jpeg_tensor, refuse_row
from imgpipe.train.threads import thread_batches

__all__ = [
    "SampleFn",
    "ParquetImageDataset",
    "ImageLoader",
]

log = logging.getLogger(__name__)


# A per-sample transform: an H x W x C uint8 array and the sample's seed (sample_seed) in,
# an H' x W' x C uint8 array out, every output of a batch the same size.
SampleFn = Callable[[np.ndarray, int], np.ndarray]


_MIXED_SIZES = (
    "a batch holds images of different sizes and no transform makes them equal; "
    "pass a transform with a fixed output size (the resize step's outputs are all alike)"
)


def _stack(images: Sequence[np.ndarray]) -> torch.Tensor:
    """``H x W x C`` arrays as one ``N x C x H x W`` uint8 tensor with channels-last strides (one copy)."""
    shapes = {i.shape for i in images}
    if len(shapes) != 1:
        raise ValueError(_MIXED_SIZES)
    batch = np.empty((len(images), *images[0].shape), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = image
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def _sequential_opencv() -> None:
    """No OpenCV thread pool in a worker: the workers are the parallelism.

    The transforms' OpenCV kernels would otherwise each use a pool as large as the
    machine, in every worker (torch's own threads are already 1 in a DataLoader worker).
    """
    cv2 = sys.modules.get("cv2")  # loaded by a transform that uses it; never imported here
    if cv2 is not None:
        cv2.setNumThreads(0)


# ----------------------------------------------------------------------------------------
# The dataset (runs in the workers) and the loader (the training loop's side).


class ParquetImageDataset(IterableDataset):
    """Yields ready batches of one rank's share of a split, each worker its own partition.

    Usually built by :class:`ImageLoader`, which also runs the epoch/resume
    bookkeeping; iterating it directly (``num_workers=0`` style) reads the rank's whole
    share for the epoch given at construction.

    Each batch is a dict: ``image`` (``B x C x H x W`` uint8 tensor with channels-last
    strides, a view of one ``B x H x W x C`` array; or a list of JPEG byte tensors when
    decoding is left to the device), ``label`` and ``index`` (the
    rows' positions in the split, int64), ``part``, the worker partition it came from, and
    ``rejected``, the ``reason: detail`` of each row of the batch refused before decoding
    (:func:`imgpipe.train.rows.refuse_row`; those rows are left out of the batch).

    Args:
        info: The split.
        cfg: Batch size, shuffling and seed.
        transform: Per-sample transform (:data:`SampleFn`), run in the worker with each
            sample's :func:`sample_seed`; ``None`` leaves images as stored.
        decode_device: ``cuda`` leaves JPEG rows undecoded for :func:`decode_jpeg_batch`.
        rank: This process's rank.
        world_size: Number of ranks.
        num_workers: Worker processes of the DataLoader that will iterate this dataset
            (it sizes the partitions); 0 for the main process.
        epoch: The epoch to read when no :class:`ImageLoader` drives it.
    """

    def __init__(
        self,
        info: SplitInfo,
        cfg: LoaderConfig,
        *,
        transform: SampleFn | None = None,
        decode_device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        epoch: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.info = info
        self.cfg = cfg
        self.transform = transform
        self.decode_on_device = info.format == "jpeg" and torch.device(decode_device).type == "cuda"
        self.rank = rank
        self.world_size = world_size
        self.parts = max(1, num_workers)
        # Shared with the workers (inherited at their start, so it also reaches
        # persistent workers): [epoch, rotation, samples to skip per partition].
        self.shared = multiprocessing.RawArray("q", 2 + self.parts)
        self.shared[0] = epoch
        # Workers started by spawn/forkserver begin with default storage settings; carry any
        # set in-process (e.g. by --s3-endpoint) over to them.
        self.storage_settings = storage.settings()
        self._readers: dict[int, RowGroupReader] = {}  # by partition, for the process _readers_pid
        self._readers_pid = os.getpid()
        # One budget per process: the thread engine's threads share it; worker processes get
        # a share each (a copy of the cache in a worker starts empty).
        processes = cfg.engine == "processes" and num_workers > 0
        budget = cache_budget(cfg.cache_bytes)
        if budget and processes and not cfg.persistent_workers:
            log.warning("loader: no row cache: worker processes that end with each epoch would fill it and drop it (set persistent_workers)")
            budget = 0
        self.cache = RowCache(budget // (self.parts if processes else 1)) if budget else None

    def partition_batches(self) -> list[int]:
        """Batches each worker partition of this rank delivers in an epoch (the same every epoch)."""
        r0, r1 = rank_range(self.info.num_samples, self.rank, self.world_size, drop_remainder=self.cfg.drop_last)
        return worker_batches(r1 - r0, self.cfg.batch_size, self.parts, drop_last=self.cfg.drop_last)

    def rank_samples(self) -> int:
        """Rows this rank reads in an epoch (before dropping a last partial batch)."""
        r0, r1 = rank_range(self.info.num_samples, self.rank, self.world_size, drop_remainder=self.cfg.drop_last)
        return r1 - r0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        if worker is not None:
            storage.use_settings(self.storage_settings)
        if worker is not None:
            _sequential_opencv()
        epoch, rotation = int(self.shared[0]), int(self.shared[1])
        part = (worker_id + rotation) % self.parts
        for rows, keys in self.part_rows(epoch, part, int(self.shared[2 + part])):
            yield self.make_batch(rows, keys, epoch, part)

    def part_rows(self, epoch: int, part: int, skip: int = 0) -> Iterator[tuple[list[Row], list[int]]]:
        """The undecoded rows and split positions of each batch of worker partition ``part`` in ``epoch``.

        ``skip`` samples of the partition were delivered before (a resumed epoch). Reading
        is cheap next to :meth:`make_batch`, which turns the rows into a batch.
        """
        mine, order = epoch_order(self.info, self.cfg, epoch, self.rank, self.world_size, part, self.parts)
        yield from self._batches(mine, order[skip:], self._reader(part))

    def _reader(self, part: int) -> RowGroupReader:
        """This process's reader for partition ``part``, kept from epoch to epoch: its files stay open.

        Local files stay mapped, their pages handed back after each read (:class:`imgpipe.train.rows.RowGroupReader`).

        One per partition: the thread engine reads its partitions on threads of their own,
        and a reader's open files are not shared between threads. The row cache is.
        """
        pid = os.getpid()
        if self._readers_pid != pid:  # a forked worker opens its own, after the fork
            self._readers, self._readers_pid = {}, pid
        reader = self._readers.get(part)
        if reader is None:
            reader = self._readers[part] = RowGroupReader(self.info, self.cache)
        return reader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"], state["_readers_pid"] = {}, None  # open files do not travel to a spawned worker
        return state

    def _batches(self, mine: list[Unit], order: np.ndarray, reader: RowGroupReader) -> Iterator[tuple[list[Row], list[int]]]:
        position = {int(g): i for i, g in enumerate(order.tolist())}
        starts = np.array([g.first_index for g in self.info.row_groups])
        ranges_by_group: dict[int, list[tuple[int, int]]] = {}
        for u in mine:
            ranges_by_group.setdefault(u.group, []).append((u.start, u.stop))
        pending: dict[int, Row] = {}
        bs = self.cfg.batch_size
        for first in range(0, len(order), bs):
            keys = order[first : first + bs].tolist()
            if len(keys) < bs and self.cfg.drop_last:
                return
            rows = []
            for k in keys:
                if k not in pending:
                    g = int(np.searchsorted(starts, k, side="right") - 1)
                    group = self.info.row_groups[g]
                    loaded = reader.read(group)
                    for a, b in ranges_by_group[g]:
                        for r in range(a, b):
                            idx = group.first_index + r
                            if position.get(idx, -1) >= position[k]:
                                pending[idx] = loaded[r]
                rows.append(pending.pop(k))
            yield rows, keys

    def make_batch(self, rows: list[Row], keys: list[int], epoch: int, part: int) -> dict[str, Any]:
        """One batch (class docstring) from :meth:`part_rows`' rows: bounded, decoded, transformed, stacked."""
        refused = [refuse_row(self.info, r) for r in rows]
        rejected = [f"{reason} (row {k})" for reason, k in zip(refused, keys) if reason is not None]
        if rejected:
            log.warning("loader: %d row(s) of split %s refused before decoding: %s", len(rejected), self.info.split, "; ".join(rejected))
            rows = [r for r, reason in zip(rows, refused) if reason is None]
            keys = [k for k, reason in zip(keys, refused) if reason is None]
        if self.decode_on_device or not rows:
            image: Any = [jpeg_tensor(r) for r in rows]
        elif self.info.format == "jpeg" and getattr(self.transform, "crops_first", False):
            image, rows, keys = self._cropped_jpegs(rows, keys, epoch, rejected)
        else:
            if self.info.format == "raw":
                images = decode_raw(rows)
            else:
                images, rows, keys = self._decoded_jpegs(rows, keys, rejected)
            image = self._transformed(images, keys, epoch) if self.transform is not None else _stack(images)
        labels = torch.tensor([r.label for r in rows], dtype=torch.int64)
        index = torch.tensor(keys, dtype=torch.int64)
        return {"image": image, "label": labels, "index": index, "part": part, "rejected": rejected}

    def _decoded_jpegs(self, rows: list[Row], keys: list[int], rejected: list[str]) -> tuple[list[np.ndarray], list[Row], list[int]]:
        """JPEG rows decoded at full size; one the decoder refuses is an ``undecodable`` reject, not a failed batch."""
        images, kept, kept_keys = [], [], []
        for r, k in zip(rows, keys):
            try:
                images.extend(decode_jpeg_cpu([r]))
            except ValueError as exc:
                rejected.append(_undecodable(exc, k))
                continue
            kept.append(r)
            kept_keys.append(k)
        return images, kept, kept_keys

    def _cropped_jpegs(self, rows: list[Row], keys: list[int], epoch: int, rejected: list[str]) -> tuple[torch.Tensor, list[Row], list[int]]:
        """JPEG rows decoded only as large as each sample's crop needs (``SampleTransform.from_jpeg``), into one batch.

        A row the decoder refuses is an ``undecodable`` reject, left out of the batch.
        """
        transform = self.transform
        seeds = sample_seeds(self.cfg.seed, epoch, keys).tolist()
        batch = np.empty((len(rows), transform.size, transform.size, rows[0].shape[2]), dtype=np.uint8)  # type: ignore[union-attr]
        kept, kept_keys = [], []
        for r, k, seed in zip(rows, keys, seeds):
            slot = batch[len(kept)]
            try:
                got = transform.from_jpeg(r.data, r.shape, seed, out=slot)  # type: ignore[union-attr]
            except ValueError as exc:
                rejected.append(_undecodable(exc, k))
                continue
            if got is not slot:
                if got.shape != slot.shape:
                    raise ValueError(_MIXED_SIZES)
                slot[...] = got
            kept.append(r)
            kept_keys.append(k)
        return torch.from_numpy(batch[: len(kept)]).permute(0, 3, 1, 2), kept, kept_keys

    def _transformed(self, images: Sequence[np.ndarray], keys: Sequence[int], epoch: int) -> torch.Tensor:
        """The transform's outputs as one ``N x C x H x W`` batch, each written into its row where the transform can."""
        transform, seed = self.transform, self.cfg.seed
        assert transform is not None
        fills = getattr(transform, "fills_out", False)  # SampleTransform: transform(image, seed, out=row)
        seeds = sample_seeds(seed, epoch, keys).tolist()
        first = transform(images[0], seeds[0])
        batch = np.empty((len(images), *first.shape), dtype=np.uint8)
        batch[0] = first
        for i in range(1, len(images)):
            row = batch[i]
            got = transform(images[i], seeds[i], out=row) if fills else transform(images[i], seeds[i])
            if got is not row:
                if got.shape != row.shape:
                    raise ValueError(_MIXED_SIZES)
                row[...] = got
        return torch.from_numpy(batch).permute(0, 3, 1, 2)


def _undecodable(exc: Exception, key: int) -> str:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    log.warning("loader: row %d does not decode: %s", key, detail)
    return f"undecodable: {detail} (row {key})"


class ImageLoader:
    """The training loop's view of a split: batches per epoch, resumable mid-epoch.

    Wraps a :class:`ParquetImageDataset` in a ``DataLoader(batch_size=None)``;
    batching, shuffling and partitioning happen in the dataset. Call :meth:`set_epoch`
    before each epoch (as with ``DistributedSampler``). ``rejected`` counts, by reason, the
    rows of the epoch so far that were refused before decoding (a forged or corrupt row);
    they are left out of their batches.

    Args:
        info: The split.
        cfg: Loader settings.
        transform: Per-sample transform (:data:`SampleFn`) run in the workers, or ``None``.
        decode_device: ``cuda`` to decode JPEG batches on the GPU (see
            :func:`decode_jpeg_batch`); ignored for raw data.
        rank: This process's rank (``torch.distributed.get_rank()`` under DDP).
        world_size: Number of ranks.
    """

    def __init__(
        self,
        info: SplitInfo,
        cfg: LoaderConfig,
        *,
        transform: SampleFn | None = None,
        decode_device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.info = info
        self.cfg = cfg
        self.num_workers = cfg.resolved_num_workers
        self.dataset = ParquetImageDataset(
            info,
            cfg,
            transform=transform,
            decode_device=decode_device,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
        )
        self.epoch = 0
        # Rows of the current epoch refused before decoding, by reason (refuse_row): the
        # loader's report of what it left out.
        self.rejected: dict[str, int] = {}
        self._consumed = [0] * self.dataset.parts
        self._rotation = 0
        self._loader: DataLoader | None = None

    @property
    def parts(self) -> int:
        """Worker partitions (``max(1, num_workers)``)."""
        return self.dataset.parts

    @property
    def decode_on_device(self) -> bool:
        """Whether batches carry undecoded JPEG bytes for :func:`decode_jpeg_batch`."""
        return self.dataset.decode_on_device

    @property
    def cached_bytes(self) -> int | None:
        """Bytes of row groups the row cache holds in this process, or ``None`` where worker processes hold them."""
        cache = self.dataset.cache
        if cache is None:
            return 0
        return cache.used_bytes if self.cfg.engine == "threads" or self.num_workers == 0 else None

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers
            pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
            self._loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=workers,
                pin_memory=pin,
                persistent_workers=self.cfg.persistent_workers and workers > 0,
                prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
                # DataLoader draws its worker base seed from this, not from the global RNG.
                generator=torch.Generator().manual_seed(self.cfg.seed),
                multiprocessing_context=self._start_method() if workers > 0 else None,
            )
        return self._loader

    def _batches(self) -> Iterator[dict[str, Any]]:
        """The current epoch's batches from where it stands, made by the configured engine."""
        if self.cfg.engine == "processes" or self.num_workers == 0:
            return iter(self._dataloader())
        _sequential_opencv()  # the threads are the parallelism
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        return thread_batches(
            self.dataset,
            epoch=self.epoch,
            rotation=self._rotation,
            consumed=list(self._consumed),
            workers=self.num_workers,
            prefetch=self.cfg.prefetch_factor,
            pin=pin,
        )

    def _start_method(self) -> str:
        if self.cfg.multiprocessing_context is not None:
            return self.cfg.multiprocessing_context
        return "fork" if storage.fork_safe([self.info.data]) else "forkserver"

    def set_epoch(self, epoch: int) -> None:
        """Starts ``epoch`` from its beginning."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.rejected = {}
        self._consumed = [0] * self.parts
        self._rotation = 0

    def epoch_batches(self) -> int:
        """Batches of an epoch from its start; with ``drop_last``, the same on every rank."""
        return sum(self.dataset.partition_batches())

    def epoch_samples(self) -> int:
        """Rows this rank reads per epoch (with ``drop_last``, before the last partial batch is dropped)."""
        return self.dataset.rank_samples()

    def _consumed_batches(self) -> int:
        return sum(-(-c // self.cfg.batch_size) for c in self._consumed)

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return max(0, self.epoch_batches() - self._consumed_batches())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        remaining = len(self)
        if remaining == 0:
            return
        shared = self.dataset.shared
        shared[0], shared[1] = self.epoch, self._rotation
        for p in range(self.parts):
            shared[2 + p] = self._consumed[p]
        for batch in self._batches():
            self._consumed[batch["part"]] += len(batch["label"]) + len(batch["rejected"])
            for refused in batch["rejected"]:
                reason = refused.partition(":")[0]
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
            if len(batch["label"]):  # a batch whose every row was refused has nothing to train on
                yield batch
            remaining -= 1
            if remaining % TRIM_EVERY_BATCHES == 0:  # the batches handed out and freed: their pages back
                resources.trim_heap()
            if remaining == 0:
                break

    def state_dict(self) -> dict[str, Any]:
        """A small resumable position: epoch, samples delivered per worker partition, and the layout."""
        return {
            "epoch": self.epoch,
            "consumed": list(self._consumed),
            "seed": self.cfg.seed,
            "batch_size": self.cfg.batch_size,
            "parts": self.parts,
            "world_size": self.dataset.world_size,
        }

    def state_at_start(self, epoch: int) -> dict[str, Any]:
        """The :meth:`state_dict` of ``epoch``'s beginning, without moving this loader there."""
        return {**self.state_dict(), "epoch": epoch, "consumed": [0] * self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state_dict`: the rest of its epoch, in the original order.

        Raises:
            ValueError: If the state is mid-epoch but was saved with another seed, batch
                size, worker count or world size (the partitions would differ).
        """
        self.set_epoch(int(state["epoch"]))
        consumed = [int(c) for c in state.get("consumed", [])]
        if not any(consumed):
            return
        layout = {"seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "parts": self.parts}
        layout["world_size"] = self.dataset.world_size
        changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume mid-epoch {self.epoch} with a different layout ({detail}); resume with the "
                "saved num_workers/world size/batch size/seed, or restart the epoch (drop the loader state)"
            )
        self._consumed = consumed
        self._rotation = next_partition(self.dataset.partition_batches(), consumed, self.cfg.batch_size)
