"""The loader's thread engine: one rank's batches made by threads inside the training process.

    for batch in thread_batches(dataset, epoch=0, rotation=0, consumed=[0, 0], workers=2, prefetch=2, pin=False): ...

It delivers the batches a ``DataLoader`` over :class:`imgpipe.train.loader.ParquetImageDataset`
with ``workers`` processes delivers, in the same order: worker ``w`` serves partition
``(w + rotation) % parts`` and the workers are visited round-robin, an exhausted one skipped.
One thread reads row groups ahead; ``workers`` threads decode and transform whole batches.
Arrow's reads, the JPEG decoder and OpenCV's kernels release the GIL, so the threads use the
cores without starting a process or copying a finished batch from one process to another.
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


def _round_robin(dataset: Any, epoch: int, rotation: int, consumed: Sequence[int]) -> Iterator[tuple[Any, list[int], int]]:
    """``(rows, keys, part)`` per batch, in the order the DataLoader's workers would deliver them."""
    parts = dataset.parts
    slots = [(w + rotation) % parts for w in range(parts)]
    sources = {w: dataset.part_rows(epoch, part, int(consumed[part])) for w, part in enumerate(slots)}
    try:
        while sources:
            for w in list(sources):
                got = next(sources[w], None)
                if got is None:
                    del sources[w]
                    continue
                rows, keys = got
                yield rows, keys, slots[w]
    finally:
        for source in sources.values():
            source.close()


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

    def put(item: Future | BaseException | object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce(pool: ThreadPoolExecutor) -> None:
        try:
            for rows, keys, part in _round_robin(dataset, epoch, rotation, consumed):
                if not put(pool.submit(make, rows, keys, part)):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the loop, which raises it
            put(error)

    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="imgpipe-loader")
    reader = threading.Thread(target=produce, args=(pool,), name="imgpipe-loader-reader", daemon=True)
    reader.start()
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
        reader.join()
        pool.shutdown(wait=True, cancel_futures=True)
