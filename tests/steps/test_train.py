"""The train step on tiny resize-shaped data: its outputs, per-image predictions, other data paths, its config.

Runs use ``tiny_cnn`` (or resnet18 once) on 32 px images and a few steps so the module
stays within a couple of minutes on two shared cores.
"""

from __future__ import annotations

import inspect
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imgpipe import contract, storage
from imgpipe.config import config_from_dict
from imgpipe.report.training import html_report
from imgpipe.steps.train import train
from imgpipe.train import assembly
from imgpipe.train.config import TrainConfig
from imgpipe.train.models import build_model
from imgpipe.train.optim import lr_factor
from imgpipe.train.recipes import resolve as resolve_recipe
from tests.steps.conftest import read_json, tiny
from tests.train.test_loader import write_resize_output

# Only the module fixture `finished` (set up before any function fixture) checks the exports, and keeps them.
pytestmark = pytest.mark.usefixtures("no_exports")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(data: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """One complete run with the default recipe (auto: small here, 8 train images per class) and flip TTA."""
    out = "file://" + str(tmp_path_factory.mktemp("train-out") / "model")
    report = train(data, out, tiny(tta_flip=True, label_smoothing=0.1))
    return out, report


# ------------------------------------------------------------------ outputs


def test_metrics_say_how_many_images_an_epoch_used_and_when_each_epoch_ended(finished):
    out, report = finished
    metrics = read_json(storage.join(out, "metrics.json"))
    used = metrics["epoch_images"]
    assert used == {"split": 32, "per_epoch": 32, "left_out": 0, "why": used["why"]}, "32 rows: four full batches of 8"
    assert used["why"] == "every image, in full batches of 8"
    ends = [e["ended_at"] for e in metrics["epochs"]]
    assert ends == sorted(ends) and all(0 < e["elapsed_s"] < report.seconds + 1 for e in metrics["epochs"])
    assert metrics["diverged"] is False and metrics["divergence"] == {"diverged": False, "lr_scale": 1.0, "events": []}
    assert "each epoch trains on 32 of the 32 train images" in storage.read_bytes(storage.join(out, "report.html")).decode()


def test_the_manifest_says_where_the_steps_time_went_by_phase(finished):
    """bench/steps/train_phases.py draws these: each phase timed once or summed over the epochs."""
    out, report = finished
    phases = contract.read_manifest(out, expect_step="train")["extra"]["phase_s"]
    assert set(phases) == {"setup", "steps", "validation", "precise_bn", "checkpoints", "final_evaluation", "outputs"}
    assert 0 < phases.pop("precise_bn") < phases["validation"]  # a part of it
    # The report's seconds end where the outputs begin.
    assert all(v > 0 for v in phases.values()) and sum(phases.values()) - phases["outputs"] <= report.seconds + 0.01
    assert report.extra["started_at"] <= read_json(storage.join(out, "metrics.json"))["epochs"][0]["ended_at"]


def test_the_train_step_starts_without_the_reports_plotting_library():
    """matplotlib (a third of a second of a cold start) is imported when the outputs are drawn, not before the first epoch."""
    code = "import sys, imgpipe.steps.train; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_one_rank_trains_on_every_image_each_epoch_but_a_last_batch_of_one(data, tmp_path):
    """32 rows in batches of 5: six full batches and one of 2 (torchvision's reference keeps it too); of 31: one left out."""
    out = "file://" + str(tmp_path / "partial")
    train(data, out, tiny(batch_size=5, epochs=1))
    metrics = read_json(storage.join(out, "metrics.json"))
    assert metrics["epoch_images"] == {"split": 32, "per_epoch": 32, "left_out": 0, "why": "every image, the last batch 2 images"}
    assert metrics["epochs"][0]["train_images"] == 32
    out = "file://" + str(tmp_path / "one-left")
    train(data, out, tiny(batch_size=31, epochs=1))
    used = read_json(storage.join(out, "metrics.json"))["epoch_images"]
    assert used["per_epoch"] == 31 and used["left_out"] == 1 and "full batches of 31" in used["why"], "BatchNorm cannot train on one image"


def test_outputs_exist_and_commit_last(finished):
    out, report = finished
    manifest = contract.read_manifest(out, expect_step="train")
    names = {f["name"] for f in manifest["files"]}
    base = {
        "model.pt",
        "metrics.json",
        "curves.png",
        "confusion_matrix.png",
        "augmentations.png",
        "report.html",
        contract.CONFIG,
        "predictions.parquet",
        "worst_loss.png",
        "model.json",
        "model.onnx",
        "model.ts",
    }
    confused = bool(read_json(storage.join(out, "metrics.json")).get("confused_pairs"))
    assert names == base | ({"confused_pairs.png"} if confused else set())
    for f in manifest["files"]:
        assert storage.exists(storage.join(out, f["name"])) and f["bytes"] > 0
    assert storage.exists(storage.join(out, "checkpoint.pt"))
    assert manifest["extra"]["images_seen"] == {"train": 32, "val": 8, "test": 8}
    assert manifest["inputs"] == manifest["outputs"] == 48 and manifest["rejected"] == 0
    assert manifest["upstream"]["step"] == "resize"
    assert report.epochs_run == 2 and report.summary().startswith("train: 2 epoch(s)")


def test_metrics_json_has_per_epoch_and_test_fields(finished):
    out, _ = finished
    metrics = read_json(storage.join(out, "metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    for epoch in metrics["epochs"]:
        for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "images_per_s", "data_wait_fraction", "lr"):
            assert isinstance(epoch[key], float) and np.isfinite(epoch[key]), key
        assert 0 <= epoch["val_accuracy"] <= 1 and 0 <= epoch["data_wait_fraction"] <= 1
        assert set(epoch["val_per_class_recall"]) == {f"class_{k}" for k in range(4)}
        assert epoch["train_images"] == 32
    assert metrics["test"]["images"] == metrics["test_tta"]["images"] == 8
    assert metrics["labels"] == [f"class_{k}" for k in range(4)]
    assert metrics["epochs"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero


def test_figures_are_valid_pngs_and_the_html_report_embeds_them(finished):
    out, _ = finished
    figures = [f["name"] for f in contract.read_manifest(out)["files"] if f["name"].endswith(".png")]
    assert {"curves.png", "confusion_matrix.png", "augmentations.png", "worst_loss.png"} <= set(figures)
    for name in figures:
        png = storage.read_bytes(storage.join(out, name))
        assert png.startswith(PNG_MAGIC)
        width, height = Image.open(io.BytesIO(png)).size
        assert width > 100 and height > 100
    page = storage.read_bytes(storage.join(out, "report.html")).decode()
    assert page.count("data:image/png;base64,") == len(figures) and "val_macro_f1" in page
    metrics = read_json(storage.join(out, "metrics.json"))
    assert html_report(metrics, {"a <b>": PNG_MAGIC}).count("<img") == 1  # names are escaped
    assert "a &lt;b&gt;" in html_report(metrics, {"a <b>": PNG_MAGIC})


def test_model_file_and_resolved_config_round_trip(finished):
    out, _ = finished
    saved = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.pt"))), weights_only=True)
    assert saved["labels"] == [f"class_{k}" for k in range(4)] and saved["image_size"] == 32
    model = build_model(saved["model_name"], len(saved["labels"]), saved["channels"])
    model.load_state_dict(saved["model"])
    resolved = yaml.safe_load(storage.read_bytes(storage.join(out, contract.CONFIG)))
    cfg = config_from_dict(TrainConfig, resolved)
    assert (cfg.image_size, cfg.num_workers, cfg.aug_device, cfg.pin_memory) == (32, 0, "cpu", False)
    assert cfg.tta_flip and cfg.label_smoothing == 0.1


# ------------------------------------------------------------------ other paths


def test_batched_augmentation_path_with_jpeg_data_and_workers(tmp_path):
    data = write_resize_output("file://" + str(tmp_path / "jpeg"), counts={"train": 16, "val": 4}, size=32, fmt="jpeg")
    out = "file://" + str(tmp_path / "out")
    report = train(data, out, tiny(epochs=1, aug_device="gpu", num_workers=2, aug_policy="trivialaugment"))
    assert report.extra["images_seen"] == {"train": 16, "val": 4}  # no test split: skipped
    resolved = yaml.safe_load(storage.read_bytes(storage.join(out, contract.CONFIG)))
    assert resolved["aug_device"] == "gpu" and resolved["num_workers"] == 2


@pytest.mark.parametrize(("aug_device", "fmt", "whole"), [("cpu", "raw", ("train",)), ("gpu", "jpeg", ("train",)), ("cpu", "jpeg", ("train", "val"))])
def test_whole_pictures_are_cropped_at_load_time(tmp_path, aug_device, fmt, whole):
    # Train rows of varying size (resize mode whole): RandomResizedCrop over each whole picture,
    # in the recipe (CPU) or alone in the workers before the batched recipe (GPU path, here on
    # CPU tensors); val is centre-cropped as stored, or at load time when it is whole too. The
    # training side is the data's size.
    data = write_resize_output("file://" + str(tmp_path / "whole"), counts={"train": 16, "val": 4}, size=32, fmt=fmt, whole=whole)
    out = "file://" + str(tmp_path / "out")
    report = train(data, out, tiny(epochs=1, aug_device=aug_device, num_workers=2 if fmt == "jpeg" else 0))
    assert report.extra["images_seen"] == {"train": 16, "val": 4}
    resolved = yaml.safe_load(storage.read_bytes(storage.join(out, contract.CONFIG)))
    assert resolved["image_size"] == 32 and resolved["aug_device"] == aug_device
    assert storage.exists(out + "/augmentations.png")


def test_grayscale_data_trains_resnet18_with_an_adapted_first_conv(tmp_path):
    data = write_resize_output("file://" + str(tmp_path / "gray"), counts={"train": 8, "val": 4}, size=32, channels=1)
    out = "file://" + str(tmp_path / "out")
    report = train(data, out, tiny(model="resnet18", epochs=1, batch_size=4, max_steps_per_epoch=1, hflip=False))
    saved = torch.load(io.BytesIO(storage.read_bytes(out + "/model.pt")), weights_only=True)
    assert saved["channels"] == 1 and saved["model"]["conv1.weight"].shape[1] == 1
    assert report.extra["channels"] == 1


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    factors = [lr_factor(s, 4, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model": "resnet9000"}, "unknown model"),
        ({"epochs": 0}, "epochs"),
        ({"aug_policy": "autoaug"}, "is not one of"),
        ({"aug_device": "tpu"}, "is not one of"),
        ({"device": "mps"}, "device"),
        ({"mixup": -0.1}, "mixup"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"randaugment_m": 40}, "randaugment_m"),
        ({"crop_scale": "0.9,0.1"}, "crop_scale"),
        ({"weights": "gs://bucket/w.pt"}, "unsupported storage URI"),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch"),
        ({"num_workers": -2}, "num_workers"),
        ({"loader_engine": "greenlets"}, "loader_engine must be one of auto, threads, processes"),
        ({"learning_rate": 0.1}, "unknown TrainConfig option"),
    ],
)
def test_config_rejects_bad_values_at_the_boundary(values, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(TrainConfig, values)


def test_config_defaults_and_yaml_style_overrides():
    unset = TrainConfig()
    assert unset.epochs is None and unset.mixup is None and not unset.resolved, "recipe fields wait for the recipe"
    assert unset.recipe == "auto", "the notes' recipe by dataset size is what a run gets by default"
    cfg, how = resolve_recipe(unset, [200] * 10)
    assert how.recipe == "medium" and how.requested == "auto"
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.device, cfg.aug_policy, cfg.aug_device) == (
        "resnet18",
        50,
        128,
        "auto",
        "randaugment",
        "auto",
    )
    assert (cfg.mixup, cfg.cutmix, cfg.hflip, cfg.resume, cfg.weights, cfg.image_size) == (0.5, 0.5, True, False, None, None)
    cfg, _ = resolve_recipe(config_from_dict(TrainConfig, {"crop_scale": "0.35,1", "hflip": "false", "num_workers": "3"}), [200] * 10)
    assert cfg.crop_scale == (0.35, 1.0) and cfg.hflip is False and cfg.num_workers == 3
    assert cfg.augment.crop_scale == (0.35, 1.0) and cfg.loader(shuffle=True).num_workers == 3


def test_train_rejects_bad_inputs(data, tmp_path):
    with pytest.raises(ValueError, match="must not be"):
        train(data, data + "/model", tiny())
    with pytest.raises(contract.UncommittedOutputError):
        train("file://" + str(tmp_path / "missing"), "file://" + str(tmp_path / "out"), tiny())
    # A batch larger than the split: one rank trains on it all as one short batch (several ranks are refused).
    report = train(data, "file://" + str(tmp_path / "out"), tiny(batch_size=64, epochs=1))
    assert report.extra["images_seen"]["train"] == 32


@pytest.mark.parametrize(
    ("kwargs", "found"),
    [
        ({"classes": 1}, r"training images of 1 class\(es\) \('class_0'\) of the 1 it names"),
        # Two classes named, but every training image is of one (the other only in val and test).
        ({"classes": 2, "mislabel": lambda split, i: split == "train" and i % 2 == 1}, r"of 1 class\(es\) \('class_0'\) of the 2"),
    ],
)
def test_train_commits_no_model_over_one_class(tmp_path, kwargs, found):
    data = write_resize_output(f"file://{tmp_path}/resize", counts={"train": 16, "val": 4, "test": 4}, **kwargs)
    with pytest.raises(ValueError, match=found + ".*a classifier needs two classes"):
        train(data, f"file://{tmp_path}/model", tiny(epochs=1))
    assert not (tmp_path / "model").exists(), "nothing is written, no model.onnx, no card"


# ------------------------------------------------------------------ per-image predictions


def test_predictions_cover_val_and_test_and_open_in_pandas_and_datasets(finished, data):
    import datasets
    import pandas as pd

    out, _ = finished
    uri = storage.join(out, "predictions.parquet")
    frame = pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))
    assert frame["split"].value_counts().to_dict() == {"val": 8, "test": 8}
    assert set(frame.columns) >= {"path", "sha256", "label", "predicted", "top_classes", "top_probs", "loss"}
    for split in ("val", "test"):
        rows = frame[frame["split"] == split]
        assert sorted(rows["index"]) == list(range(8)), "every image of the split once"
    # The names and hashes are the data's own.
    source = pa_concat(data, ("val", "test"))
    assert set(frame["path"]) == set(source["path"]) and set(frame["sha256"]) == set(source["sha256"])
    first = frame.iloc[0]
    probs = list(first["top_probs"])
    assert probs == sorted(probs, reverse=True) and len(probs) == 4 and first["top_classes"][0] == first["predicted_name"]
    assert (frame["correct"] == (frame["label"] == frame["predicted"])).all()
    local = str(pytest_tmp_copy(uri))
    ds = datasets.load_dataset("parquet", data_files=local, split="train")
    assert ds.num_rows == 16 and "top_probs" in ds.features


