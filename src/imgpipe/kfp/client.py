"""Submitting and scheduling the pipeline on Kubeflow Pipelines: upload once per version, then runs or a recurring run.

    submit(["data_root=s3://b/imgpipe"], target=Target(host=..., namespace="team-a")); schedule("0 0 3 * * *", params, target=...)

How it works in detail: docs/internals/kubeflow.md, "imgpipe.kfp.client".
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.kfp.connect import HOST_ENV, connect
from imgpipe.kfp.cron import validate_cron
from imgpipe.kfp.package import (
    compile_package,
    package_digest,
    parse_params,
    version_name,
)
from imgpipe.kfp.preflight import check_params
from imgpipe.kfp.refusals import call
from imgpipe.kfp.releases import check_release, server_healthz
from imgpipe.kfp.run_end import TERMINAL_STATES, run_failure, wait_for_run
from imgpipe.stepio.artifacts import PIPELINE_NAME

__all__ = [
    "DEFAULT_EXPERIMENT",
    "TERMINAL_STATES",
    "ensure_pipeline_version",
    "Submitted",
    "Scheduled",
    "Target",
    "submit",
    "schedule",
]

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "imgpipe"
EXPERIMENT_ENV = "IMGPIPE_EXPERIMENT"
NAMESPACE_ENV = "IMGPIPE_KFP_NAMESPACE"
SERVICE_ACCOUNT_ENV = "IMGPIPE_SERVICE_ACCOUNT"
# The account k8s/base creates for imgpipe's runs (k8s/base/serviceaccount-pipeline.yaml): the
# only one the RayJob Role is bound to. Runs in a profile namespace use it unless told otherwise.
PIPELINE_SERVICE_ACCOUNT = "imgpipe-pipeline"
_EQUALS = 1  # kfp filter.proto Predicate.Operation.EQUALS

# ----------------------------------------------------------------------------------------
# Uploading the pipeline and its versions (each call through refusals.call).


def _by_name(name: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})


def _find_pipeline(client: Any, name: str, namespace: str | None) -> str | None:
    """The id of pipeline ``name`` in ``namespace`` (``None``: the shared pipelines)."""
    doing = f"find pipeline {name!r} in {namespace or 'the shared pipelines'}"
    if namespace is None:
        return call(doing, "list", "pipelines", namespace, client.get_pipeline_id, name)
    found = call(doing, "list", "pipelines", namespace, client.list_pipelines, filter=_by_name(name), namespace=namespace, page_size=2)
    return found.pipelines[0].pipeline_id if found.pipelines else None


def ensure_pipeline_version(
    client: Any, package: str | Path, *, pipeline_name: str = PIPELINE_NAME, namespace: str | None = None
) -> tuple[str, str, str]:
    """Finds or uploads the pipeline and the package's version.

    Args:
        client: A ``kfp.Client``.
        package: The compiled package.
        pipeline_name: The pipeline's display name.
        namespace: The profile namespace of a multi-user deployment: the pipeline is
            uploaded into it and looked up there; ``None`` uses shared pipelines
            (single-user deployments).

    Returns:
        ``(pipeline_id, version_id, version_name)``.
    """
    package = str(package)
    version = version_name(package, pipeline_name)
    pipeline_id = _find_pipeline(client, pipeline_name, namespace)
    if pipeline_id is None:
        # Creates the pipeline with a first version named like the pipeline; ours follows.
        pipeline_id = call(
            f"upload pipeline {pipeline_name!r} into {namespace or 'the shared pipelines'}",
            "create",
            "pipelines",
            namespace,
            client.upload_pipeline,
            package,
            pipeline_name=pipeline_name,
            description="imgpipe: download -> clean -> resize -> train",
            namespace=namespace,
        ).pipeline_id
        log.info("created pipeline %s (%s) in %s", pipeline_name, pipeline_id, namespace or "the shared namespace")
    # Version calls are authorized as `pipelines` on the version's pipeline (module docstring).
    found = call(
        f"list the versions of pipeline {pipeline_name!r}",
        "list",
        "pipelines",
        namespace,
        client.list_pipeline_versions,
        pipeline_id=pipeline_id,
        filter=_by_name(version),
        page_size=1,
    )
    if found.pipeline_versions:
        version_id = found.pipeline_versions[0].pipeline_version_id
        log.info("pipeline version %s exists (%s)", version, version_id)
        return pipeline_id, version_id, version
    uploaded = call(
        f"upload version {version} of pipeline {pipeline_name!r}",
        "create",
        "pipelines",
        namespace,
        client.upload_pipeline_version,
        package,
        pipeline_version_name=version,
        pipeline_id=pipeline_id,
        description=f"package sha256 {package_digest(package)}",
    )
    log.info("uploaded pipeline version %s (%s)", version, uploaded.pipeline_version_id)
    return pipeline_id, uploaded.pipeline_version_id, version


@dataclass(frozen=True)
class Submitted:
    """A run created (or re-attached to) by :func:`submit`."""

    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    run_id: str
    created: bool = True
    state: str | None = None


@dataclass(frozen=True)
class Scheduled:
    """A recurring run created (or found) by :func:`schedule`."""

    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    recurring_run_id: str
    cron: str
    created: bool


@dataclass(frozen=True)
class Target:
    """Where and as whom runs go; ``None`` fields come from the environment (module docstring).

    Attributes:
        host: The KFP API endpoint, e.g. ``http://ml-pipeline.kubeflow:8888``.
        experiment: Experiment name (created if missing).
        namespace: The Kubeflow profile namespace (multi-user deployments).
        service_account: The Kubernetes service account of the run's pods; in a
            namespace, :data:`PIPELINE_SERVICE_ACCOUNT` unless set.
    """

    host: str | None = None
    experiment: str | None = None
    namespace: str | None = None
    service_account: str | None = None

    def resolved(self) -> Target:
        """With the environment's values for unset fields."""
        env = os.environ
        namespace = self.namespace or env.get(NAMESPACE_ENV) or None
        return Target(
            host=self.host or env.get(HOST_ENV) or None,
            experiment=self.experiment or env.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT,
            namespace=namespace,
            service_account=self.service_account or env.get(SERVICE_ACCOUNT_ENV) or (PIPELINE_SERVICE_ACCOUNT if namespace else None),
        )


