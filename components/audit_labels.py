"""The ranking component of the audit: the folds' out-of-fold predictions into cleanlab's suspected label errors."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from imgpipe.containers.catalog import image


# The gpu image: cleanlab, and the gallery decodes images with the train step's reader. No GPU is asked for.
@dsl.component(base_image=image("gpu"), install_kfp_package=False)
def audit_labels(
    branches: list,
    trained: Input[list[Artifact]],
    data_root: str,
    run_id: str,
    filter_by: str,
    audit: Output[Artifact],
    report: Output[HTML],
    metrics: Output[Metrics],
    overrides: Output[Artifact],
) -> None:
    """Ranks the train images by label quality into the run's ``audit/``; ``overrides`` is the CSV for clean's ``label_overrides``."""
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_audit
    from imgpipe.steps.audit import AuditConfig, rank_label_issues
    from imgpipe.sweep import branch_prefixes

    models = list(branch_prefixes(branches, trained, ka.read_policy(data_root)).values())
    result = rank_label_issues(models, ka.run_prefix(data_root, run_id, "audit"), AuditConfig(folds=len(models), filter_by=filter_by))
    publish_audit(result.dest, report=report, metrics=metrics, overrides=overrides)
    ka.write_step_artifact(audit, result.dest)
