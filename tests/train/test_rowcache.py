"""The loader's row cache: the same batches, each row group read once, the budget kept."""

from __future__ import annotations

import pickle

import pyarrow.parquet as pq
import pytest
import torch

from imgpipe.train.config import TrainConfig
from imgpipe.train.loader import ImageLoader
from imgpipe.train.loader_config import LoaderConfig
from imgpipe.train.partition import describe_split
from imgpipe.train.rowcache import RowCache
from tests.train.test_loader import write_resize_output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 train rows in row groups of 4 (10 groups), 16 px RGB."""
    return write_resize_output("file://" + str(tmp_path_factory.mktemp("rowcache") / "raw"), counts={"train": 40})


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Row groups read out of Parquet, as they happen."""
    seen: list[int] = []
    read = pq.ParquetFile.read_row_group

    def counted(self, i, *args, **kwargs):
        seen.append(i)
        return read(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    return seen


def epochs(loader: ImageLoader, count: int) -> list[list[tuple[torch.Tensor, list[int]]]]:
    out = []
    for epoch in range(count):
        loader.set_epoch(epoch)
        out.append([(b["image"].clone(), b["index"].tolist()) for b in loader])
    return out


@pytest.mark.parametrize("engine", ["threads", "processes"])
def test_a_cache_reads_each_row_group_once_and_changes_no_batch(data, reads, engine):
    info = describe_split(data, "train")
    groups = len(info.row_groups)
    workers = 2 if engine == "threads" else 0  # a worker process's reads are not seen here
    plain_loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=workers, engine=engine))
    reads.clear()
    plain = epochs(plain_loader, 3)
    assert len(reads) == 3 * groups
    loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=workers, engine=engine, cache_bytes=1 << 30))
    reads.clear()
    cached = epochs(loader, 3)
    assert len(reads) == groups  # the first epoch only
    assert len(loader.dataset.cache) == groups
    for a, b in zip(plain, cached):
        assert [k for _, k in a] == [k for _, k in b]
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))


def test_the_budget_bounds_what_is_kept(data, reads):
    info = describe_split(data, "train")
    group_bytes = 4 * (16 * 16 * 3 + 8 * 5)  # four rows of pixels, with room for the small columns
    loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=0, cache_bytes=3 * group_bytes))
    reads.clear()
    epochs(loader, 2)
    cache = loader.dataset.cache
    assert 0 < len(cache) <= 3 and cache.used_bytes <= cache.limit_bytes
    groups = len(info.row_groups)
    assert len(reads) == 2 * groups - len(cache)  # what is kept is not read again; the rest is
    assert loader.cached_bytes == cache.used_bytes  # what the train step reports after each epoch


def test_what_the_cache_holds_is_reported_where_this_process_holds_it(data):
    info = describe_split(data, "train")
    threads = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2, engine="threads", cache_bytes=1 << 30))
    assert threads.cached_bytes == 0
    epochs(threads, 1)
    assert threads.cached_bytes == threads.dataset.cache.used_bytes > 0
    assert ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2, engine="processes", cache_bytes=1 << 30)).cached_bytes is None
    assert ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2, engine="threads")).cached_bytes == 0


def test_worker_processes_share_the_budget_out_and_start_empty(data):
    info = describe_split(data, "train")
    loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2, engine="processes", cache_bytes=1000))
    assert loader.dataset.cache.limit_bytes == 500
    loader.dataset.cache.put("k", pq.read_table(info.row_groups[0].file.removeprefix("file://")))
    copy = pickle.loads(pickle.dumps(loader.dataset.cache))
    assert len(copy) == 0 and copy.limit_bytes == 500
    assert ImageLoader(info, LoaderConfig(batch_size=4, num_workers=2, engine="threads", cache_bytes=1000)).dataset.cache.limit_bytes == 1000
    assert ImageLoader(info, LoaderConfig(batch_size=4, num_workers=0)).dataset.cache is None


def test_settings_refuse_a_negative_budget():
    with pytest.raises(ValueError, match="cache_bytes"):
        LoaderConfig(cache_bytes=-1)
    with pytest.raises(ValueError, match="limit_bytes"):
        RowCache(-1)
    with pytest.raises(ValueError, match="loader_cache_gb"):
        TrainConfig(loader_cache_gb=-0.5)
    cfg = TrainConfig(loader_cache_gb=1.5)
    assert cfg.loader(shuffle=True).cache_bytes == 1.5 * 2**30
    assert cfg.loader(shuffle=False).cache_bytes == 0  # evaluation reads each row once an epoch: nothing to keep


