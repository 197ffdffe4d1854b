"""The imgpipe Kubeflow pipeline: download -> clean -> resize -> train.

Every task writes ``{data_root}/runs/{run id}/{step}/`` and passes the next one a small
step artifact that names that prefix (:mod:`imgpipe.stepio.artifacts`); images never
travel as kfp artifacts. Every data task also emits a Metrics and an HTML artifact
(:func:`imgpipe.stepio.publish.publish_step_report`); the train task emits the Model,
Metrics, ClassificationMetrics and HTML artifacts the Kubeflow UI shows.

What is fixed when the pipeline is compiled (:class:`pipelines.options.PipelineOptions`): the images,
resources, retries, GPU scheduling and caching. Caching is a compile-time choice on
purpose: a run created from an uploaded pipeline version (``imgpipe submit``) cannot
override it (kfp applies ``enable_caching`` only to runs created from a package
file), and the version name carries the package digest, so a ``--caching`` build is
another version. The KFP backend resolves ``{{$.pipeline_job_uuid}}`` before it computes
a task's cache key, so a task that took the run's id could never be a hit: in a
``--caching`` build the data and train tasks take ``BY_INPUTS`` instead and write below
prefixes keyed by their inputs (``PipelineOptions.task_run_id``), and promote, which moves
``latest.json``, runs every time. Caching is off by default and must stay off for
scheduled retraining, where new data behind an unchanged URI must never be a cache hit.

What is chosen per run: the pipeline parameters of :func:`imgpipe_pipeline`
(``imgpipe submit --param k=v``); any step config field through ``step_config``
(``{"train": {"lr": 3e-4}}``), which wins over the typed parameters.

Download and clean run as one task each, or, in a package compiled with ``PipelineOptions.shards``
above 1, as a ``ParallelFor`` of ``prepare-shard`` tasks (each downloads and cleans its share of
the sources) and a ``merge-shards`` task that writes the one clean output resize reads
(:mod:`imgpipe.stepio.shards`, docs/sources.md, "Past one pod").

Resize runs as one of two tasks, chosen by ``ray_address`` at run time: ``resize-local``
(``ray_address == ""``: the work inside the pod, sized like clean: a process pool for a
small input, else a local Ray, by ``ResizeConfig.executor``) or ``resize`` (a KubeRay
RayJob or a Ray cluster's Jobs API does the work; the pod only submits and follows it,
so it asks for what a poller needs). Train takes the committed prefix of whichever ran
(``dsl.OneOf``). Train's memory limit covers its memory-backed ``/dev/shm``, which
Kubernetes counts against the container's limit.

Train runs as one of two tasks too, chosen by ``train_nodes``: ``train`` (1: every GPU of its
pod) or ``train-trainjob`` (more: a Kubeflow Trainer TrainJob of that many nodes does the work;
the pod creates and follows it and asks for no GPU, so a quota counts only the TrainJob's
nodes). Both hand on the committed train prefix as a parameter, and ``promote`` takes the one
that ran (``dsl.OneOf`` of parameters: KFP 2.16's backend resolves an artifact ``OneOf`` to the
last branch whichever ran, kubeflow/pipelines#13436, and ``kfp.local`` refuses one). ``promote``
runs the gate, registers a promoted model, and holds the run's outputs.
"""

# No `from __future__ import annotations`: kfp reads the signature's annotations as types.
import functools
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from imgpipe.components.clean import clean
from imgpipe.components.download import download
from imgpipe.components.merge_shards import merge_shards
from imgpipe.components.prepare_shard import prepare_shard
from imgpipe.components.promote import promote
from imgpipe.components.resize import resize
from imgpipe.components.train import train
from imgpipe.components.verify_output import verify_output
from imgpipe.pipelines.options import (
    RAY_TOKEN_KEYS,
    RAY_TOKEN_SECRET,
    PipelineOptions,
    configure_task,
    schedule_on_gpu,
    step_image,
    trainjob_settings,
)
from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, ClassificationMetrics, Metrics, Model

