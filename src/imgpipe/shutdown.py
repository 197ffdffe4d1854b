"""How a step's process ends: without the work that only frees memory the kernel frees anyway.

Python's exit waits for the non-daemon threads, runs the exit handlers (logging's flush
among them) and flushes the standard streams; then it tears the modules down, collecting
garbage several times over the whole heap on the way. A step's process has committed its
output by then, and that last part frees nothing the kernel does not.

- :func:`skip_collection_at_exit` keeps the teardown but freezes the heap from an exit
  handler, so that the collector's passes skip it (any process: a CLI step, a kfp component).
- :func:`end_process` skips the teardown altogether (a CLI step command, after its output
  is committed), for a process that loaded an extension that checks for leaks at the
  teardown, where freezing cannot apply: the train step's.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import sys
import threading

__all__ = ["skip_collection_at_exit", "end_process"]

# Extensions built with nanobind check, when the interpreter finalizes, that every object
# they made was freed, and print a report of the rest ("nanobind: leaked 514 functions!",
# about 27 lines) that users read as a crash. A frozen heap leaves their cycles unfreed, so
# a process that loaded one is finalized in full. triton is one: torchvision.ops imports
# torch._dynamo, which imports triton when it is installed (torch.utils._triton).
_CHECKED_AT_EXIT = ("triton",)


def skip_collection_at_exit() -> None:
    """Lets this process end without the collector walking every object it still holds.

    Python's finalization collects garbage several times while it tears the modules down,
    and each pass visits every tracked object: 0.18–0.27 s of a cold ``imgpipe clean``
    on 2 cores (``perf``: all in ``gc_collect_main``), for memory the kernel frees anyway.
    Freezing the heap from an exit handler moves it out of the collector's view only once
    the process is ending, so calling this from code that goes on running (a test, a
    notebook) changes nothing until that process exits. Exit handlers, stream flushes and
    the modules' teardown still run; only garbage in reference cycles is left unfinalized,
    which is why the steps close their files and commit before they return.
    """
    atexit.unregister(_freeze_at_exit)  # one registration however often it is called
    atexit.register(_freeze_at_exit)


def _freeze_at_exit() -> None:
    """Freezes the heap for the finalization, unless an extension that checks for leaks is loaded."""
    if not any(name in sys.modules for name in _CHECKED_AT_EXIT):
        gc.freeze()


def end_process(code: int | None) -> None:
    """Ends this process with exit status ``code`` as Python's exit does, less the modules' teardown.

    The exit handlers run and the standard streams are flushed, Python's and the C
    library's (an extension's ``printf``); then the process ends (``os._exit``), without the
    teardown's garbage collections and finalizers. ``None`` is status 0, as for
    ``sys.exit``; a stdout that cannot be flushed (its reader gone) makes a successful exit
    status 120, as Python's does. With triton loaded (:data:`_CHECKED_AT_EXIT`: the heap
    cannot be frozen) the teardown took 1.9–2.7 s of a cold ``imgpipe train`` on 2 cores,
    after its output was committed; this takes 0.2 s. For a step's own process only, once
    its output is committed and its files are closed: an object left to the teardown (a
    file in a module's global, garbage in a reference cycle) is not finalized.

    Returns (and ends nothing) while a thread other than this one, not a daemon, still
    runs: Python's exit waits for such threads, and wakes the idle workers of a thread pool
    left open so that they finish; the caller then exits as usual.
    """
    me = threading.current_thread()
    if any(t is not me and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    status = 0 if code is None else code
    atexit._run_exitfuncs()  # what Python's exit runs them with: last registered first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone
            if stream is sys.stdout and status == 0:
                status = 120
    with contextlib.suppress(OSError, AttributeError):  # a C library without fflush(NULL)
        ctypes.CDLL(None).fflush(None)
    os._exit(status)