def _package(
    package: str | Path | None,
    caching: bool,
    gpu: bool | None,
    tmp: str,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
    shards: int = 1,
) -> Path:
    if package is not None:
        path = Path(package)
        if not path.is_file():
            raise ValueError(f"pipeline package {path} does not exist")
        return path
    return compile_package(Path(tmp) / f"{pipeline}.yaml", caching=caching, gpu=gpu, pipeline=pipeline, parallelism=parallelism, shards=shards)


def _prepare(
    target: Target,
    params: Iterable[str] | Mapping[str, Any],
    package: str | Path | None,
    caching: bool,
    gpu: bool | None,
    client: Any,
    tmp: str,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
    shards: int = 1,
) -> tuple[Any, dict[str, Any], str, str, str, str, str | None]:
    path = _package(package, caching, gpu, tmp, pipeline, parallelism, shards)
    typed = parse_params(params, path)
    check_params(typed)  # every step's config as its task will build it: refused here, not hours into the run
    client = client or connect(target.host, namespace=target.namespace)
    namespace = _namespace(client, target)
    pipeline_id, version_id, version = ensure_pipeline_version(client, path, pipeline_name=pipeline, namespace=namespace)
    # kfp's create_experiment lists experiments by name first, then creates one if none.
    experiment_id = call(
        f"find or create experiment {target.experiment!r} in {namespace or 'the default namespace'}",
        "list and create",
        "experiments",
        namespace,
        client.create_experiment,
        target.experiment,
        namespace=namespace,
    ).experiment_id
    return client, typed, pipeline_id, version_id, version, experiment_id, namespace


def _namespace(client: Any, target: Target) -> str | None:
    """The profile namespace in multi-user mode (required there), else ``None``; first, the server's release checked.

    Raises:
        ValueError: If the server runs multi-user and no namespace is set.
        RuntimeError: If the server is a Kubeflow Pipelines imgpipe cannot run on (:func:`~imgpipe.kfp.releases.check_release`).
    """
    healthz = server_healthz(client)
    check_release(healthz)
    multi_user = bool(healthz.get("multi_user", False))
    if not multi_user:
        return None
    if not target.namespace:
        raise ValueError(
            "this Kubeflow Pipelines runs in multi-user mode: pass --namespace (or set "
            f"{NAMESPACE_ENV}) to your Kubeflow profile's namespace; experiments, pipelines and runs live there"
        )
    return target.namespace


