"""bench/common/host.py: what a benchmark records of the machine, read from the kernel's own files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "common"


def _load():
    if "host" not in sys.modules:
        spec = importlib.util.spec_from_file_location("host", BENCH / "host.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["host"] = module
        spec.loader.exec_module(module)
    return sys.modules["host"]


def test_the_cpu_model_is_the_first_model_name_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert _load().cpu_model(cpuinfo) == "AMD EPYC"


def test_the_boot_time_is_the_kernels_btime_in_utc(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nbtime 1795723800\nprocesses 10\n")
    assert _load().booted(stat) == "2026-11-26T20:10:00Z"
    assert _load().booted(tmp_path / "missing") is None


def _daemon(root: Path, index: int, state: str, actions: list[str]) -> None:
    daemon = root / str(index)
    (daemon / "contexts" / "0" / "schemes").mkdir(parents=True)
    (daemon / "state").write_text(state + "\n")
    for i, action in enumerate(actions):
        scheme = daemon / "contexts" / "0" / "schemes" / str(i)
        scheme.mkdir()
        (scheme / "action").write_text(action + "\n")


def test_damon_counts_only_a_running_daemon_with_a_pageout_scheme(tmp_path):
    host = _load()
    assert host.damon_pageout(tmp_path / "no-damon") is None
    root = tmp_path / "kdamonds"
    root.mkdir()
    (root / "nr_kdamonds").write_text("0\n")
    assert host.damon_pageout(root) is False
    _daemon(root, 0, "off", ["pageout"])
    _daemon(root, 1, "on", ["stat"])
    assert host.damon_pageout(root) is False
    _daemon(root, 2, "on", ["stat", "pageout"])
    assert host.damon_pageout(root) is True


def test_this_machine_is_described_with_every_field():
    record = _load().describe()
    assert set(record) == {"cpu_model", "cpus", "kernel", "booted", "python", "loadavg", "damon_pageout"}
    assert record["cpu_model"] and record["kernel"] and record["cpus"] >= 1
