"""Where a training process runs: its rank in a torchrun job, its device, determinism.

Plain helpers over ``torch.distributed``: joining the process group torchrun describes
(NCCL on CUDA, gloo on the CPU), or running single-process without one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "resolve_device", "init_distributed", "all_reduce", "all_gather_rows", "barrier", "determinism"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: Global rank.
        world_size: Number of ranks.
        local_rank: Rank on this machine (picks the GPU).
        owns_group: Whether this step created the process group (and must destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0, the only writer."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ValueError: If CUDA is asked for and not available.
    """
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> DistInfo:
    """Joins the process group torchrun describes, or reuses one already initialized.

    Uses NCCL when training on CUDA and gloo on CPU. Without ``WORLD_SIZE > 1`` and
    without an existing group, the run is single-process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def all_reduce(values: list[float], device: torch.device, ctx: DistInfo) -> list[float]:
    """Sums ``values`` over every rank (as is, single-process)."""
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(rows: torch.Tensor, ctx: DistInfo) -> torch.Tensor:
    """Every rank's ``rows`` (``N_r x ...``, ``N_r`` may differ by rank) concatenated in rank order, on every rank.

    ``dist.all_gather`` needs tensors of one shape, so each rank first shares its row
    count, then pads its rows to the largest count; the padding is cut off again.
    """
    if ctx.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def barrier(ctx: DistInfo) -> None:
    """Waits for every rank (nothing to wait for single-process)."""
    if ctx.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms for the run, restoring the process's previous settings."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if enabled:
        # cuBLAS needs a fixed workspace for reproducible results (PyTorch "Reproducibility" notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled  # autotuning picks kernels by timing
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark = previous_benchmark