from imgpipe.clean.config import CleanConfig
from imgpipe.config_flags import field_default, field_docs, plain_text
from imgpipe.resize.config import ResizeConfig
from imgpipe.serving import registry as modelregistry
from imgpipe.stepio.artifacts import PIPELINE_NAME
from imgpipe.stepio.shards import shard_items
from imgpipe.steps.download import OXFORD_PET_ANNOTATIONS_URL, OXFORD_PET_IMAGES_URL
from imgpipe.steps.promote import PromoteConfig
from imgpipe.train.config import TrainConfig

__all__ = [
    "PIPELINE_NAME",
    "PARAMETER_FIELDS",
    "DEFAULT_RAY_ADDRESS",
    "DEFAULT_RESIZE_TRAIN_MODE",
    "data_steps",
    "train_steps",
    "pipeline_docstring",
    "build_pipeline",
    "compile_pipeline",
    "write_package",
    "pipeline_function",
]


# Each typed run parameter sets one step config field; its default and its description
# (shown in the Kubeflow UI and the package) are that field's, so they are written once.
# The components take them as Optional (None: the config's default).
PARAMETER_FIELDS: dict[str, tuple[type, str]] = {
    "grayscale": (CleanConfig, "grayscale"),
    "split": (CleanConfig, "split"),
    "seed": (CleanConfig, "seed"),
    "image_size": (ResizeConfig, "size"),
    "preset": (ResizeConfig, "preset"),
    "resize_mode": (ResizeConfig, "mode"),
    "model": (TrainConfig, "model"),
    "recipe": (TrainConfig, "recipe"),
    "domain": (TrainConfig, "domain"),
    "epochs": (TrainConfig, "epochs"),
    "batch_size": (TrainConfig, "batch_size"),
    "aug_policy": (TrainConfig, "aug_policy"),
    "pretrained": (TrainConfig, "pretrained"),
    "train_nodes": (TrainConfig, "nodes"),
    "promotion_tolerance": (PromoteConfig, "tolerance"),
}
# On Kubeflow the resize work goes to a KubeRay RayJob; the step's own default (a local
# Ray, ResizeConfig.ray_address "") is the CLI's. "" runs the work inside the resize pod.
DEFAULT_RAY_ADDRESS = "kuberay"
# The pipeline always trains, so its train split is stored whole by default: training crops
# then sample the whole picture (as FFCV and timm do), and train centre-crops val/test as
# short-side-crop stored them. The step's own default (ResizeConfig.train_mode None: train
# as mode) is the CLI's. "" means resize_mode.
DEFAULT_RESIZE_TRAIN_MODE = "whole"
# The run parameters that are not a step config field.
_OTHER_PARAMETERS = {
    "data_root": "Where every step writes: {data_root}/runs/{run id}/{step}/ (s3://bucket/prefix).",
    "source_uri": "Where the images are (https:// or s3://; the pods' source policy applies): an archive (tar, zip, "
    "nested one level), a bucket prefix of loose images (s3://bucket/prefix/), a CSV or JSON Lines list of uri,label, "
    "WebDataset shards (shards-{000..099}.tar) or a Hugging Face Parquet file.",
    "source_sha256": "Expected SHA-256 of the image archive; empty skips the check.",
    "annotations_uri": "Oxford-style annotations archive (head boxes, trimaps); empty for none.",
    "annotations_sha256": "Expected SHA-256 of the annotations archive; empty skips the check.",
    "previous_run_prefix": "'latest' or a run's clean prefix: download fetches only the objects of a prefix or URI "
    "list that are new or changed since that run, and clean skips the images it saw (incremental).",
    "resize_train_mode": "Resize mode of the train split (ResizeConfig.train_mode): whole (the whole picture, "
    "aspect kept, short side image_size/0.875, for training crops over all of it), short-side-crop, fixed, pad, "
    "or empty for resize_mode; val and test always use resize_mode.",
    "ray_address": "Where resize runs: kuberay[://NAMESPACE] (a RayJob), http://HEAD:8265 (a Ray cluster's "
    "Jobs API, one of IMGPIPE_RAY_CLUSTERS) or empty (inside the resize pod: a process pool for a small input, "
    "else a local Ray; step_config's resize.executor decides).",
    "step_config": 'Any step config field, per step: {"train": {"lr": 0.0003}}; wins over the typed parameters.',
}


