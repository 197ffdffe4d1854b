"""bench/steps/gpu.py and the data it shares with bench/steps/loader.py: the same images in parallel, its figure from the recorded runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

BENCH = Path(__file__).parents[2] / "bench" / "steps"


def _load(name: str):
    if name not in sys.modules:
        sys.path.insert(0, str(BENCH))  # bench/steps/gpu.py imports its sibling loader.py by name
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tables(uri: str) -> list:
    return [pq.read_table(p) for p in sorted((Path(uri.removeprefix("file://")) / "train").glob("*.parquet"))]


def test_images_made_in_worker_processes_are_the_same_rows(tmp_path):
    loader = _load("loader")
    one = loader.write_datasets(tmp_path / "one", 24, 32, (48, 36))
    two = loader.write_datasets(tmp_path / "two", 24, 32, (48, 36), workers=2)
    for a, b in zip(one[1:], two[1:]):
        assert [t.num_rows for t in _tables(a)] == [24] and all(x.equals(y) for x, y in zip(_tables(a), _tables(b)))


def test_the_figure_is_drawn_from_the_recorded_runs(tmp_path):
    gpu = _load("gpu")
    assert gpu.main(["--plot", str(tmp_path / "gpu.png"), str(BENCH.parent / "recorded" / "gpu.json")]) == 0
    assert (tmp_path / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_decode_row_on_the_cpu_gives_rates_for_its_paths():
    gpu = _load("gpu")
    row = gpu.decode_row(0.05, torch.device("cpu"), seconds=0.05)
    assert row["cpu_1_thread"]["img_s"] > 0 and row["megapixels"] > 0
    assert not any(k.startswith("gpu_") for k in row), "no nvJPEG rows without CUDA"
