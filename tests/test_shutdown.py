"""How a step's process ends (imgpipe.shutdown): each case in a fresh interpreter, as a step's process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from imgpipe import cli, shutdown


def _python(code: str, buffered: bool = False) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; ``buffered``: its stdout block-buffered, whatever PYTHONUNBUFFERED says."""
    env = {k: v for k, v in os.environ.items() if not (buffered and k == "PYTHONUNBUFFERED")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_skipping_the_exit_collection_waits_for_the_exit():
    # A handler registered before runs after it (exit handlers run last in, first out), so
    # it sees the heap frozen; until then nothing is.
    code = (
        "import atexit, gc\n"
        "from imgpipe import shutdown\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "shutdown.skip_collection_at_exit(); shutdown.skip_collection_at_exit()\n"
        "print('frozen now:', gc.get_freeze_count() > 0)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["frozen now: False", "frozen at exit: True"]


def test_a_process_that_loaded_torchvision_ends_without_leak_reports():
    # torchvision.ops imports triton (through torch._dynamo) when it is installed; triton's
    # nanobind bindings report every object a frozen heap left unfreed at the exit.
    pytest.importorskip("torchvision")
    for end in ("", "shutdown.end_process(0)\n"):
        done = _python("from imgpipe import shutdown\nimport torchvision\nshutdown.skip_collection_at_exit()\n" + end)
        assert done.returncode == 0 and "leaked" not in done.stderr, done.stderr[-2000:]


# A module global whose finalizer prints: Python's teardown runs it, end_process does not.
_PROBE = (
    "import atexit, sys\n"
    "from imgpipe import shutdown\n"
    "class Finalized:\n"
    "    def __del__(self): print('finalized in the teardown')\n"
    "kept = Finalized()\n"
    "atexit.register(lambda: print('exit handler ran'))\n"
    "sys.stdout.write('buffered, no newline')\n"
)


def test_ending_a_process_runs_its_exit_handlers_and_flushes_but_skips_the_teardown():
    done = _python(_PROBE + "shutdown.end_process(3)\nprint('not reached')\n")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newlineexit handler ran\n"
    # The same process left to Python's exit finalizes the global.
    usual = _python(_PROBE + "sys.exit(3)\n")
    assert usual.returncode == 3 and usual.stdout.endswith("finalized in the teardown\n")


def test_ending_a_process_flushes_the_c_librarys_output_too():
    # An extension's printf sits in the C library's buffer while stdout is a pipe.
    done = _python("import ctypes\nfrom imgpipe import shutdown\nctypes.CDLL(None).printf(b'from C\\n')\nshutdown.end_process(None)\n")
    assert (done.returncode, done.stdout) == (0, "from C\n"), done.stderr


@pytest.mark.parametrize("end", ["shutdown.end_process(0)", "sys.exit(0)"])
def test_a_stdout_whose_reader_is_gone_fails_the_exit_as_python_fails_it(end):
    code = (
        "import os, sys\n"
        "from imgpipe import shutdown\n"
        "sys.stdout.write('lost')\n"  # buffered: stdout is a pipe
        "r, w = os.pipe(); os.dup2(w, 1); os.close(r); os.close(w)\n" + end + "\n"
    )
    assert _python(code, buffered=True).returncode == 120


def test_a_process_with_a_thread_still_running_ends_as_python_ends_it():
    # end_process returns; Python's exit then waits for the thread, whose output is not lost.
    code = (
        _PROBE + "import threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "shutdown.end_process(3)\n"
        "print('returned')\n"
        "sys.exit(4)\n"
    )
    done = _python(code)
    assert done.returncode == 4, done.stderr
    assert "returned" in done.stdout and "thread done" in done.stdout and "finalized in the teardown" in done.stdout


@pytest.mark.parametrize(("command", "ends"), [("train", True), ("clean", False)])
def test_the_train_command_ends_its_process_without_the_teardown(monkeypatch, command, ends):
    ended = []
    monkeypatch.setattr(shutdown, "end_process", ended.append)
    # Nothing of a step's process setting left in the test's: no exit handler, no hidden module, the environment restored.
    monkeypatch.setattr(shutdown, "skip_collection_at_exit", lambda: None)
    monkeypatch.setattr(cli.resources, "hide_unused_module", lambda name: False)
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
    credentials = logging.getLogger("botocore.credentials")
    monkeypatch.setattr(credentials, "level", credentials.level)
    monkeypatch.setitem(cli.COMMANDS, command, lambda args: 0)
    monkeypatch.setattr(sys, "argv", ["imgpipe", command, "file:///nowhere/in", "file:///nowhere/out"])
    assert cli.main() == 0
    assert ended == ([0] if ends else [])
    # A caller in a longer-lived process (argv given) keeps its process.
    ended.clear()
    assert cli.main([command, "file:///nowhere/in", "file:///nowhere/out"]) == 0
    assert ended == []
