"""Clean's plan on an index built in memory: arrays in, arrays out, the same decisions as before."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from imgpipe.clean import plan as plan_module
from imgpipe.clean.config import SPLITS, CleanConfig
from imgpipe.clean.plan import Index, Unit, build_labeler, plan_rows
from imgpipe.clean.splits import split_codes, stratified_split
from imgpipe.data.labels import Labeler


def _index(rows: list[tuple[str, str]]) -> Index:
    paths = pa.array([p for p, _ in rows], pa.large_string())
    hashes = pa.array([h for _, h in rows], pa.large_string())
    return Index([Unit("file:///in/part-0.parquet", 0, 0, len(rows))], paths, hashes)


def test_duplicates_keep_the_first_path_and_name_it():
    # Input order is not path order: the kept copy is the first in sorted order.
    index = _index([("c/Bengal_2.jpg", "h1"), ("a/Bengal_1.jpg", "h1"), ("b/Bengal_3.jpg", "h2"), ("noclass.jpg", "h3")])
    plan = plan_rows(index, Labeler("oxford"), CleanConfig(split=(1.0, 0.0, 0.0)))
    assert plan.classes == ["Bengal"]
    assert plan.order[1] >= 0 and plan.order[2] >= 0 and plan.order[0] == -1
    assert sorted(plan.order[plan.order >= 0].tolist()) == [0, 1]
    assert plan.deferred[0].reason == "duplicate" and plan.deferred[0].detail == "same bytes as a/Bengal_1.jpg"
    assert plan.deferred[3].reason == "no_label"
    assert plan.planned == 2


def test_known_rows_keep_their_split_and_are_carried():
    rows = [(f"images/{c}_{i}.jpg", f"{c}{i}") for c in ("Bengal", "beagle") for i in range(10)]
    known = pa.table({"sha256": ["Bengal0", "beagle3"], "split": ["test", "val"]})
    plan = plan_rows(_index(rows), Labeler("oxford"), CleanConfig(), known)
    assert plan.carried.sum() == 2
    assert SPLITS[plan.split[0]] == "test" and SPLITS[plan.split[13]] == "val"
    assert not plan.carried[1:13].any()


def test_plan_is_arrays_not_objects_per_row():
    n = 5000
    rows = [(f"images/Bengal_{i}.jpg", f"{i:064x}") for i in range(n)]
    plan = plan_rows(_index(rows), Labeler("oxford"), CleanConfig())
    for column in (plan.order, plan.label, plan.split, plan.carried):
        assert isinstance(column, np.ndarray) and column.dtype != object and len(column) == n
    assert sorted(plan.order.tolist()) == list(range(n))
    sub = plan.of_units([Unit("x", 0, 10, 5)])
    assert sub.order.tolist() == plan.order[10:15].tolist()


def test_split_codes_match_split_names():
    labels = [0] * 7 + [1] * 3 + [2]
    codes = split_codes(labels, (0.8, 0.1, 0.1), seed=3)
    assert codes.dtype == np.int8
    assert [SPLITS[c] for c in codes] == stratified_split(labels, (0.8, 0.1, 0.1), seed=3)


@pytest.mark.parametrize(
    ("classes", "rule"),
    [
        (["cat", "cat"], "class 1 repeats class 0 ('cat')"),
        (["cat", "dog\x07"], "class 1: the class name holds U+0007"),
        ("cat", "the class names are a string, not a list of strings"),
    ],
)
def test_a_download_manifests_class_list_passes_the_label_gate_before_it_orders_classes(classes, rule):
    # A download output written before the gate: its source list is a file like any other.
    sources = [{"uri": "file:///ok", "classes": ["cat", "dog"]}, {"uri": "file:///d/README.md", "classes": classes}]
    with pytest.raises(ValueError, match=re.escape(f"the download manifest's sources[1] (file:///d/README.md) classes: {rule}")):
        build_labeler(CleanConfig(label_source="given"), _index([]), sources)


def test_more_distinct_class_names_than_the_cap_fail_the_plan(monkeypatch):
    monkeypatch.setattr(plan_module, "MAX_CLASSES", 3)
    rows = [(f"{c}/1.jpg", c) for c in ("a", "b", "c", "d")]
    with pytest.raises(ValueError, match="label_source folder gives more than 3 distinct class names"):
        plan_rows(_index(rows), Labeler("folder"), CleanConfig())
