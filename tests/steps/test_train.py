"""The train step on tiny resize-shaped data: outputs, learning, resume, weights, DDP.

Runs use ``tiny_cnn`` (or resnet18 once) on 32 px images and a few steps so the module
stays within a couple of minutes on two shared cores. The DDP test starts two gloo
processes with torchrun; run the module inside ``scripts/in-loopback-netns``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import textwrap

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imgpipe import contract, storage
from imgpipe.config import config_from_dict
from imgpipe.report.training import html_report
from imgpipe.steps import train as train_mod
from imgpipe.steps.train import train
from imgpipe.train import assembly
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.checkpoint import CHECKPOINT, load_checkpoint
from imgpipe.train.config import TrainConfig
from imgpipe.train.models import build_model, extract_state_dict, load_weights
from imgpipe.train.optim import lr_factor
from imgpipe.train.recipes import resolve as resolve_recipe
from tests.helpers import torchrun_two_ranks
from tests.train.test_loader import write_resize_output

# Only the module fixture `finished` (set up before any function fixture) checks the exports, and keeps them.
pytestmark = pytest.mark.usefixtures("no_exports")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COUNTS = {"train": 32, "val": 8, "test": 8}


def tiny(**overrides) -> TrainConfig:
    """A fast, fully specified config: tiny_cnn, batches of 8, no worker processes."""
    values = {
        "model": "tiny_cnn",
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_fraction": 0.2,
        "num_workers": 0,
        "shuffle_buffer": 16,
        "device": "cpu",
        **overrides,
    }
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("train-data")
    return write_resize_output("file://" + str(root / "resize"), counts=COUNTS, size=32, row_group_rows=4)


@pytest.fixture(scope="module")
def finished(data: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    """One complete run with the default recipe (auto: small here, 8 train images per class) and flip TTA."""
    out = "file://" + str(tmp_path_factory.mktemp("train-out") / "model")
    report = train(data, out, tiny(tta_flip=True, label_smoothing=0.1))
    return out, report


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


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


# ------------------------------------------------------------------ learning and resume


def test_loss_falls_on_a_tiny_run(data, tmp_path):
    report = train(data, "file://" + str(tmp_path / "out"), tiny(epochs=6, aug_policy="none", mixup=0.0, cutmix=0.0))
    losses = [e["train_loss"] for e in read_json(str(tmp_path / "out" / "metrics.json"))["epochs"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert report.metrics["val_accuracy"] > 0.5  # 4 classes: chance is 0.25


def train_preempted_at(epoch: int, data: str, out: str, cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs ``train`` until the node is preempted as ``epoch`` starts (a KeyboardInterrupt), as a killed pod stops."""
    real = train_mod.train_one_epoch

    def preempted(run, at):
        if at == epoch:
            raise KeyboardInterrupt("node preempted")
        return real(run, at)

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "train_one_epoch", preempted)
        with pytest.raises(KeyboardInterrupt):
            train(data, out, cfg)


def test_resume_after_an_interruption_gives_the_same_weights(data, tmp_path, monkeypatch):
    cfg = tiny(epochs=3, deterministic=True, max_steps_per_epoch=3)
    train(data, "file://" + str(tmp_path / "straight"), cfg)

    interrupted = "file://" + str(tmp_path / "interrupted")
    train_preempted_at(1, data, interrupted, cfg, monkeypatch)
    assert not contract.is_committed(interrupted)
    assert torch.load(str(tmp_path / "interrupted" / "checkpoint.pt"), weights_only=True)["epoch"] == 0
    report = train(data, interrupted, dataclasses.replace(cfg, resume=True))
    assert report.epochs_run == 2 and report.extra["resumed_from_epoch"] == 1

    def weights(name: str) -> dict[str, torch.Tensor]:
        return extract_state_dict(torch.load(str(tmp_path / name / "model.pt"), weights_only=True))

    straight, resumed = weights("straight"), weights("interrupted")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    history = read_json(str(tmp_path / "interrupted" / "metrics.json"))["epochs"]
    assert [e["epoch"] for e in history] == [0, 1, 2]


def test_the_loaders_thread_engine_trains_the_same_weights_as_its_worker_processes(data, tmp_path):
    cfg = tiny(epochs=2, deterministic=True, max_steps_per_epoch=3, num_workers=2, persistent_workers=False)
    for engine in ("processes", "threads"):
        train(data, "file://" + str(tmp_path / engine), dataclasses.replace(cfg, loader_engine=engine))
    weights = {e: extract_state_dict(torch.load(str(tmp_path / e / "model.pt"), weights_only=True)) for e in ("processes", "threads")}
    assert weights["processes"].keys() == weights["threads"].keys()
    assert all(torch.equal(weights["processes"][k], weights["threads"][k]) for k in weights["processes"])


