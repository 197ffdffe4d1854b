"""The imgpipe-sweep Kubeflow pipeline: download -> clean -> resize once, then train once per grid branch, then compare.

The data steps are the main pipeline's (:func:`imgpipe_pipeline.data_steps`, the same
components, resources and retries), and so are the run parameters: the sweep takes
every parameter of ``imgpipe`` (derived from its signature, never listed twice; only
``epochs`` defaults to :data:`imgpipe.sweep.SWEEP_EPOCHS`) plus the grid: ``grid`` (a
list of branches, each a mapping of grid keys) and one ``grid_<key>`` list per grid key
(:data:`imgpipe.sweep.GRID_KEYS`), whose cartesian product is crossed with ``grid``, and
``seeds`` (:data:`imgpipe.sweep.SEEDS_KEY`): runs per branch, each with its own seed.

Then:

* ``plan`` (:mod:`components.plan_sweep`) checks the grid and builds every branch's
  TrainConfig before any GPU is asked for; it returns one item per branch, carrying the
  committed resize prefix so that the loop's tasks take only the item and run parameters.
* ``dsl.ParallelFor`` over the items runs the train component once per branch, with the
  same data and seed, into ``{data_root}/runs/{run id}/train-{branch}/`` (with ``seeds``
  N above 1, once per branch and seed k, into ``train-{branch}-s{k}/`` with seed base + k).
  ``SweepOptions.parallelism`` bounds how many branches (so GPUs) run at once: kfp
  compiles it into the loop task's ``iteratorPolicy.parallelismLimit``
  (kubeflow/pipelines sdk-2.14.0 ``sdk/python/kfp/dsl/tasks_group.py`` ``ParallelFor``
  stores ``parallelism`` as ``parallelism_limit``, and
  ``sdk/python/kfp/compiler/pipeline_spec_builder.py`` writes
  ``pipeline_task_spec.iterator_policy.parallelism_limit`` when it is above 0; unchanged
  in 2.17.0). It is a plain ``int`` there, not a channel: fixed when compiling.
* ``compare`` (:mod:`components.compare`) takes the plan and the branches' step
  artifacts (``dsl.Collected``) and writes ``{data_root}/runs/{run id}/compare/``: the
  ranking, flags and overlaid curves as HTML and Metrics, and the winner's config as an
  artifact (``winner.yaml``: a ``train:`` section for a full run's ``step_config``).

Why the resize prefix travels in the loop items: ``kfp.local`` 2.17.0
(``kfp/local/orchestrator/task_spec_utils.py``
``create_parameter_loop_iteration_task_spec``) replaces every task-output input of a
loop iteration with the loop item, so a task output passed straight into the loop body
arrives there as the item. Through the item, ``imgpipe sweep`` (kfp.local) and a
cluster run the same package.

A branch that fails fails the loop and the run (kfp's ``ParallelFor``); its retries are
train's (it resumes its own checkpoint).
"""

# No `from __future__ import annotations`: kfp reads the signature's annotations as types.
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from imgpipe.components.compare import compare
from imgpipe.components.plan_sweep import plan_sweep
from imgpipe.components.train import train
from imgpipe.pipelines.imgpipe_pipeline import (
    data_steps,
    pipeline_docstring,
    pipeline_function,
    write_package,
)
from imgpipe.pipelines.options import PipelineOptions, Resources, configure_task, schedule_on_gpu
from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics

from imgpipe.config_flags import field_docs, plain_text
from imgpipe.sweep import GRID_KEYS, MAX_SEEDS, SEEDS_KEY, SWEEP_EPOCHS, SWEEP_PIPELINE_NAME
from imgpipe.train.config import TrainConfig

__all__ = [
    "SWEEP_PIPELINE_NAME",
    "DEFAULT_PARALLELISM",
    "GRID_PARAMETERS",
    "SweepOptions",
    "build_sweep_pipeline",
    "compile_sweep",
    "base_options",
    "branch_parameters",
    "train_each",
]

