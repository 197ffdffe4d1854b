"""Which rows each rank and worker reads, from a split's metadata alone; no torch needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from imgpipe.contract import UncommittedOutputError
from imgpipe.train.partition import (
    assign_rows,
    describe_split,
    epoch_stream,
    rank_range,
    read_labels,
    shuffle_order,
    split_names,
    worker_batches,
)
from imgpipe.writer import OutputWriter
from tests.train.test_loader import write_resize_output


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 train rows in 4 files of 3+ row groups (row groups of 4 rows), 16 px RGB."""
    root = tmp_path_factory.mktemp("partition")
    return write_resize_output("file://" + str(root / "raw"), counts={"train": 40, "val": 10})


def test_importing_partition_does_not_import_torch():
    code = "import sys, imgpipe.train.partition; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "imgpipe.train.partition pulls in torch"


# ------------------------------------------------------------------ metadata


def test_describe_split_reads_geometry_labels_and_row_groups(raw_data):
    info = describe_split(raw_data, "train")
    assert (info.format, info.height, info.width, info.channels) == ("raw", 16, 16, 3)
    assert info.num_samples == 40
    assert [g.rows for g in info.row_groups] == [4, 4, 4] * 3 + [4]
    assert [g.first_index for g in info.row_groups] == list(range(0, 40, 4))
    assert read_labels(raw_data) == ["class_0", "class_1", "class_2", "class_3"]
    assert split_names(raw_data) == ["train", "val"]


def test_describe_split_rejects_missing_split_and_uncommitted_or_foreign_outputs(raw_data, tmp_path):
    with pytest.raises(ValueError, match=r"no rows for split 'test'.*\['train', 'val'\]"):
        describe_split(raw_data, "test")
    with pytest.raises(UncommittedOutputError):
        describe_split("file://" + str(tmp_path / "nothing"), "train")
    other = OutputWriter("file://" + str(tmp_path / "clean"), "clean")
    other.begin()
    other.commit(inputs=0, rejects=[], config={})
    with pytest.raises(ValueError, match="expected 'resize'"):
        describe_split(other.dest, "train")


def rows_of(groups, units) -> list[int]:
    return [groups[u.group].first_index + r for u in units for r in range(u.start, u.stop)]


def test_rows_are_dealt_rank_major_then_worker_and_cover_everything_once(raw_data):
    groups = describe_split(raw_data, "train").row_groups
    kwargs = {"epoch": 5, "seed": 1, "shuffle": True, "batch_size": 3, "drop_last": False}
    stream = rows_of(groups, epoch_stream(groups, epoch=5, seed=1, shuffle=True))
    assert sorted(stream) == list(range(40)) and stream != list(range(40))
    dealt = {}
    for rank in range(2):
        for part in range(3):
            dealt[rank, part] = rows_of(groups, assign_rows(groups, rank=rank, world_size=2, part=part, parts=3, **kwargs))
    assert sorted(sum(dealt.values(), [])) == list(range(40))
    # Rank-major: rank 0 reads the first half of the epoch's stream, its workers consecutive runs of it.
    assert dealt[0, 0] + dealt[0, 1] + dealt[0, 2] == stream[:20]
    assert [len(dealt[0, p]) for p in range(3)] == [9, 6, 5]  # 7 batches of 3 (the last short): 3/2/2
    assert worker_batches(20, 3, 3, drop_last=True) == [2, 2, 2]


def test_training_ranges_are_equal_and_drop_only_a_small_remainder():
    assert rank_range(41, 1, 3, drop_remainder=True) == (13, 26)
    assert [rank_range(41, r, 3, drop_remainder=False) for r in range(3)] == [(0, 14), (14, 28), (28, 41)]
    assert worker_batches(13, 4, 2, drop_last=True) == [2, 1]  # 12 of 13 rows
    assert worker_batches(13, 4, 2, drop_last=False) == [2, 2]


def test_shuffle_buffer_emits_a_permutation_and_respects_its_window():
    idx = np.arange(100)
    out = shuffle_order(idx, 10, np.random.default_rng(0))
    assert sorted(out.tolist()) == idx.tolist() and out.tolist() != idx.tolist()
    # A row can only leave after it has entered: position k emits a row < k + buffer.
    assert all(v < k + 10 for k, v in enumerate(out.tolist()))
    assert shuffle_order(idx, 1, np.random.default_rng(0)).tolist() == idx.tolist()


def test_sample_seeds_are_splitmix64_from_a_seed_sequence_of_seed_and_epoch():
    from imgpipe.train.partition import sample_seed, sample_seeds, splitmix64

    # SplitMix64's published outputs from state 0 (Vigna, splitmix64.c).
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert [int(x) for x in splitmix64(np.uint64(0), np.arange(4, dtype=np.uint64))] == expected

    def reference(state: int, step: int) -> int:  # the algorithm in Python integers
        mask = (1 << 64) - 1
        z = (state + (step + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    base = int(np.random.SeedSequence([7, 3]).generate_state(1, np.uint64)[0])
    seeds = sample_seeds(7, 3, [0, 5, 10**9])
    assert seeds.tolist() == [reference(base, i) >> 1 for i in (0, 5, 10**9)]
    assert sample_seed(7, 3, 5) == seeds[1] and all(0 <= s < 2**63 for s in seeds.tolist())
    many = sample_seeds(0, 0, np.arange(100_000))
    assert len(set(many.tolist())) == 100_000 and not np.array_equal(many, sample_seeds(0, 1, np.arange(100_000)))