def test_resume_refuses_a_checkpoint_of_another_model(data, tmp_path):
    out = "file://" + str(tmp_path / "out")
    train(data, out, tiny(epochs=1, max_steps_per_epoch=1))
    with pytest.raises(ValueError, match="model='tiny_cnn'"):
        train(data, out, tiny(model="resnet18", epochs=2, max_steps_per_epoch=1, resume=True))


def test_a_run_preempted_mid_epoch_resumes_at_its_last_step_checkpoint_with_the_same_weights(data, tmp_path, monkeypatch):
    cfg = tiny(epochs=2, deterministic=True, max_steps_per_epoch=4, checkpoint_every_steps=2)
    train(data, "file://" + str(tmp_path / "straight"), cfg)

    resumed = "file://" + str(tmp_path / "resumed")
    real = train_mod.save_checkpoint
    saved = []

    def preempted_after_a_step_checkpoint(run, epoch, step=None):
        real(run, epoch, step)
        saved.append((epoch, step))
        if epoch == 1 and step == 2:
            raise KeyboardInterrupt("node preempted")

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "save_checkpoint", preempted_after_a_step_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(data, resumed, cfg)
    assert saved == [(0, 2), (0, None), (1, 2)], "every 2 steps within an epoch, and at its end"
    report = train(data, resumed, dataclasses.replace(cfg, resume=True))
    assert report.extra["resumed_from_epoch"] == 1
    straight, again = (extract_state_dict(torch.load(str(tmp_path / n / "model.pt"), weights_only=True)) for n in ("straight", "resumed"))
    assert all(torch.equal(straight[k], again[k]) for k in straight), "the rest of the epoch, in its order, from step 2"


def test_resume_refuses_another_loader_layout_and_names_it(data, tmp_path):
    """Another worker count deals the epoch's samples to other partitions: the resumed order would not be the run's."""
    out = "file://" + str(tmp_path / "out")
    train(data, out, tiny(epochs=1, max_steps_per_epoch=1, num_workers=0))
    with pytest.raises(ValueError, match=r"loader_parts 1 \(now 2\).*same ranks and num_workers"):
        train(data, out, tiny(epochs=2, max_steps_per_epoch=1, num_workers=2, resume=True))


def test_compile_wraps_the_model_and_adamw_is_fused_only_on_cuda(data, tmp_path, monkeypatch):
    from imgpipe.train.optim import fused_adamw

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    train(data, "file://" + str(tmp_path / "out"), tiny(epochs=1, max_steps_per_epoch=1, compile=True))
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    cpu_model = build_model("tiny_cnn", 4)
    assert not fused_adamw(cpu_model)  # the fused kernel is CUDA's; on a CPU the foreach one runs


# ------------------------------------------------------------------ weights from object storage


def test_load_weights_from_s3_fits_heads_and_channels(s3_bucket):
    torch.manual_seed(0)
    source = build_model("tiny_cnn", 10, 3)
    buf = io.BytesIO()
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, buf)  # a DDP checkpoint
    uri = s3_bucket + "/weights/tiny.pt"
    storage.write_bytes(uri, buf.getvalue())

    same = build_model("tiny_cnn", 10, 3)
    assert load_weights(same, uri) == []
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))

    other_head = build_model("tiny_cnn", 4, 1)  # fine-tuning: 4 classes, grey input
    missing = load_weights(other_head, uri)
    assert missing == ["13.bias", "13.weight"]  # the classifier head
    assert torch.equal(other_head[0].weight, source[0].weight.sum(1, keepdim=True))

    with pytest.raises(ValueError, match="do not fit"):
        load_weights(build_model("resnet18", 10, 3), uri)
    with pytest.raises(FileNotFoundError):
        load_weights(same, s3_bucket + "/weights/absent.pt")