# Branches (each one GPU) training at once unless the package says otherwise.
DEFAULT_PARALLELISM = 2
# The sweep's own run parameters: the explicit grid, then one list per grid key.
GRID_PARAMETERS: tuple[str, ...] = ("grid", *(f"grid_{key}" for key in GRID_KEYS))
# The data steps' parameters (data_steps' keywords), taken from the run's parameters.
_DATA_PARAMETERS = tuple(p for p in inspect.signature(data_steps).parameters if p != "options")
# The main pipeline's parameters a fan-out pipeline does not offer: each branch trains on the
# GPUs of its own pod (a branch waiting on a TrainJob would hold them, parallelism times over).
NOT_OFFERED = ("train_nodes",)


def branch_parameters(main: inspect.Signature) -> list[inspect.Parameter]:
    """The main pipeline's parameters that a fan-out pipeline (sweep, audit) offers, in order."""
    return [p for p in main.parameters.values() if p.name not in NOT_OFFERED]


def _default_resources() -> dict[str, Resources]:
    # plan builds TrainConfigs, compare reads metrics.json and draws: small CPU pods in the gpu image.
    return {"plan": Resources("250m", "1", "1Gi", "2Gi"), "compare": Resources("500m", "1", "2Gi", "4Gi")}


@dataclass(frozen=True)
class SweepOptions:
    """What is fixed when the sweep is compiled.

    Attributes:
        pipeline: The main pipeline's options (images, resources, retries, GPU, caching),
            which the data steps and every branch's train task follow.
        parallelism: Branches training at once (``ParallelFor(parallelism=...)``): each
            asks for ``pipeline.gpu.count`` GPUs, so this bounds the sweep's GPUs.
        resources: Requests and limits of the ``plan`` and ``compare`` tasks.
    """

    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    parallelism: int = DEFAULT_PARALLELISM
    resources: dict = field(default_factory=_default_resources)

    def __post_init__(self) -> None:
        if isinstance(self.parallelism, bool) or not isinstance(self.parallelism, int) or self.parallelism < 1:
            raise ValueError(f"parallelism must be an integer >= 1 (branches training at once), got {self.parallelism!r}")


class Outputs(NamedTuple):
    """What a sweep run hands back: the comparison's UI artifacts and the winner's config."""

    report: HTML
    metrics: Metrics
    winner: Artifact


def _grid_docs() -> dict[str, str]:
    docs = field_docs(TrainConfig)
    out = {
        "grid": "Explicit branches: a list of mappings of grid keys ("
        + ", ".join(GRID_KEYS)
        + ") and an optional name; crossed with the grid_* lists.",
    }
    for key, name in GRID_KEYS.items():
        out[f"grid_{key}"] = f"Values of {key} to sweep ({plain_text(docs[name]).rstrip('.')}; TrainConfig.{name}); [] sweeps none."
    out[SEEDS_KEY] = (
        f"Runs per branch, 1 to {MAX_SEEDS}: run k trains with seed base + k (TrainConfig.seed); "
        "compare ranks each branch by the mean over its runs and shows the spread."
    )
    return out


