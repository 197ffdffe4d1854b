"""How one split is streamed, without torch: :class:`LoaderConfig` and the loader's defaults.

The train step builds a ``LoaderConfig`` from its own settings
(:meth:`imgpipe.train.config.TrainConfig.loader`); :mod:`imgpipe.train.loader` streams by it.
The defaults a run gets when it names none are here, each chosen by measurement
(docs/benchmarks.md, "The train step by loader engine and row cache"): the engine
(:func:`resolve_engine`), the row cache (:func:`default_cache_bytes`), the workers
(:func:`default_num_workers`) and where a CUDA run augments (:func:`augments_on_device`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from imgpipe import resources
from imgpipe.config import check_numbers, check_range

__all__ = [
    "MAX_BATCH",
    "MAX_SHUFFLE_BUFFER",
    "MAX_PREFETCH",
    "MAX_WORKERS",
    "MAX_CACHE_GB",
    "LOADER_ENGINES",
    "TRAIN_LOADER_ENGINES",
    "AUTO_CACHE_FRACTION",
    "TRIM_EVERY_BATCHES",
    "LoaderConfig",
    "CPU_AUGMENT_MIN_CORES",
    "cores_per_rank",
    "default_num_workers",
    "augments_on_device",
    "resolve_engine",
    "default_cache_bytes",
]

# Upper bounds of the loader's sizes: past them a value only exhausts memory (or overflows
# the bytes it is turned into) at the first epoch instead of being refused here.
MAX_BATCH = 1 << 16
MAX_SHUFFLE_BUFFER = 1 << 20
MAX_PREFETCH = 64
MAX_WORKERS = 256
# The row cache's largest size, in GiB (LoaderConfig.cache_bytes, TrainConfig.loader_cache_gb):
# more than any one training node's memory.
MAX_CACHE_GB = 4096

LOADER_ENGINES = ("threads", "processes")
# TrainConfig.loader_engine also takes "auto": resolve_engine's choice.
TRAIN_LOADER_ENGINES = ("auto", *LOADER_ENGINES)
# The row cache a run that names none gets: this fraction of the memory the pod may use
# (resources.usable_memory: its cgroup limit, v1 or v2, else the machine's RAM).
AUTO_CACHE_FRACTION = 0.25
# Batches a loader delivers between two hand-backs of the C library's free heap pages
# (resources.trim_heap; also after its last batch): without them a process's resident memory
# grew with every pass over a split, the batches it had freed kept (docs/benchmarks.md, "Scale").
TRIM_EVERY_BATCHES = 16
# A CUDA run whose rank has at least this many CPU cores augments in its loader workers
# (aug_device auto): augments_on_device, measured in docs/benchmarks.md, "GPU".
CPU_AUGMENT_MIN_CORES = 6


@dataclass(frozen=True)
class LoaderConfig:
    """How one split is streamed.

    Attributes:
        batch_size: Samples per batch (per rank).
        shuffle: Permute units and pass rows through the shuffle buffer (training);
            off gives the file order, partitioned the same way (evaluation).
        shuffle_buffer: Rows a worker mixes at once; 0 or 1 keeps the unit order.
        drop_last: Training mode: every rank reads the same number of rows and only
            full batches (DDP needs equal step counts); fewer than ``world_size`` rows
            plus one partial batch per rank are left out each epoch. Off, every row is
            read and the last batch of a rank may be short.
        seed: Base seed of the unit permutation, the shuffle buffer and the
            per-sample transform seeds.
        num_workers: DataLoader worker processes; ``None`` picks
            :func:`default_num_workers`.
        prefetch_factor: Batches each worker prepares ahead.
        pin_memory: Page-locked batches for fast host-to-GPU copies; ``None`` means
            "when CUDA is available".
        persistent_workers: Keep workers alive between epochs.
        multiprocessing_context: Start method of the workers (``fork``, ``spawn``,
            ``forkserver``); ``None`` picks ``forkserver`` for ``s3://`` data (the AWS
            SDK's threads in the parent do not survive a ``fork``) and ``fork``, the
            quickest to start, otherwise.
        engine: What the ``num_workers`` workers are: ``threads`` in the training
            process (nothing to start, no batch copied between processes; reads,
            decoding and OpenCV release the GIL; the default, by measurement), or
            DataLoader worker ``processes`` (for a transform that holds the GIL in
            Python). Both deliver the same batches in the same order.
        cache_bytes: Memory for keeping the row groups read (0: none): a group kept is
            not read again in later epochs, neither copied out of Parquet's pages nor
            downloaded (:mod:`imgpipe.train.rowcache`). The loader's memory grows by up to
            this much; worker processes share it out.
    """

    batch_size: int = 128
    shuffle: bool = True
    shuffle_buffer: int = 1024
    drop_last: bool = True
    seed: int = 0
    num_workers: int | None = None
    prefetch_factor: int = 2
    pin_memory: bool | None = None
    persistent_workers: bool = True
    multiprocessing_context: str | None = None
    engine: str = "threads"
    cache_bytes: int = 0

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH, integer=True)
        check_range("cache_bytes", self.cache_bytes, 0, MAX_CACHE_GB << 30, integer=True)
        if self.engine not in LOADER_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(LOADER_ENGINES)}, got {self.engine!r}")
        check_range("shuffle_buffer", self.shuffle_buffer, 0, MAX_SHUFFLE_BUFFER, integer=True)
        if self.num_workers is not None:
            check_range("num_workers", self.num_workers, 0, MAX_WORKERS, integer=True, note="or unset: automatic")
        check_range("prefetch_factor", self.prefetch_factor, 1, MAX_PREFETCH, integer=True)
        if self.multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"multiprocessing_context must be fork, spawn or forkserver, got {self.multiprocessing_context!r}")

    @property
    def resolved_num_workers(self) -> int:
        """``num_workers``, or the automatic choice when it is ``None``."""
        return default_num_workers() if self.num_workers is None else self.num_workers


def cores_per_rank(local_world_size: int | None = None) -> int:
    """This rank's share of the CPUs the pod may use (at least 1).

    Args:
        local_world_size: Ranks on this machine; defaults to ``LOCAL_WORLD_SIZE`` (set
            by torchrun) or 1.
    """
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, resources.available_cpus() // max(1, local))


def default_num_workers(local_world_size: int | None = None) -> int:
    """Worker processes per rank: the rank's share of the CPUs (:func:`cores_per_rank`) minus one for the training loop."""
    return max(1, min(16, cores_per_rank(local_world_size) - 1))


