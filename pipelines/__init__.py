"""The Kubeflow pipelines of imgpipe: :mod:`pipelines.imgpipe_pipeline` (the pipeline) and
:mod:`pipelines.imgpipe_sweep` (the augmentation sweep over its data steps)."""

from imgpipe.pipelines.imgpipe_pipeline import (
    PIPELINE_NAME,
    GpuScheduling,
    PipelineOptions,
    Resources,
    Retry,
    build_pipeline,
    compile_pipeline,
)
from imgpipe.pipelines.imgpipe_sweep import (
    SWEEP_PIPELINE_NAME,
    SweepOptions,
    build_sweep_pipeline,
    compile_sweep,
)

__all__ = [
    "PIPELINE_NAME", "SWEEP_PIPELINE_NAME", "GpuScheduling", "PipelineOptions", "Resources", "Retry", "SweepOptions",
    "build_pipeline", "build_sweep_pipeline", "compile_pipeline", "compile_sweep",
]  # fmt: skip
