"""The Kubeflow components of the pipeline: one thin wrapper per step.

Each module defines one lightweight kfp v2 component, named like the module
(``components.clean.clean``): ``@dsl.component`` with the step's image as
``base_image`` and ``install_kfp_package=False`` (the image already has imgpipe and
kfp). The function body imports ``imgpipe`` and calls the step, :mod:`imgpipe.stepio.artifacts`
and :mod:`imgpipe.stepio.publish`; kfp ships the body to the container as source, so
nothing else in this package runs there. Image names come from :mod:`imgpipe.containers.catalog`.
"""

__all__ = [
    "download",
    "clean",
    "resize",
    "train",
    "promote",
    "plan_sweep",
    "compare",
    "plan_folds",
    "audit_labels",
    "prepare_shard",
    "merge_shards",
    "verify_output",
]
