"""The imgpipe-audit Kubeflow pipeline: download -> clean -> resize once, K-fold training, cleanlab's label issues.

Step 4 of the notes' tuning procedure ("suspect label quality: review the high-loss
samples") as a pipeline: the data steps are the main pipeline's
(:func:`imgpipe_pipeline.data_steps`), and so are the run parameters (derived from its
signature, never listed twice), plus ``folds`` and ``filter_by``. Then:

* ``plan-folds`` (:mod:`components.plan_folds`, the cpu image) splits the train split into
  ``folds`` stratified folds and writes one resize-shaped output per fold under the run's
  ``folds/`` (train: the other folds, val: the fold), returning one item per fold;
* ``dsl.ParallelFor`` runs the train component once per fold with the run's recipe and
  ``predictions_probs`` on, into ``train-fold-{i}/`` (a branch: nothing recorded in
  ``latest.json``, no promotion), at most ``AuditOptions.parallelism`` at once (kfp's
  ``iteratorPolicy.parallelismLimit``, as the sweep's);
* ``audit-labels`` (:mod:`components.audit_labels`) gathers the out-of-fold probabilities
  and writes the run's ``audit/``: ``label_issues.parquet``, ``label_overrides.csv`` (an
  artifact: review it, then pass its URI to clean as ``label_overrides``) and the gallery;
* with ``review_url`` set, ``publish-review`` (:mod:`components.publish_review`) puts the
  ``review_top`` most suspect images in a Label Studio project there, its API token read from
  the Secret ``imgpipe-label-studio`` (k8s/label-studio); ``imgpipe review import`` brings the
  answers back as clean's ``label_overrides``.

The fold data travels in the loop items for the reason the sweep's resize prefix does
(``kfp.local`` replaces a loop iteration's task-output inputs with the item).
"""

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from imgpipe.components.audit_labels import audit_labels
from imgpipe.components.plan_folds import plan_folds
from imgpipe.components.publish_review import publish_review
from imgpipe.pipelines.imgpipe_pipeline import (
    data_steps,
    pipeline_docstring,
    pipeline_function,
    write_package,
)
from imgpipe.pipelines.imgpipe_sweep import (
    SweepOptions,
    base_options,
    branch_parameters,
    train_each,
)
from imgpipe.pipelines.options import Resources, configure_task
from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Metrics

from imgpipe.config_flags import field_docs, plain_text
from imgpipe.review.client import SECRET, SECRET_TOKEN_KEY, SECRET_URL_KEY, TOKEN_ENV, URL_ENV
from imgpipe.review.loop import TOP
from imgpipe.steps.audit import AUDIT_PIPELINE_NAME, AuditConfig

__all__ = ["AuditOptions", "build_audit_pipeline", "compile_audit"]

AUDIT_PARAMETERS = {"folds": int, "filter_by": str}
# The review's parameters: their defaults publish nothing.
REVIEW_PARAMETERS: dict[str, tuple[type, object, str]] = {
    "review_url": (str, "", "Label Studio's http(s)://host:port: publish the most suspect images there for review (empty: no review task)."),
    "review_top": (int, TOP, "How many of the most suspect images the review project gets, worst first."),
}
_DATA_PARAMETERS = tuple(p for p in inspect.signature(data_steps).parameters if p != "options")


def _default_resources() -> dict[str, Resources]:
    # plan-folds copies the train split into the folds (streamed); audit-labels ranks and draws.
    return {
        "plan_folds": Resources("500m", "2", "2Gi", "4Gi"),
        "audit_labels": Resources("500m", "2", "2Gi", "8Gi"),
        # Draws up to review_top held-out pictures and sends them: light.
        "publish_review": Resources("250m", "1", "1Gi", "4Gi"),
    }


@dataclass(frozen=True)
class AuditOptions(SweepOptions):
    """What is fixed when the audit is compiled: the sweep's options (the main pipeline's,
    ``parallelism``: folds training at once, each with the train task's GPUs), with the
    ``plan_folds`` and ``audit_labels`` tasks' resources."""

    resources: dict = field(default_factory=_default_resources)


