"""torchvision weights through the object-storage cache, offline: names, layout, download once, hashes.

No test reaches the network. :func:`serve_weights` saves a seeded, randomly initialized
model as torchvision would publish it (``<model>-<sha256 prefix>.pth``) and points the
weights enum member's URL at that file (``file://``), so the real torch.hub download,
hash check included, fills the cache.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.hub
from torchvision.models import WeightsEnum
from torchvision.transforms._presets import ImageClassification

from imgpipe import storage
from imgpipe.config import config_from_dict
from imgpipe.train import pretrained
from imgpipe.train.augment import IMAGENET, Normalization, normalize
from imgpipe.train.config import TrainConfig, default_weights_cache
from imgpipe.train.distributed import DistInfo
from imgpipe.train.models import build_model, resolve_weights
from imgpipe.train.pretrained import cache_uri, fetch, load_pretrained, read_cached


def serve_weights(
    model: str, member: str, folder: Path, monkeypatch: pytest.MonkeyPatch, *, seed: int = 0, num_classes: int = 1000
) -> tuple[WeightsEnum, bytes]:
    """Publishes a seeded random ``model`` as ``folder/<model>-<sha256[:8]>.pth`` and points ``member``'s URL at it.

    Returns:
        The weights enum member and the file's bytes.
    """
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(build_model(model, num_classes).state_dict(), buf)
    data = buf.getvalue()
    path = folder / f"{model}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    weights = resolve_weights(model, member)
    monkeypatch.setattr(weights.value, "url", path.as_uri())  # restored after the test
    return weights, data


def count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every torch.hub download (load_state_dict_from_url calls it when the file is not local)."""
    calls: list[str] = []
    real = torch.hub.download_url_to_file

    def counting(url, *args, **kwargs):
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", counting)
    return calls


def refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"no download expected, got {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# ------------------------------------------------------------------ names


def test_members_aliases_and_qualified_names_resolve_to_one_member():
    v1 = resolve_weights("resnet18", "IMAGENET1K_V1")
    assert resolve_weights("resnet18", "DEFAULT") is v1
    assert resolve_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1") is v1
    assert resolve_weights("resnet50", "IMAGENET1K_V2").name == "IMAGENET1K_V2"
    assert TrainConfig(pretrained="DEFAULT").pretrained == "DEFAULT"


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "IMAGENET1K_V1/../../../x",
        "/etc/passwd",
        "",
        " DEFAULT",
        "DEFAULT\n",
        "imagenet1k_v1",
        "IMAGENET1K_V2",  # resnet50 has it, resnet18 does not
        "ResNet50_Weights.IMAGENET1K_V1",  # another model's enum
        "__class__",
        "_member_map_",
        "file:///etc/passwd",
    ],
)
def test_unknown_and_hostile_names_are_refused_with_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"is not a weights name of resnet18; choose one of: IMAGENET1K_V1, DEFAULT"):
        config_from_dict(TrainConfig, {"model": "resnet18", "pretrained": name})


def test_models_and_combinations_without_usable_weights_are_refused():
    with pytest.raises(ValueError, match="tiny_cnn has no pretrained weights"):
        TrainConfig(model="tiny_cnn", pretrained="DEFAULT")
    with pytest.raises(ValueError, match="without a usable classifier"):
        TrainConfig(model="vgg16", pretrained="IMAGENET1K_FEATURES")
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(pretrained="DEFAULT", weights="file:///nowhere/w.pt")
    with pytest.raises(TypeError, match="weights enum member"):
        resolve_weights("resnet18", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported storage URI"):
        TrainConfig(pretrained="DEFAULT", weights_cache="gs://bucket/weights")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"freeze_fraction": -0.1}, "freeze_fraction"),
        ({"backbone_lr_mult": 0}, "backbone_lr_mult must be > 0"),
        ({"backbone_lr_mult": float("nan")}, "backbone_lr_mult"),
    ],
)
def test_fine_tuning_options_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(TrainConfig, values)


# ------------------------------------------------------------------ layout


