"""The step registry names parts that exist, and every list of steps is read from it."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from imgpipe import config
from imgpipe import step_table as registry
from imgpipe.containers.catalog import KINDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(registry.STEPS))
def test_each_entry_names_a_config_a_step_and_a_report_that_exist(name):
    entry = registry.step(name)
    cfg = entry.config_class()
    assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen, f"{entry.config} is a frozen dataclass"
    params = list(inspect.signature(entry.run()).parameters)
    assert len(params) >= 3 and params[2] == "cfg", f"{entry.function} takes (source, dest, cfg)"
    assert list(inspect.signature(entry.report_builder()).parameters)[:2] == ["prefix", "manifest"]
    assert entry.image in KINDS
    if entry.ray_target is not None:
        assert entry.ray_target in {f.name for f in dataclasses.fields(cfg)}
    assert (ROOT / "components" / f"{name}.py").is_file(), "each step has its Kubeflow component"


def test_an_unknown_step_is_refused_with_the_list():
    with pytest.raises(ValueError, match="unknown step 'resise'; steps: download, clean, resize, train"):
        registry.step("resise")


def test_config_sections_the_cli_and_remote_jobs_read_the_registry():
    from imgpipe.cli import COMMANDS, build_parser
    from imgpipe.remote import dispatch, job

    assert ("pipeline", "synth", *registry.STEPS) == config.SECTIONS
    assert set(registry.STEPS) <= set(COMMANDS)
    parser_help = build_parser().format_help()
    for entry in registry.STEPS.values():
        assert entry.summary in " ".join(parser_help.split())
    assert set(dispatch.remote_steps()) == {"resize"}
    assert set(job.job_steps()) == {"resize", "train"}
