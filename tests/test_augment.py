"""Augmentation: the per-sample CPU pipeline, the kornia batch path on CPU tensors, MixUp/CutMix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgpipe.augment import (
    POLICIES,
    AugmentConfig,
    BatchAugment,
    MixupCutmix,
    build_eval_transform,
    build_train_transform,
    channel_stats,
    normalize,
    one_hot_targets,
    soft_target_cross_entropy,
    step_generator,
    step_seed,
)
from imgpipe.loader import seed_sample


def images(n: int, channels: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("policy", POLICIES)
def test_cpu_pipeline_shapes_and_dtypes_for_every_policy(policy, channels):
    transform = build_train_transform(AugmentConfig(policy=policy, blur_p=0.5, grayscale_p=0.5), 32, channels)
    batch = images(6, channels)
    for i, image in enumerate(batch):
        seed_sample(0, 0, i)
        out = transform(image)
        assert out.shape == (channels, 32, 32) and out.dtype == torch.uint8


def test_cpu_pipeline_is_reproducible_per_sample_seed_and_varies_across_seeds():
    transform = build_train_transform(AugmentConfig(), 24, 3)
    image = images(1)[0]
    outs = []
    for index in (5, 5, 6):
        seed_sample(1, 0, index)
        outs.append(transform(image))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_policy_none_is_the_eval_transform_and_hflip_can_be_switched_off():
    assert "CenterCrop" in repr(build_train_transform(AugmentConfig(policy="none"), 24, 3))
    assert "RandomHorizontalFlip" in repr(build_train_transform(AugmentConfig(hflip=True), 24, 3))
    assert "RandomHorizontalFlip" not in repr(build_train_transform(AugmentConfig(hflip=False), 24, 3))
    assert "RandomGrayscale" not in repr(build_train_transform(AugmentConfig(grayscale_p=0.5), 24, 1))


def test_eval_transform_is_deterministic_and_centre_crops():
    transform = build_eval_transform(20)
    batch = images(3, size=40)
    torch.manual_seed(0)
    first = [transform(x) for x in batch]
    torch.manual_seed(1)
    second = [transform(x) for x in batch]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].shape == (3, 20, 20)
    rect = torch.arange(30 * 40, dtype=torch.uint8).view(1, 30, 40)  # 30x40: short side to 20, crop the middle
    out = transform(rect)
    assert out.shape == (1, 20, 20)
    # The same object handles whole batches on the device (the GPU path's validation).
    assert torch.equal(transform(batch), torch.stack(first))
    assert torch.equal(build_eval_transform(40)(batch), batch)  # identity at the data's size


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("policy", POLICIES)
def test_kornia_batch_path_on_cpu_tensors_for_every_policy(policy, channels):
    augment = BatchAugment(AugmentConfig(policy=policy, blur_p=0.5, grayscale_p=0.5, random_erasing=0.5), 32, channels)
    batch = images(8, channels)
    out = augment(batch, seed=3)
    assert out.shape == (8, channels, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    mean, std = channel_stats(channels)
    lo, hi = (0 - max(mean)) / min(std), (1 - min(mean)) / min(std)
    assert lo - 1e-4 <= out.min() and out.max() <= hi + 1e-4  # normalized values of [0, 1] pixels


def test_kornia_batch_path_is_seeded_explicitly_and_leaves_the_global_rng_alone():
    augment = BatchAugment(AugmentConfig(policy="randaugment"), 32, 3)
    batch = images(8)
    state = torch.get_rng_state()
    a, b, c = augment(batch, seed=1), augment(batch, seed=1), augment(batch, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Per-sample parameters: two copies of one image are augmented differently.
    twins = augment(batch[:1].repeat(2, 1, 1, 1), seed=4)
    assert not torch.equal(twins[0], twins[1])
    with pytest.raises(TypeError, match="uint8"):
        augment(batch.float(), seed=1)


def test_normalize_matches_imagenet_statistics():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(batch, 3, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        channel_stats(4)


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets_sum_to_one(mixup, cutmix):
    mix = MixupCutmix(5, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    x = normalize(images(8), 3)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for step in range(5):
        mixed, targets = mix(x, labels, step_generator(0, 0, 0, step))
        assert mixed.shape == x.shape and targets.shape == (8, 5)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets >= 0).all()
    if not mix.enabled:
        assert mixed is x and torch.allclose(targets, one_hot_targets(labels, 5, 0.1))


def test_cutmix_weights_labels_by_the_pasted_area():
    mix = MixupCutmix(2, mixup_alpha=0.0, cutmix_alpha=1.0)
    x = torch.zeros(2, 1, 10, 10)
    x[1] = 1.0  # sample 0's partner (rolled by one) is all ones
    mixed, targets = mix(x, torch.tensor([0, 1]), step_generator(1, 0, 0, 0))
    pasted = float(mixed[0].mean())
    assert targets[0, 1].item() == pytest.approx(pasted)
    assert targets[0, 0].item() == pytest.approx(1 - pasted)


def test_mixing_is_reproducible_from_the_step_generator():
    mix = MixupCutmix(3)
    x, labels = normalize(images(4), 3), torch.tensor([0, 1, 2, 0])
    a = mix(x, labels, step_generator(0, 1, 0, 7))
    b = mix(x, labels, step_generator(0, 1, 0, 7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert step_seed(0, 1, 0, 7) == step_seed(0, 1, 0, 7) != step_seed(0, 1, 1, 7)


def test_soft_target_cross_entropy_equals_cross_entropy_with_smoothing():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ours = soft_target_cross_entropy(logits, one_hot_targets(labels, 4, 0.1))
    assert ours.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"policy": "mixmatch"}, "policy"),
        ({"randaugment_m": 31}, "randaugment_m"),
        ({"blur_p": 1.5}, "blur_p"),
        ({"crop_scale": (0.9, 0.1)}, "crop_scale"),
        ({"color_jitter": -1}, "color_jitter"),
    ],
)
def test_augment_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**kwargs)



def test_mixer_rejects_bad_values():
    with pytest.raises(ValueError, match="smoothing"):
        MixupCutmix(3, label_smoothing=1.0)
    with pytest.raises(ValueError, match="alphas"):
        MixupCutmix(3, mixup_alpha=-1)