def pa_concat(data: str, splits: tuple[str, ...]) -> dict[str, list]:
    import pyarrow.parquet as pq

    manifest = contract.read_manifest(data)
    out: dict[str, list] = {"path": [], "sha256": []}
    for uri in contract.data_files(data, manifest):
        if any(f"/{s}/" in uri for s in splits):
            t = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["path", "sha256"])
            out["path"] += t.column("path").to_pylist()
            out["sha256"] += t.column("sha256").to_pylist()
    return out


def pytest_tmp_copy(uri: str):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="imgpipe-test-")) / "predictions.parquet"
    path.write_bytes(storage.read_bytes(uri))
    return path


def test_balanced_class_weights_come_from_the_train_split(tmp_path):
    from imgpipe.train.partition import describe_split

    data = write_resize_output("file://" + str(tmp_path / "d"), counts={"train": 10, "val": 4}, size=16)
    info = describe_split(data, "train", contract.read_manifest(data))
    weights = assembly.class_weights(tiny(class_weights="balanced"), info, 5, torch.device("cpu"))
    # labels are i % 4: counts 3, 3, 2, 2 and none of class 4
    assert weights.tolist() == pytest.approx([10 / 12, 10 / 12, 10 / 8, 10 / 8, 0.0])
    assert assembly.class_weights(tiny(), info, 5, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="class_weights"):
        tiny(class_weights="inverse")