def submit(
    params: Iterable[str] | Mapping[str, Any] = (),
    *,
    target: Target | None = None,
    run_name: str | None = None,
    package: str | Path | None = None,
    caching: bool = False,
    gpu: bool | None = None,
    wait: bool = False,
    timeout_s: float = 6 * 3600,
    poll_s: float = 30.0,
    client: Any = None,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
    shards: int = 1,
) -> Submitted:
    """Uploads the pipeline version (idempotently) and creates a run of it.

    Args:
        params: ``key=value`` pairs or a mapping of pipeline parameters.
        target: Host, experiment, namespace, service account (default: environment).
        run_name: The run's display name (default ``<version> <UTC time>``). A run of
            that name already in the experiment is re-attached to instead of starting
            another, so a retried submitter (the CronWorkflow passes its workflow
            name) never runs the pipeline twice.
        package: A compiled package; default: compile now with ``caching`` and ``gpu``.
        caching: Compile-time caching (ignored with ``package``).
        gpu: Compile-time GPU scheduling of train (see :func:`compile_package`).
        wait: Wait for the run to end; a run that does not succeed raises.
        timeout_s: How long to wait.
        poll_s: Status poll interval while waiting.
        client: A ``kfp.Client`` (default: :func:`connect`).
        pipeline: Which pipeline (:data:`PIPELINES`), compiled when ``package`` is not given;
            also the Kubeflow pipeline the version is uploaded under.
        parallelism: The sweep's branches at once, when compiling it (see :func:`compile_package`).
        shards: Pods download and clean run on, when compiling (see :func:`compile_package`).

    Raises:
        ValueError: For bad parameters or no host.
        RuntimeError: With ``wait``, if the run ends in another state than SUCCEEDED; if
            KFP refuses a call (multi-user RBAC), naming the missing permission.
        TimeoutError: With ``wait``, if the run is still going after ``timeout_s``.
    """
    target = (target or Target()).resolved()
    with tempfile.TemporaryDirectory(prefix="imgpipe-kfp-") as tmp:
        client, typed, pipeline_id, version_id, version, experiment_id, namespace = _prepare(
            target, params, package, caching, gpu, client, tmp, pipeline, parallelism, shards
        )
    run_id, created = None, True
    if run_name:
        found = call(
            f"look for run {run_name!r}",
            "list",
            "runs",
            namespace,
            client.list_runs,
            experiment_id=experiment_id,
            filter=_by_name(run_name),
            page_size=1,
        )
        if found.runs:
            run_id, created = found.runs[0].run_id, False
            log.info("run %r exists (%s): attaching to it", run_name, run_id)
    if run_id is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        run_id = call(
            f"start a run of {version}",
            "create",
            "runs",
            namespace,
            client.run_pipeline,
            experiment_id=experiment_id,
            job_name=run_name or f"{version} {stamp}",
            params=typed,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=target.service_account,
        ).run_id
    state = None
    if wait:
        state = wait_for_run(client, run_id, timeout_s, poll_s, namespace)
        if state != "SUCCEEDED":
            run = call(f"read run {run_id}", "get", "runs", namespace, client.get_run, run_id)
            raise RuntimeError(f"run {run_id} ended {state}{run_failure(run, namespace)}")
    return Submitted(pipeline_id, version_id, version, experiment_id, run_id, created, state)


def schedule(
    cron: str,
    params: Iterable[str] | Mapping[str, Any] = (),
    *,
    target: Target | None = None,
    name: str = "imgpipe-retrain",
    package: str | Path | None = None,
    caching: bool = False,
    gpu: bool | None = None,
    replace: bool = False,
    client: Any = None,
) -> Scheduled:
    """Creates a KFP recurring run of the pipeline's current version.

    One schedule per ``name`` in the experiment: if it exists with this version and
    cron it is left as is; otherwise ``replace`` deletes it and creates the new one,
    and without ``replace`` this raises.

    Args:
        cron: Six fields, seconds first (:func:`validate_cron`). KFP starts at most one
            run at a time (``max_concurrency=1``) and does not replay runs missed while
            paused (``no_catchup``).
        params: As in :func:`submit`; ``previous_run_prefix=latest`` makes every
            scheduled run incremental.
        target: As in :func:`submit`.
        name: The schedule's display name.
        package: As in :func:`submit`.
        caching: As in :func:`submit` (keep it off for retraining: new data behind an
            unchanged URI would be a cache hit).
        gpu: As in :func:`submit`.
        replace: Swap an existing schedule of the same name.
        client: As in :func:`submit`.

    Raises:
        ValueError: For a bad cron expression or parameters, or an existing schedule of
            another version or cron without ``replace``.
        RuntimeError: If KFP refuses a call (multi-user RBAC), naming the missing permission.
    """
    cron = validate_cron(cron)
    target = (target or Target()).resolved()
    with tempfile.TemporaryDirectory(prefix="imgpipe-kfp-") as tmp:
        client, typed, pipeline_id, version_id, version, experiment_id, namespace = _prepare(target, params, package, caching, gpu, client, tmp)
    existing = call(
        f"look for recurring run {name!r}",
        "list",
        "jobs",
        namespace,
        client.list_recurring_runs,
        experiment_id=experiment_id,
        filter=_by_name(name),
        page_size=10,
    )
    for rr in existing.recurring_runs or []:
        ref = rr.pipeline_version_reference
        same_version = ref is not None and ref.pipeline_version_id == version_id
        same_cron = bool(rr.trigger and rr.trigger.cron_schedule and rr.trigger.cron_schedule.cron == cron)
        if same_version and same_cron:
            return Scheduled(pipeline_id, version_id, version, experiment_id, rr.recurring_run_id, cron, False)
        if not replace:
            raise ValueError(f"recurring run {name!r} ({rr.recurring_run_id}) already exists with another version or cron; pass --replace to swap it")
        call(f"replace recurring run {name!r}", "delete", "jobs", namespace, client.delete_recurring_run, rr.recurring_run_id)
    created = call(
        f"create recurring run {name!r}",
        "create",
        "jobs",
        namespace,
        client.create_recurring_run,
        experiment_id=experiment_id,
        job_name=name,
        description=f"imgpipe retraining, {version}",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=typed,
        pipeline_id=pipeline_id,
        version_id=version_id,
        enabled=True,
        service_account=target.service_account,
    )
    return Scheduled(pipeline_id, version_id, version, experiment_id, created.recurring_run_id, cron, True)
