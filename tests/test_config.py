"""Config resolution: defaults, YAML, overrides, validation, resolved dump."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import yaml

from imgpipe.clean.config import CleanConfig
from imgpipe.config import config_to_yaml, load_config, parse_override


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 7\ngrayscale: true\nsplit: [0.6, 0.2, 0.2]\n")
    cfg = load_config(CleanConfig, path, {"seed": 9, "workers": None})
    assert cfg.seed == 9 and cfg.grayscale is True and cfg.split == (0.6, 0.2, 0.2) and cfg.workers == 0
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_sectioned_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("clean:\n  seed: 4\ndownload:\n  retries: 2\n")
    assert load_config(CleanConfig, path, section="clean").seed == 4
    path.write_text("download:\n  retries: 2\n")
    assert load_config(CleanConfig, path, section="clean") == CleanConfig()


def test_unknown_key_and_bad_type_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown CleanConfig option.*sed.*valid options"):
        load_config(CleanConfig, overrides={"sed": 1})
    with pytest.raises(TypeError, match="seed: expected an integer"):
        load_config(CleanConfig, overrides={"seed": "abc"})
    with pytest.raises(ValueError, match="label_source"):
        load_config(CleanConfig, overrides={"label_source": "filename"})
    with pytest.raises(ValueError, match="does not exist"):
        load_config(CleanConfig, tmp_path / "missing.yaml")


def test_string_forms_from_cli():
    cfg = load_config(CleanConfig, overrides={"split": "0.8,0.1,0.1", "grayscale": "yes", "seed": "3"})
    assert cfg.split == (0.8, 0.1, 0.1) and cfg.grayscale and cfg.seed == 3
    assert parse_override("max-pixels=1000") == ("max_pixels", 1000)
    assert parse_override("labels_csv=s3://b/x.csv") == ("labels_csv", "s3://b/x.csv")
    with pytest.raises(ValueError, match="key=value"):
        parse_override("novalue")


def test_resolved_yaml_round_trips():
    cfg = CleanConfig(seed=5, split=(0.5, 0.25, 0.25))
    data = yaml.safe_load(config_to_yaml(cfg))
    assert data["split"] == [0.5, 0.25, 0.25]
    assert load_config(CleanConfig, overrides=data) == cfg


def test_a_typo_in_a_section_or_an_option_names_the_nearest_valid_one(tmp_path):
    """A misspelt section used to train silently with defaults."""
    from imgpipe.train.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("trian: {epochs: 1}\nclean: {seed: 3}\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) trian \(did you mean 'train'\?\)"):
        load_config(TrainConfig, path, section="train")
    path.write_text("train: {epocs: 1}\n")
    with pytest.raises(ValueError, match=r"epocs \(did you mean 'epochs'\?\)"):
        load_config(TrainConfig, path, section="train")
    path.write_text("train: 3\nclean: {seed: 3}\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(TrainConfig, path, section="train")
    path.write_text("clean: {seed: 3}\n")
    assert load_config(TrainConfig, path, section="train") == TrainConfig(), "no section of its own: the defaults"


def test_flags_take_type_choices_default_and_help_from_the_config():
    import argparse

    from imgpipe.config_flags import add_field_flags, field_default, flag_overrides
    from imgpipe.resize.config import ResizeConfig

    parser = argparse.ArgumentParser()
    add_field_flags(parser, CleanConfig, ("grayscale", "split", "seed", "label_source", "workers"))
    add_field_flags(parser, ResizeConfig, ("mode", "ops"), flags={"ops": "--op"})
    helps = {a.dest: a for a in parser._actions}
    assert f"(default: {field_default(CleanConfig, 'seed')})" in helps["seed"].help
    assert helps["label_source"].choices == ["auto", "oxford", "folder", "csv", "given"]
    assert helps["mode"].choices == ["short-side-crop", "fixed", "pad", "whole"]
    args = parser.parse_args(["--no-grayscale", "--seed", "3", "--split", "0.5,0.25,0.25", "--op", "clahe", "--op", "sobel"])
    # Only what was given: the rest stays "not set" so the file, then the default, apply.
    assert flag_overrides(args) == {"grayscale": False, "seed": 3, "split": "0.5,0.25,0.25", "ops": ("clahe", "sobel")}
    assert load_config(CleanConfig, None, {k: v for k, v in flag_overrides(args).items() if k != "ops"}).split == (0.5, 0.25, 0.25)
    with pytest.raises(SystemExit):
        parser.parse_args(["--seed", "x"])


def test_field_default_names_the_nearest_field():
    from imgpipe.config_flags import field_default

    with pytest.raises(ValueError, match="did you mean 'seed'"):
        field_default(CleanConfig, "sed")


def test_one_coercer_for_configs_and_run_parameters():
    from imgpipe.config import coerce

    assert coerce("x", "0.8,0.1,0.1", tuple[float, float, float]) == (0.8, 0.1, 0.1)
    assert coerce("x", {"a": 1}, dict) == {"a": 1} and coerce("x", (1, 2), list) == [1, 2]
    with pytest.raises(TypeError, match="expected an integer"):
        coerce("epochs", True, int)
    with pytest.raises(TypeError, match="expected a mapping"):
        coerce("step_config", [1], dict)


def test_well_typed_values_need_no_validator_import():
    """A step started with typed values (argparse's ints, YAML's numbers) does not pay pydantic's import."""
    import subprocess
    import sys

    code = (
        "import sys; from imgpipe.config import load_config; from imgpipe.clean.config import CleanConfig; "
        "load_config(CleanConfig, overrides={'seed': 3, 'grayscale': True, 'label_source': 'auto', 'labels_csv': None}); "
        "print('pydantic' in sys.modules); load_config(CleanConfig, overrides={'seed': '4'}); print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["False", "True"]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("epochs", 0, 1), {"integer": True, "note": "0 trains nothing"}, ValueError, "epochs must be an integer >= 1 (0 trains nothing), got 0"),
        (("lr", 1.0, 0, 1), {"high_open": True}, ValueError, "lr must be a number in [0, 1), got 1.0"),
        (("p", -0.5, 0, 1), {}, ValueError, "p must be a number in [0, 1], got -0.5"),
        (("ratio", 0, 0), {"low_open": True}, ValueError, "ratio must be a number > 0, got 0"),
        (("n", True, 1), {"integer": True}, TypeError, "n must be an integer >= 1, got True"),
        (("n", 2.0, 1), {"integer": True}, TypeError, "n must be an integer >= 1, got 2.0"),
        (("x", "3", None, 4), {}, ValueError, "x must be a number <= 4, got '3'"),
    ],
)
def test_check_range_refuses_in_one_message_for_every_config(args, kwargs, error, message):
    from imgpipe.config import check_range

    with pytest.raises(error) as raised:
        check_range(*args, **kwargs)
    assert str(raised.value) == message


