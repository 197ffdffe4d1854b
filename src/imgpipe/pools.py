"""Process pools for a step's tasks: the start method the inputs allow, and each worker's setup.

    ctx = pool_context(uris, preload=["imgpipe.resize.task"])
    with frozen_heap(), ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker,
                                            initargs=(storage.settings(), os.getpid())) as pool:
        ...

Clean's decode pool (:mod:`imgpipe.clean.pool`) and resize's local pool
(:mod:`imgpipe.resize.executor`) start their workers this way.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence

from imgpipe import resources, storage

__all__ = ["pool_context", "init_worker", "frozen_heap"]


def pool_context(uris: Iterable[str], preload: Sequence[str] = (), *, fork_ok: bool = True) -> multiprocessing.context.BaseContext:
    """Fork where every input's backend survives a fork; else a forkserver that preloads ``preload``.

    An object store's client may keep threads that do not survive a fork (the child can
    deadlock on a lock one of them held: :func:`imgpipe.storage.fork_safe`), so such inputs
    get a forkserver, whose workers start in ~0.05 s each plus ~0.4 s once for the
    server, instead of ~0.5 s each for spawn. Local inputs take plain fork, which saves
    that ~0.4 s: a tenth of cleaning an Oxford-sized set on 2 cores.

    Args:
        uris: What the workers read.
        preload: Modules the forkserver imports once for all its workers (by name).
        fork_ok: ``False`` when this process holds threads of its own that a fork would
            copy mid-operation (a Ray driver's): a forkserver then, whatever the inputs.
    """
    if fork_ok and storage.fork_safe(uris):
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    _forkserver_in_this_environment()
    return ctx


_forkserver_environ: dict[str, str] | None = None


def _forkserver_in_this_environment() -> None:
    """Stops a forkserver started in another environment, so the next workers start in this one.

    The forkserver is one per process and lives on; its workers inherit the environment it
    started in, object-store credentials included (:func:`init_worker` passes the settings,
    never a secret). A process that runs a step again after its environment changed (another
    endpoint or key pair, as a notebook or a test session may) would otherwise give its
    workers the old credentials: ACCESS_DENIED, or another store.
    """
    global _forkserver_environ
    from multiprocessing import forkserver

    now = dict(os.environ)
    if _forkserver_environ is not None and now != _forkserver_environ:
        stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own; without it the server stays
        if stop is not None:
            stop()
    _forkserver_environ = now


def init_worker(settings: storage.Settings, step_pid: int) -> None:
    """Pool initializer: the same storage settings as the parent; gone when the step is gone."""
    resources.die_with_parent(owner=step_pid)
    storage.use_settings(settings)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keeps the collector off this process's objects while forked workers run.

    Forked workers share the parent's pages until something writes to them, and a
    collection in a worker writes to every tracked object it inherited (measured: 0.12 s
    of a 2.4 s decode pass on 2 cores). The objects are collectable again afterwards,
    unless the caller had frozen its heap itself: that is left as it was.
    """
    if gc.get_freeze_count():  # unfreezing would undo the caller's freeze too
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
