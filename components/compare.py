"""The compare component of the sweep: the branches' train outputs into a ranking, flags and the winner's config."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from imgpipe.containers.catalog import image


# The gpu image: the curves are drawn with matplotlib (not in the cpu image). No GPU is asked for.
@dsl.component(base_image=image("gpu"), install_kfp_package=False)
def compare(
    branches: list,
    trained: Input[list[Artifact]],
    data_root: str,
    run_id: str,
    comparison: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
    winner: Output[Artifact],
) -> None:
    """Ranks the branches (``branches``: the plan; ``trained``: their collected step artifacts) into the run's ``compare/``."""
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_comparison
    from imgpipe.steps.compare import compare, spread_metrics
    from imgpipe.sweep import branch_prefixes

    settings = {b["branch"]: b["settings"] for b in branches}
    groups = {b["branch"]: b["group"] for b in branches if "group" in b}  # with seeds: run -> its branch
    dest = ka.run_prefix(data_root, run_id, "compare")
    result = compare(branch_prefixes(branches, trained, ka.read_policy(data_root)), dest, settings=settings, groups=groups or None)
    published = publish_comparison(result.dest, report=report, metrics=metrics, winner=winner)
    for name, value in spread_metrics(published).items():
        metrics.log_metric(name, value)
    ka.write_step_artifact(comparison, result.dest)