def test_check_range_passes_values_in_range():
    from imgpipe.config import check_range

    check_range("lr", 0.5, 0, 1, high_open=True)
    check_range("workers", 0, 0, integer=True)
    check_range("alpha", 3, 0)


def _numeric(annotation: object) -> bool:
    """Whether a field's annotation holds an ``int`` or a ``float`` (alone, optional, or in a tuple)."""
    import types
    import typing

    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple):
        return any(_numeric(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return False


def _step_configs() -> list[type]:
    from imgpipe.resize.spec import ResizeSpec
    from imgpipe.step_table import STEPS
    from imgpipe.steps.audit import AuditConfig
    from imgpipe.steps.compare import CompareConfig
    from imgpipe.steps.predict import PredictConfig
    from imgpipe.steps.promote import PromoteConfig
    from imgpipe.train.augment_config import AugmentConfig
    from imgpipe.train.loader_config import LoaderConfig

    extra = [AugmentConfig, LoaderConfig, ResizeSpec, PredictConfig, PromoteConfig, CompareConfig, AuditConfig]
    return [*(s.config_class() for s in STEPS.values()), *extra]


def _numeric_fields() -> list[tuple[type, str]]:
    import dataclasses
    import typing

    return [(cls, f.name) for cls in _step_configs() for f in dataclasses.fields(cls) if f.init and _numeric(typing.get_type_hints(cls)[f.name])]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300], ids=["nan", "inf", "-inf", "1e300"])
@pytest.mark.parametrize(("cls", "name"), _numeric_fields(), ids=lambda x: x.__name__ if isinstance(x, type) else x)
def test_every_numeric_field_of_every_step_config_refuses_non_finite_and_huge_values(cls, name, value):
    import dataclasses
    import typing

    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    given: object = value
    if typing.get_origin(typing.get_type_hints(cls)[name]) is tuple or isinstance(default, tuple):
        given = (value, *default[1:]) if isinstance(default, tuple) and default else (value, value)
    with pytest.raises(ValueError) as raised:
        cls(**{name: given})
    assert name in str(raised.value)


def test_the_bounds_hold_at_the_cli_and_in_a_pipelines_step_config(capsys):
    from imgpipe.cli import main
    from imgpipe.config import MAX_NUMBER, check_range, step_config
    from imgpipe.train.config import TrainConfig
    from imgpipe.train.loader_config import MAX_CACHE_GB

    for text in ("inf", ".inf", "nan", "1e300", str(MAX_CACHE_GB + 1)):
        assert main(["train", "in", "out", "--set", f"loader_cache_gb={text}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgpipe train: error: loader_cache_gb must be") and len(err.splitlines()) == 1, err
    for value in (float("inf"), float("nan"), 1e300):
        with pytest.raises(ValueError, match="loader_cache_gb must be a finite number"):
            step_config(TrainConfig, {"train": {"loader_cache_gb": value}}, "train")
    assert step_config(TrainConfig, {"train": {"loader_cache_gb": float(MAX_CACHE_GB)}}, "train").loader_cache_gb == MAX_CACHE_GB
    check_range("x", float("inf"), 0, allow_inf=True)  # a field may allow inf, explicitly
    with pytest.raises(ValueError, match=r"x must be a number >= 0 and of at most 2\*\*53 in size \(or inf\), got nan"):
        check_range("x", float("nan"), 0, allow_inf=True)
    with pytest.raises(ValueError, match="seed"):
        check_range("seed", MAX_NUMBER + 1, integer=True)
