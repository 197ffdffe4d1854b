"""The train step fine-tuning: pretrained weights through the cache, their statistics, a frozen backbone, its LR.

Offline: the "pretrained" weights are a seeded random model served from a ``file://``
URL (:func:`tests.train.test_pretrained.serve_weights`). Freezing and resume use ``tiny_cnn``;
the pretrained runs use resnet18 on 32 px images for one or two steps. The DDP test
starts two gloo processes with torchrun; run the module inside ``scripts/in-loopback-netns``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms._presets import ImageClassification

from imgpipe import contract, storage
from imgpipe.steps import train as train_mod
from imgpipe.steps.train import train
from imgpipe.train.augment import IMAGENET, Normalization
from imgpipe.train.models import build_model, extract_state_dict, head_parameter_names
from tests.helpers import torchrun_two_ranks
from tests.steps.conftest import COUNTS, tiny, train_preempted_at
from tests.train.test_loader import write_resize_output
from tests.train.test_pretrained import count_downloads, serve_weights

# No test here checks the ONNX or TorchScript exports (tests/train/test_export.py does).
pytestmark = pytest.mark.usefixtures("no_exports")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("transfer-data")
    return write_resize_output("file://" + str(root / "resize"), counts=COUNTS, size=32, row_group_rows=4)


def saved_model(out: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "model.pt"))), weights_only=True)


def snapshot(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.module.state_dict().items()}


# ------------------------------------------------------------------ pretrained weights


def test_a_pretrained_run_reads_the_cache_and_normalizes_with_the_weights_statistics(data, tmp_path, monkeypatch, caplog):
    weights, served = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch, seed=1)
    own = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    monkeypatch.setattr(weights.value, "transforms", partial(ImageClassification, crop_size=32, mean=own.mean, std=own.std))
    downloads = count_downloads(monkeypatch)
    used: list[Normalization] = []
    real_normalize = train_mod.normalize
    monkeypatch.setattr(train_mod, "normalize", lambda *a, **k: used.append(a[3]) or real_normalize(*a, **k))

    out = "file://" + str(tmp_path / "exp" / "train")
    cfg = tiny(model="resnet18", pretrained="DEFAULT", epochs=1, lr=0.0, max_steps_per_epoch=1, aug_policy="none")
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        train(data, out, cfg)
    cache = "file://" + str(tmp_path / "exp" / "weights")  # beside the output: no weights_cache given
    assert downloads == [weights.url]
    assert [o.uri for o in storage.list_objects(cache)] == [f"{cache}/resnet18/IMAGENET1K_V1-{Path(weights.url).name}"]
    saved, reference = saved_model(out), torch.load(io.BytesIO(served), weights_only=True)
    # lr=0: the backbone's weights are the served ones; the head was replaced for 4 classes.
    assert torch.equal(saved["model"]["conv1.weight"], reference["conv1.weight"])
    assert saved["model"]["fc.weight"].shape == (4, 512) and reference["fc.weight"].shape == (1000, 512)
    assert (tuple(saved["mean"]), tuple(saved["std"])) == (own.mean, own.std)
    assert used and all(n == own for n in used)  # training and evaluation batches alike
    assert not [r for r in caplog.records if "trained at" in r.getMessage()]  # 32 px weights, 32 px data
    resolved = yaml.safe_load(storage.read_bytes(storage.join(out, contract.CONFIG)))
    assert (resolved["pretrained"], resolved["weights_cache"]) == ("DEFAULT", cache)

    # The next run (torchvision's own statistics and 224 px) reads the cache and says the size differs.
    monkeypatch.undo()
    monkeypatch.setattr(weights.value, "url", (tmp_path / "hub" / Path(downloads[0]).name).as_uri())
    downloads = count_downloads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        train(data, "file://" + str(tmp_path / "exp" / "again"), dataclasses.replace(cfg, weights_cache=cache))
    assert downloads == []
    assert any("trained at 224 px" in r.getMessage() and "--size 224" in r.getMessage() for r in caplog.records)
    assert tuple(saved_model("file://" + str(tmp_path / "exp" / "again"))["mean"]) == IMAGENET.mean


def test_resume_refuses_other_pretrained_weights(data, tmp_path, monkeypatch):
    serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch)
    out = "file://" + str(tmp_path / "out")
    train(data, out, tiny(model="resnet18", epochs=1, max_steps_per_epoch=1, batch_size=4))
    with pytest.raises(ValueError, match="pretrained=None"):
        train(data, out, tiny(model="resnet18", epochs=2, max_steps_per_epoch=1, batch_size=4, pretrained="DEFAULT", resume=True))


# ------------------------------------------------------------------ frozen backbone, its learning rate


def test_the_backbone_stays_frozen_for_the_first_epochs_at_its_own_lr(data, tmp_path, monkeypatch):
    cfg = tiny(epochs=3, freeze_fraction=0.67, unfreeze_stages=1, backbone_lr_mult=0.1, aug_policy="none", mixup=0.0, cutmix=0.0)
    torch.manual_seed(cfg.seed)  # as train initializes the model
    initial = build_model("tiny_cnn", 4).state_dict()
    head = head_parameter_names(build_model("tiny_cnn", 4), 4)
    seen: list[tuple[dict[str, torch.Tensor], list[tuple[str, float]]]] = []
    real = train_mod.save_checkpoint

    def save(run, epoch):
        seen.append((snapshot(run), [(g["name"], g["lr"]) for g in run.optimizer.param_groups]))
        real(run, epoch)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    train(data, "file://" + str(tmp_path / "out"), cfg)

    def changed(state: dict[str, torch.Tensor]) -> set[str]:
        return {k for k, v in state.items() if not torch.equal(v, initial[k])}

    # Epochs 0 and 1: only the head moved; the backbone's weights and BatchNorm statistics did not.
    assert changed(seen[0][0]) == changed(seen[1][0]) == set(head)
    assert changed(seen[2][0]) > set(head) and "1.running_mean" in changed(seen[2][0])
    # Frozen, the backbone's groups have not started (LR 0); unfrozen, they warm up on their own to
    # at most backbone_lr_mult of the head's LR (fresh AdamW moments never meet the full LR).
    # (A checkpoint holds the LR of the next step: after epoch 1 that is the backbone's first.)
    assert all(lr == 0 for name, lr in seen[0][1] if name.startswith("backbone")) and dict(seen[0][1])["head"] > 0
    head_lr = dict(seen[1][1])["head"]
    assert all(0 < lr <= 0.1 * head_lr * 1.0001 for name, lr in seen[1][1] if name.startswith("backbone"))


# The resume inside the frozen epochs is the plain case (tests/steps/test_train_weights.py resumes too): slow.
@pytest.mark.parametrize("interrupted_at", [pytest.param(1, marks=pytest.mark.slow), 2], ids=["in-the-frozen-epochs", "at-the-unfreeze-epoch"])
def test_resume_across_the_unfreeze_epoch_gives_the_same_weights(data, tmp_path, monkeypatch, interrupted_at):
    cfg = tiny(epochs=3, deterministic=True, max_steps_per_epoch=3, freeze_fraction=0.67, unfreeze_stages=1, backbone_lr_mult=0.5)
    train(data, "file://" + str(tmp_path / "straight"), cfg)

    resumed = "file://" + str(tmp_path / "resumed")
    train_preempted_at(interrupted_at, data, resumed, cfg, monkeypatch)
    report = train(data, resumed, dataclasses.replace(cfg, resume=True))
    assert report.extra["resumed_from_epoch"] == interrupted_at

    straight, again = (extract_state_dict(saved_model("file://" + str(tmp_path / n))) for n in ("straight", "resumed"))
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


# ------------------------------------------------------------------ distributed


@pytest.mark.slow  # two DDP ranks of resnet18: DDP is in test_train_weights.py, pretrained runs above
def test_ddp_ranks_share_one_download_and_freeze_alike(data, tmp_path, monkeypatch):
    weights, served = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch, seed=2)
    out = "file://" + str(tmp_path / "ddp" / "train")
    script = tmp_path / "ddp_pretrained.py"
    # Each rank points torchvision's URL at the served file, counts its downloads, and records a
    # digest of its backbone parameters at every checkpoint (a collective every rank enters).
    script.write_text(
        textwrap.dedent(
            f"""
            import hashlib, json, os
            import torch.hub
            from imgpipe.train.models import resolve_weights
            from imgpipe.steps import train as train_mod

            rank = int(os.environ["RANK"])
            resolve_weights("resnet18", "DEFAULT").value.url = {weights.url!r}
            downloads = []
            real_download = torch.hub.download_url_to_file
            torch.hub.download_url_to_file = lambda url, *a, **k: downloads.append(url) or real_download(url, *a, **k)
            digests = []
            real_save = train_mod.save_checkpoint

            def save_and_record(run, epoch):
                backbone = b"".join(p.detach().numpy().tobytes() for n, p in run.module.named_parameters() if n not in run.head)
                digests.append(hashlib.sha256(backbone).hexdigest())
                real_save(run, epoch)

            train_mod.save_checkpoint = save_and_record
            cfg = train_mod.TrainConfig(model="resnet18", pretrained="DEFAULT", epochs=2, batch_size=4, num_workers=0,
                                        device="cpu", shuffle_buffer=8, max_steps_per_epoch=2, freeze_fraction=0.5,
                                        checkpoint_every_s=0)
            train_mod.train({data!r}, {out!r}, cfg)
            with open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w") as fh:
                json.dump({{"digests": digests, "downloads": downloads}}, fh)
            """
        )
    )
    ranks = torchrun_two_ranks(script, tmp_path, timeout=300)
    assert ranks[0]["downloads"] == [weights.url] and ranks[1]["downloads"] == []  # rank 0 filled the cache
    assert ranks[0]["digests"] == ranks[1]["digests"]
    reference = torch.load(io.BytesIO(served), weights_only=True)
    served_backbone = b"".join(
        v.numpy().tobytes() for k, v in reference.items() if k in dict(build_model("resnet18", 4).named_parameters()) and not k.startswith("fc.")
    )
    assert ranks[0]["digests"][0] == hashlib.sha256(served_backbone).hexdigest()  # frozen through epoch 0
    assert ranks[0]["digests"][1] != ranks[0]["digests"][0]  # trained in epoch 1
    assert contract.read_manifest(out, expect_step="train")["config"]["pretrained"] == "DEFAULT"