def test_auto_recipe_and_text_domain_train_without_flips_and_say_so(tmp_path, caplog):
    """The issue's check: 30 images per class pick the small-data recipe; text has no flips, in training or TTA."""
    data = write_resize_output("file://" + str(tmp_path / "d"), counts={"train": 120, "val": 8, "test": 8}, size=16)
    out = "file://" + str(tmp_path / "model")
    with caplog.at_level("INFO"):
        report = train(data, out, tiny(recipe="auto", domain="text", tta_flip=True, max_steps_per_epoch=2, lr=None))
    metrics = read_json(storage.join(out, "metrics.json"))
    recipe = metrics["recipe"]
    assert (recipe["requested"], recipe["recipe"], recipe["domain"]) == ("auto", "small", "text")
    assert "30 train images per class" in recipe["reason"] and "30 train images per class" in caplog.text
    assert "recipe small" in report.extra["recipe"]
    assert recipe["from_domain"]["hflip"] is False and "epochs" in recipe["explicit"]
    ran = yaml.safe_load(storage.read_bytes(storage.join(out, contract.CONFIG)))
    assert (ran["recipe"], ran["hflip"], ran["vflip"], ran["rot90"], ran["epochs"]) == ("small", False, False, False, 2)
    assert (ran["aug_policy"], ran["mixup_switch_prob"], ran["color_jitter"]) == ("trivialaugment", 0.2, 0.0), "the small recipe's"
    # The learning rate: lr_base scaled to the global batch (sqrt, AdamW), logged and recorded.
    lr = metrics["learning_rate"]
    assert lr["global_batch"] == ran["batch_size"] and lr["lr"] == pytest.approx(ran["lr_base"] * (ran["batch_size"] / ran["lr_base_size"]) ** 0.5)
    assert "sqrt" in lr["rule"] and "peak learning rate lr_base" in caplog.text
    assert ran["freeze_fraction"] == 0 and "no linear probe" in recipe["reason"], "from scratch: nothing to probe"
    assert "test_tta" not in metrics and "test" in metrics, "TTA with no allowed flip has no view to add"
    assert "Recipe" in storage.read_bytes(storage.join(out, "report.html")).decode()


def test_the_step_hands_back_freed_heap_pages_while_it_trains_and_evaluates(tmp_path, monkeypatch):
    """Every few batches its loaders deliver, in training and in each evaluation pass, and after each pass (resources.trim_heap)."""
    from imgpipe import resources
    from imgpipe.train.loader_config import TRIM_EVERY_BATCHES

    data = write_resize_output("file://" + str(tmp_path / "d"), counts={"train": 40, "val": 4}, size=16)
    where: list[str] = []

    def counted() -> bool:
        where.append("training" if any(f.function == "train_one_epoch" for f in inspect.stack()) else "evaluation")
        return True

    monkeypatch.setattr(resources, "trim_heap", counted)
    train(data, "file://" + str(tmp_path / "out"), tiny(epochs=1, batch_size=2, num_workers=0))
    assert where.count("training") == 20 // TRIM_EVERY_BATCHES, where
    assert where.count("evaluation") >= 2, where  # after the validation pass and the final ones
