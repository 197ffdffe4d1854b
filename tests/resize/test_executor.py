"""What runs resize's tasks: the rule between Ray and the pool, and the pool, without Ray.

The step on each executor, end to end, is tests/steps/test_resize_end_to_end.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from imgpipe.config import config_from_dict
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.executor import POOL_MAX_ROWS, POOL_NODE, choose_executor, pool_results

LOCAL: dict[str, str] = {}  # an environment without RAY_ADDRESS


@pytest.fixture(autouse=True)
def _no_ray_in_this_process(monkeypatch):
    """The rule looks at ``sys.modules["ray"]``: a test session's own Ray must not decide these tests."""
    monkeypatch.delitem(sys.modules, "ray", raising=False)


@pytest.mark.parametrize(
    "executor,ray_address,rows,environ,expected",
    [
        # auto: the pool for a small input when no cluster is named and no Ray runs here...
        ("auto", "", 10, LOCAL, "pool"),
        ("auto", "", POOL_MAX_ROWS, LOCAL, "pool"),
        # ...Ray above the threshold, or where a cluster is named (the address, or inside a Ray job).
        ("auto", "", POOL_MAX_ROWS + 1, LOCAL, "ray"),
        ("auto", "auto", 10, LOCAL, "ray"),
        ("auto", "ray://head:10001", 10, LOCAL, "ray"),
        ("auto", "", 10, {"RAY_ADDRESS": "10.0.0.1:6379"}, "ray"),
        # Forced either way.
        ("ray", "", 10, LOCAL, "ray"),
        ("pool", "", POOL_MAX_ROWS * 10, LOCAL, "pool"),
    ],
)
def test_the_rule(executor, ray_address, rows, environ, expected):
    assert choose_executor(executor, ray_address, rows, environ) == expected


def test_auto_uses_a_ray_this_process_runs_already(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    assert choose_executor("auto", "", 10, LOCAL) == "ray"
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))  # imported, not started
    assert choose_executor("auto", "", 10, LOCAL) == "pool"


def test_the_pool_is_refused_where_a_cluster_is_named():
    with pytest.raises(ValueError, match="executor 'pool'.*ray_address 'kuberay'"):
        ResizeConfig(executor="pool", ray_address="kuberay")
    with pytest.raises(ValueError, match="executor 'pool'.*'ray://head:10001'"):
        ResizeConfig(executor="pool", ray_address="ray://head:10001")
    # Inside a Ray job the address comes from the environment: refused when the step runs.
    with pytest.raises(ValueError, match="executor 'pool'.*10.0.0.1:6379"):
        choose_executor("pool", "", 10, {"RAY_ADDRESS": "10.0.0.1:6379"})
    assert ResizeConfig(executor="ray", ray_address="kuberay").executor == "ray"


def test_an_unknown_executor_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="executor must be one of auto, ray, pool"):
        ResizeConfig(executor="threads")  # type: ignore[arg-type]  # direct construction
    with pytest.raises(ValueError, match="pool"):
        config_from_dict(ResizeConfig, {"executor": "pol"})


# Task functions for the pool, at module level so that its workers import them by name.


def _echo(task: int, units: list, *, node: str, tag: str) -> dict:
    return {"task": task, "units": units, "node": node, "tag": tag, "pid": os.getpid()}


def _die_on_task_one(task: int, units: list, *, node: str) -> dict:
    if task == 1:
        os._exit(3)  # as the OOM killer's SIGKILL would end it: no exception, no cleanup
    time.sleep(0.2)
    return {"task": task}


def _hang(task: int, units: list, *, node: str) -> dict:
    time.sleep(3600)
    return {"task": task}


def test_the_pool_runs_every_task_once_with_its_arguments(tmp_path):
    tasks = [[(str(tmp_path / "a.parquet"), i)] for i in range(5)]
    with pool_results(tasks, _echo, {"tag": "x"}, 2, ["file://" + str(tmp_path)]) as results:
        got = sorted(results, key=lambda r: r["task"])
    assert [r["task"] for r in got] == list(range(5))
    assert all(r["units"] == tasks[r["task"]] and r["node"] == POOL_NODE and r["tag"] == "x" for r in got)
    assert len({r["pid"] for r in got}) <= 2 and os.getpid() not in {r["pid"] for r in got}


def test_a_process_with_another_thread_starts_its_workers_from_a_forkserver(tmp_path, monkeypatch):
    import imgpipe.resize.executor as executor

    asked = []
    real = executor.pools.pool_context
    monkeypatch.setattr(
        executor.pools, "pool_context", lambda uris, preload=(), *, fork_ok=True: asked.append(fork_ok) or real(uris, preload, fork_ok=fork_ok)
    )
    tasks = [[(str(tmp_path / "a.parquet"), 0)]]
    monkeypatch.setattr(executor.threading, "active_count", lambda: 1)
    with pool_results(tasks, _echo, {"tag": "x"}, 1, ["file://" + str(tmp_path)]) as results:
        assert len(list(results)) == 1
    # A thread alive beside the step (a progress bar's monitor, a notebook's): no fork, whose
    # worker could wait for ever on a lock that thread held (a pool forked beside tqdm's monitor hung).
    monkeypatch.setattr(executor.threading, "active_count", lambda: 3)
    with pool_results(tasks, _echo, {"tag": "x"}, 1, ["file://" + str(tmp_path)]) as results:
        assert len(list(results)) == 1
    assert asked == [True, False]


def test_a_dead_worker_fails_the_run_with_a_clear_message(tmp_path):
    tasks = [[("file:///a.parquet", i)] for i in range(4)]
    died = pytest.raises(RuntimeError, match="a pool worker died.*nothing is committed.*executor 'ray'")
    with died, pool_results(tasks, _die_on_task_one, {}, 2, ["file:///a.parquet"]) as results:
        list(results)


def test_a_stalled_pool_fails_and_its_workers_are_killed():
    tasks = [[("file:///a.parquet", 0)]]
    started = time.monotonic()
    stalled = pytest.raises(RuntimeError, match=r"no pool task finished in 0.5 s \(no_progress_timeout_s\)")
    with stalled, pool_results(tasks, _hang, {}, 1, ["file:///a.parquet"], no_progress_timeout_s=0.5) as results:
        list(results)
    assert time.monotonic() - started < 30, "the hanging worker was killed, not waited for"


def test_a_pool_worker_builds_tables_without_importing_pandas():
    # A fresh interpreter, set up as a pool worker: pyarrow would import pandas (where
    # installed) the first time it builds an array, only to recognize pandas objects.
    code = (
        "import os, sys\n"
        "import numpy as np, pyarrow as pa\n"
        "from imgpipe import storage\n"
        "from imgpipe.resize.executor import _init_worker\n"
        "_init_worker(storage.settings(), os.getppid())\n"
        "table = pa.table({'image': np.array([b'x', b'yz'], dtype=object), 'order': np.arange(2)})\n"
        "print(table.num_rows, 'pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["2", "False"], out
