"""The components: thin wrappers with the right images, and what they hand each other.

``download`` runs as kfp runs it locally (``kfp.local.SubprocessRunner``, the component
source executed by ``kfp.dsl.executor_main`` in a subprocess); kfp.local refuses input
artifacts for a single component, so ``clean`` and ``train`` are called through their
``python_func`` with real kfp artifact objects. The whole chain under kfp.local is in
``test_pipeline.py``. Helpers of :mod:`imgpipe.stepio.artifacts` and :mod:`imgpipe.stepio.publish` are
tested directly.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imgpipe.components.clean import clean
from imgpipe.components.download import download
from imgpipe.components.promote import promote
from imgpipe.components.resize import resize
from imgpipe.components.train import train
from kfp import dsl, local

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.config import step_config
from imgpipe.containers.catalog import ImageSet, image
from imgpipe.data.sources import SOURCE_LOCAL_ENV
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.remote.dispatch import remote_steps
from imgpipe.stepio import artifacts as kfp_artifacts
from imgpipe.stepio import publish as kfp_publish
from imgpipe.steps.download import DownloadConfig
from imgpipe.steps.download import download as run_download
from imgpipe.train.config import TrainConfig
from tests.train.test_loader import write_resize_output

COMPONENTS = {"download": download, "clean": clean, "resize": resize, "train": train, "promote": promote}
KINDS = {"download": "cpu", "clean": "cpu", "resize": "ray", "train": "gpu", "promote": "gpu"}
# What each component calls: a step that may run remotely goes through the layer that decides
# where (imgpipe.remote.dispatch); the gate through the run-level helper that moves latest.json.
CALLS = {"train": "imgpipe.remote.dispatch", "promote": "ka.promote_run("}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Oxford-shaped sample (2 breeds x 4 images plus the synth's quirks)."""
    root = "file://" + str(tmp_path_factory.mktemp("sample"))
    generate(root, SynthConfig(classes=2, per_class=4, seed=1), progress=False)
    return root


def _artifact(cls: type, path: Path, **metadata: object) -> dsl.Artifact:
    return cls(name=path.name, uri=str(path), metadata=dict(metadata))


@pytest.mark.parametrize("step", list(COMPONENTS))
def test_each_component_is_a_thin_lightweight_wrapper_on_its_image(step):
    component = COMPONENTS[step]
    container = component.component_spec.implementation.container
    assert container.image == image(KINDS[step])
    command = " ".join(container.command)
    assert "pip install" not in command, "install_kfp_package=False"
    func = component.python_func
    tree = ast.parse(inspect.getsource(func))
    body = tree.body[0].body[1:]  # after the docstring
    assert isinstance(body[0], ast.ImportFrom) and body[0].module.startswith("imgpipe"), "imports imgpipe inside"
    # Imports are not logic: each public name has one home, so a wrapper may need several.
    imports = [n for node in body for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module.startswith("imgpipe") for n in imports), "imports imgpipe only"
    statements = sum(1 for node in body for _ in ast.walk(node) if isinstance(_, ast.stmt)) - len(imports)
    assert statements <= 9, f"{step}: a component calls the library, it holds no logic ({statements} statements)"
    assert ("imgpipe.remote.dispatch" if step in remote_steps() else CALLS.get(step, f"imgpipe.steps.{step}")) in command