class Outputs(NamedTuple):
    """What an audit run hands back: the gallery, the counts and the CSV to review."""

    report: HTML
    metrics: Metrics
    overrides: Artifact


def _signature(main: inspect.Signature) -> inspect.Signature:
    """The main pipeline's parameters, then ``folds`` and ``filter_by`` before ``step_config``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = branch_parameters(main)
    last = params.pop()
    assert last.name == "step_config", "the main pipeline's last parameter is step_config"
    defaults = AuditConfig()
    extra = [inspect.Parameter(n, kind, default=getattr(defaults, n), annotation=t) for n, t in AUDIT_PARAMETERS.items()]
    extra += [inspect.Parameter(n, kind, default=d, annotation=t) for n, (t, d, _) in REVIEW_PARAMETERS.items()]
    return inspect.Signature([*params, *extra, last], return_annotation=Outputs)


def build_audit_pipeline(options: AuditOptions | None = None) -> dsl.graph_component.GraphComponent:
    """The audit pipeline for ``options`` (defaults: the main pipeline's, parallelism 2)."""
    options = options or AuditOptions()
    base = base_options(options)
    images = base.images
    signature = _signature(inspect.signature(pipeline_function(options.pipeline)))

    def imgpipe_audit(*args: Any) -> Outputs:
        p = signature.bind(*args).arguments  # kfp calls the pipeline function with one channel per parameter
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        resized = data_steps(base, **{name: p[name] for name in _DATA_PARAMETERS})
        planned = plan_folds(resized=resized, data_root=p["data_root"], run_id=run_id, folds=p["folds"], seed=p["seed"], step_config=p["step_config"])
        configure_task(planned, "plan_folds", images.cpu, base, base.retry)
        tr = train_each(planned.output, p, run_id, base, options.parallelism)
        ranked = audit_labels(
            branches=planned.output, trained=dsl.Collected(tr.outputs["trained"]), data_root=p["data_root"], run_id=run_id, filter_by=p["filter_by"]
        )
        configure_task(ranked, "audit_labels", images.gpu, base, base.retry)
        with dsl.If(p["review_url"] != "", name="review"):
            review = {name: p[name] for name in REVIEW_PARAMETERS}
            published = publish_review(audit=ranked.outputs["audit"], data_root=p["data_root"], **review)
            configure_task(published, "publish_review", images.gpu, base, base.retry)
            # Optional: without the Secret the task says what is missing, in one line. The URL in it is the one
            # review_url may name (the token goes only there).
            kubernetes.use_secret_as_env(published, SECRET, {SECRET_TOKEN_KEY: TOKEN_ENV, SECRET_URL_KEY: URL_ENV}, optional=True)
        return Outputs(report=ranked.outputs["report"], metrics=ranked.outputs["metrics"], overrides=ranked.outputs["overrides"])

    docs = field_docs(AuditConfig)
    extra = {name: plain_text(docs[name]) for name in AUDIT_PARAMETERS} | {n: text for n, (_, _, text) in REVIEW_PARAMETERS.items()}
    imgpipe_audit.__signature__ = signature  # type: ignore[attr-defined]
    imgpipe_audit.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()} | {"return": Outputs}
    imgpipe_audit.__doc__ = pipeline_docstring(
        summary="Prepares the data once, trains one model per fold, ranks suspected label errors; see docs/tuning.md (label audit).",
        extra=extra,
    )
    description = "Label audit: download -> clean -> resize once, K-fold training (ParallelFor), cleanlab's label issues, a Label Studio review."
    return dsl.pipeline(name=AUDIT_PIPELINE_NAME, description=description)(imgpipe_audit)


def compile_audit(package_path: str | Path, options: AuditOptions | None = None) -> Path:
    """Compiles the audit pipeline to a YAML package; returns its path."""
    return write_package(build_audit_pipeline(options), package_path)
