"""Where a step runs is decided above the steps: the registry, the local path and the refusals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imgpipe import step_table as registry
from imgpipe.remote import dispatch
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.resize import resize

ROOT = Path(__file__).resolve().parents[2]


def test_the_resize_step_imports_no_runner():
    tree = ast.parse((ROOT / "src" / "imgpipe" / "steps" / "resize.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
    assert not {m for m in imported if m.endswith(("ray_jobs", "kuberay", "dispatch"))}, imported


@pytest.mark.parametrize("address", ["kuberay", "kuberay://team-a"])
def test_the_step_function_refuses_a_remote_target_and_names_the_way(tmp_path, address):
    with pytest.raises(ValueError, match=r"is a kuberay target: run it through imgpipe\.remote\.dispatch\.run_step"):
        resize("file://" + str(tmp_path / "clean"), "file://" + str(tmp_path / "out"), ResizeConfig(ray_address=address))
    assert not (tmp_path / "out").exists(), "nothing written"


def test_a_local_target_calls_the_step_here(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(registry.Step, "run", lambda self: lambda *a: calls.append(a) or "report")
    cfg = ResizeConfig(size=16)
    assert dispatch.run_step("resize", "s3://b/in", "s3://b/out", cfg, run_id="r") == "report"
    assert calls == [("s3://b/in", "s3://b/out", cfg)]


def test_an_unknown_step_or_an_unconfigured_cluster_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="cannot run remotely; remote-capable steps: resize"):
        dispatch.run_step("clean", "a", "b", ResizeConfig())
    monkeypatch.delenv("IMGPIPE_RAY_CLUSTERS", raising=False)
    with pytest.raises(ValueError, match="not a configured Ray cluster"):
        dispatch.run_step("resize", "a", "b", ResizeConfig(ray_address="http://attacker.example:8265"))