def augments_on_device(aug_device: str, device_type: str, cores: int) -> bool:
    """Whether a run augments its batches on the training device rather than per sample in the workers.

    ``gpu`` and ``cpu`` say so; ``auto`` is ``gpu`` on CUDA only where the rank has fewer than
    :data:`CPU_AUGMENT_MIN_CORES` cores (``cores``, :func:`cores_per_rank`), else ``cpu``.
    Measured on one H100, ResNet-50 at 224, batch 256, the rank pinned to 4 to 16 cores
    (bench/steps/gpu.py, docs/benchmarks.md, "GPU"): the augmentation on the device takes GPU time
    from the model (about 2,000-2,170 images/s at any core count), while the workers, as
    processes, fed 1,905 images/s from 4 cores, 2,495 from 6, 2,875 from 8 and 2,755 from 16
    (JPEG rows: 2,454 from 8, 2,881 from 16, against 1,629-1,752 with nvJPEG and the device
    augmenting).
    """
    if aug_device != "auto":
        return aug_device == "gpu"
    return device_type == "cuda" and cores < CPU_AUGMENT_MIN_CORES


def resolve_engine(engine: str, *, feeds_gpu_per_sample: bool = False) -> str:
    """The loader engine ``engine`` names: ``auto`` is ``threads``, or ``processes`` when the
    workers augment sample by sample on the CPU for a CUDA device (``feeds_gpu_per_sample``).

    Measured on the whole train step. On the CPU (bench/steps/train_step.py, docs/benchmarks.md,
    "The train step by loader engine and row cache"): threads in the training process were
    as fast per step as worker processes, or faster, in every configuration (tiny_cnn and
    resnet18, batches of 64 and 128, raw and JPEG rows, with and without the row cache),
    with a lower data-wait fraction; the loader alone is 1.4x FFCV with threads and 0.8x
    with processes. On an H200 with 16 cores (bench/steps/gpu.py, docs/benchmarks.md, "GPU"),
    ResNet-50 at 224 with the augmentation in the workers: 680 images/s with threads (the
    per-sample transforms hold the GIL) against 2,805 with processes. Where the device
    augments (``aug_device`` gpu, the default on CUDA with few cores: :func:`augments_on_device`)
    the workers only read rows (2,649 images/s with threads, 3 % data wait), and threads stay;
    for ``whole`` pictures they also decode and crop each sample there, which was not measured
    on a GPU.
    """
    if engine not in TRAIN_LOADER_ENGINES:
        raise ValueError(f"loader_engine must be one of {', '.join(TRAIN_LOADER_ENGINES)}, got {engine!r}")
    if engine != "auto":
        return engine
    return "processes" if feeds_gpu_per_sample else "threads"


def default_cache_bytes() -> int:
    """The row cache of a run that names none: :data:`AUTO_CACHE_FRACTION` of the memory this process may use."""
    usable = resources.usable_memory()
    return int(usable * AUTO_CACHE_FRACTION) if usable else 0
