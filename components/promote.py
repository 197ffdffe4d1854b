"""The promote component: the promotion gate on the run's committed train output, and its UI artifacts."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Metrics, Model, Output

from imgpipe.containers.catalog import image


# The gpu image: re-scoring both models needs torch. No GPU is asked for (one evaluation pass each).
@dsl.component(base_image=image("gpu"), install_kfp_package=False)
def promote(
    trained: str,
    data_root: str,
    run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    promotion_tolerance: Optional[float] = None,  # None: PromoteConfig's default
) -> None:
    """Decides whether the run's model becomes ``latest`` (:mod:`imgpipe.steps.promote`); shows the model and the verdict.

    ``trained`` is the train task's committed prefix (whichever train task ran). The gate
    re-scores the current model (``latest.json``) and this one on this run's test images; the
    run becomes ``latest`` only when its score is at least the current one's, less
    ``promotion_tolerance``, and is then registered where the operator names a Model Registry.
    Either way the task succeeds, with the verdict and both numbers in its Metrics and report.
    """
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_training

    policy = ka.read_policy(data_root)
    prefix = ka.committed_prefix(trained, "train", policy)
    publish_training(prefix, model=model, metrics=metrics, classification=confusion, report=report)
    ka.promote_run(data_root, run_id, tolerance=promotion_tolerance or 0.0, metrics=metrics, report=report, policy=policy, candidate=prefix)