def test_training_starts_from_weights_in_object_storage(data, s3_bucket, tmp_path):
    torch.manual_seed(123)
    start = build_model("tiny_cnn", 4, 3)
    buf = io.BytesIO()
    torch.save(start.state_dict(), buf)
    uri = s3_bucket + "/init/start.pt"
    storage.write_bytes(uri, buf.getvalue())
    out = s3_bucket + "/runs/from-weights"  # data local, outputs on S3
    train(data, out, tiny(epochs=1, lr=0.0, max_steps_per_epoch=1, weights=uri))
    trained = extract_state_dict(torch.load(io.BytesIO(storage.read_bytes(out + "/model.pt")), weights_only=True))
    # lr=0: convolution weights are the loaded ones (BatchNorm running stats move regardless).
    assert torch.equal(trained["0.weight"], start[0].weight) and torch.equal(trained["13.weight"], start[13].weight)
    assert contract.read_manifest(out, expect_step="train")["config"]["weights"] == uri


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


# ------------------------------------------------------------------ distributed and GPU


def test_ddp_two_ranks_with_torchrun_gloo(data, tmp_path):
    out = "file://" + str(tmp_path / "ddp")
    script = tmp_path / "ddp_train.py"
    # Each rank records a digest of its own parameters at every checkpoint (a collective that
    # every rank enters), then the train and image counts the run reports.
    script.write_text(
        textwrap.dedent(
            f"""
            import hashlib, json, os
            from imgpipe.steps import train as train_mod

            rank = int(os.environ["RANK"])
            digests = []
            real_save = train_mod.save_checkpoint

            def save_and_record(run, epoch):
                # Parameters only: BatchNorm running stats are per rank until DDP's next broadcast.
                weights = b"".join(p.detach().numpy().tobytes() for p in run.module.parameters())
                digests.append(hashlib.sha256(weights).hexdigest())
                real_save(run, epoch)

            train_mod.save_checkpoint = save_and_record
            cfg = train_mod.TrainConfig(model="tiny_cnn", epochs=2, batch_size=4, num_workers=0, device="cpu",
                                        shuffle_buffer=8, deterministic=True)
            report = train_mod.train({data!r}, {out!r}, cfg)
            with open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w") as fh:
                json.dump({{"digests": digests, "world": report.extra["world_size"],
                           "seen": report.extra["images_seen"]}}, fh)
            """
        )
    )
    ranks = torchrun_two_ranks(script, tmp_path, timeout=240)
    assert ranks[0]["digests"] == ranks[1]["digests"]  # DDP keeps the replicas identical
    assert len(set(ranks[0]["digests"])) == 2  # and they change from epoch to epoch
    assert ranks[0]["world"] == 2
    # 32 training images in all: each rank streamed its own 16 (4 steps of 4), none twice.
    assert ranks[0]["seen"] == ranks[1]["seen"] == {"train": 32, "val": 8, "test": 8}
    assert contract.read_manifest(out, expect_step="train")["extra"]["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU decode, kornia, bf16, channels_last)")
def test_cuda_run_uses_the_gpu_path(tmp_path):
    data = write_resize_output("file://" + str(tmp_path / "jpeg"), counts={"train": 32, "val": 8}, size=64, fmt="jpeg")
    out = "file://" + str(tmp_path / "out")
    report = train(data, out, TrainConfig(model="resnet18", epochs=2, batch_size=8, num_workers=2, device="auto"))
    resolved = yaml.safe_load(storage.read_bytes(storage.join(out, contract.CONFIG)))
    assert report.extra["device"].startswith("cuda") and resolved["aug_device"] == "gpu"
    assert np.isfinite(report.metrics["train_loss"])


def test_train_config_augmentation_defaults_are_augment_configs():
    assert resolve_recipe(TrainConfig(recipe="none"))[0].augment == AugmentConfig()
    with pytest.raises(ValueError, match="resolve it first"):
        TrainConfig().augment  # noqa: B018


def test_train_reads_its_inputs_manifest_once(tmp_path, monkeypatch):
    """The committed resize output is read once and passed down (it used to be read ~6 times)."""
    data = write_resize_output(str(tmp_path / "resize"), counts=COUNTS)
    reads = []
    real = contract.read_manifest
    monkeypatch.setattr(contract, "read_manifest", lambda prefix, *a, **k: reads.append(prefix) or real(prefix, *a, **k))
    train(data, str(tmp_path / "out"), tiny(epochs=1))
    assert reads.count(storage.normalize_uri(data)) == 1, reads