def _signature(main: inspect.Signature) -> inspect.Signature:
    """The main pipeline's parameters (``epochs`` defaulting to the sweep's), the grid's before ``step_config``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [p.replace(default=SWEEP_EPOCHS) if p.name == "epochs" else p for p in branch_parameters(main)]
    last = params.pop()
    assert last.name == "step_config", "the main pipeline's last parameter is step_config"
    # An empty list (no value swept) as the default: kfp.local cannot pass a None list default.
    grid = [inspect.Parameter(name, kind, default=[], annotation=list) for name in GRID_PARAMETERS]
    # Then the runs per branch (1: each branch once, as before seeds existed).
    seeds = inspect.Parameter(SEEDS_KEY, kind, default=1, annotation=int)
    return inspect.Signature([*params, *grid, seeds, last], return_annotation=Outputs)


def _typed_train_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """The train task's typed inputs, as the main pipeline passes them: each from the run parameter of its name.

    Derived from the train component's inputs, so a typed parameter added to both reaches
    every branch (and ``plan``, which then must take it too: kfp refuses an unknown input).
    ``model_name`` takes ``model`` (the component's ``model`` is its Model output).
    """
    inputs = train.component_spec.inputs
    skip = ("data_root", "step_config")  # the task takes these from the item and the run
    typed = {name: params[name] for name in inputs if name in params and name not in skip}
    return {**typed, "model_name": params["model"]}


def base_options(options: SweepOptions) -> PipelineOptions:
    """The main pipeline's options with the fan-out pipeline's own tasks' resources added."""
    return dataclasses.replace(options.pipeline, resources={**options.pipeline.resources, **options.resources})


def train_each(items: Any, p: dict[str, Any], run_id: Any, base: PipelineOptions, parallelism: int) -> dsl.PipelineTask:
    """A ``ParallelFor`` of train tasks over plan ``items`` (the sweep's branches, the audit's folds).

    Each takes its data, branch name and ``step_config`` from the item and the typed train
    parameters from the run (:func:`_typed_train_inputs`); at most ``parallelism`` at once.

    Returns:
        The loop's train task (for ``dsl.Collected`` of its outputs).
    """
    # No name=: KFP before 2.16.0 (Kubeflow v1.11's 2.15.0) then records the loop under it, not
    # its task key, and the fan-in's driver cannot find its producer (kubeflow/pipelines#13239,
    # fixed by #12808); tests/test_fan_in.py holds every loop's name to its key.
    with dsl.ParallelFor(items, parallelism=parallelism) as item:
        tr = train(
            resized=item.resized,
            data_root=p["data_root"],
            run_id=run_id,
            branch=item.branch,
            step_config=item.step_config,
            placement="pod",
            train_nodes=1,
            **_typed_train_inputs(p),
        )
        configure_task(tr, "train", base.images.gpu, base, base.train_retry)
        if base.gpu is not None:
            schedule_on_gpu(tr, base.gpu)
    return tr


def build_sweep_pipeline(options: SweepOptions | None = None) -> dsl.graph_component.GraphComponent:
    """The sweep pipeline for ``options`` (defaults: the main pipeline's, parallelism 2)."""
    options = options or SweepOptions()
    base = base_options(options)
    images = base.images
    signature = _signature(inspect.signature(pipeline_function(options.pipeline)))

    def imgpipe_sweep(*args: Any) -> Outputs:
        p = signature.bind(*args).arguments  # kfp calls the pipeline function with one channel per parameter
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        resized = data_steps(base, **{name: p[name] for name in _DATA_PARAMETERS})
        typed = _typed_train_inputs(p)
        grid = {g: p[g] for g in (*GRID_PARAMETERS, SEEDS_KEY)}
        planned = plan_sweep(resized=resized, step_config=p["step_config"], **typed, **grid)
        configure_task(planned, "plan", images.gpu, base, base.retry)
        tr = train_each(planned.output, p, run_id, base, options.parallelism)
        cmp = compare(branches=planned.output, trained=dsl.Collected(tr.outputs["trained"]), data_root=p["data_root"], run_id=run_id)
        configure_task(cmp, "compare", images.gpu, base, base.retry)
        return Outputs(report=cmp.outputs["report"], metrics=cmp.outputs["metrics"], winner=cmp.outputs["winner"])

    imgpipe_sweep.__signature__ = signature  # type: ignore[attr-defined]
    imgpipe_sweep.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()} | {"return": Outputs}
    imgpipe_sweep.__doc__ = pipeline_docstring(
        summary="Prepares the data once, trains one short run per grid branch, ranks them; see docs/tuning.md (Tuning augmentation).",
        extra=_grid_docs(),
        defaults={"epochs": SWEEP_EPOCHS},
    )
    description = "Augmentation sweep: download -> clean -> resize once, train per grid branch (ParallelFor), compare."
    return dsl.pipeline(name=SWEEP_PIPELINE_NAME, description=description)(imgpipe_sweep)


def compile_sweep(package_path: str | Path, options: SweepOptions | None = None) -> Path:
    """Compiles the sweep pipeline to a YAML package; returns its path."""
    return write_package(build_sweep_pipeline(options), package_path)
