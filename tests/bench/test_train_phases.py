"""bench/steps/train_phases.py: a real cold train step's phases add up to its process's wall time, and the bars are drawn."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.bench.test_gpu_bench import _load


def test_held_out_rows_go_to_val_and_test_by_class(tmp_path):
    loader = _load("loader")
    _, raw, _ = loader.write_datasets(tmp_path, 200, 16, (24, 20), held_out=True)
    root = tmp_path / "resize-raw"
    counts = {split: sum(pq.read_table(p).num_rows for p in (root / split).glob("*.parquet")) for split in ("train", "val", "test")}
    assert counts == {"train": 160, "val": 20, "test": 20}
    labels = pq.read_table(next((root / "val").glob("*.parquet"))).column("label").to_pylist()
    assert sorted(set(labels)) == list(range(10))  # every class held out, not one


def test_a_manifest_without_phases_is_refused_with_what_it_lacks():
    phases = _load("train_phases")
    with pytest.raises(ValueError, match="phase_s"):
        phases.phases_of(10.0, 0.0, {"extra": {}})


@pytest.mark.slow
def test_one_cold_train_step_accounts_for_its_wall_time(tmp_path):
    phases = _load("train_phases")
    out = tmp_path / "phases.json"
    assert phases.main(["--sizes", "100", "--epochs", "2", "--size", "32", "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    run = json.loads(out.read_text())["results"]["100"]
    parts = run["phases"]
    assert run["epochs"] == 2 and parts["steps"] > 0 and parts["per-epoch extras"] > 0 and parts["imports"] > 0
    assert sum(parts[name] for name, _ in phases.PHASES) == pytest.approx(run["wall_s"], abs=0.05)
    assert parts["start"] >= parts["imports"] + parts["setup"] - 0.02
    assert parts["end"] >= parts["final_evaluation"] + parts["outputs"] - 0.05
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
