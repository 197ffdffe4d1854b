"""What is fixed when a pipeline is compiled, and how each task is set up from it.

    options = PipelineOptions(caching=False, shards=4)      # images, resources, retries, GPU scheduling, Secrets
    configure_task(task, "clean", step_image(options.images, "clean"), options, options.retry)

:class:`PipelineOptions` is what ``imgpipe compile`` fixes; the pipelines
(:mod:`pipelines.imgpipe_pipeline`, its sweep and its audit) build each task with :func:`configure_task`
(image, requests and limits, retries, caching, the S3 Secret and the operator's ConfigMap).
"""

# No `from __future__ import annotations`, like the pipeline modules that kfp reads.
import json
import os
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes

from imgpipe.config import check_range
from imgpipe.containers.catalog import ImageSet
from imgpipe.data.sources import SOURCE_LOCAL_ENV, SOURCE_NETWORKS_ENV
from imgpipe.readpolicy import READ_PREFIXES_ENV
from imgpipe.remote import kube, rayjob_spec, trainjob_spec
from imgpipe.remote.ranks import PROCS_ENV
from imgpipe.remote.targets import CLUSTERS_ENV
from imgpipe.serving import registry as modelregistry
from imgpipe.step_table import STEPS
from imgpipe.stepio.artifacts import BY_INPUTS
from imgpipe.stepio.shards import shard_items

__all__ = [
    "S3_SECRET",
    "S3_SECRET_KEYS",
    "S3_CONFIG_MAP",
    "S3_CONFIG_KEYS",
    "OPERATOR_SETTINGS",
    "RAY_TOKEN_SECRET",
    "RAY_TOKEN_KEYS",
    "Resources",
    "Retry",
    "GpuScheduling",
    "PipelineOptions",
    "step_image",
    "configure_task",
    "schedule_on_gpu",
    "trainjob_settings",
]

# The same Secret and ConfigMap the KubeRay resources use (k8s/ray/, k8s/base/).
S3_SECRET = "imgpipe-s3-credentials"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
S3_CONFIG_MAP = "imgpipe-s3-config"
# Every operator setting a task reads at run time, as env of every task from the ConfigMap
# (optional, and so is each key; docs/deploy/permissions.md, "Operator settings", lists the same): the S3
# endpoint and region, the Ray clusters a run may send resize to, the KubeRay worker cap, the
# TrainJob node cap, what sources and other URIs a run may name, and the Model Registry's
# model name and whether registering may fail.
OPERATOR_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    CLUSTERS_ENV,
    rayjob_spec.MAX_WORKERS_ENV,
    trainjob_spec.MAX_NODES_ENV,
    SOURCE_NETWORKS_ENV,
    SOURCE_LOCAL_ENV,
    READ_PREFIXES_ENV,
    modelregistry.MODEL_NAME_ENV,
    modelregistry.OPTIONAL_ENV,
)
S3_CONFIG_KEYS = {name: name for name in OPERATOR_SETTINGS}
# The token of the shared RayCluster's Jobs API (k8s/ray-shared/raycluster-shared.yaml; KubeRay
# creates the Secret). Optional: the local and KubeRay modes need none.
RAY_TOKEN_SECRET = "imgpipe-ray-shared"
RAY_TOKEN_KEYS = {"auth_token": "RAY_AUTH_TOKEN"}


@dataclass(frozen=True)
class Resources:
    """Kubernetes requests and limits of one task (kfp quantity strings)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


@dataclass(frozen=True)
class Retry:
    """A task's retry policy: ``num_retries`` more attempts, waiting ``backoff`` x ``factor``^n, capped."""

    num_retries: int = 3
    backoff: str = "60s"
    factor: float = 2.0
    max_backoff: str = "1800s"


@dataclass(frozen=True)
class GpuScheduling:
    """Where the train task runs: its accelerators, the taint it tolerates, the nodes it selects.

    ``count`` GPUs, one training process each; the task's CPUs are ``count`` times train's
    (each process has its loader workers), and its memory is train's limit as set.

    The defaults fit the NVIDIA GPU operator (nodes labelled
    ``nvidia.com/gpu.present=true``) and GPU node pools tainted ``nvidia.com/gpu``.
    """

    accelerator: str = "nvidia.com/gpu"
    count: int = 1
    toleration_key: str = "nvidia.com/gpu"
    node_selector: tuple[tuple[str, str], ...] = (("nvidia.com/gpu.present", "true"),)
    # PyTorch loader workers share batches through /dev/shm; the container default is 64 MiB.
    # A memory-backed emptyDir counts against the container's memory limit.
    shm_size: str = "16Gi"


