"""bench/race/real_sets.py: the race's fixed split is stratified, the same for a seed, and refuses a set too small for it (issue 49)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location("real_sets", Path(__file__).parents[2] / "bench" / "race" / "real_sets.py")
real_sets = importlib.util.module_from_spec(_SPEC)
sys.modules["real_sets"] = real_sets  # dataclasses look their module up there
_SPEC.loader.exec_module(real_sets)


def test_the_split_is_stratified_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # the digits' class counts
    a = real_sets.split_indices(labels, (0.6, 0.2, 0.2), seed=0)
    b = real_sets.split_indices(labels, (0.6, 0.2, 0.2), seed=0)
    assert all((a[s] == b[s]).all() for s in a), "the same split for the same seed"
    everything = np.concatenate([a[s] for s in real_sets.SPLITS])
    assert len(everything) == len(labels) == len(set(everything.tolist())), "every image in exactly one split"
    for cls in range(10):
        n = int((labels == cls).sum())
        counts = [int((labels[a[s]] == cls).sum()) for s in real_sets.SPLITS]
        assert abs(counts[0] - 0.6 * n) <= 1 and abs(counts[1] - 0.2 * n) <= 1, (cls, counts)
    other = real_sets.split_indices(labels, (0.6, 0.2, 0.2), seed=1)
    assert not (other["test"].shape == a["test"].shape and (other["test"] == a["test"]).all())


def test_a_set_too_small_for_the_split_is_refused_with_the_numbers():
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(ValueError, match=r"class 1 has 2 images: a 0.6/0.2/0.2 split needs at least 5 per class"):
        real_sets.split_indices(labels, (0.6, 0.2, 0.2), seed=0)
    with pytest.raises(ValueError, match="three positive numbers summing to 1"):
        real_sets.split_indices(labels, (0.7, 0.2, 0.2), seed=0)


def test_written_sets_read_back_as_imagefolder_classes(tmp_path):
    images = np.arange(30 * 8 * 8, dtype=np.uint32).reshape(30, 8, 8).astype(np.uint8)
    data = real_sets.RealSet("toy", images, np.array([0, 1, 2] * 10), ("a", "b", "c"), "tests")
    summary = real_sets.write_set(data, tmp_path / "toy", size=16)
    assert summary["counts"] == {"train": 18, "val": 6, "test": 6}
    files = sorted(p.relative_to(tmp_path / "toy").as_posix() for p in (tmp_path / "toy").rglob("*.png"))
    assert len(files) == 30 and files[0].startswith("test/a/toy-")
    assert (tmp_path / "toy.split.json").exists(), "the split's record lies beside the set, not among its images"


def test_a_colour_set_is_written_in_colour(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    data = real_sets.RealSet("toy", images, np.array([0, 1] * 5), ("dog", "cat"), "tests")
    real_sets.write_set(data, tmp_path / "toy", size=8)
    first = sorted((tmp_path / "toy").rglob("*.png"))[0]
    index = int(first.stem.split("-")[1])
    with Image.open(first) as img:
        assert img.mode == "RGB" and (np.asarray(img) == images[index]).all()


def test_a_packaged_sample_keeps_the_same_images_per_class_for_the_same_seed():
    labels = np.repeat(np.arange(3), [50, 40, 60])
    images = np.arange(150)
    a, la = real_sets._sample(images, labels, 30)
    b, _ = real_sets._sample(images, labels, 30)
    assert (a == b).all() and np.bincount(la).tolist() == [30, 30, 30] and (np.diff(a) > 0).all()
