"""The train step's weights: learning, resume, starting weights from object storage, DDP and GPU, the epoch kept.

Runs use ``tiny_cnn`` on 32 px images and a few steps. The DDP test starts two gloo
processes with torchrun; run the module inside ``scripts/in-loopback-netns``.
"""

from __future__ import annotations

import dataclasses
import io
import textwrap
import time

import numpy as np
import pytest
import torch
import yaml

from imgpipe import contract, storage
from imgpipe.steps import train as train_mod
from imgpipe.steps.train import train
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.checkpoint import CHECKPOINT, load_checkpoint
from imgpipe.train.config import TrainConfig
from imgpipe.train.models import build_model, extract_state_dict, load_weights
from imgpipe.train.recipes import resolve as resolve_recipe
from tests.helpers import torchrun_two_ranks
from tests.steps.conftest import COUNTS, read_json, tiny, train_preempted_at
from tests.train.test_loader import write_resize_output

# No test here checks the ONNX or TorchScript exports (tests/train/test_export.py does).
pytestmark = pytest.mark.usefixtures("no_exports")


# ------------------------------------------------------------------ learning and resume


def test_loss_falls_on_a_tiny_run(data, tmp_path):
    report = train(data, "file://" + str(tmp_path / "out"), tiny(epochs=6, aug_policy="none", mixup=0.0, cutmix=0.0))
    losses = [e["train_loss"] for e in read_json(str(tmp_path / "out" / "metrics.json"))["epochs"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert report.metrics["val_accuracy"] > 0.5  # 4 classes: chance is 0.25


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


def test_a_checkpoint_stores_the_kept_weights_once_when_they_are_the_models_and_resumes_them(data, tmp_path, monkeypatch):
    # Epoch 1, epoch 2, then the kept weights' own validation (rows are not in a checkpoint).
    _scripted_validation(monkeypatch, [0.8, 0.4, 0.8])
    cfg = tiny(epochs=2, deterministic=True, max_steps_per_epoch=3, mixup=0, cutmix=0)
    interrupted = "file://" + str(tmp_path / "interrupted")
    train_preempted_at(1, data, interrupted, cfg, monkeypatch)
    state = torch.load(str(tmp_path / "interrupted" / "checkpoint.pt"), weights_only=True)
    assert state["epoch"] == 0 and state["best_is_model"] and state["best_state"] is None, "epoch 1 was the best yet: its weights once"
    train(data, interrupted, dataclasses.replace(cfg, resume=True))  # epoch 2 scores lower: epoch 1's weights, from the checkpoint, ship
    assert read_json(str(tmp_path / "interrupted" / "metrics.json"))["selection"]["epoch"] == 0
    shipped = extract_state_dict(torch.load(str(tmp_path / "interrupted" / "model.pt"), weights_only=True))
    assert all(torch.equal(shipped[k], state["model"][k]) for k in shipped)


def test_a_checkpoint_written_in_the_background_is_on_storage_when_the_step_fails(data, tmp_path, monkeypatch):
    from imgpipe.train import checkpoint as ckpt

    writes = []
    real = ckpt.storage.write_bytes

    def slow(uri, blob):
        time.sleep(0.5)  # still writing when the error comes
        writes.append(uri)
        real(uri, blob)

    monkeypatch.setattr(ckpt.storage, "write_bytes", slow)
    out = "file://" + str(tmp_path / "failed")
    train_preempted_at(1, data, out, tiny(epochs=3, max_steps_per_epoch=2), monkeypatch)
    assert writes and (tmp_path / "failed" / "checkpoint.pt").exists(), "the last checkpoint was written before the error went up"


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


def test_compile_wraps_the_model_and_adamw_is_fused_on_the_cpu_and_cuda_only(data, tmp_path, monkeypatch):
    from imgpipe.train.optim import fused_adamw

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    train(data, "file://" + str(tmp_path / "out"), tiny(epochs=1, max_steps_per_epoch=1, compile=True))
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert fused_adamw(build_model("tiny_cnn", 4))  # torch has a fused CPU kernel (tests/train/test_models.py)
    with torch.device("meta"):
        assert not fused_adamw(build_model("tiny_cnn", 4))  # no kernel there: torch's loop


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


# ------------------------------------------------------------------ distributed and GPU


def test_ddp_two_ranks_with_torchrun_gloo(data, tmp_path):
    out = "file://" + str(tmp_path / "ddp")
    script = tmp_path / "ddp_train.py"
    # Each rank records a digest of its own parameters at every checkpoint (a collective that
    # every rank enters; every epoch is past the interval, which the ranks agree on through
    # another), then the train and image counts the run reports.
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
                                        shuffle_buffer=8, deterministic=True, checkpoint_every_s=1e-6)
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
    cfg = TrainConfig(model="resnet18", epochs=2, batch_size=8, num_workers=2, device="auto", aug_device="gpu")
    report = train(data, out, cfg)
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
    calls: list[dict] = []
    real = getattr(train_mod._evaluate_split, "real", train_mod._evaluate_split)  # a second script replaces the first

    def scripted(run, loader, tta_flips=(), model=None, keep_rows=False):
        measured = real(run, loader, tta_flips, model, keep_rows)
        if loader is not run.val_loader:  # the test split
            return measured
        source = model or run.module
        calls.append({k: v.detach().clone() for k, v in source.state_dict().items()})
        f1 = f1_by_call[len(calls) - 1]
        n = len(run.labels)
        confusion = [[2 if i == j else 0 for j in range(n)] for i in range(n)]
        # The scores scripted, the rows measured (the kept validation's rows are predictions.parquet's).
        scores = {"loss": 1 - f1, "accuracy": f1, "macro_f1": f1, "per_class_recall": [f1] * n, "pr_auc": f1}
        return dataclasses.replace(measured, **scores, confusion=confusion, images=2 * n)

    scripted.real = real
    monkeypatch.setattr(train_mod, "_evaluate_split", scripted)
    return calls


def _checkpointed_epochs(monkeypatch) -> list[int]:
    written: list[int] = []
    real = train_mod.save_checkpoint

    def save(run, epoch, step=None):
        written.append(epoch)
        real(run, epoch, step)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    return written


def test_epochs_shorter_than_the_checkpoint_interval_write_only_the_last_one_and_a_resume_finds_it(data, tmp_path, monkeypatch):
    written = _checkpointed_epochs(monkeypatch)
    out = str(tmp_path / "out")
    train(data, out, tiny(epochs=3, checkpoint_every_s=3600))
    assert written == [2], "an hour between checkpoints: only the last epoch's is written"
    assert load_checkpoint(storage.join(out, CHECKPOINT))["epoch"] == 2
    assert train(data, out, tiny(epochs=3, checkpoint_every_s=3600, resume=True)).epochs_run == 0, "the finished run resumes at its end"


def test_epochs_longer_than_the_checkpoint_interval_each_write_one(data, tmp_path, monkeypatch):
    written = _checkpointed_epochs(monkeypatch)
    train(data, str(tmp_path / "out"), tiny(epochs=3, checkpoint_every_s=1e-6))
    assert written == [0, 1, 2]


def test_early_stopping_writes_the_checkpoint_of_its_epoch_whatever_the_interval(data, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.4, 0.8, 0.6, 0.7, 0.9])
    written = _checkpointed_epochs(monkeypatch)
    out = str(tmp_path / "out")
    train(data, out, tiny(epochs=5, patience=2, mixup=0, cutmix=0, checkpoint_every_s=3600))
    assert written == [3], "the run stopped after epoch 4: its checkpoint records the stop for a resume"
    assert load_checkpoint(storage.join(out, CHECKPOINT))["selection"]["stopped_at"] == 3


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