def _default_resources() -> dict[str, Resources]:
    return {
        "download": Resources("1", "2", "2Gi", "4Gi"),
        "clean": Resources("4", "4", "8Gi", "8Gi"),
        # PipelineOptions.shards > 1: each shard downloads and cleans its share, sized like clean.
        "prepare-shard": Resources("4", "4", "8Gi", "8Gi"),
        # About 60 bytes an image plus one Parquet batch per shard (imgpipe.steps.merge).
        "merge-shards": Resources("2", "2", "4Gi", "8Gi"),
        # --caching builds: reads one manifest after each cacheable task in a dsl.If branch.
        "verify-output": Resources("100m", "1", "256Mi", "1Gi"),
        # ray_address "": the pod does the work (a process pool or a local Ray: ResizeConfig.executor).
        "resize-local": Resources("4", "4", "8Gi", "8Gi"),
        # KubeRay or a Ray cluster does the work; the pod submits, polls and copies the log.
        "resize": Resources("250m", "1", "512Mi", "1Gi"),
        # 32 GiB for the process and its loader workers, plus GpuScheduling.shm_size (16 GiB). The row
        # cache a run names none of takes a quarter of the limit (train.loader_config.AUTO_CACHE_FRACTION: 12 GiB),
        # within the 32: the request equals the limit, so the node has it.
        "train": Resources("8", "8", "48Gi", "48Gi"),
        # train_nodes > 1: a TrainJob's nodes do the work; the pod creates and follows it.
        "train-trainjob": Resources("250m", "1", "512Mi", "1Gi"),
        # Re-scores the current and the new model on the test split (CPU, one pass each).
        "promote": Resources("2", "4", "4Gi", "8Gi"),
    }


# Tasks that run in every run: promote acts beyond its own output (it moves latest.json and
# registers the model), and verify-output exists to run (components/verify_output.py).
NEVER_CACHED = frozenset({"promote", "verify-output"})


@dataclass(frozen=True)
class PipelineOptions:
    """What is fixed at compile time.

    Attributes:
        caching: kfp caching of every task but those in :data:`NEVER_CACHED` (off: see
            :mod:`pipelines.imgpipe_pipeline`); the data and train tasks then write below
            prefixes keyed by their inputs (:attr:`task_run_id`).
        images: The step images; read from the environment when the options are made.
        retry: Retry policy of download, clean and resize; ``None`` disables retries.
        train_retry: Retry policy of train (it resumes from its last checkpoint).
        resources: Requests and limits per step.
        gpu: GPU scheduling of train; ``None`` trains on CPU nodes.
        s3_secret: Secret with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, as env
            of every task; ``None`` for pods with other credentials (IRSA, workload identity).
        model_registry: Kubeflow Model Registry where a promoted model is registered
            (``http(s)://host[:port]``; read from ``$IMGPIPE_MODEL_REGISTRY`` when the options
            are made); empty registers nothing.
        image_pull_secrets: Secrets every pod pulls its image with (a private registry): the
            tasks', the RayJobs' and the TrainJobs' (read from ``$IMGPIPE_IMAGE_PULL_SECRETS``,
            comma-separated, when the options are made).
        shards: Pods download and clean run on: 1 is one task each; more compiles a
            ``ParallelFor`` of ``prepare-shard`` tasks (each downloads and cleans its share of
            the sources, :mod:`imgpipe.data.sharding`) and a ``merge-shards`` task that writes
            the one clean output resize reads. Fixed when compiling, like the sweep's parallelism.
        shard_parallelism: Shards running at once (0: all of them).
    """

    caching: bool = False
    images: ImageSet = field(default_factory=ImageSet.from_env)
    retry: Retry | None = Retry()
    train_retry: Retry | None = Retry(num_retries=1, backoff="120s")
    resources: dict = field(default_factory=_default_resources)
    gpu: GpuScheduling | None = GpuScheduling()
    s3_secret: str | None = S3_SECRET
    model_registry: str = field(default_factory=lambda: os.environ.get(modelregistry.REGISTRY_ENV, ""))
    image_pull_secrets: tuple[str, ...] = field(default_factory=kube.pull_secrets)
    shards: int = 1
    shard_parallelism: int = 0

    def __post_init__(self) -> None:
        shard_items(self.shards)  # checks the count
        check_range("shard_parallelism", self.shard_parallelism, 0, self.shards, integer=True)

    @property
    def task_run_id(self) -> str:
        """The run id the data and train tasks get: the run's, or with caching :data:`~imgpipe.stepio.artifacts.BY_INPUTS`.

        With the run's id in a task's inputs, KFP's cache key differs in every run, so a
        package compiled with caching hands those tasks :data:`~imgpipe.stepio.artifacts.BY_INPUTS`
        instead: each writes a prefix keyed by its inputs (:func:`imgpipe.stepio.artifacts.task_prefix`).
        """
        return BY_INPUTS if self.caching else dsl.PIPELINE_JOB_ID_PLACEHOLDER


