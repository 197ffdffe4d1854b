"""The folds component of the audit: the train split into K stratified folds, one item per fold for the ``ParallelFor``."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def plan_folds(
    resized: str,
    data_root: str,
    run_id: str,
    folds: int,
    seed: int,
    step_config: Optional[dict] = None,  # kfp reads typing.Optional, not `X | None`
) -> list:
    """Writes ``folds`` resize-shaped outputs into the run's ``folds/`` (train: the other folds; val: the fold).

    Returns one item per fold (``branch``, ``resized``, ``step_config`` with per-image probabilities on).
    """
    from imgpipe.stepio import artifacts as ka
    from imgpipe.steps.audit import AuditConfig, plan_folds

    data = ka.committed_prefix(resized, "resize", ka.read_policy(data_root))
    return plan_folds(data, ka.run_prefix(data_root, run_id, "folds"), AuditConfig(folds=folds, seed=seed), step_config)
