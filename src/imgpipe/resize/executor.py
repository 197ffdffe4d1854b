"""What runs resize's tasks: the rule between Ray and a local process pool, and the pool.

    executor = choose_executor(cfg.executor, cfg.ray_address, rows)   # "ray" or "pool"
    with pool_results(tasks, run_task, arguments, workers, uris) as results:
        ...   # TaskResults as tasks finish

The pool imports neither Ray nor Ray Data; why the rule and its threshold: docs/internals.md,
"imgpipe.steps.resize".
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal

from imgpipe import pools, resources, storage
from imgpipe.resize.config import Executor

if TYPE_CHECKING:
    from imgpipe.resize.task import TaskResult

__all__ = ["POOL_MAX_ROWS", "POOL_NODE", "ray_running", "choose_executor", "pool_results"]

# The most rows "auto" gives the pool (docs/internals.md): up to here Ray's start of 7.5-9 s
# over the same step on a pool (cold, 2 cores, docs/benchmarks.md) is a large share of the
# run, and a worker lost to the OOM killer costs at most a re-run of the whole step (the
# pipeline retries the task), minutes on 2 cores. Above it, Ray's retry of only the lost
# worker's task is worth its start.
POOL_MAX_ROWS = 20_000

# What a pool task reports as its node: the manifest's extra.ray_nodes then has one entry.
POOL_NODE = "local-pool"


def ray_running() -> bool:
    """Whether this process is already a Ray driver (a notebook, a test session), without importing Ray."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(getattr(ray, "is_initialized", lambda: False)())


def _init_worker(settings: storage.Settings, step_pid: int) -> None:
    """Pool initializer: :func:`imgpipe.pools.init_worker`, and no pandas.

    A task builds Arrow tables from NumPy arrays, and pyarrow imports pandas the first time
    it does, where installed (the ray image installs it for Ray Data), only to recognize
    pandas objects: 0.28 s of each worker's start on 2 cores, for nothing a task uses.
    """
    pools.init_worker(settings, step_pid)
    resources.hide_unused_module("pandas")


def choose_executor(executor: Executor, ray_address: str, rows: int, environ: Mapping[str, str] | None = None) -> Literal["ray", "pool"]:
    """Ray or the pool, for the tasks of a step that runs here (a Jobs API or KubeRay target never asks).

    ``auto``: the pool when no cluster is named (``ray_address`` and ``$RAY_ADDRESS``
    empty: the step would start a local Ray), no Ray runs in this process (its start is
    paid already), and the input has at most :data:`POOL_MAX_ROWS` rows; else Ray.

    Raises:
        ValueError: For ``pool`` where a cluster is named (inside a Ray job, ``$RAY_ADDRESS``).
    """
    environ = os.environ if environ is None else environ
    named = ray_address.strip() or environ.get("RAY_ADDRESS", "").strip()
    if executor == "pool":
        if named:
            raise ValueError(
                f"executor 'pool' runs the tasks in this process's own pool, but a Ray cluster is named ({named!r}): "
                "use executor 'ray' or 'auto' there"
            )
        return "pool"
    if executor == "ray" or named or ray_running() or rows > POOL_MAX_ROWS:
        return "ray"
    return "pool"


@contextlib.contextmanager
def pool_results(
    tasks: Sequence[Sequence[tuple[str, int]]],
    run: Callable[..., TaskResult],
    arguments: Mapping[str, Any],
    workers: int,
    uris: Iterable[str],
    no_progress_timeout_s: float = -1,
) -> Iterator[Iterator[TaskResult]]:
    """Runs ``run(i, tasks[i], node=POOL_NODE, **arguments)`` for every task on a process pool.

    Args:
        tasks: The planned tasks (row groups), each run once.
        run: The task function, at module level (workers import it by name).
        arguments: Its keyword arguments besides the task (settings only, no credential:
            each worker reads with its own environment's).
        workers: Processes, at most one per task.
        uris: What the tasks read (fork, or a forkserver where the storage needs one).
        no_progress_timeout_s: Fail when no task finishes for this long; -1: wait forever.

    Yields:
        The tasks' results as they finish. Leaving early (an error here or in the
        caller) kills the workers.

    Raises:
        RuntimeError: From the iteration, if a worker died (the pool retries nothing, and
            the step commits nothing) or no task finished within ``no_progress_timeout_s``.
    """
    # Fork only a process with no other thread (a fresh `imgpipe resize`, a pod): a thread of a
    # notebook, a test session, a progress bar or a Ray driver may hold a lock at the fork, and
    # the worker then waits on it for ever (seen: a pool forked beside tqdm's monitor hung).
    ctx = pools.pool_context(uris, preload=[run.__module__], fork_ok=threading.active_count() == 1 and not ray_running())
    executor = ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(tasks))),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(storage.settings(), os.getpid()),
    )
    try:
        with pools.frozen_heap():
            futures = [executor.submit(run, i, list(units), node=POOL_NODE, **arguments) for i, units in enumerate(tasks)]
            yield _finished(futures, no_progress_timeout_s)
    except BaseException:
        _stop(executor)
        raise
    executor.shutdown(wait=True)


def _finished(futures: Sequence[Future], no_progress_timeout_s: float) -> Iterator[TaskResult]:
    """The futures' results as they finish; a dead worker or a stall is a ``RuntimeError``."""
    pending, returned = set(futures), 0
    timeout = None if no_progress_timeout_s == -1 else no_progress_timeout_s
    while pending:
        done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        if not done:
            raise RuntimeError(
                f"resize: no pool task finished in {no_progress_timeout_s:g} s (no_progress_timeout_s); "
                f"{len(futures) - returned} of {len(futures)} tasks unfinished"
            )
        for future in done:
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    f"resize: a pool worker died (the OOM killer, or a crash in a C library) with "
                    f"{len(futures) - returned} of {len(futures)} tasks unfinished; the pool retries nothing, so "
                    "nothing is committed. Give the step more memory or a lower concurrency, or run it with "
                    "executor 'ray', which retries a lost worker's task"
                ) from exc
            returned += 1
            yield result


def _stop(executor: ProcessPoolExecutor) -> None:
    """Ends the pool now: queued tasks cancelled, running workers killed, not waited for.

    ``shutdown`` alone waits for every running task; Python 3.14's ``terminate_workers``
    ends them, and before it only the executor's own ``_processes`` name them.
    """
    terminate = getattr(executor, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            process.join(timeout=5)
