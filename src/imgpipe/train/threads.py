"""The loader's thread engine: one rank's batches made by threads inside the training process.

    for batch in thread_batches(dataset, epoch=0, rotation=0, consumed=[0, 0], workers=2, prefetch=2, pin=False): ...

It delivers the batches a ``DataLoader`` over :class:`imgpipe.train.loader.ParquetImageDataset`
with ``workers`` processes delivers, in the same order: worker ``w`` serves partition
``(w + rotation) % parts`` and the workers are visited round-robin, an exhausted one skipped.
One thread per partition reads its row groups ahead (as each worker process reads its own),
so the reads of a first epoch, before the row cache holds them, run side by side; ``workers``
threads decode and transform whole batches. Arrow's reads, the JPEG decoder and OpenCV's
kernels release the GIL, so the threads use the cores without starting a process or copying a
finished batch from one process to another.
Each thread runs its own copy of the transform (a transform's generators are per call, but
live on the object).
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["thread_batches"]

_DONE = object()


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Puts ``item`` unless ``stop`` is set first; whether it did."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(source: queue.Queue, stop: threading.Event) -> Any:
    """The next item of ``source``, or :data:`_DONE` once ``stop`` is set while it waits."""
    while True:
        try:
            return source.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return _DONE


def _feed(source: Iterator[tuple[Any, list[int]]], out: queue.Queue, stop: threading.Event) -> None:
    """Puts a partition's ``(rows, keys)`` into ``out``, then :data:`_DONE` or the error; closes ``source`` in this thread."""
    try:
        for item in source:
            if not _put(out, item, stop):
                return
        _put(out, _DONE, stop)
    except BaseException as error:  # handed to the orderer, which hands it to the loop
        _put(out, error, stop)
    finally:
        source.close()


def _round_robin(dataset: Any, epoch: int, rotation: int, consumed: Sequence[int], stop: threading.Event) -> Iterator[tuple[Any, list[int], int]]:
    """``(rows, keys, part)`` per batch, in the order the DataLoader's workers would deliver them.

    Each partition's rows come from a thread of its own (one batch ahead), reading through
    the partition's own reader (:meth:`imgpipe.train.loader.ParquetImageDataset.part_rows`).
    It stops waiting for them once ``stop`` is set, and they stop when it ends.
    """
    halt = threading.Event()
    parts = dataset.parts
    slots = [(w + rotation) % parts for w in range(parts)]
    queues: dict[int, queue.Queue] = {w: queue.Queue(maxsize=1) for w in range(parts)}
    feeders = [
        threading.Thread(
            target=_feed,
            args=(dataset.part_rows(epoch, part, int(consumed[part])), queues[w], halt),
            name=f"imgpipe-loader-read_{part}",
            daemon=True,
        )
        for w, part in enumerate(slots)
    ]
    for feeder in feeders:
        feeder.start()
    try:
        live = list(range(parts))
        while live:
            for w in list(live):
                item = _get(queues[w], stop)
                if stop.is_set():
                    return
                if item is _DONE:
                    live.remove(w)
                    continue
                if isinstance(item, BaseException):
                    raise item
                rows, keys = item
                yield rows, keys, slots[w]
    finally:
        halt.set()
        for feeder in feeders:
            feeder.join()


def thread_batches(
    dataset: Any,
    *,
    epoch: int,
    rotation: int,
    consumed: Sequence[int],
    workers: int,
    prefetch: int,
    pin: bool,
) -> Iterator[dict[str, Any]]:
    """The batches of ``epoch`` from the partitions' positions ``consumed`` on (module docstring).

    Args:
        dataset: The rank's share of the split (a :class:`imgpipe.train.loader.ParquetImageDataset`,
            which imports this module).
        epoch: The epoch to read.
        rotation: The partition the first worker serves (a resumed epoch's next one).
        consumed: Samples each partition already delivered in this epoch.
        workers: Threads that make batches (at least 1).
        prefetch: Batches each thread may have ready or in progress ahead of the loop.
        pin: Page-lock each batch's images (for asynchronous copies to a GPU).
    """
    local = threading.local()

    def make(rows: Any, keys: list[int], part: int) -> dict[str, Any]:
        if not hasattr(local, "dataset"):
            local.dataset = copy.copy(dataset)
            local.dataset.transform = copy.deepcopy(dataset.transform)
        batch = local.dataset.make_batch(rows, keys, epoch, part)
        if pin and not isinstance(batch["image"], list):
            batch["image"] = batch["image"].pin_memory()
        return batch

    ahead: queue.Queue[Future | BaseException | object] = queue.Queue(maxsize=max(1, workers * prefetch))
    stop = threading.Event()

    def produce(pool: ThreadPoolExecutor) -> None:
        source = _round_robin(dataset, epoch, rotation, consumed, stop)
        try:
            for rows, keys, part in source:
                if not _put(ahead, pool.submit(make, rows, keys, part), stop):
                    return
            _put(ahead, _DONE, stop)
        except BaseException as error:  # handed to the loop, which raises it
            _put(ahead, error, stop)
        finally:
            source.close()

    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="imgpipe-loader")
    orderer = threading.Thread(target=produce, args=(pool,), name="imgpipe-loader-order", daemon=True)
    orderer.start()
    try:
        while True:
            item = ahead.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Future)
            yield item.result()
    finally:
        stop.set()
        orderer.join()
        pool.shutdown(wait=True, cancel_futures=True)
