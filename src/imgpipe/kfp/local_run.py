"""``imgpipe run``: the Kubeflow pipeline end to end on this machine, through ``kfp.local``.

    result = run_local(load_local_config("configs/local.yaml")); print(result.summary())

How it works in detail: docs/internals.md, "imgpipe.kfp.local_run".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imgpipe import contract, storage
from imgpipe.config import check_sections, read_config_file
from imgpipe.data.sharding import Shard
from imgpipe.data.sources import SOURCE_LOCAL_ENV
from imgpipe.kfp.local_containers import docker_runner_for, engine_for
from imgpipe.kfp.local_s3 import local_s3_server
from imgpipe.kfp.progress import step_progress
from imgpipe.kfp.shards import SHARDS_DIR
from imgpipe.registry import STEPS

__all__ = [
    "LOCAL_PARAMS",
    "LOCAL_STEP_CONFIG",
    "LocalRunConfig",
    "LocalRunResult",
    "SYNTH_KEYS",
    "load_local_config",
    "STORE_DIR",
    "local_s3_server",
    "run_local",
]

log = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")
# Under the workdir: the local object store's data (SeaweedFS), kept from run to run.
STORE_DIR = "seaweedfs"
# Pipeline parameters that make a laptop run finish in minutes on two cores: small
# images, few epochs, a local Ray (the pipeline's default is KubeRay); the rest (model,
# augmentation, ...) are the configs' defaults.
LOCAL_PARAMS: dict[str, Any] = {
    "image_size": 64,
    "epochs": 2,
    "batch_size": 32,
    "ray_address": "",
}
# The synth section's keys: the SynthConfig fields a local run passes on.
SYNTH_KEYS = ("classes", "per_class", "seed", "off_centre")
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
        params: Pipeline parameters over :data:`LOCAL_PARAMS`.
        step_config: Step config sections over :data:`LOCAL_STEP_CONFIG` (per field).
        runner: ``subprocess`` (each step a subprocess of this Python) or ``docker``
            (each step in its image; see the module docstring).
        shards: Download and clean as this many shard tasks and a merge (``PipelineOptions.shards``).
    """

    data_root: str | None = None
    workdir: str = "./.data"
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
        """The pipeline parameters of this run, except the data locations."""
        sections = {k: dict(v) for k, v in LOCAL_STEP_CONFIG.items()}
        for step, values in self.step_config.items():
            if step not in STEPS:
                raise ValueError(f"step_config has a section {step!r}; steps are {', '.join(STEPS)}")
            sections.setdefault(step, {}).update(values)
        return {**LOCAL_PARAMS, **self.params, "step_config": sections}


@dataclass
class LocalRunResult:
    """Where a local run left its results.

    Attributes:
        run_id: The kfp local run id (the ``runs/{run_id}/`` segment of every prefix).
        prefixes: Step name -> committed output prefix (in the store the run used).
        reports: Step name -> its manifest.
        artifacts: kfp output name -> local file (model, metrics, confusion, report).
        metadata: kfp output name -> the artifact's metadata (metrics, confusion matrix).
        copies: Local copies of the train output, when the store was the run's own.
        promotion: The promotion gate's decision (:class:`imgpipe.steps.promote.Decision` as a dict).
        reconciled: Whether every archive member ended in exactly one place.
        seconds: Wall time of the whole run.
    """

    run_id: str
    prefixes: dict[str, str]
    reports: dict[str, dict[str, Any]]
    artifacts: dict[str, str]
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    reconciled: bool = False
    seconds: float = 0.0
    promotion: dict[str, Any] | None = None

    def summary(self) -> str:
        """The lines ``imgpipe run`` prints at the end."""
        r = self.reports
        lines = [f"{step}: {m['inputs']} in -> {m['outputs']} out, {m['rejected']} rejected -> {self.prefixes[step]}" for step, m in r.items()]
        dl, cl, rs = r["download"], r["clean"], r["resize"]
        lines.append(
            f"\nrun {self.run_id} finished in {self.seconds:.1f}s: {dl['inputs']} archive members -> "
            f"{rs['outputs']} training images, {dl['rejected'] + cl['rejected'] + rs['rejected']} rejected "
            f"({'reconciled' if self.reconciled else 'NOT RECONCILED'})"
        )
        metrics = (r.get("train") or {}).get("metrics") or {}
        if metrics.get("val_accuracy") is not None:
            lines.append(f"validation accuracy {metrics['val_accuracy']:.3f}, macro-F1 {metrics['val_macro_f1']:.3f}")
        if self.promotion is not None:
            verdict = "promoted" if self.promotion["promoted"] else "NOT promoted (latest unchanged)"
            lines.append(f"promotion: {verdict}: {self.promotion['reason']}")
        local = self.copies or {}
        for name in (contract.REPORT, contract.MODEL, contract.METRICS):
            lines.append(f"{name + ':':14} {local.get(name) or storage.join(self.prefixes['train'], name)}")
        lines.append(f"{'kfp outputs:':14} {Path(self.artifacts['model']).parents[1]} (model, metrics, confusion, report)")
        return "\n".join(lines)


