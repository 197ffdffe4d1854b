"""Augmentation: the per-sample CPU recipe (albumentations), the kornia batch path on CPU tensors, MixUp/CutMix."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import albumentations as A
import albumentations.augmentations.geometric.functional as fgeometric
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgpipe.resize.warp import shrink
from imgpipe.train.augment import (
    BatchAugment,
    MixupCutmix,
    build_batch_eval_transform,
    channel_stats,
    normalize,
    one_hot_targets,
    soft_target_cross_entropy,
    step_generator,
    step_seed,
)
from imgpipe.train.augment_config import POLICIES, AugmentConfig
from imgpipe.train.augment_cpu import (
    SampleTransform,
    build_eval_transform,
    build_train_transform,
)
from imgpipe.train.partition import sample_seed
from imgpipe.train.policies import PolicySpec


def images(n: int, channels: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def array(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth ``H x W x C`` uint8 image (noise would hide what blurs and sharpens do)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (1, channels, 6, 6)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 255)
    return smooth[0].permute(1, 2, 0).round().to(torch.uint8).numpy().copy()


def top_level_ops(transform: SampleTransform) -> list[str]:
    return [type(t).__name__ for t in transform.pipeline.transforms]


# ------------------------------------------------------------------ the CPU recipe (albumentations)


def test_the_loader_and_the_cpu_recipe_start_without_torchvision():
    """A loader worker unpickles its recipe in a fresh process; torchvision would add a second or so to each start."""
    code = (
        "import sys\n"
        "from imgpipe.train.augment_config import AugmentConfig\n"
        "from imgpipe.train.augment_cpu import build_train_transform\n"
        "from imgpipe.train.loader import ImageLoader\n"
        "build_train_transform(AugmentConfig(policy='randaugment', random_erasing=0.25), 32, 3)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "the CPU recipe or the loader imports torchvision"


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("policy", POLICIES)
def test_cpu_recipe_takes_any_size_and_gives_size_x_size_uint8(policy, channels):
    transform = build_train_transform(AugmentConfig(policy=policy, blur_p=0.5, grayscale_p=0.5), 32, channels)
    # Smaller, larger, portrait, landscape, very thin: the later whole-picture data.
    for i, (h, w) in enumerate([(40, 57), (31, 20), (32, 32), (120, 13), (300, 200)]):
        image = array(h, w, channels, seed=i)
        image.flags.writeable = False  # as np.frombuffer of a row gives it
        for index in range(8):
            out = transform(image, sample_seed(0, 0, 10 * i + index))
            assert out.shape == (32, 32, channels) and out.dtype == np.uint8
    with pytest.raises(TypeError, match="uint8"):
        transform(array(32, 32, channels).astype(np.float32), 0)
    with pytest.raises(TypeError, match=f"H x W x {channels}"):
        transform(array(32, 32, 4 - channels), 0)


def test_cpu_recipe_is_reproducible_per_sample_seed_and_varies_across_samples():
    transform = build_train_transform(AugmentConfig(), 24, 3)
    image = array(30, 40)
    outs = [transform(image, sample_seed(1, 0, index)) for index in (5, 5, 6)]
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    # Nothing carries over between samples: the same seed after others, or in a new object.
    for index in range(20):
        transform(image, sample_seed(1, 0, index))
    assert np.array_equal(transform(image, sample_seed(1, 0, 5)), outs[0])
    assert np.array_equal(build_train_transform(AugmentConfig(), 24, 3)(image, sample_seed(1, 0, 5)), outs[0])
    # Another epoch of the same sample is another augmentation.
    assert not np.array_equal(transform(image, sample_seed(1, 1, 5)), outs[0])
    # A copy sent to a spawned worker augments alike.
    assert np.array_equal(pickle.loads(pickle.dumps(transform))(image, sample_seed(1, 0, 5)), outs[0])


def test_cpu_recipe_leaves_every_global_generator_alone():
    transform = build_train_transform(AugmentConfig(policy="trivialaugment", blur_p=0.5), 24, 3)
    image = array(30, 40)
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    first = [transform(image, sample_seed(0, 0, i)) for i in range(20)]
    np_after = np.random.get_state()
    assert np_state[0] == np_after[0] and np.array_equal(np_state[1], np_after[1]) and np_state[2:] == np_after[2:]
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    # Nor does it read them: reseeding every global generator changes nothing.
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    assert all(np.array_equal(a, transform(image, sample_seed(0, 0, i))) for i, a in enumerate(first))


def test_cpu_operations_draw_independently():
    """One generator shared in sequence, not one per operation seeded alike (Compose(seed=...)'s way)."""

    def generators(op: A.BasicTransform | A.BaseCompose) -> set[tuple[int, int]]:
        pairs = {(id(op.random_generator), id(op.py_random))}
        for child in op.transforms if isinstance(op, A.BaseCompose) else ():
            pairs |= generators(child)
        return pairs

    for policy in ("randaugment", "trivialaugment", "autoaugment"):
        # Every nested operation draws from the transform's two generators.
        assert len(generators(build_train_transform(AugmentConfig(policy=policy), 24, 3).pipeline)) == 1
    cfg = AugmentConfig(policy="basic", color_jitter=0, grayscale_p=0, blur_p=0, random_erasing=0, crop_scale=(1.0, 1.0))
    transform = build_train_transform(cfg, 16, 3)  # crop (whole image), flip p=0.5, affine p=0.5
    image = array(16, 16)
    flipped = image[:, ::-1]
    outcomes = set()
    for index in range(64):
        out = transform(image, sample_seed(0, 0, index))
        flip = np.array_equal(out, flipped)
        affine = not flip and not np.array_equal(out, image)
        outcomes.add((flip, affine))
    assert (True, False) in outcomes and (False, True) in outcomes  # the flip and the affine are not tied


def test_cpu_recipe_holds_the_configured_steps():
    # ColorJitter is off under a policy unless set (timm's rule): the default recipe has none.
    assert "ColorJitter" not in top_level_ops(build_train_transform(AugmentConfig(), 24, 3))
    assert top_level_ops(build_train_transform(AugmentConfig(color_jitter=0.2), 24, 3)) == [
        "RandomResizedCrop",
        "HorizontalFlip",
        "Affine",
        "PolicyTransform",
        "ColorJitter",
        "ToGray",
        "GaussianBlur",
        "Erasing",
    ]
    bare = AugmentConfig(policy="basic", hflip=False, color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0)
    assert top_level_ops(build_train_transform(bare, 24, 3)) == ["RandomResizedCrop"]
    assert "ToGray" not in top_level_ops(build_train_transform(AugmentConfig(grayscale_p=0.5), 24, 1))
    assert top_level_ops(build_train_transform(AugmentConfig(policy="none"), 24, 3)) == ["SmallestMaxSize", "CenterCrop"]
    assert not build_train_transform(AugmentConfig(policy="none"), 24, 3).random
    # Each policy is one step that draws torchvision's operations (tests/train/test_aug_parity.py holds them to it).
    for policy in ("randaugment", "trivialaugment", "autoaugment"):
        step = build_train_transform(AugmentConfig(policy=policy, randaugment_n=3, randaugment_m=12), 24, 3).pipeline.transforms[3]
        assert type(step).__name__ == "PolicyTransform" and step.spec == PolicySpec(policy, 3, 12, 24)


def test_eval_transform_is_deterministic_and_centre_crops():
    transform = build_eval_transform(20)
    image = array(40, 40)
    assert not transform.random
    assert np.array_equal(transform(image, 0), transform(image, 12345))
    assert transform(image, 0).shape == (20, 20, 3)
    rect = np.arange(30 * 40, dtype=np.int64).reshape(30, 40, 1).astype(np.uint8)  # 30x40, one channel
    assert np.array_equal(build_eval_transform(30)(rect, 0), rect[:, 5:35])  # no resize: the middle 30 columns
    assert build_eval_transform(20)(rect, 0).shape == (20, 20, 1)
    assert np.array_equal(build_eval_transform(40)(image, 0), image)  # identity at the data's size
    tall = array(90, 30)
    assert build_eval_transform(24)(tall, 0).shape == (24, 24, 3)


def test_batch_eval_transform_on_the_device_is_deterministic_and_centre_crops():
    transform = build_batch_eval_transform(20)
    batch = images(3, size=40)
    torch.manual_seed(0)
    first = [transform(x) for x in batch]
    torch.manual_seed(1)
    second = [transform(x) for x in batch]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].shape == (3, 20, 20)
    rect = torch.arange(30 * 40, dtype=torch.uint8).view(1, 30, 40)  # 30x40: short side to 20, crop the middle
    assert transform(rect).shape == (1, 20, 20)
    # The same object handles whole batches on the device (the GPU path's validation).
    assert torch.equal(transform(batch), torch.stack(first))
    assert torch.equal(build_batch_eval_transform(40)(batch), batch)  # identity at the data's size


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