def parameter_default(name: str) -> Any:
    """The default of typed run parameter ``name``: its config field's, as a kfp parameter value.

    An unset field (``None``: the recipe's value, or none) is ``""`` for a text parameter and
    ``0`` for a number. Never ``None``: KFP's driver refuses a null parameter where a sub-DAG
    (a ``dsl.If`` branch) takes it ("the resolved input parameter is null"), and a run started
    from the UI leaves every optional parameter unset.
    """
    value = field_default(*PARAMETER_FIELDS[name])
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if value is None:
        cls, field_name = PARAMETER_FIELDS[name]
        return "" if _is_text(typing.get_type_hints(cls)[field_name]) else 0
    return value


def _is_text(annotation: Any) -> bool:
    """Whether a field takes text: ``str`` or a ``Literal`` of strings, optional or not."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a is str or (typing.get_origin(a) is typing.Literal and isinstance(typing.get_args(a)[0], str)) for a in args)


def pipeline_docstring(
    summary: str = "Downloads, cleans, resizes (Ray Data) and trains; see docs/deploy.md.",
    extra: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> str:
    """A pipeline's docstring; kfp reads each parameter's description from its ``Args:``.

    Args:
        summary: The first line.
        extra: Descriptions of parameters beyond this pipeline's (the sweep's).
        defaults: Typed parameters whose default differs from their config field's (the sweep's epochs).
    """
    docs = dict(_OTHER_PARAMETERS)
    shown = {**{param: parameter_default(param) for param in PARAMETER_FIELDS}, **(defaults or {})}
    for param, (cls, name) in PARAMETER_FIELDS.items():
        docs[param] = f"{plain_text(field_docs(cls)[name])} ({cls.__name__}.{name}; default {shown[param]!r})"
    docs.update(extra or {})
    lines = [summary, "", "Args:"]
    lines += [f"    {k}: {' '.join(v.split())}" for k, v in docs.items()]
    return "\n".join(lines)


class Outputs(NamedTuple):
    """What a run hands back: the promote task's UI artifacts (the model, its scores and report, the verdict)."""

    model: Model
    metrics: Metrics
    confusion: ClassificationMetrics
    report: HTML


def data_steps(
    options: PipelineOptions,
    *,
    data_root: Any,
    source_uri: Any,
    source_sha256: Any,
    annotations_uri: Any,
    annotations_sha256: Any,
    grayscale: Any,
    split: Any,
    seed: Any,
    previous_run_prefix: Any,
    image_size: Any,
    preset: Any,
    resize_mode: Any,
    resize_train_mode: Any,
    ray_address: Any,
    step_config: Any,
) -> Any:
    """Adds download -> clean -> resize to the pipeline being built; returns resize's committed prefix.

    The arguments are the pipeline's parameters (channels) of the same names; the sweep
    pipeline (``pipelines/imgpipe_sweep.py``) calls this too, so both prepare data alike.

    Returns:
        ``dsl.OneOf`` of the two resize tasks' outputs (the one ``ray_address`` chose).
    """
    images = options.images
    common = {"data_root": data_root, "run_id": options.task_run_id, "step_config": step_config}
    sources = {"source_uri": source_uri, "source_sha256": source_sha256, "annotations_uri": annotations_uri, "annotations_sha256": annotations_sha256}
    cleaning = {"grayscale": grayscale, "split": split, "seed": seed, "previous_run_prefix": previous_run_prefix}
    if options.shards > 1:
        cleaned = _sharded_clean(options, sources, cleaning, common)
    else:
        dl = download(**sources, previous_run_prefix=previous_run_prefix, **common)
        configure_task(dl, "download", step_image(images, "download"), options, options.retry)
        cl = clean(dataset=dl.outputs["dataset"], **cleaning, **common)
        configure_task(cl, "clean", step_image(images, "clean"), options, options.retry)
        cleaned = cl.outputs["cleaned"]
    resize_args = {
        "cleaned": cleaned,
        "image_size": image_size,
        "preset": preset,
        "mode": resize_mode,
        "train_mode": resize_train_mode,
        "ray_address": ray_address,
        **common,
    }
    with dsl.If(ray_address == "", name="ray-in-the-pod"):
        in_pod = resize(**resize_args)
        configure_task(in_pod, "resize-local", step_image(images, "resize"), options, options.retry)
        here = verified(options, in_pod.outputs["Output"], "resize", data_root)
    with dsl.Else(name="ray-cluster"):
        remote = resize(**resize_args)
        configure_task(remote, "resize", step_image(images, "resize"), options, options.retry)
        # ray_address "kuberay": the RayJob's cluster runs the resize image too.
        remote.set_env_variable("IMGPIPE_RAY_IMAGE", images.ray)
        kubernetes.use_secret_as_env(remote, RAY_TOKEN_SECRET, RAY_TOKEN_KEYS, optional=True)
        there = verified(options, remote.outputs["Output"], "resize", data_root)
    return dsl.OneOf(here, there)


