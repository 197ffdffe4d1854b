"""``imgpipe run``: the Kubeflow pipeline end to end on this machine, through ``kfp.local``.

The pipeline function that ``imgpipe compile`` compiles runs here unchanged under
``kfp.local.SubprocessRunner(use_venv=False)``: every component is a subprocess of this
venv's Python, executing the same component source a pod would, with the resize step
on a local Ray. Only the retries are off (a local failure is not transient); the
Kubernetes-only settings (Secret as env, GPU, tolerations, ``/dev/shm``) stay in the
pipeline and ``kfp.local`` ignores them.

The object store is a real S3 API: unless ``data_root`` names one, a moto S3 server is
started on 127.0.0.1 for the run (``moto[server]``, the ``local`` extra), and the
components reach it through ``AWS_ENDPOINT_URL`` and ``AWS_*`` credentials in their
environment, exactly as pods get them from the ``imgpipe-s3-config`` ConfigMap and the
``imgpipe-s3-credentials`` Secret. So the local run exercises the same ``s3://`` code
paths as a cluster. That server keeps objects in memory, so before it stops the run's
train output is copied to ``{workdir}/runs/{run id}/train/``; the kfp artifacts
(model, metrics, confusion matrix, HTML report) are files under ``{workdir}/kfp/``.
``data_root`` may instead be a directory (``file://``) or an existing bucket
(``s3://...`` with ``AWS_ENDPOINT_URL`` set), and then nothing is copied.

With ``runner="docker"`` the same pipeline runs under ``kfp.local.DockerRunner``: each
task in its kind's image (``make images``) as uid 10001, through the engine
``DOCKER_HOST`` names, on the host network (inside ``scripts/in-loopback-netns``: one
loopback-only namespace shared with the S3 server). Resize submits to a Ray cluster of
two containers from the ``ray`` image (:mod:`imgpipe.containers.raycluster`) through
its Jobs API, with token auth on. Containers see only the S3 store (a ``file://``
data root is refused) and the kfp pipeline root, which is mounted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imgpipe import contract, resources, storage
from imgpipe.config import check_sections, read_config_file
from imgpipe.sources import SOURCE_LOCAL_ENV

__all__ = [
    "STEPS",
    "LOCAL_PARAMS",
    "LOCAL_STEP_CONFIG",
    "LocalRunConfig",
    "LocalRunResult",
    "SYNTH_KEYS",
    "load_local_config",
    "local_s3_server",
    "moto_s3_server",
    "container_writable",
    "container_env",
    "docker_runner",
    "run_local",
]

log = logging.getLogger(__name__)

STEPS = ("download", "clean", "resize", "train")
RUNNERS = ("subprocess", "docker")
LOCAL_BUCKET = "imgpipe-local"
# The S3 settings a step container gets from this process, as a pod gets them from the
# imgpipe-s3-config ConfigMap and the imgpipe-s3-credentials Secret.
S3_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)  # fmt: skip
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
    "train": {"num_workers": 0, "shuffle_buffer": 256, "warmup_epochs": 0.5},
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
            (:class:`imgpipe.synth.SynthConfig`), which a centre crop often loses.
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

    def summary(self) -> str:
        """The lines ``imgpipe run`` prints at the end."""
        r = self.reports
        lines = [
            f"{step}: {m['inputs']} in -> {m['outputs']} out, {m['rejected']} rejected -> {self.prefixes[step]}"
            for step, m in r.items()
        ]
        dl, cl, rs = r["download"], r["clean"], r["resize"]
        lines.append(
            f"\nrun {self.run_id} finished in {self.seconds:.1f}s: {dl['inputs']} archive members -> "
            f"{rs['outputs']} training images, {dl['rejected'] + cl['rejected'] + rs['rejected']} rejected "
            f"({'reconciled' if self.reconciled else 'NOT RECONCILED'})"
        )
        metrics = (r.get("train") or {}).get("metrics") or {}
        if metrics.get("val_accuracy") is not None:
            lines.append(f"validation accuracy {metrics['val_accuracy']:.3f}, macro-F1 {metrics['val_macro_f1']:.3f}")
        local = self.copies or {}
        for name in (contract.REPORT, contract.MODEL, contract.METRICS):
            lines.append(f"{name + ':':14} {local.get(name) or storage.join(self.prefixes['train'], name)}")
        lines.append(f"{'kfp outputs:':14} {Path(self.artifacts['model']).parents[1]} (model, metrics, confusion, report)")
        return "\n".join(lines)


def load_local_config(path: str | Path | None, **overrides: Any) -> LocalRunConfig:
    """Reads a local run's YAML: sections ``pipeline`` (parameters), ``synth`` and one per step.

    Example::

        pipeline: {epochs: 1, image_size: 48}
        synth: {classes: 4, per_class: 10, off_centre: true}
        train: {max_steps_per_epoch: 5}

    Args:
        path: The YAML file, or ``None``.
        overrides: :class:`LocalRunConfig` fields that win over the file (``None`` ignored).

    Raises:
        ValueError: On a missing file, an unknown section or an unknown synth key.
    """
    doc: dict[str, Any] = {}
    if path is not None:
        doc = read_config_file(path)
        check_sections(doc, f"config file {path}")
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
        storage.S3Backend.client().create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"


def _sample_dataset(cfg: LocalRunConfig, data_root: str) -> tuple[str, str]:
    if cfg.source is not None:
        return cfg.source, cfg.annotations or ""
    from imgpipe.synth import SynthConfig, generate

    synth_dir = storage.join(data_root, "synth")
    synth = SynthConfig(classes=cfg.classes, per_class=cfg.per_class, seed=cfg.seed, off_centre=cfg.off_centre)
    print(generate(synth_dir, synth).summary())
    return storage.join(synth_dir, "images.tar.gz"), cfg.annotations or storage.join(synth_dir, "annotations.tar.gz")


@contextlib.contextmanager
def _allow_local_sources(*uris: str) -> Iterator[None]:
    """Lets the download component read the local sources of this run while the block runs.

    The component refuses local paths unless its environment allows them (a run
    parameter must not read the pod's files); here the operator named them, either as
    ``--source`` or as the data root the sample dataset was generated into.
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


def _run_pipeline(workdir: Path, arguments: dict[str, Any], runner: Any = None) -> dict[str, Any]:
    from kfp import local

    from imgpipe.kfp_client import import_pipelines

    pipelines = import_pipelines()

    local.init(
        runner=runner or local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        raise_on_error=True,
    )
    # Same pipeline as the cluster's, minus retries; the local runner ignores the rest.
    pipeline = pipelines.build_pipeline(pipelines.PipelineOptions(retry=None, train_retry=None))
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
            f"--runner docker needs an S3 data root: step containers cannot see {cfg.data_root} "
            "(omit --data-root to use the run's own S3 server)"
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


def run_local(cfg: LocalRunConfig) -> LocalRunResult:
    """Runs the pipeline through ``kfp.local`` (see the module docstring); returns where things are.

    Raises:
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    with contextlib.ExitStack() as stack:
        client = _engine_for(cfg, stack)
        own_store = cfg.data_root is None
        data_root = stack.enter_context(local_s3_server()) if own_store else storage.normalize_uri(cfg.data_root)
        source, annotations = _sample_dataset(cfg, data_root)
        stack.enter_context(_allow_local_sources(source, annotations))
        runner = None
        if client is not None:
            runner, ray_address = _docker_runner(client, stack, workdir)
            if not cfg.params.get("ray_address"):
                arguments["ray_address"] = ray_address
        outputs = _run_pipeline(
            workdir,
            {**arguments, "data_root": data_root, "source_uri": source, "annotations_uri": annotations},
            runner,
        )
        train_prefix = outputs["model"].metadata["prefix"]
        run_id = train_prefix.rstrip("/").split("/")[-2]
        prefixes = {step: storage.join(data_root, "runs", run_id, step) for step in STEPS}
        reports = {step: contract.read_manifest(prefix, expect_step=step) for step, prefix in prefixes.items()}
        copies = _copy_prefix(prefixes["train"], workdir / "runs" / run_id / "train") if own_store else {}
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
    )