def _cpus_times(quantity: str, n: int) -> str:
    """A CPU quantity (``"8"``, ``"500m"``) ``n`` times over."""
    if quantity.endswith("m"):
        return f"{int(quantity[:-1]) * n}m"
    return f"{float(quantity) * n:g}"


def step_image(images: ImageSet, step: str) -> str:
    """The image of ``step``'s task: the kind its :mod:`imgpipe.step_table` entry names."""
    return getattr(images, STEPS[step].image)


def configure_task(task: dsl.PipelineTask, step: str, image: str, options: PipelineOptions, retry: Retry | None) -> None:
    res = options.resources[step]
    if step == "train" and options.gpu is not None and options.gpu.count > 1:
        # One training process per GPU, each with its loader workers.
        n = options.gpu.count
        res = Resources(_cpus_times(res.cpu_request, n), _cpus_times(res.cpu_limit, n), res.memory_request, res.memory_limit)
    task.set_display_name(step)
    task.set_container_image(image)
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    task.set_caching_options(enable_caching=options.caching and step not in NEVER_CACHED)
    task.set_env_variable("PYTHONUNBUFFERED", "1")
    if options.image_pull_secrets:  # this pod's, and those of the RayJobs and TrainJobs it creates
        kubernetes.set_image_pull_secrets(task, list(options.image_pull_secrets))
        task.set_env_variable(kube.PULL_SECRETS_ENV, ",".join(options.image_pull_secrets))
    if retry is not None:
        task.set_retry(
            num_retries=retry.num_retries,
            backoff_duration=retry.backoff,
            backoff_factor=retry.factor,
            backoff_max_duration=retry.max_backoff,
        )
    if options.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=options.s3_secret, secret_key_to_env=S3_SECRET_KEYS)
    # Endpoint and region are not secret, and a pod on AWS needs neither: optional.
    kubernetes.use_config_map_as_env(task, S3_CONFIG_MAP, S3_CONFIG_KEYS, optional=True)


def schedule_on_gpu(task: dsl.PipelineTask, gpu: GpuScheduling) -> None:
    # One training process per GPU (imgpipe.remote.ranks); CPU and memory grow with them.
    task.set_env_variable(PROCS_ENV, str(gpu.count))
    task.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.count)
    kubernetes.add_toleration(task, key=gpu.toleration_key, operator="Exists", effect="NoSchedule")
    for key, value in gpu.node_selector:
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=gpu.shm_size)


def trainjob_settings(task: dsl.PipelineTask, image: str, options: PipelineOptions) -> None:
    """What the poller hands a TrainJob's nodes (train_nodes > 1): image, resources, scheduling, /dev/shm, S3 Secret.

    Each node gets what the in-pod train task gets: its requests, limits, GPUs, toleration,
    node selector and pull secrets (one fact, here and in :func:`schedule_on_gpu`); a CPU
    build's nodes get no GPU. The poller itself asks for none.
    """
    res = options.resources["train"]
    procs = options.gpu.count if options.gpu is not None else 1
    node = {
        "requests": {"cpu": _cpus_times(res.cpu_request, procs), "memory": res.memory_request},
        "limits": {"cpu": _cpus_times(res.cpu_limit, procs), "memory": res.memory_limit},
    }
    pod: dict[str, Any] = {}
    if options.gpu is not None:
        node["limits"][options.gpu.accelerator] = str(options.gpu.count)
        task.set_env_variable(trainjob_spec.SHM_ENV, options.gpu.shm_size)
        pod["tolerations"] = [{"key": options.gpu.toleration_key, "operator": "Exists", "effect": "NoSchedule"}]
        pod["nodeSelector"] = dict(options.gpu.node_selector)
    if options.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    task.set_env_variable(trainjob_spec.POD_ENV, json.dumps(pod, sort_keys=True))
    task.set_env_variable(PROCS_ENV, str(procs))  # processes per node
    task.set_env_variable(trainjob_spec.IMAGE_ENV, image)
    task.set_env_variable(trainjob_spec.NODE_RESOURCES_ENV, json.dumps(node, sort_keys=True))
    if options.s3_secret:
        task.set_env_variable(trainjob_spec.SECRET_ENV, options.s3_secret)
