"""``imgpipe run``: the Kubeflow pipeline end to end on this machine, through ``kfp.local``.

    result = run_local(load_local_config("configs/local.yaml")); print(result.summary())

How it works in detail: docs/internals/kubeflow.md, "imgpipe.local.run".
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from imgpipe import contract, storage
from imgpipe.config import config_from_dict, config_to_dict
from imgpipe.data.sources import SOURCE_LOCAL_ENV
from imgpipe.kfp import preflight
from imgpipe.local.containers import docker_runner_for, engine_for
from imgpipe.local.names import DEFAULT_WORKDIR, STORE_DIR
from imgpipe.local.progress import step_progress
from imgpipe.local.result import LocalRunResult, collect_result
from imgpipe.local.s3 import local_s3_server
from imgpipe.local.settings import Layers, parameter_fields
from imgpipe.step_table import STEPS
from imgpipe.stepio.publish import with_promotion

__all__ = [
    "LOCAL_PARAMS",
    "LOCAL_STEP_CONFIG",
    "LocalRunConfig",
    "load_local_config",
    "STORE_DIR",
    "local_s3_server",
    "run_local",
]

log = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")
# Pipeline parameters that make a laptop run finish in minutes on two cores: small
# images, few epochs, a local Ray (the pipeline's default is KubeRay); the rest (model,
# augmentation, ...) are the configs' defaults.
LOCAL_PARAMS: dict[str, Any] = {
    "image_size": 64,
    "epochs": 2,
    "batch_size": 32,
    "ray_address": "",
}
# Step config sections: loader workers as processes cost more than they give on two cores.
LOCAL_STEP_CONFIG: dict[str, dict[str, Any]] = {
    "train": {"num_workers": 0, "shuffle_buffer": 256, "warmup_fraction": 0.05},
}


@dataclass(frozen=True)
class LocalRunConfig:
    """Settings of a local run.

    Attributes:
        data_root: Where the steps write; ``None`` starts SeaweedFS on 127.0.0.1 over
            ``workdir/seaweedfs`` (it persists from run to run) and uses ``s3://imgpipe-local``.
        workdir: Local directory for the kfp local pipeline root (``kfp/``), copies of
            the results (``runs/``) and the local object store's data (``seaweedfs/``).
        source: Image archive URI; ``None`` generates the sample dataset into the store.
        annotations: Annotations archive URI (default: the sample dataset's, or none).
        classes: Sample dataset breeds.
        per_class: Sample dataset images per breed.
        seed: Sample dataset seed.
        off_centre: Sample dataset with off-centre objects in wide or tall images
            (:class:`imgpipe.data.synth.SynthConfig`), which a centre crop often loses.
        params: Pipeline parameters over :data:`LOCAL_PARAMS`; each one wins over the step
            config field it sets (``epochs`` over ``step_config["train"]["epochs"]``).
        step_config: Step config sections over :data:`LOCAL_STEP_CONFIG` (per field).
        runner: ``subprocess`` (each step a subprocess of this Python) or ``docker``
            (each step in its image; see the module docstring).
        shards: Download and clean as this many shard tasks and a merge (``PipelineOptions.shards``).
    """

    data_root: str | None = None
    workdir: str = DEFAULT_WORKDIR
    source: str | None = None
    annotations: str | None = None
    classes: int = 12
    per_class: int = 60
    seed: int = 0
    off_centre: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    step_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    runner: str = "subprocess"
    shards: int = 1

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")

    def pipeline_arguments(self) -> dict[str, Any]:
        """The pipeline parameters of this run, except the data locations.

        The local defaults lie under :attr:`params` and :attr:`step_config`; a parameter of
        :attr:`params` replaces the step field it sets (:func:`imgpipe.local.settings.parameter_fields`),
        so a component never sees a section that overrules it.
        """
        sections = {k: dict(v) for k, v in LOCAL_STEP_CONFIG.items()}
        for step, values in self.step_config.items():
            if step not in STEPS:
                raise ValueError(f"step_config has a section {step!r}; steps are {', '.join(STEPS)}")
            sections.setdefault(step, {}).update(values)
        fields = parameter_fields()
        for name in self.params:
            if name in fields:
                step, key = fields[name]
                sections.get(step, {}).pop(key, None)
        return {**LOCAL_PARAMS, **self.params, "step_config": sections}


def load_local_config(
    path: str | Path | Sequence[str | Path] | None,
    *,
    params: Sequence[str] = (),
    sets: Sequence[str] = (),
    **overrides: Any,
) -> LocalRunConfig:
    """A local run's settings: the defaults in code, then each YAML file in order, then the command line.

    Each file holds sections ``pipeline`` (parameters), ``synth`` and one per step; a later
    layer wins field by field, and a parameter and the step field it sets are one setting
    (:mod:`imgpipe.local.settings`): ``--param epochs=1`` wins over a file's ``train: {epochs: 3}``.

    Example::

        pipeline: {epochs: 1, image_size: 48}
        synth: {classes: 4, per_class: 10, off_centre: true}
        train: {max_steps_per_epoch: 5}

    Args:
        path: The YAML file, several of them, or ``None``.
        params: ``--param KEY=VALUE`` pairs: pipeline parameters (``step_config`` too).
        sets: ``--set SECTION.KEY=VALUE`` pairs: any field of a section.
        overrides: :class:`LocalRunConfig` fields that win over everything (``None`` ignored).

    Raises:
        ValueError: On a missing file, an unknown section, a section that is not a
            mapping, an unknown synth key or a malformed pair.
    """
    layers = Layers()
    for one in [] if path is None else [path] if isinstance(path, (str, Path)) else list(path):
        layers.add_file(one)
    layers.add_command_line(params, sets)
    values: dict[str, Any] = {**layers.synth, "params": layers.params, "step_config": layers.sections}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LocalRunConfig(**values)


def _synth_config(cfg: LocalRunConfig) -> Any:
    """The sample data set's :class:`~imgpipe.data.synth.SynthConfig` (its own checks run)."""
    from imgpipe.data.synth import SynthConfig

    values = {"classes": cfg.classes, "per_class": cfg.per_class, "seed": cfg.seed, "off_centre": cfg.off_centre}
    try:
        return config_from_dict(SynthConfig, values)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"synth: {exc}") from None


