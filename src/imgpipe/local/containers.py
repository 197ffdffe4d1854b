"""The container engine side of `imgpipe run --runner docker`: kfp.local's DockerRunner, checked before a run.

    with contextlib.ExitStack() as stack:
        runner, pipeline_root = docker_runner_for(engine, stack, workdir)

The images must exist, reach the S3 server, and write to the pipeline root as uid 10001.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imgpipe import storage

__all__ = ["STORE_ENV", "CONTAINER_USER", "container_env", "container_writable", "docker_runner", "docker_runner_for"]

# The store settings a step container gets from this process, as a pod gets them from the
# imgpipe-s3-config ConfigMap and the imgpipe-s3-credentials Secret (and a session token, if any).
STORE_ENV = (*storage.SETTINGS_ENV, *storage.SECRET_ENV, "AWS_SESSION_TOKEN")
# The uid the images run as (docker/Dockerfile); its group is 0.
CONTAINER_USER = "10001"


def container_env() -> dict[str, str]:
    """The store settings (:data:`STORE_ENV`) of this process that a step container gets."""
    return {k: os.environ[k] for k in STORE_ENV if os.environ.get(k)}


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


def engine_for(runner: str, data_root: str | None, stack: contextlib.ExitStack) -> Any:
    """The engine client of a docker run (checked before any work starts), else ``None``."""
    if runner != "docker":
        return None
    from imgpipe.containers.engine import connect

    if data_root is not None and storage.is_local(data_root):
        raise ValueError(
            f"--runner docker needs an S3 data root: step containers cannot see {data_root} (omit --data-root to use the run's own S3 server)"
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


def docker_runner_for(client: Any, stack: contextlib.ExitStack, workdir: Path) -> tuple[Any, str]:
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
