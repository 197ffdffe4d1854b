"""One precedence for a local run: defaults in code < each --config file in order < --param / --set on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe.kfp.preflight import check_arguments
from imgpipe.local.run import LOCAL_PARAMS, LocalRunConfig, load_local_config
from imgpipe.local.settings import Layers, parameter_fields

LOCAL_YAML = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


def _train(cfg: LocalRunConfig):
    return check_arguments(cfg.pipeline_arguments())[1]


def test_a_command_line_parameter_wins_over_the_config_files_step_field():
    # The case: configs/local.yaml sets train.epochs 3 and train.model resnet18.
    cfg = load_local_config(LOCAL_YAML, params=["epochs=1", "model=resnet34", "image_size=48"])
    configs = _train(cfg)
    assert configs["train"].epochs == 1 and configs["train"].model == "resnet34"
    assert configs["resize"].size == 48, "image_size sets resize.size, over the file's resize.size 96"
    assert configs["train"].lr == 0.002 and configs["resize"].mode == "short-side-crop", "the file's other fields stay"


def test_the_config_file_wins_over_the_defaults_and_set_wins_over_the_file(tmp_path):
    configs = _train(load_local_config(LOCAL_YAML))
    assert configs["train"].epochs == 3 and LOCAL_PARAMS["epochs"] != 3, "the file's train.epochs over the local default"
    assert configs["resize"].size == 96
    configs = _train(load_local_config(LOCAL_YAML, sets=["train.epochs=2", "resize.size=40", "pipeline.batch_size=8"]))
    assert (configs["train"].epochs, configs["resize"].size, configs["train"].batch_size) == (2, 40, 8)
    assert load_local_config(LOCAL_YAML, sets=["synth.classes=4"], per_class=5).classes == 4


def test_a_later_file_wins_field_by_field_over_an_earlier_one_parameter_or_section(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("pipeline: {epochs: 5}\ntrain: {lr: 0.01}\n")
    second.write_text("train: {epochs: 4}\n")
    configs = _train(load_local_config([first, second]))
    assert (configs["train"].epochs, configs["train"].lr) == (4, 0.01)
    second.write_text("pipeline: {epochs: 6}\n")
    assert _train(load_local_config([LOCAL_YAML, second]))["train"].epochs == 6, "a parameter beats an earlier file's section"
    first.write_text("pipeline: {epochs: 5}\ntrain: {epochs: 7}\n")
    assert _train(load_local_config(first))["train"].epochs == 7, "within one file the step section is the more specific"


def test_step_config_given_as_a_parameter_is_a_layer_of_sections():
    cfg = load_local_config(LOCAL_YAML, params=['step_config={"train": {"lr": 0.0005}}'])
    assert _train(cfg)["train"].lr == 0.0005


def test_params_set_in_code_win_over_sections_set_in_code():
    cfg = LocalRunConfig(params={"epochs": 1}, step_config={"train": {"epochs": 3, "lr": 0.01}})
    args = cfg.pipeline_arguments()
    assert "epochs" not in args["step_config"]["train"] and args["epochs"] == 1 and args["step_config"]["train"]["lr"] == 0.01


def test_every_mapped_parameter_names_a_real_field():
    from imgpipe.step_table import STEPS

    for param, (step, field) in parameter_fields().items():
        assert field in STEPS[step].config_class().__dataclass_fields__, param


def test_malformed_command_line_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"SECTION.KEY=VALUE, e.g. --set train.lr=0.001"):
        Layers().add_command_line(sets=["lr=0.1"])
    with pytest.raises(ValueError, match=r"unknown section\(s\) trian \(did you mean 'train'\?\)"):
        Layers().add_command_line(sets=["trian.lr=0.1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) clases \(did you mean 'classes'\?\)"):
        Layers().add_command_line(sets=["synth.clases=3"])
    with pytest.raises(ValueError, match="must look like key=value"):
        Layers().add_command_line(params=["epochs"])