def test_image_names_come_from_one_place_and_the_environment():
    env = {"IMGPIPE_REGISTRY": "reg.example/ml/", "IMGPIPE_IMAGE_TAG": "2024.1"}
    assert image("cpu", env) == "reg.example/ml/imgpipe-cpu:2024.1"
    assert ImageSet.from_env({**env, "IMGPIPE_GPU_IMAGE": "nvcr.io/x/trainer:1"}) == ImageSet(
        cpu="reg.example/ml/imgpipe-cpu:2024.1", ray="reg.example/ml/imgpipe-ray:2024.1", gpu="nvcr.io/x/trainer:1"
    )
    with pytest.raises(ValueError, match="unknown image kind"):
        image("tpu", env)


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom or non-Python base image")
def test_download_component_under_kfp_local_writes_the_run_prefix(sample, tmp_path, monkeypatch):
    # The sample is a local file: the operator allows local sources (imgpipe run does the same).
    monkeypatch.setenv(SOURCE_LOCAL_ENV, "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    data_root = "file://" + str(tmp_path / "store")
    task = download(
        source_uri=storage.join(sample, "images.tar.gz"),
        annotations_uri=storage.join(sample, "annotations.tar.gz"),
        data_root=data_root,
        run_id="run-7",
        step_config={"download": {"row_group_rows": 4}},
    )
    out = task.outputs["dataset"]
    assert out.metadata["prefix"] == f"{data_root}/runs/run-7/download"
    # The UI artifacts describe the image archive's output, never the annotations'.
    assert task.outputs["metrics"].metadata["outputs"] == out.metadata["outputs"]
    assert "<h2>Sources</h2>" in Path(task.outputs["report"].path).read_text()
    assert out.metadata["annotations"] == f"{data_root}/runs/run-7/annotations"
    manifest = json.loads(Path(out.path).read_text())
    assert manifest == contract.read_manifest(out.metadata["prefix"], expect_step="download")
    assert manifest["config"]["row_group_rows"] == 4
    assert out.metadata["inputs"] == manifest["inputs"] and out.metadata["step"] == "download"
    assert Path(out.path).stat().st_size < 64 << 10, "the artifact is the manifest, never the data"


def test_clean_component_reads_the_download_artifact(sample, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv(SOURCE_LOCAL_ENV, "1")  # the data root is local: the operator allows it
    data_root = "file://" + str(tmp_path / "store")
    dl = run_download([storage.join(sample, "images.tar.gz")], kfp_artifacts.run_prefix(data_root, "r1", "download"), DownloadConfig())
    dataset = _artifact(dsl.Artifact, tmp_path / "dataset", prefix=dl.dest, annotations="")
    cleaned = _artifact(dsl.Artifact, tmp_path / "cleaned")
    ui = {"metrics": _artifact(dsl.Metrics, tmp_path / "metrics"), "report": _artifact(dsl.HTML, tmp_path / "report")}
    with caplog.at_level(logging.WARNING):
        clean.python_func(
            dataset=dataset,
            data_root=data_root,
            run_id="r1",
            cleaned=cleaned,
            **ui,
            split="0.5,0.25,0.25",
            previous_run_prefix="latest",
            # Eight images: a decoded-away one can leave the test split empty.
            step_config={"clean": {"workers": 1, "seed": 3.0, "min_images_per_split": 0}},
        )
    manifest = contract.read_manifest(cleaned.metadata["prefix"], expect_step="clean")
    assert cleaned.metadata["prefix"] == f"{data_root}/runs/r1/clean"
    assert manifest["config"]["split"] == [0.5, 0.25, 0.25] and manifest["config"]["seed"] == 3
    assert cleaned.metadata["previous_run_prefix"] == "", "no run recorded yet: a full run"
    assert manifest["inputs"] == dl.outputs
    assert ui["metrics"].metadata["outputs"] == manifest["outputs"] and ui["metrics"].metadata["classes"] == 2
    assert "<h2>Images per class</h2>" in Path(ui["report"].path).read_text()

    # A prefix that is not a committed clean output is refused, before anything is written.
    with pytest.raises(ValueError, match="expected 'clean'"):
        clean.python_func(dataset=dataset, data_root=data_root, run_id="r2", cleaned=cleaned, previous_run_prefix=dl.dest, **ui)
    assert not contract.is_committed(kfp_artifacts.run_prefix(data_root, "r2", "clean"))


def test_train_then_promote_components_publish_model_metrics_report_and_the_verdict(tmp_path, monkeypatch):
    from imgpipe.train.evaluation import EvalResult

    # metrics.json carries the test confusion matrix once EvalResult.to_dict includes it
    # (proposed to the train step); until then the test adds it, so the path to the
    # ClassificationMetrics artifact is exercised with the real train step either way.
    to_dict = EvalResult.to_dict
    monkeypatch.setattr(EvalResult, "to_dict", lambda self, labels: {"confusion": self.confusion, **to_dict(self, labels)})
    monkeypatch.setenv(SOURCE_LOCAL_ENV, "1")  # the data root is local: the operator allows it
    data_root = "file://" + str(tmp_path / "store")
    data = write_resize_output(kfp_artifacts.run_prefix(data_root, "r1", "resize"), classes=3, size=16)
    outs = {"trained": _artifact(dsl.Artifact, tmp_path / "trained"), **_shown(tmp_path)}
    trained = train.python_func(
        resized=data,  # the committed prefix, as dsl.OneOf hands over the resize branch that ran
        data_root=data_root,
        run_id="r1",
        model_name="tiny_cnn",
        epochs=1,
        batch_size=4,
        aug_policy="basic",
        step_config={"train": {"num_workers": 0, "device": "cpu", "max_steps_per_epoch": 2, "shuffle_buffer": 8}},
        **outs,
    )
    out = f"{data_root}/runs/r1/train"
    assert outs["trained"].metadata["prefix"] == out
    weights = torch.load(outs["model"].path, map_location="cpu", weights_only=True)
    assert weights["model_name"] == "tiny_cnn" and weights["labels"] == [f"class_{k}" for k in range(3)]
    assert outs["model"].metadata["model_uri"] == f"{out}/model.pt"
    assert {"val_accuracy", "val_macro_f1", "test_accuracy", "train_loss", "epochs_run"} <= set(outs["metrics"].metadata)
    assert "data:image/png;base64" in Path(outs["report"].path).read_text()
    history = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    matrix = outs["confusion"].metadata["confusionMatrix"]
    assert [r["row"] for r in matrix["rows"]] == history["test"]["confusion"]
    assert sum(map(sum, history["test"]["confusion"])) == history["test"]["images"] > 0
    config = contract.read_manifest(out, expect_step="train")["config"]
    assert config["resume"] is True
    assert config["pretrained"] is None and config["weights_cache"] == f"{data_root}/weights"  # one cache per data root
    # The train task hands its prefix on (dsl.OneOf of the two train tasks); the promote task gates it.
    assert trained == out and kfp_artifacts.read_latest(data_root) is None
    shown = _shown(tmp_path / "promote")
    promote.python_func(trained=trained, data_root=data_root, run_id="r1", **shown)
    latest = kfp_artifacts.read_latest(data_root)
    assert latest["run_id"] == "r1" and latest["prefixes"]["train"] == out
    assert shown["model"].metadata["model_uri"] == f"{out}/model.pt" and shown["metrics"].metadata["promoted"] == 1.0
    assert "Promotion: promoted" in Path(shown["report"].path).read_text()
    with pytest.raises(ValueError, match="not this run's train output"):  # a prefix of another run is no candidate
        promote.python_func(trained=trained, data_root=data_root, run_id="r2", **shown)


def _shown(where: Path) -> dict:
    """The artifacts train and promote show in the UI (model, metrics, confusion, report), under ``where``."""
    kinds = {"model": dsl.Model, "metrics": dsl.Metrics, "confusion": dsl.ClassificationMetrics, "report": dsl.HTML}
    return {name: _artifact(cls, where / name) for name, cls in kinds.items()}


def test_a_cached_build_writes_prefixes_keyed_by_inputs_and_promote_walks_their_manifests(tmp_path, monkeypatch):
    """With caching, KFP hands a later run the earlier run's output: its prefix must not name either run."""
    monkeypatch.setenv(SOURCE_LOCAL_ENV, "1")
    data_root = "file://" + str(tmp_path / "store")
    data = write_resize_output(kfp_artifacts.run_prefix(data_root, "r1", "resize"), classes=3, size=16)
    settings = {"train": {"num_workers": 0, "device": "cpu", "max_steps_per_epoch": 1, "shuffle_buffer": 8}}

    def trains(name: str, epochs: int) -> str:
        outs = {"trained": _artifact(dsl.Artifact, tmp_path / name / "trained"), **_shown(tmp_path / name)}
        args = {"model_name": "tiny_cnn", "epochs": epochs, "batch_size": 4, "aug_policy": "basic", "step_config": settings}
        return train.python_func(resized=data, data_root=data_root, run_id=kfp_artifacts.BY_INPUTS, **args, **outs)

    first = trains("a", 1)
    assert re.fullmatch(re.escape(f"{data_root}/runs/") + r"in-[0-9a-f]{20}/train", first), first
    assert trains("b", 1) == first, "the same inputs: the same prefix (a retry continues it)"
    assert trains("c", 2) != first, "other inputs: another prefix"
    shown = _shown(tmp_path / "promote")
    promote.python_func(trained=first, data_root=data_root, run_id="r9", **shown)
    latest = kfp_artifacts.read_latest(data_root)
    assert latest["run_id"] == "r9" and latest["prefixes"]["train"] == first
    assert latest["prefixes"]["resize"] == data and "clean" not in latest["prefixes"], "the chain ends at a resize output with no upstream"
    assert contract.is_committed(kfp_artifacts.run_prefix(data_root, "r9", "promote"))
    elsewhere = write_resize_output(kfp_artifacts.run_prefix(data_root, "in-" + "0" * 20, "resize"), classes=2, size=8)
    with pytest.raises(ValueError, match="expected 'train'"):  # a keyed prefix of another step is no candidate
        promote.python_func(trained=elsewhere, data_root=data_root, run_id="r9", **shown)
    with pytest.raises(ValueError, match="not this run's train output"):  # nor another run's own
        kfp_artifacts.promote_run(data_root, "r9", candidate=kfp_artifacts.run_prefix(data_root, "r1", "train"))


def _fake_train_output(out: str, metrics: dict) -> None:
    storage.write_bytes(f"{out}/model.pt", b"weights")
    storage.write_bytes(f"{out}/metrics.json", json.dumps(metrics).encode())
    storage.write_bytes(f"{out}/report.html", b"<html>report</html>")
    manifest = {"step": "train", "extra": {"model": "m"}, "metrics": {"val_accuracy": 0.5, "test_accuracy": None}, "epochs_run": 2}
    storage.write_bytes(f"{out}/{contract.MANIFEST}", json.dumps(manifest).encode())
    storage.write_bytes(f"{out}/{contract.SUCCESS}", b"")


def test_publish_training_logs_the_confusion_matrix_of_the_test_split(tmp_path):
    out = "file://" + str(tmp_path / "train")
    _fake_train_output(out, {"labels": ["cat", "dog"], "epochs": [], "test": {"confusion": [[3, 1], [0, 4]]}})
    arts = {
        "model": _artifact(dsl.Model, tmp_path / "a" / "model"),
        "metrics": _artifact(dsl.Metrics, tmp_path / "a" / "metrics"),
        "classification": _artifact(dsl.ClassificationMetrics, tmp_path / "a" / "cm"),
        "report": _artifact(dsl.HTML, tmp_path / "a" / "report"),
    }
    kfp_publish.publish_training(out, **arts)
    matrix = arts["classification"].metadata["confusionMatrix"]
    assert [a["displayName"] for a in matrix["annotationSpecs"]] == ["cat", "dog"]
    assert [r["row"] for r in matrix["rows"]] == [[3, 1], [0, 4]]
    assert arts["classification"].metadata["split"] == "test"
    assert arts["metrics"].metadata == {"val_accuracy": 0.5, "epochs_run": 2.0}, "unset metrics are left out"
    assert Path(arts["model"].path).read_bytes() == b"weights"
    assert Path(arts["report"].path).read_text() == "<html>report</html>"


def test_find_confusion_prefers_test_then_last_validation():
    assert kfp_publish.find_confusion({"test": {"confusion": [[1]]}, "val_confusion": [[2]]}) == ("test", [[1]])
    assert kfp_publish.find_confusion({"test": {"accuracy": 1.0}, "epochs": [{"val_confusion": [[2]]}]}) == ("val", [[2]])
    assert kfp_publish.find_confusion({"epochs": [{"val_accuracy": 1.0}]}) is None


def test_step_config_sections_win_over_typed_parameters():
    cfg = step_config(TrainConfig, {"train": {"epochs": 3.0, "lr": 0.01}}, "train", epochs=10, model="tiny_cnn")
    assert (cfg.epochs, cfg.lr, cfg.model) == (3, 0.01, "tiny_cnn"), "kfp passes JSON numbers as floats"
    assert step_config(CleanConfig, None, "clean", grayscale=True, annotations=None).grayscale
    with pytest.raises(ValueError, match="unknown CleanConfig option"):
        step_config(CleanConfig, {"clean": {"grayscal": True}}, "clean")
    with pytest.raises(TypeError, match="must be a mapping"):
        step_config(CleanConfig, {"clean": [1]}, "clean")


@pytest.mark.parametrize("run_id", ["", "{{$.pipeline_job_uuid}}", "a/b", "../x"])
def test_run_prefix_refuses_what_cannot_be_one_path_segment(run_id):
    with pytest.raises(ValueError, match="run id"):
        kfp_artifacts.run_prefix("s3://bucket/root", run_id, "clean")


def test_read_step_artifact_checks_the_step_and_the_commit(tmp_path):
    prefix = write_resize_output("file://" + str(tmp_path / "resize"), classes=2, size=8, counts={"train": 4})
    art = _artifact(dsl.Artifact, tmp_path / "a", prefix=prefix)
    assert kfp_artifacts.read_step_artifact(art, "resize") == prefix
    with pytest.raises(ValueError, match="expected 'clean'"):
        kfp_artifacts.read_step_artifact(art, "clean")
    storage.delete(f"{prefix}/{contract.SUCCESS}")
    with pytest.raises(contract.UncommittedOutputError):
        kfp_artifacts.read_step_artifact(art, "resize")
    with pytest.raises(ValueError, match="no 'prefix' metadata"):
        kfp_artifacts.read_step_artifact(_artifact(dsl.Artifact, tmp_path / "missing"), "resize")


def test_incremental_runs_resolve_latest(tmp_path, monkeypatch):
    monkeypatch.setenv(SOURCE_LOCAL_ENV, "1")  # the data root is local: the operator allows it
    root = "file://" + str(tmp_path / "store")
    assert kfp_artifacts.resolve_previous(root, "") is None
    assert kfp_artifacts.resolve_previous(root, "latest") is None, "first run: nothing recorded"
    prev = write_resize_output(kfp_artifacts.run_prefix(root, "old", "clean"), classes=2, size=8, counts={"train": 4})
    kfp_artifacts.record_latest(root, "old", {"clean": prev})
    with pytest.raises(ValueError, match="expected 'clean'"):  # the fixture writes resize-shaped output
        kfp_artifacts.resolve_previous(root, prev)
    storage.write_bytes(f"{prev}/{contract.MANIFEST}", json.dumps({"step": "clean"}).encode())
    assert kfp_artifacts.resolve_previous(root, "latest") == prev
    assert kfp_artifacts.resolve_previous(root, prev) == prev

    assert CleanConfig(skip_hashes_from=prev).skip_hashes_from == prev, "the component passes it straight on"


def test_a_component_process_skips_the_collection_at_exit():
    # The components import kfp_artifacts first; a fresh interpreter sees its exit handler.
    code = "import atexit, gc\natexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\nimport imgpipe.stepio.artifacts\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "frozen at exit: True"


def test_a_prefix_keyed_by_inputs_names_its_step_and_a_cached_merge_takes_only_keyed_shards():
    from imgpipe.stepio.shards import _is_shard_of

    root, key = "s3://bucket/root", "in-" + "a" * 20
    shard = f"{root}/runs/{key}/shards/00000-of-00002/clean"
    assert kfp_artifacts.keyed_step(root, f"{root}/runs/{key}/train") == "train"
    assert kfp_artifacts.keyed_step(root, shard) == "shards/00000-of-00002/clean"
    assert kfp_artifacts.keyed_step(root, f"{root}/runs/r1/train") is None, "a run's own prefix is not keyed"
    assert kfp_artifacts.keyed_step(root, f"s3://bucket/other/runs/{key}/train") is None, "nor one under another data root"
    assert _is_shard_of(root, kfp_artifacts.BY_INPUTS, shard)
    assert not _is_shard_of(root, kfp_artifacts.BY_INPUTS, f"{root}/runs/{key}/clean"), "a keyed output that is no shard"
    assert not _is_shard_of(root, "r1", shard), "a run's own merge takes only its own shards"
    assert _is_shard_of(root, "r1", f"{root}/runs/r1/shards/00000-of-00002/clean")
