"""Training on every GPU of the pod: the compile-time count, its checks, and 2 CPU ranks through the component.

The two-rank test starts gloo processes through torch's elastic launch on loopback; run
the module inside ``scripts/in-loopback-netns``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from imgpipe.components.promote import promote as promote_component
from imgpipe.components.train import train as train_component
from kfp import dsl

from imgpipe import contract, storage
from imgpipe.kfp import package as kfp_package
from imgpipe.remote import ranks
from imgpipe.stepio import artifacts as kfp_artifacts
from tests.helpers import ir_dags
from tests.test_components import _artifact
from tests.train.test_loader import write_resize_output


@pytest.mark.parametrize("value", [0, -1, ranks.MAX_PROCS + 1])
def test_a_count_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match=f"between 1 and {ranks.MAX_PROCS}"):
        ranks.check_procs(value)


@pytest.mark.parametrize("value", ["2", 2.0, True, None])
def test_a_count_that_is_no_integer_is_refused(value):
    with pytest.raises(TypeError, match="must be an integer"):
        ranks.check_procs(value)


@pytest.mark.parametrize("text", ["two", "2; rm -rf /", "-1", "1.5"])
def test_the_environment_count_is_checked(monkeypatch, text):
    monkeypatch.setenv(ranks.PROCS_ENV, text)
    with pytest.raises(ValueError, match=ranks.PROCS_ENV):
        ranks.procs_from_env()


def test_the_environment_count_defaults_to_one(monkeypatch):
    monkeypatch.delenv(ranks.PROCS_ENV, raising=False)
    assert ranks.procs_from_env() == 1
    monkeypatch.setenv(ranks.PROCS_ENV, "4")
    assert ranks.procs_from_env() == 4


def _train_container(package: Path) -> tuple[dict, dict]:
    ir = next(yaml.safe_load_all(package.read_text()))
    # train runs in an If branch
    (label,) = [task["componentRef"]["name"] for dag in ir_dags(ir) for task in dag["tasks"].values() if task["taskInfo"]["name"] == "train"]
    executor = ir["components"][label]["executorLabel"]
    return ir["deploymentSpec"]["executors"][executor]["container"], ir


@pytest.mark.parametrize("gpus", [1, 4])
def test_compile_with_train_gpus_asks_for_them_and_starts_one_process_each(tmp_path, monkeypatch, gpus):
    monkeypatch.delenv(kfp_package.GPU_ENV, raising=False)
    monkeypatch.delenv(kfp_package.GPUS_ENV, raising=False)
    package = kfp_package.compile_package(tmp_path / "p.yaml", train_gpus=gpus)
    container, _ = _train_container(package)
    accelerator = container["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", str(gpus))
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[ranks.PROCS_ENV] == str(gpus)
    res = container["resources"]
    assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == (str(8 * gpus), str(8 * gpus)), "8 CPUs per process"


def test_the_gpu_count_comes_from_the_environment_too(tmp_path, monkeypatch):
    monkeypatch.delenv(kfp_package.GPU_ENV, raising=False)
    monkeypatch.setenv(kfp_package.GPUS_ENV, "2")
    container, _ = _train_container(kfp_package.compile_package(tmp_path / "p.yaml"))
    assert container["resources"]["accelerator"]["resourceCount"] == "2"
    monkeypatch.setenv(kfp_package.GPUS_ENV, "lots")
    with pytest.raises(ValueError, match=kfp_package.GPUS_ENV):
        kfp_package.compile_package(tmp_path / "q.yaml")


def test_more_gpus_without_gpu_nodes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs the train task on GPU nodes"):
        kfp_package.compile_package(tmp_path / "p.yaml", gpu=False, train_gpus=2)
    with pytest.raises(ValueError, match="between 1 and"):
        kfp_package.compile_package(tmp_path / "p.yaml", train_gpus=0)


def test_cli_compile_takes_train_gpus(tmp_path, monkeypatch):
    from imgpipe.cli import main

    monkeypatch.delenv(kfp_package.GPU_ENV, raising=False)
    assert main(["compile", str(tmp_path / "p.yaml"), "--train-gpus", "2"]) == 0
    container, _ = _train_container(tmp_path / "p.yaml")
    assert container["resources"]["accelerator"]["resourceCount"] == "2"


def test_more_cuda_ranks_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="4 train processes need 4 GPUs, but this pod sees 2"):
        ranks._check_devices(4, "auto")
    ranks._check_devices(2, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        ranks._check_devices(2, "cuda")


@pytest.mark.ray  # gloo on loopback: inside scripts/in-loopback-netns
def test_two_cpu_ranks_through_the_train_components_own_code_path(tmp_path, monkeypatch):
    monkeypatch.setenv(ranks.PROCS_ENV, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("IMGPIPE_SOURCE_LOCAL", "1")  # the data root is local: the operator allows it
    data_root = "file://" + str(tmp_path / "store")
    data = write_resize_output(kfp_artifacts.run_prefix(data_root, "r2", "resize"), classes=3, size=16)
    kinds = {"trained": dsl.Artifact, "model": dsl.Model, "metrics": dsl.Metrics, "confusion": dsl.ClassificationMetrics, "report": dsl.HTML}
    outs = {name: _artifact(cls, tmp_path / name) for name, cls in kinds.items()}
    trained = train_component.python_func(
        resized=data,
        data_root=data_root,
        run_id="r2",
        model_name="tiny_cnn",
        epochs=1,
        batch_size=4,
        aug_policy="basic",
        step_config={"train": {"num_workers": 0, "device": "cpu", "shuffle_buffer": 8}},
        **outs,
    )
    out = f"{data_root}/runs/r2/train"
    manifest = contract.verify_output(out)
    assert manifest["extra"]["world_size"] == 2, "two processes trained"
    seen = manifest["extra"]["images_seen"]
    rows = contract.read_manifest(data)["extra"]["splits"]
    assert seen["train"] == rows["train"], "each training image once, split between the ranks"
    assert outs["trained"].metadata["prefix"] == out and Path(outs["model"].path).stat().st_size > 0
    assert {"val_accuracy", "test_accuracy"} <= set(outs["metrics"].metadata)
    # Rank 0 alone wrote: one model, one manifest, no second attempt's files.
    names = sorted(o.uri[len(storage.normalize_uri(out).rstrip("/")) + 1 :] for o in storage.list_objects(out))
    assert names.count("model.pt") == 1 and names.count(contract.MANIFEST) == 1
    # The next task, the promotion gate, takes the prefix the train task handed on.
    assert trained == out and kfp_artifacts.read_latest(data_root) is None, "train promotes nothing itself"
    kinds = {"model": dsl.Model, "metrics": dsl.Metrics, "confusion": dsl.ClassificationMetrics, "report": dsl.HTML}
    promote_component.python_func(
        trained=trained, data_root=data_root, run_id="r2", **{name: _artifact(cls, tmp_path / "promote" / name) for name, cls in kinds.items()}
    )
    assert kfp_artifacts.read_latest(data_root)["run_id"] == "r2"