def test_the_cache_layout_is_model_then_member_and_torchvision_file_name(tmp_path):
    cache = "file://" + str(tmp_path / "data" / "weights")
    weights = resolve_weights("resnet18", "DEFAULT")
    assert cache_uri(cache, "resnet18", weights) == cache + "/resnet18/IMAGENET1K_V1-resnet18-f37072fd.pth"
    assert default_weights_cache("s3://bucket/exp/train") == "s3://bucket/exp/weights"
    assert default_weights_cache(str(tmp_path / "exp" / "train")) == "file://" + str(tmp_path / "exp" / "weights")
    for root in ("s3://bucket", "file:///train"):
        with pytest.raises(ValueError, match="set weights_cache"):
            default_weights_cache(root)


@pytest.mark.parametrize("url", ["https://example.test/models/..", "https://example.test/a%2F..%2Fb.pth", "https://example.test/"])
def test_a_url_whose_file_name_is_not_one_plain_segment_names_no_cache_object(url, monkeypatch):
    weights = resolve_weights("resnet18", "DEFAULT")
    monkeypatch.setattr(weights.value, "url", url)
    with pytest.raises(ValueError, match="cannot name a cache object"):
        cache_uri("file:///nowhere/weights", "resnet18", weights)


# ------------------------------------------------------------------ download once, then the cache


def test_an_empty_cache_downloads_once_and_later_runs_read_it(any_root, tmp_path, monkeypatch):
    weights, served = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch)
    downloads = count_downloads(monkeypatch)
    cache = any_root + "/weights"
    uri = cache_uri(cache, "resnet18", weights)
    assert not storage.exists(uri)

    model = build_model("resnet18", 4)
    assert load_pretrained(model, "resnet18", weights, cache) == ["fc.bias", "fc.weight"]  # the head, replaced
    assert downloads == [weights.url]
    assert storage.read_bytes(uri) == served  # the file as published, byte for byte
    assert [o.uri for o in storage.list_objects(cache)] == [uri]
    reference = torch.load(io.BytesIO(served), weights_only=True)
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference if not k.startswith("fc."))

    # A later run (the source gone, as in a pod without network) reads the cache only.
    (tmp_path / "hub").rename(tmp_path / "hub-gone")
    again = build_model("resnet18", 4)
    load_pretrained(again, "resnet18", resolve_weights("resnet18", "IMAGENET1K_V1"), cache)
    assert len(downloads) == 1
    assert torch.equal(again.conv1.weight, model.conv1.weight)


def test_a_populated_cache_is_read_without_any_download(tmp_path, monkeypatch):
    weights, served = serve_weights("mobilenet_v3_small", "IMAGENET1K_V1", tmp_path / "hub", monkeypatch, seed=3)
    cache = "file://" + str(tmp_path / "data" / "weights")
    storage.write_bytes(cache_uri(cache, "mobilenet_v3_small", weights), served)  # an operator copied it there
    refuse_downloads(monkeypatch)
    model = build_model("mobilenet_v3_small", 5)
    assert load_pretrained(model, "mobilenet_v3_small", weights, cache) == ["classifier.3.bias", "classifier.3.weight"]


def test_a_corrupt_cache_object_is_refused(tmp_path, monkeypatch):
    weights, served = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch)
    cache = "file://" + str(tmp_path / "data" / "weights")
    uri = cache_uri(cache, "resnet18", weights)
    storage.write_bytes(uri, served[:-1] + bytes([served[-1] ^ 1]))
    refuse_downloads(monkeypatch)
    with pytest.raises(ValueError, match="corrupt or was replaced; delete it"):
        load_pretrained(build_model("resnet18", 4), "resnet18", weights, cache)
    # As in torch.hub, a file name without a hash prefix is not checked.
    storage.write_bytes(storage.join(cache, "other.pt"), b"x")
    assert read_cached(storage.join(cache, "other.pt"), "other.pt") == b"x"