def test_the_device_crop_warps_the_batch_at_once_with_kornias_per_sample_pixels():
    """One batched warp for every sample's box, not an interpolation per sample; the same pixels as kornia's per-sample crop."""
    import kornia.augmentation as K
    from torch.profiler import ProfilerActivity, profile

    cfg = AugmentConfig()
    crop = BatchAugment(cfg, 24, 3).geometric[0]
    per_sample = K.RandomResizedCrop((24, 24), scale=cfg.crop_scale)  # kornia's default cropping_mode: "slice"
    batch = images(16, size=40).float() / 255
    torch.manual_seed(5)
    batched = crop(batch)
    torch.manual_seed(5)
    reference = per_sample(batch)
    assert batched.shape == (16, 3, 24, 24)
    assert torch.allclose(batched, reference, atol=1e-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        crop(batch)
    assert not [e.key for e in prof.key_averages() if e.key == "aten::upsample_bilinear2d"]


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


def test_mixing_probability_leaves_batches_unmixed_and_keeps_the_stream_at_one():
    x, labels = normalize(images(4), 3), torch.tensor([0, 1, 2, 0])
    plain = one_hot_targets(labels, 3, 0.0)
    never = MixupCutmix(3, prob=0.0)
    for step in range(5):
        mixed, targets = never(x, labels, step_generator(0, 0, 0, step))
        assert mixed is x and torch.equal(targets, plain)
    sometimes = MixupCutmix(3, prob=0.5)
    outcomes = {sometimes(x, labels, step_generator(0, 0, 0, s))[0] is x for s in range(40)}
    assert outcomes == {True, False}, "some batches mixed, some not"
    # prob=1 draws nothing extra: the same batches as before the option existed.
    always, default = MixupCutmix(3, prob=1.0), MixupCutmix(3)
    a, b = always(x, labels, step_generator(0, 1, 0, 3)), default(x, labels, step_generator(0, 1, 0, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="prob must be in"):
        MixupCutmix(3, prob=1.5)


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


def test_class_weights_weigh_each_class_share_of_the_loss():
    import torch.nn.functional as F

    from imgpipe.train.augment import soft_target_cross_entropy

    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    weights = torch.tensor([0.5, 1.0, 2.0])
    one_hot = F.one_hot(labels, 3).float()
    expected = F.cross_entropy(logits, labels, weight=weights, reduction="sum") / 6
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot, weights), expected)
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))


