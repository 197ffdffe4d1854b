"""The Kubeflow pipelines of imgpipe (one for now: :mod:`pipelines.imgpipe_pipeline`)."""

from imgpipe.pipelines.imgpipe_pipeline import (
    PIPELINE_NAME,
    GpuScheduling,
    PipelineOptions,
    Resources,
    Retry,
    build_pipeline,
    compile_pipeline,
)

__all__ = ["PIPELINE_NAME", "GpuScheduling", "PipelineOptions", "Resources", "Retry", "build_pipeline", "compile_pipeline"]