def load_local_config(path: str | Path | Sequence[str | Path] | None, **overrides: Any) -> LocalRunConfig:
    """Reads a local run's YAML: sections ``pipeline`` (parameters), ``synth`` and one per step.

    Several files are read in order and merged field by field, a later file winning (a
    run's settings, then a sweep winner's ``train:`` recipe).

    Example::

        pipeline: {epochs: 1, image_size: 48}
        synth: {classes: 4, per_class: 10, off_centre: true}
        train: {max_steps_per_epoch: 5}

    Args:
        path: The YAML file, several of them, or ``None``.
        overrides: :class:`LocalRunConfig` fields that win over the file (``None`` ignored).

    Raises:
        ValueError: On a missing file, an unknown section, a section that is not a
            mapping or an unknown synth key.
    """
    doc: dict[str, dict[str, Any]] = {}
    for one in [] if path is None else [path] if isinstance(path, (str, Path)) else list(path):
        loaded = read_config_file(one)
        check_sections(loaded, f"config file {one}")
        for section, values in loaded.items():
            if not isinstance(values, Mapping):
                raise ValueError(f"config file {one}: section {section!r} must hold a mapping of options")
            doc.setdefault(section, {}).update(values)
    synth = dict(doc.get("synth") or {})
    unknown = sorted(set(synth) - set(SYNTH_KEYS))
    if unknown:
        raise ValueError(f"synth section: unknown key(s) {', '.join(unknown)}; keys: {', '.join(SYNTH_KEYS)}")
    values: dict[str, Any] = {
        **synth,
        "params": dict(doc.get("pipeline") or {}),
        "step_config": {s: dict(doc[s]) for s in STEPS if doc.get(s)},
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LocalRunConfig(**values)


def _sample_dataset(cfg: LocalRunConfig, data_root: str) -> tuple[str, str]:
    if cfg.source is not None:
        return cfg.source, cfg.annotations or ""
    from imgpipe.data.synth import SynthConfig, generate

    synth_dir = storage.join(data_root, "synth")
    synth = SynthConfig(classes=cfg.classes, per_class=cfg.per_class, seed=cfg.seed, off_centre=cfg.off_centre)
    print(generate(synth_dir, synth).summary())
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


def start_run(cfg: LocalRunConfig, stack: contextlib.ExitStack, workdir: Path, arguments: dict[str, Any]) -> tuple[str, bool, Any]:
    """Sets up a local run inside ``stack``: engine, store, sample data, local sources, runner.

    Fills the data locations (and a docker run's ``ray_address``) into ``arguments``.

    Returns:
        ``(data_root, own_store, runner)``; ``own_store``: the run's own S3 server (its data persists; the server stops with ``stack``).
    """
    client = engine_for(cfg.runner, cfg.data_root, stack)
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


def run_local(cfg: LocalRunConfig, *, verbose: bool = False) -> LocalRunResult:
    """Runs the pipeline through ``kfp.local`` (see the module docstring); returns where things are.

    Unless ``verbose``, kfp's own output (each task's executor input and log) goes to
    ``workdir/logs/run-<time>.log`` and the terminal gets one line per step.

    Raises:
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    with contextlib.ExitStack() as stack:
        data_root, own_store, runner = start_run(cfg, stack, workdir, arguments)
        log = None if verbose else workdir / "logs" / time.strftime("run-%Y%m%d-%H%M%S.log")
        outputs = run_pipeline(workdir, arguments, runner, shards=cfg.shards, log=log)
        train_prefix = outputs["model"].metadata["prefix"]
        run_id = train_prefix.rstrip("/").split("/")[-2]
        prefixes = {step: storage.join(data_root, "runs", run_id, step) for step in STEPS}
        if cfg.shards > 1:
            prefixes["download"] = storage.join(data_root, "runs", run_id, SHARDS_DIR)
        reports = {step: _report(step, prefix, cfg.shards) for step, prefix in prefixes.items()}
        promotion = decision(storage.join(data_root, "runs", run_id, "promote"))
        copies = copy_prefix(prefixes["train"], workdir / "runs" / run_id / "train") if own_store else {}
    dl, cl, rs = reports["download"], reports["clean"], reports["resize"]
    reconciled = dl["inputs"] == cl["outputs"] + cl["rejected"] + dl["rejected"] and rs["inputs"] == cl["outputs"]
    return LocalRunResult(
        run_id=run_id,
        prefixes=prefixes,
        reports=reports,
        artifacts={name: artifact.path for name, artifact in outputs.items()},
        metadata={name: dict(artifact.metadata) for name, artifact in outputs.items()},
        copies=copies,
        reconciled=reconciled,
        seconds=round(time.monotonic() - started, 1),
        promotion=promotion,
    )


def _report(step: str, prefix: str, shards: int) -> dict[str, Any]:
    """A step's manifest; a sharded run's download is its shards' downloads, counted together."""
    if step != "download" or shards == 1:
        return contract.read_manifest(prefix, expect_step=step)
    parts = [contract.read_manifest(storage.join(prefix, Shard(i, shards).name, "download"), expect_step=step) for i in range(shards)]
    return {"step": step, "shards": shards, **{k: sum(int(m[k]) for m in parts) for k in ("inputs", "outputs", "rejected")}}


def decision(prefix: str) -> dict[str, Any] | None:
    """The promotion decision of a run, when the gate committed one."""
    from imgpipe.steps.promote import read_decision

    if not contract.is_committed(prefix):
        return None
    return dataclasses.asdict(read_decision(prefix))