def test_a_run_that_names_no_cache_gets_a_quarter_of_the_pods_memory(monkeypatch):
    """The default row cache follows the cgroup's memory limit (resources.usable_memory reads v1 and v2)."""
    from imgpipe import resources
    from imgpipe.train.loader_config import AUTO_CACHE_FRACTION

    monkeypatch.setattr(resources, "usable_memory", lambda: 48 << 30)
    cfg = TrainConfig()
    assert cfg.loader_cache_gb is None and cfg.loader_engine == "auto"
    loader = cfg.loader(shuffle=True)
    assert loader.cache_bytes == int((48 << 30) * AUTO_CACHE_FRACTION) == 12 << 30 and loader.engine == "threads"
    assert cfg.loader(shuffle=False).cache_bytes == 0
    monkeypatch.setattr(resources, "usable_memory", lambda: None)
    assert cfg.loader(shuffle=True).cache_bytes == 0, "no limit known: no cache"


def test_a_budget_past_half_the_memory_is_cut_to_it_with_a_warning(data, monkeypatch, caplog):
    from imgpipe import resources

    monkeypatch.setattr(resources, "usable_memory", lambda: 4000)  # read by imgpipe.train.rowcache.cache_budget
    info = describe_split(data, "train")
    loader = ImageLoader(info, LoaderConfig(batch_size=4, num_workers=0, cache_bytes=10**12))
    assert loader.dataset.cache.limit_bytes == 2000
    assert "lower loader_cache_gb" in caplog.text


def test_worker_processes_that_end_each_epoch_get_no_cache(data, caplog):
    info = describe_split(data, "train")
    cfg = LoaderConfig(batch_size=4, num_workers=2, engine="processes", persistent_workers=False, cache_bytes=1 << 20)
    assert ImageLoader(info, cfg).dataset.cache is None
    assert "set persistent_workers" in caplog.text


def test_auto_engine_is_processes_only_where_the_workers_augment_for_a_gpu():
    """Measured on an H200 (docs/benchmarks.md, "GPU"): per-sample CPU augmentation in threads
    fed ResNet-50 680 images/s against 2,805 in processes; elsewhere threads won (CPU steps)."""
    from imgpipe.train.assembly import train_loader_config
    from imgpipe.train.loader_config import resolve_engine

    assert resolve_engine("auto") == "threads"
    assert resolve_engine("auto", feeds_gpu_per_sample=True) == "processes"
    assert resolve_engine("threads", feeds_gpu_per_sample=True) == "threads", "a named engine is kept"
    cfg = TrainConfig(batch_size=8)
    assert train_loader_config(cfg, 64, 1).engine == "threads"
    assert train_loader_config(cfg, 64, 1, feeds_gpu_per_sample=True).engine == "processes"
    assert cfg.loader(shuffle=False).engine == "threads"


@pytest.mark.parametrize(
    ("cpus", "local_ranks", "device", "on_device"),
    [(4, 1, "cuda", True), (5, 1, "cuda", True), (6, 1, "cuda", False), (16, 1, "cuda", False), (16, 4, "cuda", True), (16, 1, "cpu", False)],
)
def test_auto_augments_on_the_gpu_only_where_the_rank_has_few_cores(monkeypatch, cpus, local_ranks, device, on_device):
    """Measured on an H100 (docs/benchmarks.md, "GPU"): the workers augmenting fed ResNet-50 faster
    than the device's batched augmentation from 6 cores up, slower from 4. A pod's CPU limit and
    the ranks beside it decide (16 cores shared by 4 ranks are 4 each)."""
    from imgpipe import resources
    from imgpipe.train.assembly import aug_on_device
    from imgpipe.train.loader_config import CPU_AUGMENT_MIN_CORES, augments_on_device, cores_per_rank

    monkeypatch.setattr(resources, "available_cpus", lambda root=None: cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert cores_per_rank() == cpus // local_ranks
    assert aug_on_device(TrainConfig(), torch.device(device)) is on_device
    assert CPU_AUGMENT_MIN_CORES == 6
    for named in ("cpu", "gpu"):  # a named place is kept, whatever the cores
        assert augments_on_device(named, device, cpus // local_ranks) is (named == "gpu")


def test_evaluation_loaders_keep_the_engine_as_set_when_training_got_processes(data):
    """A run's resolved config records its training loader's engine; the test split's loader takes
    ``TrainingRun.eval_engine`` (auto: threads) instead of those processes."""
    from imgpipe.train.assembly import eval_loader
    from imgpipe.train.distributed import DistInfo

    info = describe_split(data, "train")
    resolved = TrainConfig(batch_size=8, num_workers=2, loader_engine="processes")
    ctx = DistInfo(rank=0, world_size=1, local_rank=0)
    assert eval_loader(resolved, info, 16, "cpu", ctx, persistent=False).cfg.engine == "processes"
    loader = eval_loader(resolved, info, 16, "cpu", ctx, persistent=False, engine=TrainConfig().loader(shuffle=False).engine)
    assert loader.cfg.engine == "threads"
