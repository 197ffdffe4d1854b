"""Both augmentation paths against torchvision itself: its op code, its magnitude tables and its draws.

The oracle is torchvision's ``transforms.v2`` as installed: ``_AUGMENTATION_SPACE`` for the
magnitudes, ``_apply_image_or_video_transform`` for what an operation does, and the
(operation, magnitude) sequence its ``forward`` draws, recorded. The GPU path runs here on
CPU tensors (no GPU in ``make test``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from imgpipe.train import policies
from imgpipe.train.augment import IMAGENET, BatchAugment
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.augment_cpu import build_train_transform
from imgpipe.train.config import TrainConfig
from imgpipe.train.policies import PolicyLimits, PolicySpec, draw, magnitude_table
from imgpipe.train.policy_cpu import apply_op as cpu_op
from imgpipe.train.policy_gpu import apply_op as gpu_op
from imgpipe.train.recipes import DOMAINS

TORCHVISION = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment}
SIZE = 48


def photo(channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: every operation changes it visibly, no two pixels tie everywhere."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, SIZE)
    base = np.stack([np.outer(x, x), np.outer(1 - x, x), np.outer(x, 1 - x)], -1) * 200 + rng.integers(0, 55, (SIZE, SIZE, 3))
    return base.astype(np.uint8)[..., :channels].copy()


def oracle(policy: str, image: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    """torchvision's own application of ``op`` at ``magnitude`` to a uint8 tensor."""
    t = TORCHVISION[policy]()
    out = t._apply_image_or_video_transform(torch.from_numpy(image).permute(2, 0, 1), op, magnitude, interpolation=t.interpolation, fill=t._fill)
    return out.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("policy", policies.POLICY_NAMES)
def test_magnitude_tables_are_torchvisions(policy):
    space = TORCHVISION[policy]._AUGMENTATION_SPACE
    assert set(space) == set(policies.AUTOAUGMENT_OPS if policy == "autoaugment" else policies.RANDAUGMENT_OPS)
    bins = 10 if policy == "autoaugment" else 31
    for op, (table_fn, signed) in space.items():
        theirs = table_fn(bins, SIZE, SIZE)
        ours = magnitude_table(policy, op, SIZE)
        assert (op in policies.SIGNED_OPS) == signed, op
        if theirs is None:
            assert ours is None, op
        else:
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, err_msg=op)


def test_the_imagenet_policy_is_torchvisions():
    assert [tuple(s) for s in v2.AutoAugment()._policies] == [tuple(s) for s in policies.IMAGENET_POLICY]


