"""``imgpipe run``: the Kubeflow pipeline end to end on this machine, through ``kfp.local``.

    result = run_local(load_local_config("configs/local.yaml")); print(result.summary())

How it works in detail: docs/internals.md, "imgpipe.kfp.local_run".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imgpipe import contract, resources, storage
from imgpipe.config import check_sections, read_config_file
from imgpipe.data.sources import SOURCE_LOCAL_ENV
from imgpipe.kfp.artifacts import LATEST, read_latest

__all__ = [
    "STEPS",
    "LOCAL_PARAMS",
    "LOCAL_STEP_CONFIG",
    "LocalRunConfig",
    "LocalRunResult",
    "SweepRunResult",
    "SYNTH_KEYS",
    "load_local_config",
    "local_s3_server",
    "moto_s3_server",
    "container_writable",
    "container_env",
    "docker_runner",
    "run_local",
    "run_sweep",
    "run_audit",
    "AuditRunResult",
]

log = logging.getLogger(__name__)

STEPS = ("download", "clean", "resize", "train")
RUNNERS = ("subprocess", "docker")
LOCAL_BUCKET = "imgpipe-local"
# The S3 settings a step container gets from this process, as a pod gets them from the
# imgpipe-s3-config ConfigMap and the imgpipe-s3-credentials Secret.
S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
# The uid the images run as (docker/Dockerfile); its group is 0.
CONTAINER_USER = "10001"
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
        data_root: Where the steps write; ``None`` starts a moto S3 server on 127.0.0.1
            and uses ``s3://imgpipe-local``.
        workdir: Local directory for the kfp local pipeline root (``kfp/``), copies of
            the results (``runs/``), and nothing else.
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


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Runs moto's S3 server as a process on 127.0.0.1 and points this process (and its children) at it.

    The server speaks the real S3 HTTP API, so everything that talks to it, boto3 and
    pyarrow's own S3 client alike, goes through signing, multipart uploads and
    pagination as against a real store. The environment is restored on exit.

    Yields:
        The endpoint URL, ``http://127.0.0.1:PORT``.

    Raises:
        RuntimeError: If moto is not installed or the server does not come up.
    """
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "the local object store needs moto's S3 server: pip install 'imgpipe[local]', "
            "or pass --data-root DIR to write to a local directory instead"
        ) from exc
    port = resources.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in names}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local S3 server (moto) did not start on 127.0.0.1") from None
                time.sleep(0.2)
        # Component subprocesses inherit these, as pods get them from the Secret and ConfigMap.
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="local",
            AWS_SECRET_ACCESS_KEY="local",
            AWS_DEFAULT_REGION="us-east-1",
        )
        storage.configure_s3()  # forget clients made for another endpoint
        yield f"http://127.0.0.1:{port}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.configure_s3()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def local_s3_server(bucket: str = LOCAL_BUCKET) -> Iterator[str]:
    """:func:`moto_s3_server` with ``bucket`` created in it.

    Yields:
        ``s3://bucket``.
    """
    with moto_s3_server():
        storage.s3_client().create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"


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


def _run_pipeline(workdir: Path, arguments: dict[str, Any], runner: Any = None, *, sweep: bool = False, audit: bool = False) -> dict[str, Any]:
    from kfp import local

    from imgpipe.kfp.package import import_pipelines

    pipelines = import_pipelines()

    local.init(
        runner=runner or local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        raise_on_error=True,
    )
    # Same pipeline as the cluster's, minus retries; the local runner ignores the rest.
    options = pipelines.PipelineOptions(retry=None, train_retry=None)
    if sweep:
        pipeline = pipelines.build_sweep_pipeline(pipelines.SweepOptions(pipeline=options))
    elif audit:
        pipeline = pipelines.build_audit_pipeline(pipelines.AuditOptions(pipeline=options))
    else:
        pipeline = pipelines.build_pipeline(options)
    with warnings.catch_warnings():
        # The images are not Python images to kfp's eye, and resources/GPU are Kubernetes-only.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        task = pipeline(**arguments)
    return dict(task.outputs)


