"""A Ray cluster of two containers, started the way KubeRay starts its pods.

The head runs ``ray start --head --block`` with the dashboard (the Jobs API) and token
authentication on; the worker runs ``ray start --block --address=HEAD:GCS_PORT``. Both
come from the ``ray`` image, run as its non-root user, and share the network namespace
of the engine's host network: inside ``scripts/in-loopback-netns`` that is one namespace
whose only interface is loopback, so every Ray port is on 127.0.0.1. Because the two
nodes share that address, the worker gets its own dashboard-agent, metrics and
runtime-env-agent ports and each node its own range of worker ports: Ray's defaults
are the same on every node and would collide.

A step reaches the cluster as a pod reaches a RayCluster's head service:
``ray_address=http://127.0.0.1:<dashboard port>`` with ``RAY_AUTH_TOKEN`` set.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from imgpipe.resources import free_port

__all__ = ["RayClusterSpec", "RayCluster", "ray_cluster"]

_NODES_SCRIPT = "import ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))"


@dataclass(frozen=True)
class RayClusterSpec:
    """How the two containers are started.

    Attributes:
        image: The ``ray`` image.
        env: Environment of both nodes (the S3 settings and credentials, as KubeRay's
            pod templates take them from the Secret and ConfigMap).
        cpus_per_node: Ray CPUs of each node (the head takes tasks too, as a worker does:
            the point is to see both nodes work).
        object_store_bytes: Object store of each node; ``shm_size`` must hold it.
        shm_size: ``/dev/shm`` of each container.
        start_timeout_s: How long the head and the worker may take to come up.
        labels: Labels on both containers (what a cleanup can select).
    """

    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    cpus_per_node: int = 1
    object_store_bytes: int = 256 << 20
    shm_size: str = "512m"
    start_timeout_s: float = 120.0
    labels: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "imgpipe"})


@dataclass
class RayCluster:
    """A running two-container cluster: where its Jobs API is, and its token."""

    address: str
    token: str
    containers: list[Any]

    @property
    def submitter_env(self) -> dict[str, str]:
        """What a step that submits to this cluster needs in its environment."""
        return {"RAY_AUTH_TOKEN": self.token}


def _logs(container: Any, lines: int = 40) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace")
    except Exception as exc:  # the container is gone
        return f"(no logs: {exc})"


def _start(client: Any, spec: RayClusterSpec, name: str, command: list[str], env: Mapping[str, str]) -> Any:
    return client.containers.run(
        spec.image,
        command=command,
        name=name,
        detach=True,
        network_mode="host",
        shm_size=spec.shm_size,
        environment=dict(env),
        labels={**spec.labels, "imgpipe.ray-node": name},
    )


def _check_running(container: Any, what: str) -> None:
    container.reload()
    if container.status not in ("created", "running"):
        raise RuntimeError(f"the Ray {what} container exited ({container.status}); its last log lines:\n{_logs(container)}")


def _alive_nodes(head: Any) -> int:
    result = head.exec_run(["python", "-c", _NODES_SCRIPT])
    text = result.output.decode(errors="replace").strip().splitlines()
    return int(text[-1]) if result.exit_code == 0 and text and text[-1].isdigit() else 0


def _wait_for(check: Any, containers: list[tuple[Any, str]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for container, role in containers:
            _check_running(container, role)
        if check():
            return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {role}:\n{_logs(c)}" for c, role in containers)
            raise TimeoutError(f"{what} not within {timeout_s:.0f} s; last log lines:\n{logs}")
        time.sleep(1.0)


def _dashboard_up(address: str, token: str) -> bool:
    import requests

    try:
        return requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def ray_cluster(client: Any, spec: RayClusterSpec) -> Iterator[RayCluster]:
    """Starts a head and one worker container; stops and removes both on exit.

    Raises:
        RuntimeError: If a node's container exits while starting (with its log).
        TimeoutError: If the dashboard or the second node does not come up in time.
    """
    token = secrets.token_hex(32)
    gcs, dashboard = free_port(), free_port()
    suffix = uuid.uuid4().hex[:8]
    env = {**spec.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    common = [
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={spec.cpus_per_node}",
        f"--object-store-memory={spec.object_store_bytes}",
    ]
    head_cmd = [
        "ray",
        "start",
        "--head",
        *common,
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--min-worker-port=20000",
        "--max-worker-port=20999",
    ]
    # Both nodes are on 127.0.0.1: the worker's agents and workers need ports of their own.
    worker_cmd = [
        "ray",
        "start",
        *common,
        f"--address=127.0.0.1:{gcs}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--min-worker-port=21000",
        "--max-worker-port=21999",
    ]
    address = f"http://127.0.0.1:{dashboard}"
    started: list[Any] = []
    try:
        head = _start(client, spec, f"imgpipe-ray-head-{suffix}", head_cmd, env)
        started.append(head)
        _wait_for(lambda: _dashboard_up(address, token), [(head, "head")], spec.start_timeout_s, "the Ray dashboard")
        worker = _start(client, spec, f"imgpipe-ray-worker-{suffix}", worker_cmd, env)
        started.append(worker)
        _wait_for(lambda: _alive_nodes(head) >= 2, [(head, "head"), (worker, "worker")], spec.start_timeout_s, "two Ray nodes")
        yield RayCluster(address=address, token=token, containers=started)
    finally:
        # `ray start --block` answers SIGTERM by draining for up to 30 s; these nodes hold
        # nothing worth draining once the run is over.
        for container in reversed(started):
            with contextlib.suppress(Exception):
                container.remove(force=True)