# Every operation at a few magnitudes of each policy's table (both signs), on 3 and 1 channels.
CASES = sorted(
    {
        (op, float(sign * table[b]))
        for policy in policies.POLICY_NAMES
        for op in policies.ALL_OPS
        if (table := magnitude_table(policy, op, SIZE)) is not None
        for b in (1, len(table) // 2, len(table) - 1)
        for sign in ((1, -1) if op in policies.SIGNED_OPS else (1,))
    }
    | {("AutoContrast", 0.0), ("Equalize", 0.0), ("Invert", 0.0), ("Identity", 0.0)}
)


@pytest.mark.parametrize("channels", [3, 1])
def test_each_operation_on_both_paths_is_torchvisions(channels):
    image = photo(channels)
    for op, magnitude in CASES:
        policy = "autoaugment" if op == "Invert" else "randaugment"
        expected = oracle(policy, image, op, magnitude).astype(int)
        on_gpu_path = gpu_op(torch.from_numpy(image).permute(2, 0, 1)[None], op, magnitude)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(on_gpu_path, expected, err_msg=f"GPU path {op} {magnitude}")
        diff = np.abs(cpu_op(image, op, magnitude).astype(int) - expected)
        if op == "Color":
            # torch blends with a grey computed by fused multiply-adds (add_(alpha=)); its floor can
            # land one level apart from NumPy's on a few pixels (measured: <= 1 level, < 3% of pixels).
            assert diff.max() <= 1 and (diff > 0).mean() < 0.05, f"CPU path {op} {magnitude}"
        else:
            assert diff.max() == 0, f"CPU path {op} {magnitude}: {int((diff > 0).sum())} pixels differ"


@pytest.mark.parametrize("counts", ["opencv", "numpy"])
@pytest.mark.parametrize("channels", [3, 1])
def test_table_and_remap_kernels_are_torchvisions_at_training_sizes(channels, counts, monkeypatch):
    """The operations the CPU path runs as lookup tables or ``cv2.remap``, on non-square 224-class images."""
    from imgpipe.train import policy_cpu

    if counts == "numpy":  # Equalize's count for images too large for OpenCV's float32 histogram
        monkeypatch.setattr(policy_cpu, "_EXACT_FLOAT32", 0)
    rng = np.random.default_rng(1)
    for height, width in [(224, 224), (131, 200)]:
        image = np.clip(rng.normal(120, 50, (height, width, 3)), 0, 255).astype(np.uint8)[..., :channels].copy()
        image[: height // 3] //= 2  # uneven histogram: Equalize's table matters
        for op, magnitude in [
            ("Rotate", 17.3),
            ("Rotate", -30.0),
            ("ShearX", 0.3),
            ("ShearY", -0.21),
            ("TranslateX", -61.0),
            ("TranslateY", 45.0),
            ("Brightness", 0.7),
            ("Brightness", -0.45),
            ("Contrast", 0.9),
            ("Contrast", -0.3),
            ("Solarize", 0.4),
            ("AutoContrast", 0.0),
            ("Equalize", 0.0),
        ]:
            expected = oracle("randaugment", image, op, magnitude)
            np.testing.assert_array_equal(cpu_op(image, op, magnitude), expected, err_msg=f"{op} {magnitude} at {height}x{width}x{channels}")


def _torchvision_draws(policy: str, runs: int, **kwargs) -> Counter:
    """(op, magnitude) pairs torchvision's own ``forward`` applies over ``runs`` calls, recorded."""
    torch.manual_seed(0)
    t = TORCHVISION[policy](**kwargs)
    seen: Counter = Counter()
    t._apply_image_or_video_transform = lambda image, op, magnitude, **_: (seen.update([(op, round(magnitude, 4))]), image)[1]
    image = torch.from_numpy(photo()).permute(2, 0, 1)
    for _ in range(runs):
        t(image)
    return seen


def _our_draws(spec: PolicySpec, runs: int) -> Counter:
    rng = np.random.default_rng(0)
    return Counter((op, round(m, 4)) for _ in range(runs) for op, m in draw(spec, rng))


@pytest.mark.parametrize(
    ("policy", "kwargs", "spec"),
    [
        ("randaugment", {"num_ops": 2, "magnitude": 9}, PolicySpec("randaugment", 2, 9, SIZE)),
        ("trivialaugment", {}, PolicySpec("trivialaugment", size=SIZE)),
        ("autoaugment", {}, PolicySpec("autoaugment", size=SIZE)),
    ],
)
def test_the_distribution_of_operations_is_torchvisions(policy, kwargs, spec):
    runs = 6000
    theirs, ours = _torchvision_draws(policy, runs, **kwargs), _our_draws(spec, runs)
    # Which operations, and how often (Identity included; torchvision skips applying nothing).
    by_op_theirs, by_op_ours = Counter(), Counter()
    for (op, _), n in theirs.items():
        by_op_theirs[op] += n
    for (op, _), n in ours.items():
        by_op_ours[op] += n
    assert set(by_op_ours) == set(by_op_theirs)
    total_t, total_o = sum(by_op_theirs.values()), sum(by_op_ours.values())
    assert abs(total_t - total_o) / total_t < 0.03, (total_t, total_o)
    for op in by_op_theirs:  # each op's share within 3 standard errors
        p = by_op_theirs[op] / total_t
        assert abs(by_op_ours[op] / total_o - p) < 3 * np.sqrt(p * (1 - p) / total_t) + 0.005, op
    # Every magnitude drawn is one of torchvision's bins (either sign), and both draw the same set.
    for op, m in ours:
        table = magnitude_table(policy, op, SIZE)
        assert (m == 0.0 and table is None) or any(abs(abs(m) - float(v)) < 1e-3 for v in table), (op, m)
    # Rare TrivialAugment bins (1 in ~870 draws each) may be unseen by one side or the other.
    assert len(set(theirs) ^ set(ours)) <= len(theirs) // 10


def _only_policy(policy: str, m: int, **limits) -> AugmentConfig:
    return AugmentConfig(
        policy=policy,
        randaugment_n=2,
        randaugment_m=m,
        hflip=False,
        rotation=0,
        color_jitter=0,
        grayscale_p=0,
        blur_p=0,
        random_erasing=0,
        crop_scale=(1.0, 1.0),
        **limits,
    )


def _not_red(images: np.ndarray) -> float:
    mean = images.reshape(len(images), -1, 3).astype(int).mean(1)
    return float(np.mean(~((mean[:, 0] > 150) & (mean[:, 1] < 60) & (mean[:, 2] < 60))))


@pytest.mark.parametrize("m", [5, 9])
def test_plain_red_images_change_as_often_as_with_torchvision(m):
    """The issue's check: the GPU path turned 72% of red images non-red at M=5, torchvision ~15%."""
    n = 400
    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[..., 0], red[..., 1:] = 200, 30
    torch.manual_seed(0)
    ra = v2.RandAugment(num_ops=2, magnitude=m)
    theirs = _not_red(np.stack([ra(torch.from_numpy(red).permute(2, 0, 1)).permute(1, 2, 0).numpy() for _ in range(n)]))
    cfg = _only_policy("randaugment", m)
    cpu = build_train_transform(cfg, SIZE, 3)
    on_cpu = _not_red(np.stack([cpu(red, i) for i in range(n)]))
    batch = torch.from_numpy(np.repeat(red[None], n, 0)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = BatchAugment(cfg, SIZE, 3)(batch, seed=1)
    mean, std = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1), torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    on_gpu = _not_red(((out * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert abs(on_cpu - theirs) < 0.07 and abs(on_gpu - theirs) < 0.07, (theirs, on_cpu, on_gpu)


@pytest.mark.parametrize("domain", ["text", "medical", "satellite", "product"])
@pytest.mark.parametrize("policy", policies.POLICY_NAMES)
def test_domains_limit_every_policy_on_both_paths(domain, policy):
    limits = PolicyLimits(DOMAINS[domain]["policy_exclude"], DOMAINS[domain].get("policy_max_m", 30))
    spec = PolicySpec(policy, 2, 30, SIZE, limits)
    caps = {op: magnitude_table("randaugment", op, SIZE) for op in policies.ALL_OPS}
    for op, m in _our_draws(spec, 3000):
        assert op not in limits.exclude
        table = caps[op]
        if table is not None and limits.max_m < 30:
            cap = float(table[limits.max_m])
            assert (m >= cap - 1e-3) if op in ("Posterize", "Solarize") else abs(m) <= cap + 1e-3, (op, m)
    cfg = _only_policy(policy, 30, policy_exclude=limits.exclude, policy_max_m=limits.max_m)
    assert build_train_transform(cfg, SIZE, 3).pipeline.transforms[-1].spec == spec  # the CPU path's draws
    assert BatchAugment(cfg, SIZE, 3).policy == spec  # the GPU path's draws


def test_satellite_turns_quarter_turns_on_only_when_asked():
    assert DOMAINS["satellite"]["rot90"] is False
    from imgpipe.train.recipes import resolve

    cfg, _ = resolve(TrainConfig(domain="satellite", recipe="none"))
    assert cfg.rot90 is False and cfg.vflip and cfg.hflip
    asked, _ = resolve(TrainConfig(domain="satellite", recipe="none", rot90=True))
    assert asked.rot90 is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"randaugment_n": 0}, r"randaugment_n must be an integer in \[1, 4\].*basic"),
        ({"randaugment_n": 5}, r"randaugment_n must be an integer in \[1, 4\]"),
        ({"randaugment_m": 31}, r"randaugment_m must be an integer in \[0, 30\]"),
        ({"randaugment_m": -1}, r"randaugment_m must be an integer in \[0, 30\]"),
        ({"policy_max_m": 31}, r"policy_max_m must be an integer in \[0, 30\]"),
        ({"policy_exclude": ("Teleport",)}, r"unknown operation\(s\) \['Teleport'\]"),
        ({"policy_exclude": policies.RANDAUGMENT_OPS}, r"leaves no operation to apply"),
    ],
)
def test_policy_settings_are_range_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(policy="randaugment", **fields)
    with pytest.raises(ValueError, match=message):
        TrainConfig(aug_policy="randaugment", **fields)


def test_m_0_and_30_run_on_both_paths():
    """kornia's policy raised on both; torchvision takes every bin."""
    for m in (0, 30):
        cfg = _only_policy("randaugment", m)
        build_train_transform(cfg, SIZE, 3)(photo(), 1)
        BatchAugment(cfg, SIZE, 3)(torch.from_numpy(photo()).permute(2, 0, 1)[None].contiguous(), seed=1)