def _sample_dataset(cfg: LocalRunConfig, data_root: str) -> tuple[str, str]:
    if cfg.source is not None:
        return cfg.source, cfg.annotations or ""
    from imgpipe.data.synth import generate

    synth_dir = storage.join(data_root, "synth")
    # A progress bar only where it redraws in place: piped, its every frame would be a line.
    print(generate(synth_dir, _synth_config(cfg), progress=sys.stderr.isatty()).summary())
    return storage.join(synth_dir, "images.tar.gz"), cfg.annotations or storage.join(synth_dir, "annotations.tar.gz")


@contextlib.contextmanager
def _allow_local_files(*uris: str) -> Iterator[None]:
    """Lets the components read the local files of this run (sources, data root) while the block runs.

    A component refuses local paths unless its environment allows them (a run parameter
    must not read the pod's files: :mod:`imgpipe.data.sources`, :mod:`imgpipe.readpolicy`);
    here the operator named them, as ``--source``, ``--data-root`` or the data root the
    sample dataset was generated into.
    """
    if not any(uri and urlparse(os.fspath(uri)).scheme in ("", "file") for uri in uris):
        yield
        return
    saved = os.environ.get(SOURCE_LOCAL_ENV)
    os.environ[SOURCE_LOCAL_ENV] = "1"  # component subprocesses inherit it
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SOURCE_LOCAL_ENV, None)
        else:
            os.environ[SOURCE_LOCAL_ENV] = saved


def run_pipeline(
    workdir: Path,
    arguments: dict[str, Any],
    runner: Any = None,
    *,
    sweep: bool = False,
    audit: bool = False,
    shards: int = 1,
    log: Path | None = None,
) -> dict[str, Any]:
    """Runs one of the pipelines through kfp.local; with ``log``, kfp's output goes there and the terminal gets a line per step."""
    from kfp import local

    from imgpipe.kfp.package import import_pipelines

    pipelines = import_pipelines()

    local.init(
        runner=runner or local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        raise_on_error=True,
    )
    # Same pipeline as the cluster's, minus retries; the local runner ignores the rest.
    options = pipelines.PipelineOptions(retry=None, train_retry=None, shards=shards)
    if sweep:
        pipeline = pipelines.build_sweep_pipeline(pipelines.SweepOptions(pipeline=options))
    elif audit:
        pipeline = pipelines.build_audit_pipeline(pipelines.AuditOptions(pipeline=options))
    else:
        pipeline = pipelines.build_pipeline(options)
    with warnings.catch_warnings(), step_progress(log) if log is not None else contextlib.nullcontext():
        # The images are not Python images to kfp's eye, and resources/GPU are Kubernetes-only.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        task = pipeline(**arguments)
    return dict(task.outputs)


def copy_prefix(prefix: str, dest: Path) -> dict[str, str]:
    dest.mkdir(parents=True, exist_ok=True)
    copies = {}
    for obj in storage.list_objects(prefix):
        name = obj.uri[len(prefix.rstrip("/")) + 1 :]
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(obj.uri, target)
        copies[name] = str(target)
    return copies