def verified(options: PipelineOptions, prefix: Any, step: str, data_root: Any) -> Any:
    """``prefix`` (a branch task's output), through a ``verify-output`` task in a ``--caching`` build.

    KFP 2.17 leaves a ``dsl.If`` branch whose task was a cache hit RUNNING, and the
    ``dsl.OneOf`` after it then fails (components/verify_output.py); a task that is never
    cached, after it in the branch, completes the branch. A build without caching needs none.
    """
    if not options.caching:
        return prefix
    task = verify_output(prefix=prefix, step=step, data_root=data_root)
    configure_task(task, "verify-output", options.images.cpu, options, options.retry)
    return task.output


def _sharded_clean(options: PipelineOptions, sources: dict[str, Any], cleaning: dict[str, Any], common: dict[str, Any]) -> Any:
    """Adds the ``ParallelFor`` of ``prepare-shard`` tasks and the ``merge-shards`` task; returns the merged clean artifact.

    The loop items are constants (one per shard) and every other input of a shard task is a
    run parameter: ``kfp.local`` hands a loop body the item in place of any task output.
    """
    image = step_image(options.images, "clean")
    with dsl.ParallelFor(shard_items(options.shards), parallelism=options.shard_parallelism) as item:  # no name=: imgpipe_sweep.train_each
        prep = prepare_shard(shard=item, **sources, **cleaning, **common)
        configure_task(prep, "prepare-shard", image, options, options.retry)
    merged = merge_shards(shards=dsl.Collected(prep.outputs["Output"]), **cleaning, **common)
    configure_task(merged, "merge-shards", image, options, options.retry)
    return merged.outputs["cleaned"]


def train_steps(options: PipelineOptions, *, train_nodes: Any, **train_args: Any) -> Any:
    """Adds the two train tasks to the pipeline being built; returns the committed train prefix of the one that ran.

    ``train_nodes`` 1: ``train`` on every GPU of its pod. More: ``train-trainjob``, a poller
    without GPUs that creates the TrainJob (:func:`trainjob_settings`) and follows it. Each
    task refuses a config whose node count is not its own (``placement``), so a
    ``step_config`` cannot make the poller train or the GPU pod wait.

    Returns:
        ``dsl.OneOf`` of the two tasks' committed prefixes (parameters).
    """
    images = options.images
    with dsl.If(train_nodes == 1, name="train-in-the-pod"):
        in_pod = train(train_nodes=train_nodes, placement="pod", **train_args)
        configure_task(in_pod, "train", step_image(images, "train"), options, options.train_retry)
        if options.gpu is not None:
            schedule_on_gpu(in_pod, options.gpu)
        here = verified(options, in_pod.outputs["Output"], "train", train_args["data_root"])
    with dsl.Else(name="train-as-trainjob"):
        poller = train(train_nodes=train_nodes, placement="trainjob", **train_args)
        configure_task(poller, "train-trainjob", step_image(images, "train"), options, options.train_retry)
        trainjob_settings(poller, images.gpu, options)
        there = verified(options, poller.outputs["Output"], "train", train_args["data_root"])
    return dsl.OneOf(here, there)


def build_pipeline(options: PipelineOptions | None = None) -> dsl.graph_component.GraphComponent:
    """The pipeline for ``options`` (defaults: images from the environment, caching off)."""
    description = "Image dataset preparation and training: download -> clean -> resize (Ray Data) -> train."
    return dsl.pipeline(name=PIPELINE_NAME, description=description)(pipeline_function(options))