# ------------------------------------------------------------------ the domain operations, on both paths

# Only the operation under test: a crop of the whole image at its own size is the identity.
_ONLY = dict(policy="basic", hflip=False, color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0, crop_scale=(1.0, 1.0))


def _quarter_turns_and_flips(image: np.ndarray) -> list[np.ndarray]:
    turns = [np.rot90(image, k) for k in range(4)]
    return turns + [t[::-1] for t in turns]


def test_cpu_domain_operations_are_in_the_recipe_in_order():
    cfg = AugmentConfig(vflip=True, rot90=True, noise_p=0.1, jpeg_p=0.2)
    ops = top_level_ops(build_train_transform(cfg, 24, 3))
    assert ops[:4] == ["RandomResizedCrop", "HorizontalFlip", "VerticalFlip", "RandomRotate90"]
    assert ops[-3:] == ["GaussNoise", "ImageCompression", "Erasing"]
    text = AugmentConfig(hflip=False, vflip=False, rot90=False)
    assert not {"HorizontalFlip", "VerticalFlip", "RandomRotate90"} & set(top_level_ops(build_train_transform(text, 24, 3)))


@pytest.mark.parametrize("channels", [3, 1])
def test_cpu_flips_and_quarter_turns_only_move_pixels(channels):
    image = array(24, 24, channels, seed=3)
    transform = build_train_transform(AugmentConfig(**{**_ONLY, "vflip": True, "rot90": True}), 24, channels)
    outs = [transform(image, seed) for seed in range(24)]
    allowed = _quarter_turns_and_flips(image)
    assert all(any(np.array_equal(o, a) for a in allowed) for o in outs)
    assert len({o.tobytes() for o in outs}) > 4, "the turns and flips vary per sample"


@pytest.mark.parametrize("channels", [3, 1])
def test_cpu_noise_and_jpeg_change_pixels_but_not_the_picture(channels):
    image = array(32, 32, channels, seed=4)
    for extra in ({"noise_p": 1.0}, {"jpeg_p": 1.0}):
        out = build_train_transform(AugmentConfig(**{**_ONLY, **extra}), 32, channels)(image, 7)
        diff = np.abs(out.astype(int) - image.astype(int))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert diff.mean() > 0.5 and diff.mean() < 40, (extra, diff.mean())


