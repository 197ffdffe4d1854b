"""Clean's crash-isolating decode pool: a dead or stuck decoder costs one image, never the step.

Tasks (:class:`Task`: some row groups of the input) run on a process pool sized by the
CPUs and the memory (:func:`decode_pool`); each writes its usable rows to local bucket
files and returns what it settled as arrays (:class:`TaskResult`). Rows are named by
their position in clean's index (:class:`imgpipe.clean.plan.Index`) throughout. While a task
decodes a member, its marker file names it (:class:`Marker`), so:

* a decode that takes longer than the time limit is ended from outside: the pool kills
  the worker its marker names, and the image becomes ``decode_timeout``;
* when a worker dies (the OOM killer's SIGKILL, a crash in a C library), the member each
  unfinished task names is decoded again alone, in a process of its own, and becomes
  ``decoder_killed`` if that dies too; then the unfinished tasks run again without those
  members, one row group per task, so each further loss repeats little work.

The task function is a parameter (:func:`run_tasks`); :func:`imgpipe.clean.decode.validate_task`
is clean's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from imgpipe import pools, storage
from imgpipe.clean.buckets import drop_buckets, marker_path, read_marker, take_suspect
from imgpipe.clean.tasks import Task, TaskResult
from imgpipe.data.images import load_decoders

__all__ = [
    "DECODER_KILLED",
    "DECODE_TIMEOUT",
    "DecodePool",
    "decode_pool",
    "run_tasks",
    "import_before_fork",
]

# A task: (Task, ...) -> a TaskResult naming every row it settles.
TaskFunction = Callable[..., "TaskResult"]

# Reject code of an image whose decoder killed its process twice, in the pool and alone;
# the other codes come from imgpipe.data.images, and no_label / duplicate from the plan.
DECODER_KILLED = "decoder_killed"


DECODE_TIMEOUT = "decode_timeout"


# How clean shares memory among its decode workers. A quarter stays with the step's own
# process (index, plan, shard writing) and the allocator's slack. Each worker costs a base
# before any image: the pages it dirties after the fork (interpreter, numpy, pyarrow,
# Pillow) and a row group of encoded input beside its normalized copy. A worker is worth
# starting only if it can still take a 12-megapixel photo (96 MiB at 8 bytes per pixel).
_MEMORY_HEADROOM = 0.25


_WORKER_BASE_BYTES = 128 << 20


_MIN_IMAGE_BYTES = 128 << 20


# Pool restarts in a row that a dead worker may cause without naming an image (it died
# reading or writing a row group): past this the cause is not one image, and the step fails.
_MAX_BARREN_RESTARTS = 2


@dataclass(frozen=True)
class DecodePool:
    """How many decode processes run, and the memory one image may take in each.

    Attributes:
        workers: Decode processes.
        max_decode_bytes: Per-image budget, ``None`` when the memory is unknown.
        memory: The memory divided among them, ``None`` when unknown.
    """

    workers: int
    max_decode_bytes: int | None
    memory: int | None


def decode_pool(cpus: int, memory: int | None) -> DecodePool:
    """Caps ``cpus`` workers to those ``memory`` can hold, and gives each image a budget."""
    if memory is None:
        return DecodePool(cpus, None, None)
    usable = int(memory * (1 - _MEMORY_HEADROOM))
    workers = max(1, min(cpus, usable // (_WORKER_BASE_BYTES + _MIN_IMAGE_BYTES)))
    share = usable // workers
    # Below the base, the base is a guess worth less than trying: images get half the share.
    return DecodePool(workers, max(share - _WORKER_BASE_BYTES, share // 2), memory)


def _init_worker(settings: storage.Settings, step_pid: int) -> None:
    """Pool initializer: :func:`imgpipe.pools.init_worker`, and quiet decoders."""
    pools.init_worker(settings, step_pid)
    # What a decoder warns about (a bad TIFF tag, truncated EXIF) is in the reject detail or
    # harmless; from every worker it would only flood the step's log.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def _kill_overdue(bucket_dir: str | Path, tasks: Iterable[Task], timeout_s: float) -> set[int]:
    """Kills each worker whose marker has named one row for longer than ``timeout_s``.

    Returns:
        The rows whose decode was cut short.
    """
    overdue = set()
    if not timeout_s:
        return overdue
    now = time.time()
    for task in tasks:
        path = marker_path(bucket_dir, task.index)
        try:
            if now - path.stat().st_mtime <= timeout_s:
                continue
            named = read_marker(path.read_bytes().decode())
        except (FileNotFoundError, ValueError):
            continue
        if named is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(named[0], signal.SIGKILL)
            overdue.add(named[1])
    return overdue


def _pool_context(uris: Iterable[str]) -> multiprocessing.context.BaseContext:
    """Fork for fork-safe inputs, else a forkserver that imports :mod:`imgpipe.clean._forkserver` (:func:`imgpipe.pools.pool_context`).

    The server imports that module and so runs :func:`import_before_fork` once for all its workers.
    """
    return pools.pool_context(uris, preload=[f"{__package__}._forkserver"])


def run_tasks(
    tasks: Sequence[Task],
    run: TaskFunction,
    task_args: Callable[[Task], tuple],
    bucket_dir: Path,
    pool: DecodePool,
    *,
    in_process: bool = False,
    timeout_s: float = 0.0,
    first_free: int = 0,
) -> tuple[TaskResult, int]:
    """Runs ``run(*task_args(task))`` for every task on the decode pool, with progress.

    A worker that dies costs the member it was decoding (see the module docstring).

    Args:
        tasks: The tasks, each with a distinct ``index``.
        run: The task function, at module level (workers import it by name); its first
            argument is the :class:`Task`.
        task_args: The arguments of ``run`` for a task (the task first).
        bucket_dir: Where the tasks' bucket and marker files are.
        pool: How many workers, and each image's memory budget.
        in_process: Run the tasks one after another in this process (no isolation).
        timeout_s: Longest decode of one image; 0 for no limit.
        first_free: The lowest index a task started here may take (a retry of one row
            alone): indices below it are the caller's own bucket files.

    Returns:
        What the tasks settled, in task order, and the next task index no bucket file uses.
    """
    results: dict[int, TaskResult] = {}

    next_index = max(len(tasks), first_free)
    with tqdm(total=sum(t.rows for t in tasks), desc="clean: decode", unit="img", dynamic_ncols=True) as bar:
        if in_process or not tasks:  # no rows (an empty source, a shard with nothing of its own): no pool to start
            for task in tasks:
                results[task.index] = run(*task_args(task))
                bar.update(task.rows)
            return TaskResult.concat([results[i] for i in sorted(results)]), next_index
        ctx = _pool_context(unit.uri for t in tasks for unit in t.units)
        import_before_fork()
        pending, barren = list(tasks), 0
        watch = _Watch(bucket_dir, timeout_s)
        while pending := _run_pool(pending, run, task_args, pool.workers, ctx, results, bar, watch):
            for task in pending:
                drop_buckets(bucket_dir, task.index)
            named = {t.index: take_suspect(bucket_dir, t.index) for t in pending}
            suspects = {index: suspect for index, suspect in named.items() if suspect is not None}
            for task in (t for t in pending if t.index in suspects):
                row, member = suspects[task.index]
                if row in watch.overdue:
                    # It overran the limit itself (the watchdog, not a neighbour's crash,
                    # ended its worker): a second full wait alone would tell nothing new.
                    results[next_index] = TaskResult.failed(row, DECODE_TIMEOUT, watch.detail())
                else:
                    solo = Task(next_index, task.units, 1, only=row)
                    results[solo.index] = _settle_alone(run, task_args(solo), member, ctx, watch, pool)
                next_index += 1
                bar.update(1)
            barren = 0 if suspects else barren + 1
            if barren > _MAX_BARREN_RESTARTS:
                raise RuntimeError(
                    f"clean: decode workers died {barren} times in a row outside any image decode"
                    " (reading or writing row groups); give the step more memory or fewer workers"
                )
            # A restart repeats an unfinished task from its first row: one row group per
            # task bounds what each further hang or crash costs.
            pieces = []
            for task in (_without(t, suspects.get(t.index)) for t in pending):
                for unit in task.units:
                    rows = sum(map(task.wants, unit.positions))
                    pieces.append(replace(task, index=next_index, units=(unit,), rows=rows))
                    next_index += 1
            pending = pieces
    return TaskResult.concat([results[i] for i in sorted(results)]), next_index


def _without(task: Task, suspect: tuple[int, str] | None) -> Task:
    """``task`` skipping the suspect row, once a run of its own settled it."""
    if suspect is None:
        return task
    return replace(task, rows=task.rows - 1, skip=task.skip | {suspect[0]})


def import_before_fork() -> None:
    """Does here, once, the imports that every forked worker would otherwise do on first use.

    Called before a fork pool starts, and in the forkserver (inputs whose storage is not
    fork-safe) by importing :mod:`imgpipe.clean._forkserver`.

    Pillow loads its format plugins on the first open. pyarrow imports pandas, when it is
    installed, the first time it builds an array from Python values (to recognize pandas
    types): 0.3 s of CPU per process on this machine, paid by each worker on its first
    spill write. (The step's images do not install pandas; a development environment with
    Ray Data does.)
    """
    load_decoders()
    pa.array([0])


def _run_pool(
    tasks: Sequence[Task],
    run: TaskFunction,
    task_args: Callable[[Task], tuple],
    workers: int,
    ctx: multiprocessing.context.BaseContext,
    results: dict[int, TaskResult],
    bar: tqdm,
    watch: _Watch,
) -> list[Task]:
    """Runs ``tasks`` on a fresh process pool into ``results``, killing overrunning decodes.

    Returns:
        The tasks left unfinished because a worker died (all that were not done by then).
    """
    unfinished: list[Task] = []
    with (
        pools.frozen_heap(),
        ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(storage.settings(), os.getpid()),
        ) as executor,
    ):
        futures = {}
        for task in tasks:
            try:
                futures[executor.submit(run, *task_args(task))] = task
            except BrokenProcessPool:  # a worker died while tasks were still being handed out
                unfinished.append(task)
        running = set(futures)
        while running:
            done, running = wait(running, timeout=watch.poll_s, return_when=FIRST_COMPLETED)
            watch.overdue |= _kill_overdue(watch.bucket_dir, (futures[f] for f in running), watch.timeout_s)
            for fut in done:
                task = futures[fut]
                try:
                    results[task.index] = fut.result()
                except BrokenProcessPool:
                    unfinished.append(task)
                else:
                    bar.update(task.rows)
    return sorted(unfinished, key=lambda t: t.index)


@dataclass
class _Watch:
    """The per-image time limit: where the markers are, the limit, and who overran it."""

    bucket_dir: Path
    timeout_s: float
    overdue: set[str] = field(default_factory=set)

    def detail(self) -> str:
        return f"decoding took longer than image_timeout_s={self.timeout_s:g} s; its worker was killed"

    @property
    def poll_s(self) -> float:
        return min(1.0, self.timeout_s / 4) if self.timeout_s else 1.0


def _settle_alone(
    run: TaskFunction, args: tuple, member: str, ctx: multiprocessing.context.BaseContext, watch: _Watch, pool: DecodePool
) -> TaskResult:
    """Decodes a suspect alone: its result, or ``decoder_killed`` / ``decode_timeout`` if it fails again.

    Args:
        run: The task function.
        args: Its arguments, for a task of one row (``only``).
        member: The row's path, for messages.
        ctx: Multiprocessing context of the pool.
        watch: The time limit; its ``bucket_dir`` holds the bucket files and marker
            (removed if the process dies).
        pool: The decode pool, for the budget the detail names.

    Raises:
        RuntimeError: If the process died outside the decode: not the image's doing.
    """
    solo: Task = args[0]
    assert solo.only is not None, "a suspect runs alone"
    bucket_dir = watch.bucket_dir
    outcome = _run_alone(run, args, ctx, watch)
    if not isinstance(outcome, int):
        return outcome
    drop_buckets(bucket_dir, solo.index)
    if solo.only in watch.overdue and outcome == -signal.SIGKILL:
        take_suspect(bucket_dir, solo.index)
        return TaskResult.failed(solo.only, DECODE_TIMEOUT, watch.detail())
    if take_suspect(bucket_dir, solo.index) is None:
        raise RuntimeError(
            f"clean: the process decoding {member} alone {_exit_text(outcome)} outside the"
            " decode (reading or writing its row group); give the step more memory"
        )
    if pool.max_decode_bytes is None:
        need = "more memory than the process could get"
    else:
        need = f"more memory than the per-image budget of {pool.max_decode_bytes} bytes, which its header's estimate fitted"
    detail = f"the process decoding it {_exit_text(outcome)} in the pool and again alone; it likely needs {need} (the OOM killer sends SIGKILL)"
    return TaskResult.failed(solo.only, DECODER_KILLED, detail)


def _exit_text(exit_code: int) -> str:
    """``multiprocessing``'s exit code in words: negative is the signal that ended the process."""
    if exit_code >= 0:
        return f"ended with exit status {exit_code}"
    try:
        return f"was killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"was killed by signal {-exit_code}"


