"""The Kubeflow pipelines of imgpipe: :mod:`pipelines.imgpipe_pipeline` (the pipeline),
:mod:`pipelines.imgpipe_sweep` (the augmentation sweep over its data steps) and
:mod:`pipelines.imgpipe_audit` (the K-fold label audit over them); :mod:`pipelines.options`
holds what is fixed when they are compiled."""

from imgpipe.pipelines.imgpipe_audit import (
    AUDIT_PIPELINE_NAME,
    AuditOptions,
    build_audit_pipeline,
    compile_audit,
)
from imgpipe.pipelines.imgpipe_pipeline import (
    PIPELINE_NAME,
    build_pipeline,
    compile_pipeline,
)
from imgpipe.pipelines.imgpipe_sweep import (
    SWEEP_PIPELINE_NAME,
    SweepOptions,
    build_sweep_pipeline,
    compile_sweep,
)
from imgpipe.pipelines.options import (
    GpuScheduling,
    PipelineOptions,
    Resources,
    Retry,
)

__all__ = [
    "PIPELINE_NAME",
    "SWEEP_PIPELINE_NAME",
    "AUDIT_PIPELINE_NAME",
    "GpuScheduling",
    "PipelineOptions",
    "Resources",
    "Retry",
    "SweepOptions",
    "AuditOptions",
    "build_pipeline",
    "build_sweep_pipeline",
    "build_audit_pipeline",
    "compile_pipeline",
    "compile_sweep",
    "compile_audit",
]