def container_env() -> dict[str, str]:
    """The S3 settings (:data:`S3_ENV`) of this process that a step container gets."""
    return {k: os.environ[k] for k in S3_ENV if os.environ.get(k)}


def _check_images(client: Any, images: Any) -> None:
    import docker

    for kind in ("cpu", "ray", "gpu"):
        name = getattr(images, kind)
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            raise RuntimeError(f"the {kind} image {name} is not in the engine: build it first (make images)") from None


def _check_network(client: Any, image: str, env: Mapping[str, str]) -> None:
    """Fails clearly when step containers cannot reach the object store this run uses.

    ``--network host`` joins the network namespace of the *engine*: an engine started
    outside ours (a Docker daemon, a Podman service outside scripts/in-loopback-netns)
    cannot see a server on our 127.0.0.1.
    """
    from urllib.parse import urlparse

    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    probe = f"import socket; socket.create_connection(({url.hostname!r}, {port}), timeout=5).close()"
    try:
        client.containers.run(image, ["python", "-c", probe], network_mode="host", user=CONTAINER_USER, remove=True)
    except Exception as exc:
        raise RuntimeError(
            f"a step container cannot reach the object store at {endpoint}: the engine's host network is not "
            "this process's. Start the engine in this network namespace (make run-containers does: "
            f"scripts/in-loopback-netns scripts/with-engine ...). ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _engine_for(cfg: LocalRunConfig, stack: contextlib.ExitStack) -> Any:
    """The engine client of a docker run (checked before any work starts), else ``None``."""
    if cfg.runner != "docker":
        return None
    from imgpipe.containers.engine import connect

    if cfg.data_root is not None and not storage.normalize_uri(cfg.data_root).startswith("s3://"):
        raise ValueError(
            f"--runner docker needs an S3 data root: step containers cannot see {cfg.data_root} (omit --data-root to use the run's own S3 server)"
        )
    return stack.enter_context(contextlib.closing(connect()))


@contextlib.contextmanager
def container_writable(pipeline_root: Path) -> Iterator[Path]:
    """Makes a kfp pipeline root writable by step containers while the block runs.

    The images run as uid 10001 in group 0 and write task outputs under the pipeline
    root, which ``kfp.local`` mounts and partly creates from this process: the root and
    everything created meanwhile is group-writable (umask 002), and owned by group 0
    when this process runs as root.
    """
    pipeline_root.mkdir(parents=True, exist_ok=True)
    os.chmod(pipeline_root, 0o775 if os.getuid() == 0 else 0o777)
    previous = os.umask(0o002)
    try:
        yield pipeline_root
    finally:
        os.umask(previous)


def docker_runner(env: Mapping[str, str]) -> Any:
    """The ``kfp.local.DockerRunner`` of imgpipe: host network, uid 10001, ``env`` for every task."""
    from kfp import local

    return local.DockerRunner(network_mode="host", user=CONTAINER_USER, environment={**env, "PYTHONUNBUFFERED": "1"})


def _docker_runner(client: Any, stack: contextlib.ExitStack, workdir: Path) -> tuple[Any, str]:
    """The DockerRunner of this run and the Jobs API address of its Ray cluster."""
    from imgpipe.containers.catalog import ImageSet
    from imgpipe.containers.raycluster import RayClusterSpec, ray_cluster

    images = ImageSet.from_env()
    _check_images(client, images)
    env = container_env()
    _check_network(client, images.cpu, env)
    stack.enter_context(container_writable(workdir / "kfp"))
    print(f"ray: starting a head and a worker container from {images.ray}")
    cluster = stack.enter_context(ray_cluster(client, RayClusterSpec(image=images.ray, env=env)))
    print(f"ray: 2 nodes up, Jobs API at {cluster.address} (token auth)")
    # The cluster is this run's own: the resize container may submit to it and to nothing else.
    allowed = {"IMGPIPE_RAY_CLUSTERS": cluster.address}
    return docker_runner({**env, **cluster.submitter_env, **allowed}), cluster.address


def _copy_prefix(prefix: str, dest: Path) -> dict[str, str]:
    dest.mkdir(parents=True, exist_ok=True)
    copies = {}
    for obj in storage.list_objects(prefix):
        name = obj.uri[len(prefix.rstrip("/")) + 1 :]
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(obj.uri, target)
        copies[name] = str(target)
    return copies


# The local run's record of its current model, in the workdir: the run's own S3 server is
# gone after each run, so the model a promotion chose is restored into the next one from the
# local copy of its train output, for the next run's promotion gate to score against.
CURRENT = "current.json"


def _restore_current(workdir: Path, data_root: str) -> str | None:
    """Puts the last promoted model back into a fresh store and names it in ``latest.json``; its prefix, if any."""
    path = workdir / CURRENT
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    local, prefix = Path(record["local_train"]), record["train"]
    if not (local / contract.SUCCESS).exists():
        log.warning("local run: the current model's copy %s is gone; this run's model will be the first", local)
        return None
    files = sorted((f for f in local.rglob("*") if f.is_file()), key=lambda f: f.name == contract.SUCCESS)  # _SUCCESS last
    for f in files:
        storage.upload_file(f, storage.join(prefix, f.relative_to(local).as_posix()))
    latest = {"run_id": record["run_id"], "finished_at": record["finished_at"], "prefixes": {"train": prefix}}
    storage.write_bytes(storage.join(data_root, LATEST), json.dumps(latest, indent=2).encode())
    return prefix


def _keep_current(workdir: Path, data_root: str, run_id: str, local_train: Path) -> None:
    """After a promotion in the run's own store, records the local copy of its train output as the current model."""
    latest = read_latest(data_root) or {}
    if latest.get("run_id") != run_id:
        return
    record = {"run_id": run_id, "finished_at": latest.get("finished_at"), "train": latest["prefixes"]["train"], "local_train": str(local_train)}
    tmp = workdir / (CURRENT + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(workdir / CURRENT)


def _start(cfg: LocalRunConfig, stack: contextlib.ExitStack, workdir: Path, arguments: dict[str, Any]) -> tuple[str, bool, Any]:
    """Sets up a local run inside ``stack``: engine, store, sample data, local sources, runner.

    Fills the data locations (and a docker run's ``ray_address``) into ``arguments``.

    Returns:
        ``(data_root, own_store, runner)``; ``own_store``: the run's own S3 server, gone after ``stack``.
    """
    client = _engine_for(cfg, stack)
    own_store = cfg.data_root is None
    data_root = stack.enter_context(local_s3_server()) if own_store else storage.normalize_uri(cfg.data_root)
    source, annotations = _sample_dataset(cfg, data_root)
    stack.enter_context(_allow_local_files(source, annotations, data_root))
    runner = None
    if client is not None:
        runner, ray_address = _docker_runner(client, stack, workdir)
        if not cfg.params.get("ray_address"):
            arguments["ray_address"] = ray_address
    arguments.update(data_root=data_root, source_uri=source, annotations_uri=annotations)
    return data_root, own_store, runner


def run_local(cfg: LocalRunConfig) -> LocalRunResult:
    """Runs the pipeline through ``kfp.local`` (see the module docstring); returns where things are.

    Raises:
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    with contextlib.ExitStack() as stack:
        data_root, own_store, runner = _start(cfg, stack, workdir, arguments)
        if own_store:
            _restore_current(workdir, data_root)
        outputs = _run_pipeline(workdir, arguments, runner)
        train_prefix = outputs["model"].metadata["prefix"]
        run_id = train_prefix.rstrip("/").split("/")[-2]
        prefixes = {step: storage.join(data_root, "runs", run_id, step) for step in STEPS}
        reports = {step: contract.read_manifest(prefix, expect_step=step) for step, prefix in prefixes.items()}
        promotion = _decision(storage.join(data_root, "runs", run_id, "promote"))
        copies = _copy_prefix(prefixes["train"], workdir / "runs" / run_id / "train") if own_store else {}
        if own_store:
            _keep_current(workdir, data_root, run_id, workdir / "runs" / run_id / "train")
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


def _decision(prefix: str) -> dict[str, Any] | None:
    """The promotion decision of a run, when the gate committed one."""
    from imgpipe.steps.promote import read_decision

    if not contract.is_committed(prefix):
        return None
    return dataclasses.asdict(read_decision(prefix))


@dataclass
class SweepRunResult:
    """Where a local sweep left its results.

    Attributes:
        run_id: The kfp local run id.
        prefixes: ``compare`` and ``train-{branch}`` -> committed prefix (in the store the run used).
        comparison: The compare step's ``comparison.json``.
        artifacts: kfp output name -> local file (report, metrics, winner).
        copies: Local copies (name -> file) of the comparison and the branches' metrics and
            reports, when the store was the run's own.
        seconds: Wall time of the whole run.
    """

    run_id: str
    prefixes: dict[str, str]
    comparison: dict[str, Any]
    artifacts: dict[str, str]
    copies: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The lines ``imgpipe sweep`` prints at the end: the ranking, the flags, where the winner is."""
        c = self.comparison
        key = c["ranked_by"][0]
        state = "imbalanced" if c["imbalanced"] else "balanced"
        lines = [
            f"sweep {self.run_id}: {len(c['branches'])} branches ranked by {key} (classes {state}, "
            f"largest/smallest {c['imbalance']:.2f}) in {self.seconds:.1f}s"
        ]
        for row in c["branches"]:
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "base settings"
            figures = ", ".join(
                f"{k} {row[k]:.3f}{_spread(row, k)}" for k in ("val_macro_f1", "val_pr_auc", "val_accuracy") if row.get(k) is not None
            )
            seeds = f" (mean of {row['seeds']} seeds)" if row.get("seeds", 1) > 1 else ""
            lines.append(f"{row['rank']:>3}. {row['branch']} ({settings}): {figures}{seeds}")
            lines += [f"       {f['kind']}: {f['message']}" for f in row["flags"]]
        local = self.copies or {}
        compare_prefix = self.prefixes["compare"]
        for name in ("comparison.html", "winner.yaml"):
            lines.append(f"{name + ':':17} {local.get(f'compare/{name}') or storage.join(compare_prefix, name)}")
        return "\n".join(lines)


def _spread(row: Mapping[str, Any], key: str) -> str:
    """`` ±std`` of ``key`` over a branch's seeds (compare's ``spread``), or nothing for one seed."""
    spread = (row.get("spread") or {}).get(key)
    return f" ±{spread['std']:.3f}" if spread else ""


def run_sweep(cfg: LocalRunConfig, grid: Sequence[Mapping[str, Any]] | None, axes: Mapping[str, Sequence[Any]] | None) -> SweepRunResult:
    """Runs the sweep pipeline through ``kfp.local`` on the run's data; returns the comparison.

    Every branch's config is checked (:func:`imgpipe.sweep.plan`) before anything runs.
    ``epochs`` is the sweep's default (:data:`imgpipe.sweep.SWEEP_EPOCHS`) unless the
    parameters or the ``train`` section set it.

    Raises:
        ValueError, TypeError: For a grid or a branch config that is refused.
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    from imgpipe import sweep

    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    if "epochs" not in cfg.params:
        arguments.pop("epochs")  # the laptop run's 2 epochs are too few to read a trend from
    named = {
        "model": arguments.get("model"),
        "epochs": arguments.get("epochs"),
        "batch_size": arguments.get("batch_size"),
        "aug_policy": arguments.get("aug_policy"),
        "resume": True,
    }
    sweep.plan("", grid, axes, arguments["step_config"], **named)  # the edge: fail before any data moves
    arguments.update(sweep.grid_parameters(grid, axes))
    with contextlib.ExitStack() as stack:
        data_root, own_store, runner = _start(cfg, stack, workdir, arguments)
        outputs = _run_pipeline(workdir, arguments, runner, sweep=True)
        compare_prefix = storage.normalize_uri(outputs["winner"].metadata["prefix"])
        run_id = compare_prefix.rstrip("/").split("/")[-2]
        manifest = contract.read_manifest(compare_prefix, expect_step="compare")
        prefixes = {"compare": compare_prefix}
        prefixes.update({sweep.branch_step(b): p for b, p in manifest["upstream"]["branches"].items()})
        comparison = json.loads(storage.read_bytes(storage.join(compare_prefix, "comparison.json")))
        copies = _copy_sweep(prefixes, workdir / "runs" / run_id) if own_store else {}
    return SweepRunResult(
        run_id=run_id,
        prefixes=prefixes,
        comparison=comparison,
        artifacts={name: artifact.path for name, artifact in outputs.items()},
        copies=copies,
        seconds=round(time.monotonic() - started, 1),
    )


@dataclass
class AuditRunResult:
    """Where a local label audit left its results.

    Attributes:
        run_id: The kfp local run id.
        prefix: The committed audit output (in the store the run used).
        manifest: Its manifest (counts in ``extra``).
        copies: Local copies of the audit's files, when the store was the run's own.
        seconds: Wall time of the whole run.
    """

    run_id: str
    prefix: str
    manifest: dict[str, Any]
    copies: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The lines ``imgpipe audit`` prints at the end."""
        extra = self.manifest.get("extra") or {}
        lines = [
            f"audit {self.run_id}: {extra.get('issues')} of {extra.get('images')} train images have a suspect label "
            f"({extra.get('folds')} folds, cleanlab {extra.get('filter_by')}) in {self.seconds:.1f}s"
        ]
        worst = list((extra.get("by_class") or {}).items())[:5]
        if worst:
            lines.append("most suspects in: " + ", ".join(f"{c} ({n})" for c, n in worst))
        from imgpipe.steps.audit import LABEL_ISSUES, LABEL_ISSUES_HTML, LABEL_OVERRIDES

        for name in (LABEL_ISSUES_HTML, LABEL_OVERRIDES, LABEL_ISSUES):
            lines.append(f"{name + ':':22} {self.copies.get(name) or storage.join(self.prefix, name)}")
        lines.append("review label_overrides.csv, then clean with --set label_overrides=<its URI>")
        return "\n".join(lines)


def run_audit(cfg: LocalRunConfig, folds: int | None = None) -> AuditRunResult:
    """Runs the audit pipeline through ``kfp.local`` on the run's data (K folds of its train split).

    Raises:
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    if folds is not None:
        arguments["folds"] = folds
    with contextlib.ExitStack() as stack:
        data_root, own_store, runner = _start(cfg, stack, workdir, arguments)
        outputs = _run_pipeline(workdir, arguments, runner, audit=True)
        prefix = storage.normalize_uri(outputs["overrides"].metadata["prefix"])
        run_id = prefix.rstrip("/").split("/")[-2]
        manifest = contract.read_manifest(prefix, expect_step="audit")
        copies = _copy_prefix(prefix, workdir / "runs" / run_id / "audit") if own_store else {}
    return AuditRunResult(run_id=run_id, prefix=prefix, manifest=manifest, copies=copies, seconds=round(time.monotonic() - started, 1))


def _copy_sweep(prefixes: Mapping[str, str], dest: Path) -> dict[str, str]:
    """The comparison whole, and each branch's small files (not its weights and checkpoint)."""
    copies = {f"compare/{k}": v for k, v in _copy_prefix(prefixes["compare"], dest / "compare").items()}
    for step, prefix in prefixes.items():
        if step == "compare":
            continue
        for name in (contract.METRICS, contract.REPORT, contract.CONFIG):
            target = dest / step / name
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(storage.join(prefix, name), target)
            copies[f"{step}/{name}"] = str(target)
    return copies
