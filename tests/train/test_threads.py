"""The loader's thread engine against torch's DataLoader worker processes: the same batches, in the same order."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.augment_cpu import build_train_transform
from imgpipe.train.loader import ImageLoader
from imgpipe.train.loader_config import LoaderConfig
from imgpipe.train.partition import describe_split
from tests.helpers import resident_mapped_kib
from tests.train.test_loader import write_resize_output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Raw and JPEG outputs whose train split holds whole pictures of varying size (as resize mode ``whole`` stores them)."""
    root = tmp_path_factory.mktemp("threads")
    return {
        fmt: write_resize_output("file://" + str(root / fmt), counts={"train": 37, "val": 5}, size=24, fmt=fmt, whole=("train",))
        for fmt in ("raw", "jpeg")
    }


def batches(loader: ImageLoader, epoch: int, stop_after: int | None = None) -> list[dict]:
    loader.set_epoch(epoch)
    got = []
    for batch in loader:
        got.append(plain(batch))
        if stop_after is not None and len(got) == stop_after:
            break
    return got


def plain(batch: dict) -> dict:
    return {"image": batch["image"].numpy().copy(), "label": batch["label"].tolist(), "index": batch["index"].tolist(), "part": batch["part"]}


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["index"] for x in a] == [x["index"] for x in b]
    assert [x["part"] for x in a] == [x["part"] for x in b]
    assert [x["label"] for x in a] == [x["label"] for x in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])


def recipe():
    # RandomResizedCrop + flip + RandAugment: random per sample, from each sample's own seed.
    return build_train_transform(AugmentConfig(policy="randaugment", color_jitter=0.2, rotation=0, random_erasing=0.25), 20, 3)


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
@pytest.mark.parametrize(("workers", "drop_last", "rank", "world"), [(2, True, 0, 1), (3, False, 1, 2), (1, False, 0, 1)])
def test_threads_deliver_the_worker_processes_batches_in_their_order(data, fmt, workers, drop_last, rank, world):
    info = describe_split(data[fmt], "train")
    kwargs = dict(batch_size=4, shuffle_buffer=8, drop_last=drop_last, num_workers=workers, seed=5)
    ours = ImageLoader(info, LoaderConfig(**kwargs, engine="threads"), transform=recipe(), rank=rank, world_size=world)
    torchs = ImageLoader(info, LoaderConfig(**kwargs, engine="processes"), transform=recipe(), rank=rank, world_size=world)
    for epoch in (0, 3):
        expected = batches(torchs, epoch)
        got = batches(ours, epoch)
        assert got and len(got) == ours.epoch_batches()
        assert_same(got, expected)


def test_a_resumed_epoch_continues_as_the_worker_processes_would(data):
    info = describe_split(data["raw"], "train")
    cfg = LoaderConfig(batch_size=3, shuffle_buffer=8, drop_last=False, num_workers=2, seed=11, engine="threads")
    reference = batches(ImageLoader(info, LoaderConfig(**{**cfg.__dict__, "engine": "processes"}), transform=recipe()), 2)
    interrupted = ImageLoader(info, cfg, transform=recipe())
    head = batches(interrupted, 2, stop_after=5)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = ImageLoader(info, cfg, transform=recipe())
    resumed.load_state_dict(state)
    tail = [plain(batch) for batch in resumed]
    assert_same(head + tail, reference)


def test_stopping_early_leaves_no_thread_behind_and_a_failure_reaches_the_loop(data):
    info = describe_split(data["raw"], "train")
    before = {t.name for t in threading.enumerate()}
    loader = ImageLoader(info, LoaderConfig(batch_size=2, num_workers=2, prefetch_factor=1, engine="threads"), transform=recipe())
    assert batches(loader, 0, stop_after=1)
    assert not {t.name for t in threading.enumerate() if t.name.startswith("imgpipe-loader")} - before

    def broken(image, seed):
        raise RuntimeError("transform failed on purpose")

    failing = ImageLoader(info, LoaderConfig(batch_size=2, num_workers=2, engine="threads"), transform=broken)
    failing.set_epoch(0)
    with pytest.raises(RuntimeError, match="on purpose"):
        list(failing)
    assert not [t for t in threading.enumerate() if t.name.startswith("imgpipe-loader")]


def test_an_epoch_leaves_none_of_the_splits_pages_in_the_process(data):
    """The readers keep every file open, but not its pages: memory does not grow with the split ("Scale")."""
    info = describe_split(data["raw"], "train")
    loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2, engine="threads"), transform=recipe())
    assert len(batches(loader, 0)) == 37 // 4
    mapped, kib = resident_mapped_kib(Path(data["raw"].removeprefix("file://")))
    assert mapped >= 2 and kib == 0


def test_the_engine_is_checked():
    with pytest.raises(ValueError, match="engine must be one of threads, processes"):
        LoaderConfig(engine="greenlets")


def test_each_partition_is_read_on_a_thread_of_its_own_and_a_failed_read_reaches_the_loop(data, monkeypatch):
    from imgpipe.train import rows as rows_module

    info = describe_split(data["raw"], "train")
    read = rows_module.RowGroupReader.read
    readers: set[tuple[str, int]] = set()

    def recorded(self, group):
        readers.add((threading.current_thread().name, id(self)))
        return read(self, group)

    monkeypatch.setattr(rows_module.RowGroupReader, "read", recorded)
    loader = ImageLoader(info, LoaderConfig(batch_size=2, shuffle_buffer=4, num_workers=2, engine="threads"), transform=recipe())
    assert batches(loader, 0)
    assert {name for name, _ in readers} == {"imgpipe-loader-read_0", "imgpipe-loader-read_1"}
    assert len({reader for _, reader in readers}) == 2  # a reader's open files stay on one thread

    def failing(self, group):
        raise OSError("the row group went away on purpose")

    monkeypatch.setattr(rows_module.RowGroupReader, "read", failing)
    broken = ImageLoader(info, LoaderConfig(batch_size=2, num_workers=2, engine="threads"), transform=recipe())
    broken.set_epoch(0)
    with pytest.raises(OSError, match="on purpose"):
        list(broken)
    assert not [t for t in threading.enumerate() if t.name.startswith("imgpipe-loader")]
