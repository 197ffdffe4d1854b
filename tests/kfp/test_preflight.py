"""The check before a run starts: parameter names, every step's config through its own class, sources and data root."""

from __future__ import annotations

import os
import sys

import pytest

from imgpipe.kfp.preflight import changed_settings, check_arguments, check_locations, check_params, check_uri_form
from imgpipe.local.run import LOCAL_PARAMS, LOCAL_STEP_CONFIG

BASE = {**LOCAL_PARAMS, "step_config": LOCAL_STEP_CONFIG}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"epoch": 1}, r"^unknown pipeline parameter 'epoch' \(did you mean 'epochs'\?\); parameters: .*epochs"),
        ({"preset": "resnett"}, r"^resize: unknown preset 'resnett' \(did you mean 'resnet'\?\)"),
        ({"model": "resnet19"}, r"^train: unknown model 'resnet19' \(did you mean 'resnet18'\?\)"),
        ({"epochs": -1}, r"^train: epochs must be an integer in \[1, "),
        ({"promotion_tolerance": 2.0}, r"^promotion_tolerance: tolerance is a difference of scores in \[0, 1\]"),
        ({"step_config": {"train": {"epoch": 3}}}, r"^train: unknown TrainConfig option\(s\) epoch \(did you mean 'epochs'\?\)"),
        ({"step_config": {"clean": {"split": [0.5, 0.1]}}}, r"^clean: "),
        ({"step_config": {"trian": {}}}, r"^step_config: unknown section\(s\) trian \(did you mean 'train'\?\)"),
        ({"source_uri": "s3://b/x"}, r"^--param source_uri: imgpipe run sets it from --source; pass --source instead"),
        ({"image_size": "big"}, r"^parameter image_size: expected an integer, got 'big'"),
    ],
)
def test_each_mistake_is_one_line_naming_the_setting_and_the_fix(given, message):
    with pytest.raises((ValueError, TypeError), match=message) as caught:
        check_arguments({**BASE, **given})
    assert "\n" not in str(caught.value)


def test_values_are_typed_as_the_pipeline_declares_them_and_every_config_is_built():
    typed, configs = check_arguments({**BASE, "preset": 224, "epochs": 1})
    assert typed["preset"] == "224", "a number where the pipeline takes text"
    assert set(configs) == {"download", "clean", "resize", "train", "promote"}
    assert configs["resize"].preset == "224" and configs["train"].epochs == 1


def test_an_empty_text_parameter_means_the_fields_default():
    _, configs = check_arguments({**BASE, "preset": "", "aug_policy": ""})
    assert configs["resize"].preset is None and configs["train"].aug_policy is None


def test_the_settings_shown_are_only_those_that_differ_from_the_defaults():
    typed, configs = check_arguments({**BASE, "epochs": 1, "source_sha256": "ab" * 32})
    changed = changed_settings(typed, configs)
    assert changed["train"]["epochs"] == 1 and "model" not in changed["train"]
    assert changed["pipeline"] == {"source_sha256": "ab" * 32}
    assert "download" not in changed and "promote" not in changed


def test_a_local_source_must_exist_and_be_readable(tmp_path):
    (tmp_path / "shards-000.tar").write_bytes(b"x")
    check_locations(str(tmp_path), None, None)
    check_locations(str(tmp_path / "shards-000.tar"), None, str(tmp_path / "root"))
    with pytest.raises(ValueError, match=r"^--source .*missing does not exist; give an existing folder"):
        check_locations(str(tmp_path / "missing"), None, None)
    with pytest.raises(ValueError, match=r"^--annotations .*nope.tar does not exist"):
        check_locations(str(tmp_path), str(tmp_path / "nope.tar"), None)
    with pytest.raises(ValueError, match=r"shards-001.tar does not exist"):
        check_locations(str(tmp_path / "shards-{000..001}.tar"), None, None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_local_source_is_refused(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir(mode=0)
    try:
        with pytest.raises(ValueError, match="is not readable by this user"):
            check_locations(str(folder), None, None)
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/images.tar", r"unsupported scheme 'ftp'; use a local path or http://, https://, s3://"),
        ("https:///images.tar", r"nothing names the host; write it as https://HOST/PATH"),
        ("s3:///images.tar", r"no bucket"),
    ],
)
def test_a_remote_source_must_have_a_known_scheme_and_a_host_or_bucket(uri, message):
    with pytest.raises(ValueError, match=message):
        check_uri_form(uri, "--source")
    check_uri_form("https://example.org/images.tar", "--source")
    check_uri_form("s3://bucket/images/", "--source")


def test_the_data_root_is_a_bucket_or_a_folder():
    with pytest.raises(ValueError, match="not http"):
        check_locations(None, None, "https://example.org/x")


def test_a_cluster_runs_parameters_get_the_same_step_checks():
    with pytest.raises(ValueError, match="^train: unknown model"):
        check_params({"data_root": "s3://b/x", "model": "resnet19"})
    with pytest.raises(ValueError, match="parameter data_root"):
        check_params({"data_root": "gs://b/x"})
    assert check_params({"data_root": "s3://b/x", "previous_run_prefix": "latest"})["train"].epochs is None


def test_submit_checks_without_torch_where_the_submitter_has_none(monkeypatch):
    # The retraining CronWorkflow's pod runs `imgpipe submit` in the cpu image, which has no torch:
    # the train step's model check is its task's, the other steps' are made here (a cluster run hit it).
    import builtins

    from imgpipe.kfp import preflight

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch.") or name == "torchvision" or name.startswith("torchvision."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "imgpipe.train.models", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    configs = preflight.check_params({"data_root": "s3://b/p", "epochs": 0, "model": "resnet18"})
    assert "train" not in configs and "clean" in configs
    with pytest.raises(ValueError, match="clean"):
        preflight.check_params({"data_root": "s3://b/p", "step_config": {"clean": {"nope": 1}}})


def test_epochs_zero_is_the_recipes_as_the_component_reads_it():
    from imgpipe.kfp import preflight

    assert preflight.check_params({"data_root": "s3://b/p", "epochs": 0})["train"].epochs is None