def start_run(
    cfg: LocalRunConfig, stack: contextlib.ExitStack, workdir: Path, arguments: dict[str, Any], client: Any = None
) -> tuple[str, bool, Any]:
    """Sets up a local run inside ``stack``: store, sample data, local sources, runner (on ``client``, a docker run's engine).

    Fills the data locations (and a docker run's ``ray_address``) into ``arguments``.

    Returns:
        ``(data_root, own_store, runner)``; ``own_store``: the run's own S3 server (its data persists; the server stops with ``stack``).

    Raises:
        ValueError: Before anything starts, for a source that is missing or unreadable, or a malformed URI.
    """
    preflight.check_locations(cfg.source, cfg.annotations, cfg.data_root)
    own_store = cfg.data_root is None
    data_root = stack.enter_context(local_s3_server(workdir / STORE_DIR)) if own_store else storage.normalize_uri(cfg.data_root)
    source, annotations = _sample_dataset(cfg, data_root)
    stack.enter_context(_allow_local_files(source, annotations, data_root))
    runner = None
    if client is not None:
        runner, ray_address = docker_runner_for(client, stack, workdir)
        if not cfg.params.get("ray_address"):
            arguments["ray_address"] = ray_address
    arguments.update(data_root=data_root, source_uri=source, annotations_uri=annotations)
    return data_root, own_store, runner


def check_run(cfg: LocalRunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole configuration of a run, checked before anything starts or is written (:mod:`imgpipe.kfp.preflight`).

    Returns:
        The pipeline arguments, typed, and each section's config (``synth`` too when the sample data set is made).

    Raises:
        ValueError, TypeError: In one line naming the setting and what would do.
    """
    if isinstance(cfg.shards, bool) or not isinstance(cfg.shards, int) or cfg.shards < 1:
        raise ValueError(f"--shards must be a whole number >= 1, got {cfg.shards!r}")
    preflight.check_locations(cfg.source, cfg.annotations, cfg.data_root)
    synth = {"synth": _synth_config(cfg)} if cfg.source is None else {}
    arguments, configs = preflight.check_arguments(cfg.pipeline_arguments())
    return arguments, {**synth, **configs}


def _settings_text(arguments: Mapping[str, Any], configs: Mapping[str, Any]) -> str:
    """The resolved configuration as YAML: the pipeline's parameters, then every section's whole config (as kept at rest)."""
    doc = {"pipeline": {k: v for k, v in arguments.items() if k != "step_config"}, **{k: config_to_dict(c) for k, c in configs.items()}}
    return yaml.safe_dump(storage.redact_value(doc), sort_keys=False)


def _announce(log: Path | None, settings: Path, arguments: Mapping[str, Any], configs: Mapping[str, Any]) -> None:
    """The start of a run on the terminal: where the log is, and the settings that differ from the defaults."""
    if log is not None:
        print(f"imgpipe run: the whole log: {log}", file=sys.stderr)
    changed = preflight.changed_settings(arguments, configs)
    print(f"settings changed from the defaults (all of them: {settings}):", file=sys.stderr)
    for section, values in changed.items():
        print(f"  {section}: " + ", ".join(f"{k}={storage.redact_text(str(v))}" for k, v in values.items()), file=sys.stderr)
    sys.stderr.flush()


def run_local(cfg: LocalRunConfig, *, verbose: bool = False) -> LocalRunResult:
    """Runs the pipeline through ``kfp.local`` (see the module docstring); returns where things are.

    The whole configuration is checked first (:func:`check_run`): nothing starts and nothing is
    written before it passes. Unless ``verbose``, kfp's own output (each task's executor input
    and log) goes to ``workdir/logs/run-<time>.log`` and the terminal gets a line per step and
    per epoch. The resolved settings are written beside the log, and beside the outputs
    (``workdir/runs/<run id>/settings.yaml``).

    Raises:
        ValueError, TypeError: For a setting the check refuses (before anything starts).
        StepFailed: If a step fails: its name and its own reason (the traceback is in the log).
        RuntimeError: If the local S3 server cannot start.
    """
    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments, configs = check_run(cfg)
    with contextlib.ExitStack() as stack:
        client = engine_for(cfg.runner, cfg.data_root, stack)  # a docker run with no engine: one line, nothing written
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        log = None if verbose else workdir / "logs" / f"{stamp}.log"
        settings = workdir / "logs" / f"{stamp}.yaml"
        text = _settings_text(arguments, configs)
        storage.write_text(str(settings), text)
        _announce(log, settings, arguments, configs)
        data_root, own_store, runner = start_run(cfg, stack, workdir, arguments, client)
        outputs = run_pipeline(workdir, arguments, runner, shards=cfg.shards, log=log)
        run_id = outputs["model"].metadata["prefix"].rstrip("/").split("/")[-2]
        copies = copy_prefix(storage.join(data_root, "runs", run_id, "train"), workdir / "runs" / run_id / "train") if own_store else {}
        result = collect_result(run_id, data_root, outputs, shards=cfg.shards, copies=copies, seconds=0.0)
        result.store_dir = str(workdir / STORE_DIR) if own_store else ""
    storage.write_text(str(workdir / "runs" / run_id / "settings.yaml"), text)
    if result.promotion is not None and contract.REPORT in copies:
        page = Path(copies[contract.REPORT])
        storage.write_text(str(page), with_promotion(page.read_text(), result.promotion["promoted"], result.promotion["reason"]))
    result.seconds = round(time.monotonic() - started, 1)
    return result
