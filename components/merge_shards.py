"""The merge_shards component: the shards' clean outputs into the run's ``clean/`` prefix."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Output

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def merge_shards(
    shards: list[str],
    data_root: str,
    run_id: str,
    cleaned: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    grayscale: Optional[bool] = None,
    split: Optional[str] = None,
    seed: Optional[int] = None,
    previous_run_prefix: str = "",
    step_config: Optional[dict] = None,
) -> None:
    """Merges the shards' clean outputs into the run's ``clean/`` prefix (labels, duplicates, split and order over all)."""
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_step_report
    from imgpipe.stepio.shards import merge_shards

    named = {"grayscale": grayscale, "split": split, "seed": seed}
    done = merge_shards(shards, data_root, run_id, previous_run_prefix=previous_run_prefix, step_config=step_config, **named)
    publish_step_report(done.dest, metrics=metrics, report=report)
    ka.write_step_artifact(cleaned, done.dest, previous_run_prefix=done.extra.get("carried_from") or "")