def test_saving_a_checkpoint_leaves_the_loader_where_it_is(tmp_path, monkeypatch):
    """The checkpoint records the next epoch's start; the live loader is not moved there."""
    data = write_resize_output(str(tmp_path / "resize"), counts=COUNTS)
    seen = []
    real = train_mod.save_checkpoint

    def save(run, epoch):
        before = run.train_loader.state_dict()
        real(run, epoch)
        seen.append((before, run.train_loader.state_dict()))

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    train(data, str(tmp_path / "out"), tiny(epochs=2))
    assert seen and all(before == after for before, after in seen)
    state = load_checkpoint(storage.join(str(tmp_path / "out"), CHECKPOINT))
    assert state["loader"]["epoch"] == 2 and not any(state["loader"]["consumed"])


# ------------------------------------------------------------------ best weights, early stopping, EMA


def _scripted_validation(monkeypatch, f1_by_call: list[float]) -> list[dict]:
    """Validations score ``f1_by_call`` in turn; returns the trained weights at each call."""
    from imgpipe.train.evaluation import EvalResult

    calls: list[dict] = []
    real = train_mod._evaluate_split

    def scripted(run, loader, tta_flips=(), model=None, keep_rows=False):
        if loader is not run.val_loader or keep_rows:  # the test split, and the kept weights' rows at the end
            return real(run, loader, tta_flips, model, keep_rows)
        source = model or run.module
        calls.append({k: v.detach().clone() for k, v in source.state_dict().items()})
        f1 = f1_by_call[len(calls) - 1]
        n = len(run.labels)
        confusion = [[2 if i == j else 0 for j in range(n)] for i in range(n)]
        return EvalResult(loss=1 - f1, accuracy=f1, macro_f1=f1, per_class_recall=[f1] * n, confusion=confusion, images=2 * n, pr_auc=f1)

    monkeypatch.setattr(train_mod, "_evaluate_split", scripted)
    return calls


def test_the_best_epoch_is_kept_and_patience_stops_the_run(data, tmp_path, monkeypatch):
    calls = _scripted_validation(monkeypatch, [0.4, 0.8, 0.6, 0.7, 0.9])
    out = "file://" + str(tmp_path / "model")
    report = train(data, out, tiny(epochs=5, patience=2, mixup=0, cutmix=0))
    assert report.epochs_run == 4, "two epochs without a better macro-F1 after epoch 2"
    metrics = read_json(storage.join(out, "metrics.json"))
    sel = metrics["selection"]
    assert (sel["epoch"], sel["weights"], sel["stopped_early"], sel["epochs_trained"]) == (1, "model", True, 4)
    assert sel["ranked_by"] == ["val_macro_f1", "val_accuracy"] and "stopped early after epoch 4" in sel["reason"]
    assert metrics["kept"]["val_macro_f1"] == 0.8 and report.metrics["val_macro_f1"] == 0.8
    saved = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.pt"))), weights_only=True)["model"]
    assert all(torch.equal(saved[k], calls[1][k]) for k in saved), "model.pt holds epoch 2's weights, not the last"
    assert "stopped early" in storage.read_bytes(storage.join(out, "report.html")).decode()


def test_the_moving_average_is_validated_and_kept_when_better(data, tmp_path, monkeypatch):
    # Calls alternate: the trained weights, then their average, every epoch.
    calls = _scripted_validation(monkeypatch, [0.5, 0.6, 0.55, 0.7])
    out = "file://" + str(tmp_path / "model")
    train(data, out, tiny(epochs=2, ema_decay=0.9, ema_steps=1, mixup=0, cutmix=0))
    metrics = read_json(storage.join(out, "metrics.json"))
    assert metrics["selection"]["weights"] == "ema" and metrics["selection"]["epoch"] == 1
    assert metrics["epochs"][1]["ema_val_macro_f1"] == 0.7
    saved = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.pt"))), weights_only=True)["model"]
    assert all(torch.equal(saved[k], calls[3][k]) for k in saved), "model.pt holds the average"
    assert not all(torch.equal(calls[2][k], calls[3][k]) for k in calls[2]), "the average differs from the weights"


def test_a_resumed_run_keeps_the_same_weights(data, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.4, 0.9, 0.5])
    out = "file://" + str(tmp_path / "model")
    train(data, out, tiny(epochs=2))
    first = read_json(storage.join(out, "metrics.json"))["selection"]
    _scripted_validation(monkeypatch, [0.1])
    train(data, out, tiny(epochs=3, resume=True))
    second = read_json(storage.join(out, "metrics.json"))["selection"]
    assert first["epoch"] == second["epoch"] == 1, "epoch 3 (0.1) does not displace epoch 2 (0.9)"


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
