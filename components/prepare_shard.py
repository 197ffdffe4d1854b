"""The prepare_shard component: one shard of a sharded download + clean (``PipelineOptions.shards``), in one pod."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def prepare_shard(
    shard: dict,
    source_uri: str,
    data_root: str,
    run_id: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    source_sha256: str = "",
    annotations_uri: str = "",
    annotations_sha256: str = "",
    grayscale: Optional[bool] = None,  # kfp reads typing.Optional, not `X | None`
    split: Optional[str] = None,
    seed: Optional[int] = None,
    previous_run_prefix: str = "",
    step_config: Optional[dict] = None,
) -> str:
    """Downloads and cleans this shard's share of the sources; returns the shard's clean prefix."""
    from imgpipe.stepio.publish import publish_step_report
    from imgpipe.stepio.shards import prepare_shard

    named = {"grayscale": grayscale, "split": split, "seed": seed}
    done = prepare_shard(
        shard,
        source_uri,
        data_root,
        run_id,
        source_sha256=source_sha256,
        annotations_uri=annotations_uri,
        annotations_sha256=annotations_sha256,
        previous_run_prefix=previous_run_prefix,
        step_config=step_config,
        **named,
    )
    publish_step_report(done.dest, metrics=metrics, report=report)
    return done.dest