def _run_alone(run: TaskFunction, args: tuple, ctx: multiprocessing.context.BaseContext, watch: _Watch) -> TaskResult | int:
    """Runs one task in a process of its own: its results, or its exit code.

    A bare process rather than a one-worker pool: a pool reports a dead worker without
    its exit code, which the reject detail names. The time limit applies as in the pool.
    """
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_task_process, args=(send, storage.settings(), os.getpid(), run, args), daemon=True)
    proc.start()
    send.close()  # now only the child holds the sending end: its death reads as EOF
    try:
        while not receive.poll(watch.poll_s):
            watch.overdue |= _kill_overdue(watch.bucket_dir, [args[0]], watch.timeout_s)
        kind, value = receive.recv()
    except EOFError:
        kind, value = "died", None
    finally:
        receive.close()
        proc.join()
    if kind == "error":
        raise RuntimeError(f"clean: re-running one image alone failed:\n{value}")
    return value if kind == "ok" else proc.exitcode


def _task_process(send: Any, settings: storage.Settings, step_pid: int, run: TaskFunction, args: tuple) -> None:
    """Body of :func:`_run_alone`'s process: runs the task and sends back its outcome."""
    _init_worker(settings, step_pid)
    try:
        outcome: tuple[str, Any] = ("ok", run(*args))
    except Exception:  # noqa: BLE001 - sent back, so the step fails as it would in the pool
        outcome = ("error", traceback.format_exc())
    send.send(outcome)
    send.close()