def test_cpu_zero_hue_keeps_hues():
    cfg = AugmentConfig(**{**_ONLY, "color_jitter": 0.0})
    assert "ColorJitter" not in top_level_ops(build_train_transform(cfg, 24, 3))
    jitter = build_train_transform(AugmentConfig(**{**_ONLY, "color_jitter": 0.3, "hue": 0.0}), 24, 3).pipeline.transforms[1]
    assert tuple(jitter.hue) == (0.0, 0.0)


@pytest.mark.parametrize("channels", [3, 1])
def test_kornia_flips_and_quarter_turns_only_move_pixels(channels):
    batch = images(16, channels, size=24, seed=5)
    augment = BatchAugment(AugmentConfig(**{**_ONLY, "vflip": True, "rot90": True}), 24, channels, crop=False)
    out = augment(batch, seed=11)
    plain = BatchAugment(AugmentConfig(**{**_ONLY, "policy": "none"}), 24, channels)(batch, seed=0)
    views = [plain.rot90(k, (-2, -1)) for k in range(4)]
    views += [v.flip(-2) for v in views]
    for i in range(len(batch)):
        assert any(torch.allclose(out[i], v[i], atol=1e-5) for v in views), i
    assert len({tuple(out[i].flatten()[:8].tolist()) for i in range(len(batch))}) > 1


@pytest.mark.parametrize("channels", [3, 1])
def test_kornia_noise_and_jpeg_keep_shape_and_stay_close(channels):
    batch = images(4, channels, size=32, seed=6)
    base = BatchAugment(AugmentConfig(**{**_ONLY, "policy": "none"}), 32, channels)(batch, seed=0)
    for extra in ({"noise_p": 1.0}, {"jpeg_p": 1.0}):
        out = BatchAugment(AugmentConfig(**{**_ONLY, **extra}), 32, channels, crop=False)(batch, seed=3)
        assert out.shape == base.shape and torch.isfinite(out).all()
        assert 0 < (out - base).abs().mean() < 2.0, extra


def _albumentations_itself(transform: SampleTransform, image: np.ndarray, seed: int) -> np.ndarray:
    """The transform's own ``albumentations.Compose``, run as albumentations runs it, with the sample's generators.

    Run inside :func:`_shrinking_as_ours`, which is the one change the native crop makes.
    """
    pipeline = transform.pipeline
    pipeline.set_random_state(np.random.Generator(np.random.PCG64(seed)), random.Random(seed))
    out = pipeline(image=image)["image"]
    return out[..., None] if out.ndim == 2 else out


def _shrinking_as_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """albumentations' crops resized as the native crop resizes them: :func:`shrink` where it would call INTER_AREA.

    ``tests/resize/test_shrink.py`` holds that shrink to torchvision's ``resized_crop``.
    """
    resize = fgeometric.resize

    def patched(img: np.ndarray, target_shape: tuple[int, int], interpolation: int) -> np.ndarray:
        if interpolation == cv2.INTER_AREA and target_shape != img.shape[:2]:
            return shrink(img, (target_shape[1], target_shape[0]))
        return resize(img, target_shape, interpolation)

    monkeypatch.setattr(fgeometric, "resize", patched)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(policy="basic", color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0),  # RRC + flip
        AugmentConfig(policy="basic", hflip=False, color_jitter=0, grayscale_p=0, blur_p=0, rotation=0, random_erasing=0),  # RRC
        AugmentConfig(),  # the default recipe: a policy and erasing after the crop
        AugmentConfig(color_jitter=0.3, rotation=10, crop_scale=(0.3, 1.0)),
    ],
)
def test_the_native_crop_and_flip_are_albumentations_own_pixels(cfg, channels, monkeypatch):
    """albumentations' draws and pixels, but for the shrink of a crop larger than the output (``_shrinking_as_ours``)."""
    _shrinking_as_ours(monkeypatch)
    rng = np.random.default_rng(7)
    for size in (24, 64):
        transform = build_train_transform(cfg, size, channels)
        reference = build_train_transform(cfg, size, channels)  # its pipeline gets other generators below
        for i in range(120):
            image = rng.integers(0, 256, (int(rng.integers(8, 90)), int(rng.integers(8, 90)), channels), dtype=np.uint8)
            image.flags.writeable = False  # as the loader's rows are
            expected = _albumentations_itself(reference, image, i)
            np.testing.assert_array_equal(transform(image, i), expected)
            row = np.zeros((size, size, channels), np.uint8)
            assert transform(image, i, out=row) is row
            np.testing.assert_array_equal(row, expected)
