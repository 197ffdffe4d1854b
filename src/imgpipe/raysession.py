"""A Ray session for a step that runs on Ray Data: join a cluster, or start a local Ray and end it cleanly.

Where a step runs is decided above the steps: :func:`ray_session` joins the cluster at
``address`` (or ``$RAY_ADDRESS``, inside a Ray job) and disconnects afterwards, or starts
a local Ray on this machine's CPUs (:func:`imgpipe.resources.available_cpus`) and shuts
down only what it started. Used by resize and predict.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from imgpipe import resources

__all__ = ["ray_session", "shut_down_local_ray"]


@contextlib.contextmanager
def ray_session(address: str = "", warm: Callable[[], None] | None = None, warm_cpus: float = 1.0) -> Iterator[Any]:
    """Uses a running Ray, or starts/joins one and shuts down only what it started.

    Args:
        address: A cluster to join (``auto``, ``ray://...``); empty starts a local Ray.
        warm: A function one task per CPU runs on a local Ray just started, unwaited, so
            that the workers' imports overlap the driver's planning.
        warm_cpus: The CPUs each warming task asks for (the step's own tasks' figure).
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    with contextlib.ExitStack() as stack:
        if address or os.environ.get("RAY_ADDRESS"):
            # A cluster's address, or inside a Ray job (RAY_ADDRESS set): join the cluster;
            # shutting down then only disconnects.
            ray.init(address=address or None)
            stack.callback(ray.shutdown)
        else:
            # Ray ties its daemons to this driver, but their children (agents, busy
            # workers) outlive a kill -9 of the step by minutes: a reaper ends them.
            stack.enter_context(resources.reaped_with_me())
            cpus = resources.available_cpus()
            ray.init(num_cpus=cpus, include_dashboard=False)
            stack.callback(shut_down_local_ray, ray)  # runs before the reaper is dismissed
            if warm is not None:
                task = ray.remote(num_cpus=warm_cpus)(warm)
                for _ in range(cpus):
                    task.remote()
        yield ray


def shut_down_local_ray(ray: Any) -> None:
    """Shuts down a local Ray without waiting out its autoscaler monitor.

    ``ray.shutdown()`` stops the local processes one after another, each with a SIGTERM and
    up to 1 s before a SIGKILL (ray 2.60.0, ``python/ray/_private/node.py``,
    ``Node.kill_all_processes`` and ``_kill_process_impl``). The autoscaler's monitor does
    not exit on SIGTERM, so it takes that whole second: 1.02 s of a 1.46 s shutdown here.
    A local Ray has nothing to autoscale, and the step's work is done, so the monitor is
    killed first. Should Ray's internals move, this is a plain ``ray.shutdown()``.
    """
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    for info in getattr(node, "all_processes", {}).get("monitor", ()):  # ray_constants.PROCESS_TYPE_MONITOR
        with contextlib.suppress(OSError):
            info.process.kill()
    ray.shutdown()
