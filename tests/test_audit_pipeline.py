"""The imgpipe-audit package: the main pipeline's parameters plus the audit's, K folds under a parallelism limit."""

from __future__ import annotations

import pytest

from imgpipe.cli import main
from imgpipe.kfp import package as kfp_package
from imgpipe.review.client import SECRET, TOKEN_ENV
from imgpipe.review.loop import TOP
from imgpipe.steps.audit import AuditConfig
from tests.test_sweep import _dag_tasks, _load


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("audit-ir") / "audit.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGPIPE_GPU_IMAGE", "registry.test/cuda/trainer:7")
        mp.delenv(kfp_package.GPU_ENV, raising=False)
        assert main(["compile", str(out), "--pipeline", "imgpipe-audit", "--parallelism", "3"]) == 0
    return _load(out)


def test_the_audit_takes_every_parameter_of_imgpipe_and_its_own(compiled, tmp_path):
    ir, _ = compiled
    assert ir["pipelineInfo"]["name"] == "imgpipe-audit"
    params = ir["root"]["inputDefinitions"]["parameters"]
    main_params = kfp_package.pipeline_inputs(kfp_package.compile_package(tmp_path / "main.yaml"))
    assert set(params) == set(main_params) - {"train_nodes"} | {"folds", "filter_by", "review_url", "review_top"}, "each fold trains in its pod"
    assert params["folds"]["defaultValue"] == AuditConfig().folds and params["folds"]["description"]
    assert params["filter_by"]["defaultValue"] == "prune_by_noise_rate"
    assert params["review_url"]["defaultValue"] == "" and params["review_top"]["defaultValue"] == TOP


def test_the_review_is_published_only_when_asked_with_the_token_from_the_secret(compiled):
    ir, executors = compiled
    root = ir["root"]["dag"]["tasks"]
    (branch,) = [t for t in root.values() if "publish-review" in ir["components"].get(t["componentRef"]["name"], {}).get("dag", {}).get("tasks", {})]
    condition = branch["triggerPolicy"]["condition"]
    assert "review_url" in condition and "!= ''" in condition.replace('"', "'"), condition
    task = ir["components"][branch["componentRef"]["name"]]["dag"]["tasks"]["publish-review"]
    assert task["inputs"]["artifacts"]["audit"] == {"componentInputArtifact": "pipelinechannel--audit-labels-audit"}, "the ranking's output"
    assert branch["inputs"]["artifacts"]["pipelinechannel--audit-labels-audit"]["taskOutputArtifact"]["producerTask"] == "audit-labels"
    secret = executors["exec-publish-review"]["secretAsEnv"]
    assert [(s["secretName"], s["keyToEnv"], s.get("optional")) for s in secret if s["secretName"] == SECRET] == [
        (SECRET, [{"secretKey": "token", "envVar": TOKEN_ENV}, {"secretKey": "url", "envVar": "LABEL_STUDIO_URL"}], True)
    ]
    images = {name: spec["container"]["image"] for name, spec in ir["deploymentSpec"]["executors"].items()}
    assert "trainer:7" in images["exec-publish-review"], "the held-out pictures are drawn with the train step's reader"


def test_folds_train_in_a_parallel_for_and_the_ranking_collects_them(compiled):
    ir, executors = compiled
    root = ir["root"]["dag"]["tasks"]
    loop_name, loop = next((n, t) for n, t in root.items() if "parameterIterator" in t)
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--plan-folds-Output"}
    assert root["audit-labels"]["inputs"]["artifacts"]["trained"]["taskOutputArtifact"]["producerTask"] == loop_name
    train = _dag_tasks(ir)["train"]["inputs"]["parameters"]
    for key in ("resized", "branch", "step_config"):
        assert train[key]["parameterExpressionSelector"] == f'parseJson(string_value)["{key}"]', key
    assert "promotion_tolerance" not in train, "a fold promotes nothing"
    # The folds are written in the cpu image; the ranking (cleanlab) in the gpu one, without a GPU.
    images = {name: spec["container"]["image"] for name, spec in ir["deploymentSpec"]["executors"].items()}
    assert any("imgpipe-cpu" in v for k, v in images.items() if "plan-folds" in k)
    assert any("trainer:7" in v for k, v in images.items() if "audit-labels" in k)


def test_parallelism_is_refused_for_the_main_pipeline(tmp_path):
    with pytest.raises(ValueError, match="parallelism"):
        kfp_package.compile_package(tmp_path / "p.yaml", parallelism=2)
