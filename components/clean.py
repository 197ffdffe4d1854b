"""The clean component: the run's ``download/`` prefix into its ``clean/`` prefix."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def clean(
    dataset: Input[Artifact],
    data_root: str,
    run_id: str,
    cleaned: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    # None: CleanConfig's default (the pipeline passes its own parameters, derived from it).
    grayscale: Optional[bool] = None,  # kfp reads typing.Optional, not `X | None`
    split: Optional[str] = None,
    seed: Optional[int] = None,
    previous_run_prefix: str = "",
    step_config: Optional[dict] = None,
) -> None:
    """Validates, labels, splits and shuffles; with ``previous_run_prefix`` skips images seen before."""
    from imgpipe import config
    from imgpipe.clean.config import CleanConfig
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_step_report
    from imgpipe.steps.clean import clean

    policy = ka.read_policy(data_root)  # every URI the parameters name lies below data_root
    annotations = dataset.metadata.get("annotations") or None
    # "latest" is this dataset's newest promoted run, not another's in the data root.
    previous = ka.resolve_previous(data_root, previous_run_prefix, policy, sources=ka.sources_for_latest(previous_run_prefix, dataset, policy))
    named = {"grayscale": grayscale, "split": split, "seed": seed, "annotations": annotations, "skip_hashes_from": previous}
    cfg = config.step_config(CleanConfig, step_config, "clean", policy=policy, **named)
    source = ka.read_step_artifact(dataset, "download", policy)
    result = clean(source, ka.task_prefix(data_root, run_id, "clean", source, cfg), cfg)
    publish_step_report(result.dest, metrics=metrics, report=report)
    ka.write_step_artifact(cleaned, result.dest, previous_run_prefix=previous or "")
