"""The resize step's settings (OpenCV-free, so the pipeline compiles in the cpu image): a preset
or a size, the per-image spec for each split, and where the tasks run (Ray or a local pool).

cfg = ResizeConfig(preset="efficientnet_b3", ray_address="kuberay")
cfg.spec_for("train")     # the ResizeSpec train images get (train_mode may differ)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from imgpipe.config import check_numbers, check_range, did_you_mean
from imgpipe.remote.targets import parse_address
from imgpipe.resize.spec import PRESETS, OutputFormat, Resample, ResizeMode, ResizeSpec

__all__ = ["EXECUTORS", "Executor", "ResizeConfig"]

Executor = Literal["auto", "ray", "pool"]
EXECUTORS: tuple[str, ...] = get_args(Executor)


@dataclass(frozen=True)
class ResizeConfig:
    """Settings of the resize step.

    Attributes:
        size: Output side; every image becomes ``size x size`` (``whole`` mode: the
            training size, see ``mode``).
        mode: ``short-side-crop`` (ImageNet eval: short side to size/0.875, centre
            crop), ``fixed`` (stretch), ``pad`` (letterbox with ``pad_value``) or
            ``whole`` (the whole picture, aspect kept, no crop: short side to
            size/0.875, e.g. 256 for 224, long side at most ``max_aspect`` times that;
            rows vary in size, so a reader crops them, e.g. RandomResizedCrop to
            ``size`` for training, a centre ``size`` crop for evaluation, which gives
            what ``short-side-crop`` stores up to a sub-pixel shift). The mode of every
            split but ``train`` when ``train_mode`` is set.
        train_mode: The mode of the ``train`` split (e.g. ``whole``, so that training
            crops sample the whole picture); unset (``None``) means ``mode``. Other splits
            always use ``mode``. The manifest's ``extra.split_modes`` records each
            split's mode.
        max_aspect: ``whole`` mode: cap of the long side, as a multiple of the short
            side's target; a more elongated image keeps its aspect, so its short side
            comes out below the target. At most 8.
        preset: A model family's input size from
            :data:`PRESETS` (``resnet``, ``inception``, ``clip``,
            ``vit-384``, ``efficientnet-b7``, ...); when set it overrides ``size``.
        format: ``raw`` (uint8 HWC pixels, the fastest to load) or ``jpeg``.
        jpeg_quality: Quality of ``jpeg`` output.
        ops: Standardization ops applied after the resize, in order, e.g.
            ``("clahe", "gaussian_blur:1.0")``; ``roi_crop`` (first) crops to a row's
            ``bbox`` before it. See :mod:`imgpipe.resize.ops` for the list.
        resample: Filter of the antialiased resize.
        pad_value: Grey level of the letterbox border (``pad`` mode).
        fast_decode: Decode large JPEGs at a reduced DCT scale (see resize_ops).
        max_pixels: Largest image decoded, from its header (clean's ``max_pixels``; raise
            both together); a larger one is a ``too_large`` reject.
        ray_address: ``""`` runs here: on a local Ray it starts or the pool (see
            ``executor``), or on the cluster ``RAY_ADDRESS`` names, as inside a Ray
            job; ``auto`` or ``ray://host:10001`` connects to
            an existing cluster. ``http://head:8265`` (a Jobs API) submits the step as
            a Ray job to that cluster; ``kuberay`` or ``kuberay://NAMESPACE`` creates a
            KubeRay ``RayJob`` from ``k8s/ray/rayjob-resize.yaml`` that brings its own
            autoscaling cluster. Either waits for the job, streams its progress, and
            returns the report of its committed output; a retry with the same run id
            re-attaches instead of running twice. See :mod:`imgpipe.remote.targets` and
            :mod:`imgpipe.remote.dispatch`.
        executor: What runs the tasks where the step runs: ``ray`` (Ray Data on a local
            Ray or the cluster ``ray_address`` joins), ``pool`` (a process pool of this
            machine's CPUs; Ray is neither started nor imported; refused with a
            ``ray_address``) or ``auto``: the pool when no cluster is named
            (``ray_address`` and ``$RAY_ADDRESS`` empty), no Ray runs in the process, and
            the input has at most 20,000 rows (Ray's start of several seconds weighs on
            such a run, and a lost worker costs at most a re-run of it); Ray otherwise,
            which retries only a lost worker's task. The manifest's ``extra.executor``
            says which ran (:mod:`imgpipe.resize.executor`).
        batch_size: Images per ``map_batches`` call.
        concurrency: Resize tasks running at once; 0 means one per cluster CPU (on the
            pool, one per available CPU). On Ray each task asks for ``TASK_CPUS`` (0.9)
            of a CPU, so a pool as large as the CPU count still leaves headroom for Ray
            Data's own tasks and cannot deadlock them (there are no separate read tasks:
            each task reads its own row groups).
        rows_per_shard: Rows per output Parquet file (per split).
        row_group_rows: Rows per Parquet row group (the unit the loader reads).
        progress_bars: Ray Data's progress bars (off: pod logs are not terminals).
        no_progress_timeout_s: Fail when no Ray Data operator makes progress (on the
            pool: no task finishes) for this long, instead of hanging (``-1`` disables).
    """

    # The per-image fields' defaults are ResizeSpec's, which `spec` rebuilds.
    size: int = ResizeSpec.size
    mode: ResizeMode = ResizeSpec.mode
    train_mode: ResizeMode | None = None
    max_aspect: float = ResizeSpec.max_aspect
    preset: str | None = None
    format: OutputFormat = ResizeSpec.format
    jpeg_quality: int = ResizeSpec.jpeg_quality
    ops: tuple[str, ...] = ResizeSpec.ops
    resample: Resample = ResizeSpec.resample
    pad_value: int = ResizeSpec.pad_value
    fast_decode: bool = ResizeSpec.fast_decode
    max_pixels: int = ResizeSpec.max_pixels
    ray_address: str = ""
    executor: Executor = "auto"
    batch_size: int = 64
    concurrency: int = 0
    rows_per_shard: int = 1024
    row_group_rows: int = 64
    progress_bars: bool = False
    no_progress_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}{did_you_mean(str(self.preset), PRESETS)}; valid presets: {', '.join(PRESETS)}")
        parse_address(self.ray_address)  # a remote address is well-formed
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor == "pool" and self.ray_address.strip():
            raise ValueError(
                f"executor 'pool' runs the tasks in this process's own pool, but ray_address {self.ray_address!r} "
                "names a Ray cluster or job: use executor 'ray' or 'auto' there, or an empty ray_address for the pool"
            )
        check_range("batch_size", self.batch_size, 1, 1 << 16, integer=True)
        check_range("concurrency", self.concurrency, 0, 1 << 16, integer=True, note="0 = one per CPU")
        check_range("rows_per_shard", self.rows_per_shard, 1, 1 << 20, integer=True)
        check_range("row_group_rows", self.row_group_rows, 1, 1 << 16, integer=True)
        if self.no_progress_timeout_s != -1:
            check_range("no_progress_timeout_s", self.no_progress_timeout_s, 0, 7 * 86400, low_open=True, note="seconds, or -1 to disable")
        _ = self.spec  # building the per-image settings checks size, mode, ops, ... here
        _ = self.spec_for("train")  # and train_mode

    @property
    def resolved_size(self) -> int:
        """The output side: the preset's if one is set, else ``size``."""
        return PRESETS[self.preset] if self.preset is not None else self.size

    @property
    def spec(self) -> ResizeSpec:
        """The per-image settings of every split but ``train`` (and of ``train`` without ``train_mode``)."""
        return ResizeSpec(
            size=self.resolved_size,
            mode=self.mode,
            resample=self.resample,
            pad_value=self.pad_value,
            max_aspect=self.max_aspect,
            ops=tuple(self.ops),
            format=self.format,
            jpeg_quality=self.jpeg_quality,
            fast_decode=self.fast_decode,
            max_pixels=self.max_pixels,
        )

    def mode_for(self, split: str) -> ResizeMode:
        """The resize mode of rows of ``split``: ``train_mode`` for ``train`` when set, else ``mode``."""
        return self.train_mode if split == "train" and self.train_mode is not None else self.mode

    def spec_for(self, split: str) -> ResizeSpec:
        """The per-image settings of rows of ``split``."""
        spec = self.spec
        mode = self.mode_for(split)
        return spec if mode == spec.mode else dataclasses.replace(spec, mode=mode)

    @property
    def split_specs(self) -> dict[str, ResizeSpec]:
        """The splits whose settings differ from :attr:`spec` (what :func:`resize_batch` takes per row)."""
        return {"train": self.spec_for("train")} if self.mode_for("train") != self.mode else {}