def test_a_validation_at_its_ceiling_ends_the_run_with_the_kept_epoch_a_full_run_keeps(data, tmp_path, monkeypatch):
    calls = _scripted_validation(monkeypatch, [0.5, 1.0, 1.0, 1.0, 1.0])
    out = "file://" + str(tmp_path / "model")
    report = train(data, out, tiny(epochs=5, patience=3, mixup=0, cutmix=0))
    assert report.epochs_run == 2, "nothing after a perfect validation can be kept: no epochs spent finding that out"
    sel = read_json(storage.join(out, "metrics.json"))["selection"]
    assert (sel["epoch"], sel["stopped_early"], sel["stop_reason"], sel["epochs_trained"]) == (1, True, "ceiling", 2)
    assert "stopped early after epoch 2: validation at its ceiling" in sel["reason"]
    assert len(calls) == 2


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
    # Epoch 3's validation, then the kept weights' rows at the end (their validation came from the checkpoint, without rows).
    _scripted_validation(monkeypatch, [0.1, 0.9])
    train(data, out, tiny(epochs=3, resume=True))
    second = read_json(storage.join(out, "metrics.json"))["selection"]
    assert first["epoch"] == second["epoch"] == 1, "epoch 3 (0.1) does not displace epoch 2 (0.9)"