def pipeline_function(options: PipelineOptions | None = None) -> Callable[..., Outputs]:
    """The pipeline's Python function for ``options``, not yet traced by kfp: its signature is the run's parameters."""
    options = options or PipelineOptions()
    images = options.images

    def imgpipe_pipeline(
        data_root: str,
        source_uri: str = OXFORD_PET_IMAGES_URL,
        source_sha256: str = "",
        annotations_uri: str = OXFORD_PET_ANNOTATIONS_URL,
        annotations_sha256: str = "",
        grayscale: bool = parameter_default("grayscale"),
        split: str = parameter_default("split"),
        seed: int = parameter_default("seed"),
        previous_run_prefix: str = "",
        image_size: int = parameter_default("image_size"),
        preset: str = parameter_default("preset"),
        resize_mode: str = parameter_default("resize_mode"),
        resize_train_mode: str = DEFAULT_RESIZE_TRAIN_MODE,
        ray_address: str = DEFAULT_RAY_ADDRESS,
        model: str = parameter_default("model"),
        recipe: str = parameter_default("recipe"),
        domain: str = parameter_default("domain"),
        epochs: int = parameter_default("epochs"),  # 0: the recipe's
        batch_size: int = parameter_default("batch_size"),
        aug_policy: str = parameter_default("aug_policy"),
        pretrained: str = parameter_default("pretrained"),
        train_nodes: int = parameter_default("train_nodes"),
        promotion_tolerance: float = parameter_default("promotion_tolerance"),
        step_config: dict = {},  # noqa: B006 - kfp's default value, never mutated; not None: see parameter_default
    ) -> Outputs:
        resized = data_steps(
            options,
            data_root=data_root,
            source_uri=source_uri,
            source_sha256=source_sha256,
            annotations_uri=annotations_uri,
            annotations_sha256=annotations_sha256,
            grayscale=grayscale,
            split=split,
            seed=seed,
            previous_run_prefix=previous_run_prefix,
            image_size=image_size,
            preset=preset,
            resize_mode=resize_mode,
            resize_train_mode=resize_train_mode,
            ray_address=ray_address,
            step_config=step_config,
        )
        trained = train_steps(
            options,
            resized=resized,
            model_name=model,
            epochs=epochs,
            batch_size=batch_size,
            aug_policy=aug_policy,
            pretrained=pretrained,
            train_nodes=train_nodes,
            recipe=recipe,
            domain=domain,
            data_root=data_root,
            run_id=options.task_run_id,
            step_config=step_config,
        )
        # Promote's own prefix and latest.json name this run; the prefixes it records come from the chain of manifests.
        pr = promote(trained=trained, data_root=data_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, promotion_tolerance=promotion_tolerance)
        configure_task(pr, "promote", images.gpu, options, options.retry)
        if options.model_registry:
            pr.set_env_variable(modelregistry.REGISTRY_ENV, options.model_registry)
        return Outputs(**{name: pr.outputs[name] for name in Outputs._fields})

    imgpipe_pipeline.__doc__ = pipeline_docstring()
    return imgpipe_pipeline


def write_package(pipeline: dsl.graph_component.GraphComponent, package_path: str | Path) -> Path:
    """Compiles ``pipeline`` to a YAML package at ``package_path`` (folders made); returns its path."""
    path = Path(package_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, package_path=str(path))
    return path


def compile_pipeline(package_path: str | Path, options: PipelineOptions | None = None) -> Path:
    """Compiles the pipeline to a YAML package; returns its path."""
    return write_package(build_pipeline(options), package_path)


@functools.cache
def _default_build() -> dsl.graph_component.GraphComponent:
    return build_pipeline()


def __getattr__(name: str) -> Any:
    """``imgpipe_pipeline``, the default build, for ``kfp dsl compile --py pipelines/imgpipe_pipeline.py`` and imports.

    Built on first use, not at import: kfp calls ``inspect.stack()`` for each task's
    settings, and under an import's frames that took about 10 s of a compile (2 s outside).
    """
    if name == "imgpipe_pipeline":
        return _default_build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "imgpipe_pipeline"])
