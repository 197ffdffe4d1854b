"""bench/probes/crop_threads.py: what it counts as a kernel, and its share outside them on a real transform."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).parents[2] / "bench" / "probes"


def _load():
    if "crop_threads" not in sys.modules:
        sys.path.insert(0, str(BENCH))  # it imports its sibling crop.py by name
        spec = importlib.util.spec_from_file_location("crop_threads", BENCH / "crop_threads.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["crop_threads"] = module
        spec.loader.exec_module(module)
    return sys.modules["crop_threads"]


def test_a_builtin_is_named_as_cprofile_labels_it_in_either_form():
    bench = _load()
    assert bench._builtin("<resize>") == "resize"
    assert bench._builtin("{built-in method cv2.resize}") == "resize"
    assert bench._builtin("<method 'astype' of 'numpy.ndarray' objects>") not in bench.NATIVE


def test_the_crops_time_outside_its_kernels_is_a_share_and_threads_deliver_every_sample():
    bench = _load()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(6)]
    transform = bench._transform("crop", 32)
    share = bench._outside_native(transform, images, 32)
    assert 0 < share < 1
    assert bench._threads(transform, images, 1, 32, 2) > 0