def test_a_failed_download_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    weights, served = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch)
    cache_dir = tmp_path / "data" / "weights"
    cache = "file://" + str(cache_dir)

    # The published file does not match the hash in its name: torch.hub refuses it.
    path = Path(weights.url.removeprefix("file://"))
    wrong = path.with_name("resnet18-00000000.pth")
    shutil.copyfile(path, wrong)
    monkeypatch.setattr(weights.value, "url", wrong.as_uri())
    with pytest.raises(RuntimeError, match=r"could not download .* copy that file to .*resnet18-00000000\.pth"):
        load_pretrained(build_model("resnet18", 4), "resnet18", weights, cache)
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))

    # Killed while copying into the cache: no object, no temporary file left behind.
    monkeypatch.setattr(weights.value, "url", path.as_uri())

    def killed(src, dst, length=0):
        dst.write(src.read(1000))
        raise KeyboardInterrupt("pod killed")

    monkeypatch.setattr(pretrained.shutil, "copyfileobj", killed)
    with pytest.raises(KeyboardInterrupt):
        load_pretrained(build_model("resnet18", 4), "resnet18", weights, cache)
    assert [p for p in cache_dir.rglob("*") if p.is_file()] == []


def test_rank_0_fills_the_cache_and_the_other_ranks_only_read(tmp_path, monkeypatch):
    weights, served = serve_weights("resnet18", "DEFAULT", tmp_path / "hub", monkeypatch)
    downloads = count_downloads(monkeypatch)
    barriers: list[int] = []
    monkeypatch.setattr(pretrained, "barrier", lambda ctx: barriers.append(ctx.rank))
    cache = "file://" + str(tmp_path / "data" / "weights")
    # Rank 1 alone does not download; after rank 0 has (and the barrier), it reads the object.
    uri = fetch("resnet18", weights, cache, DistInfo(rank=1, world_size=2))
    assert downloads == [] and not storage.exists(uri)
    assert fetch("resnet18", weights, cache, DistInfo(rank=0, world_size=2)) == uri
    assert fetch("resnet18", weights, cache, DistInfo(rank=1, world_size=2)) == uri
    assert len(downloads) == 1 and barriers == [1, 0, 1]
    assert read_cached(uri, pretrained.file_name(weights)) == served


# ------------------------------------------------------------------ what the weights expect


def test_normalization_and_input_size_come_from_the_weights(monkeypatch):
    assert pretrained.normalization(resolve_weights("resnet18", "DEFAULT")) == IMAGENET
    assert pretrained.normalization(resolve_weights("efficientnet_v2_l", "DEFAULT")) == Normalization((0.5,) * 3, (0.5,) * 3)
    weights = resolve_weights("resnet18", "DEFAULT")
    assert pretrained.size_advice("resnet18", weights, 224) is None
    advice = pretrained.size_advice("resnet18", weights, 64)
    assert "trained at 224 px" in advice and "--size 224" in advice and "--preset resnet" in advice
    assert "--preset" not in pretrained.size_advice("mobilenet_v3_small", resolve_weights("mobilenet_v3_small", "DEFAULT"), 64)
    own = partial(ImageClassification, crop_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    monkeypatch.setattr(weights.value, "transforms", own)
    assert pretrained.normalization(weights) == Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert pretrained.size_advice("resnet18", weights, 32) is None


def test_normalize_uses_the_given_statistics():
    images = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)  # 0.2 after scaling
    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    out = normalize(images, 3, norm=norm)
    expected = torch.tensor([(0.2 - m) / s for m, s in zip(norm.mean, norm.std)]).view(1, 3, 1, 1).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-6)
    grey = normalize(images[:, :1], 1, norm=norm)
    assert torch.allclose(grey, torch.full_like(grey, (0.2 - 0.4) / 0.25), atol=1e-6)


def test_the_batched_gpu_recipe_normalizes_with_the_given_statistics():
    from imgpipe.train.augment import BatchAugment
    from imgpipe.train.augment_config import AugmentConfig

    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    # Every operation off: what is left is the standardization, on the recipe's path and on policy none's.
    bare = AugmentConfig(policy="basic", hflip=False, rotation=0, color_jitter=0, grayscale_p=0, blur_p=0, random_erasing=0)
    for cfg, crop in ((bare, False), (AugmentConfig(policy="none"), True)):
        out = BatchAugment(cfg, 8, 3, crop=crop, norm=norm)(images, seed=0)
        assert torch.allclose(out, normalize(images, 3, norm=norm), atol=1e-5)
