"""The resize step without Ray: its config, then its tasks, plan and results on hand-built inputs."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import contract, storage
from imgpipe.clean.decode import OUTPUT_SCHEMA as CLEAN_SCHEMA
from imgpipe.config import config_from_dict, config_to_dict, config_to_yaml, step_config
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.ops import resize_batch
from imgpipe.resize.spec import ResizeSpec
from imgpipe.resize.task import (
    SplitFiles,
    TaskOutput,
    read_row_group,
    resized_batches,
    run_task,
    split_results,
    table_to_batch,
)
from imgpipe.steps.resize import (
    OUTPUT_COLUMNS,
    _data_context,
    collect_results,
    list_row_groups,
    output_schema,
    plan_tasks,
    resize,
    task_arguments,
)
from imgpipe.writer import OutputWriter
from tests import imagefactory as f
from tests.helpers import build_clean, clean_members, read_table, write_download_output

# ------------------------------------------------------------------ config (no Ray)


def test_config_defaults_and_preset_override():
    cfg = ResizeConfig()
    assert (cfg.resolved_size, cfg.mode, cfg.format, cfg.ops) == (224, "short-side-crop", "raw", ())
    assert ResizeConfig(size=100, preset="inception").resolved_size == 299
    assert ResizeConfig(preset="efficientnet-b7").spec.size == 600


@pytest.mark.parametrize(
    "values,message",
    [
        ({"preset": "resnet9000"}, "unknown preset"),
        ({"mode": "stretch"}, "is not one of"),
        ({"train_mode": "whole; rm -rf /"}, "train_mode: 'whole; rm -rf /' is not one of"),
        ({"train_mode": "../../etc/passwd"}, "is not one of"),
        ({"max_aspect": 0.5}, "max_aspect"),
        ({"max_aspect": 1e9}, "max_aspect"),
        ({"format": "png"}, "is not one of"),
        ({"ops": "equalize,sharpen"}, "unknown op"),
        ({"ops": ["clahe", "roi_crop"]}, "first op"),
        ({"size": 0}, "size"),
        ({"pad_value": 256}, "pad_value"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"batch_size": 0}, "batch_size"),
        ({"concurrency": -1}, "concurrency"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
        ({"no_progress_timeout_s": 0}, "no_progress_timeout_s"),
        ({"ray_address": "kuberay://Bad_NS"}, "namespace"),
        ({"executor": "threads"}, "is not one of"),
        ({"executor": "pool", "ray_address": "kuberay"}, "executor 'pool'"),
        ({"colour": "blue"}, "unknown ResizeConfig option"),
    ],
)
def test_config_rejects_bad_values_at_the_boundary(values, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(ResizeConfig, values)


def test_config_round_trips_through_yaml_overrides():
    cfg = config_from_dict(ResizeConfig, {"ops": "roi_crop,clahe:3,gaussian_blur:1.5", "preset": "clip", "mode": "pad"})
    assert cfg.ops == ("roi_crop", "clahe:3", "gaussian_blur:1.5")
    assert cfg.spec.roi_crop and cfg.spec.size == 336
    dumped = config_to_dict(cfg)
    assert set(dumped) == {
        "size",
        "mode",
        "train_mode",
        "max_aspect",
        "preset",
        "format",
        "jpeg_quality",
        "ops",
        "resample",
        "pad_value",
        "fast_decode",
        "max_pixels",
        "ray_address",
        "executor",
        "batch_size",
        "concurrency",
        "rows_per_shard",
        "row_group_rows",
        "progress_bars",
        "no_progress_timeout_s",
    }
    assert config_from_dict(ResizeConfig, dumped) == cfg
    assert "ops:\n- roi_crop" in config_to_yaml(cfg)


def test_train_mode_gives_the_train_split_its_own_spec():
    cfg = ResizeConfig(size=64, train_mode="whole", max_aspect=3.0, ops=("clahe",))
    assert (cfg.mode_for("train"), cfg.mode_for("val"), cfg.mode_for("test")) == ("whole", "short-side-crop", "short-side-crop")
    assert cfg.spec.mode == "short-side-crop" and cfg.spec_for("val") == cfg.spec
    train = cfg.spec_for("train")
    assert train.mode == "whole" and train.max_aspect == 3.0 and train.ops == ("clahe",) and train.size == 64
    assert cfg.split_specs == {"train": train}
    # None (the default: the CLI keeps today's behaviour), or train_mode equal to mode: one spec.
    assert ResizeConfig().split_specs == {} and ResizeConfig().mode_for("train") == "short-side-crop"
    assert ResizeConfig(mode="whole", train_mode="whole").split_specs == {}
    assert ResizeConfig(mode="whole").spec_for("train").mode == "whole"
    # What each Ray task gets: settings, never credentials.
    out = TaskOutput("file:///o/resize", "0" * 32, output_schema("raw"), rows_per_shard=8, row_group_rows=4)
    args = task_arguments(cfg, out)
    assert args["spec"] == cfg.spec and args["split_specs"] == {"train": train} and args["out"] == out


def test_hostile_train_mode_is_refused_with_a_clear_error():
    # A run parameter reaches the config through kfp_artifacts.step_config (the component's path).

    for hostile in ("whole; rm -rf /", "$(id)", "WHOLE", "", 3):
        with pytest.raises((ValueError, TypeError), match="train_mode"):
            step_config(ResizeConfig, None, "resize", train_mode=hostile)
    with pytest.raises(ValueError, match="mode must be one of"):
        ResizeConfig(train_mode="stretch")  # type: ignore[arg-type]  # direct construction too
    assert step_config(ResizeConfig, None, "resize", train_mode="whole").train_mode == "whole"


def test_cli_train_mode_flag():
    from imgpipe.cli import build_parser
    from imgpipe.config_flags import flag_overrides

    args = build_parser().parse_args(["resize", "src", "dest", "--train-mode", "whole", "--mode", "pad"])
    assert flag_overrides(args) == {"train_mode": "whole", "mode": "pad"}
    assert flag_overrides(build_parser().parse_args(["resize", "src", "dest"])) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["resize", "src", "dest", "--train-mode", "whole;id"])


def test_output_schemas():
    assert output_schema("raw").names == list(OUTPUT_COLUMNS["raw"])
    assert output_schema("jpeg").field("image").type == CLEAN_SCHEMA.field("image").type


def test_refuses_an_uncommitted_or_foreign_source(tmp_path):
    # Checked before Ray starts.
    with pytest.raises(contract.UncommittedOutputError):
        resize(str(tmp_path / "nothing"), str(tmp_path / "out"), ResizeConfig())
    download = write_download_output(str(tmp_path / "download"), {"a.jpg": f.jpeg()})
    with pytest.raises(ValueError, match="expected 'clean'"):
        resize(download, str(tmp_path / "out"), ResizeConfig())
    with pytest.raises(ValueError, match="overlap"):
        resize(download, download, ResizeConfig())
    with pytest.raises(ValueError, match="overlap"):
        resize(download, str(tmp_path), ResizeConfig())
    assert contract.is_committed(download)


def test_resized_batches_reads_every_row_group_in_order_without_ray(tmp_path):
    source = build_clean("file://" + str(tmp_path))
    items = list_row_groups(contract.data_files(source))
    assert len(items) > 2 and sum(i["rows"] for i in items) == len(clean_members())
    units = [(i["file"], i["row_group"]) for i in items]
    batches = list(resized_batches(units, ResizeSpec(size=16), batch_size=3))
    assert all(len(b["path"]) <= 3 for b in batches)
    got = [p for b in batches for p in b["path"].tolist()]
    clean_rows = pa.concat_tables([read_table(u) for u in contract.data_files(source)])
    assert got == clean_rows.column("path").to_pylist()
    assert all(r == "" for b in batches for r in b["error_reason"].tolist())


def test_a_task_writes_its_own_files_and_returns_only_metadata_without_ray(tmp_path):
    source = build_clean("file://" + str(tmp_path))
    items = list_row_groups(contract.data_files(source))
    dest = OutputWriter("file://" + str(tmp_path / "resize"), "resize")
    dest.begin()
    cfg = ResizeConfig(size=16, batch_size=3, rows_per_shard=3, row_group_rows=2)
    out = TaskOutput(dest.dest, dest.attempt, output_schema("raw"), cfg.rows_per_shard, cfg.row_group_rows)
    units = [(i["file"], i["row_group"]) for i in items]
    result = run_task(7, units, **task_arguments(cfg, out))
    assert result.task == 7 and result.rows == len(clean_members()) and not result.rejects
    assert sum(f.rows for f in result.files) == result.rows
    result_bytes = len(json.dumps(result.to_dict()))
    assert result_bytes < 300 * len(result.files), "metadata only: no pixel comes back"
    for entry in result.files:
        split, name = entry.name.split("/")
        assert name.startswith("part-00007-") and name.endswith(f".a{dest.attempt[:12]}.parquet")
        data = storage.read_bytes(storage.join(dest.dest, entry.name))
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.bytes, entry.sha256), "hashed as written"
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == entry.rows <= 3 and set(table.column("split").to_pylist()) == {split}
        orders = table.column("order").to_pylist()
        assert orders == sorted(orders)
    # The driver's side: the files go on the OutputWriter and the step commits.
    got = collect_results([result], dest, inputs=result.rows, tasks=1)
    assert (got.seen, got.tasks, sum(got.splits.values())) == (result.rows, 1, result.rows)
    report = dest.commit(inputs=result.rows, rejects=got.rejects, config=cfg)
    assert report.outputs == result.rows and contract.verify_output(dest.dest)


def test_collect_results_refuses_a_task_whose_rows_do_not_reconcile(tmp_path):
    from imgpipe.contract import FileEntry
    from imgpipe.resize.task import TaskResult

    out = OutputWriter(str(tmp_path / "o"), "resize")
    out.begin()
    lost = TaskResult(task=3, rows=10, files=[FileEntry("train/part-00003-000.parquet", 9, 100, "0" * 64)])
    with pytest.raises(RuntimeError, match="task 3 read 10 rows but wrote 9"):
        collect_results([lost], out, inputs=10, tasks=1)


def test_a_failing_task_leaves_no_file_behind(tmp_path, monkeypatch):
    from imgpipe.resize import task as task_module

    source = build_clean("file://" + str(tmp_path))
    units = [(i["file"], i["row_group"]) for i in list_row_groups(contract.data_files(source))]
    dest = OutputWriter("file://" + str(tmp_path / "resize"), "resize")
    dest.begin()
    cfg = ResizeConfig(size=16, batch_size=2, rows_per_shard=100, row_group_rows=2)
    out = TaskOutput(dest.dest, dest.attempt, output_schema("raw"), cfg.rows_per_shard, cfg.row_group_rows)
    real, calls = task_module.resize_batch, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(task_module, "resize_batch", dies_on_the_third)
    with pytest.raises(MemoryError):
        run_task(0, units, **task_arguments(cfg, out))
    left = [o.uri for o in storage.list_objects(dest.dest) if o.uri.endswith(".parquet")]
    assert left == [], f"a failed task's open files are dropped, not committed: {left}"


def test_list_row_groups_measures_each_group(tmp_path):
    source = build_clean("file://" + str(tmp_path))
    items = list_row_groups(contract.data_files(source))
    for item in items:
        with open(item["file"].removeprefix("file://"), "rb") as fh:
            group = pq.ParquetFile(fh).metadata.row_group(item["row_group"])
            assert (item["rows"], item["bytes"]) == (group.num_rows, group.total_byte_size) and item["bytes"] > 0


def _groups(n, size=1000, rows=10):
    return [{"file": f"f{i // 7}", "row_group": i % 7, "rows": rows, "bytes": size} for i in range(n)]


def _flat(tasks):
    return [unit for task in tasks for unit in task]


def test_plan_tasks_runs_of_neighbouring_row_groups_from_the_input_alone():
    from imgpipe.steps import resize as step

    assert plan_tasks([]) == [[]]
    assert [len(t) for t in plan_tasks(_groups(3))] == [1, 1, 1]  # fewer groups than tasks: one each
    tasks = plan_tasks(_groups(24))
    assert len(tasks) == step.MIN_TASKS and max(map(len, tasks)) - min(map(len, tasks)) <= 1
    assert _flat(tasks) == [(g["file"], g["row_group"]) for g in _groups(24)], "every group once, in order"
    # Rows bound a task: 10,000 groups of 64 rows at 2,048 rows a task.
    many = plan_tasks(_groups(10_000, rows=64))
    assert len(many) == math.ceil(10_000 * 64 / step.TASK_ROWS) and _flat(many) == [(g["file"], g["row_group"]) for g in _groups(10_000)]


def test_plan_tasks_caps_the_input_of_one_task():
    from imgpipe.steps import resize as step

    groups = _groups(1000, size=step.MAX_TASK_BYTES // 10, rows=1)  # 100 tasks' worth at the cap
    assert len(plan_tasks(groups)) == 100


def test_bbox_column_reaches_roi_crop_without_ray(tmp_path):
    two_tone = np.zeros((50, 100, 3), np.uint8)
    two_tone[:, :50] = (255, 0, 0)
    two_tone[:, 50:] = (0, 0, 255)
    data = f.encode(Image.fromarray(two_tone), "PNG")
    table = pa.table(
        {
            "path": ["a.png", "b.png"],
            "image": [{"bytes": data, "path": "a.png"}, {"bytes": data, "path": "b.png"}],
            "order": pa.array([0, 1], pa.int64()),
            "bbox": pa.array([[0.0, 0.0, 0.5, 1.0], None], pa.list_(pa.float32())),
        }
    )
    path = str(tmp_path / "part.parquet")
    pq.write_table(table, path)
    fs, _ = storage.arrow_filesystem(path)
    batch = table_to_batch(read_row_group(fs, path, 0))
    assert batch["order"].dtype == np.int64 and batch["image"][0]["bytes"] == data
    out = resize_batch(batch, ResizeSpec(size=8, mode="fixed", ops=("roi_crop",)))
    left, whole = (np.frombuffer(p, np.uint8).reshape(8, 8, 3) for p in out["pixels"])
    assert left[:, :, 2].max() < 5 and whole[:, :, 2].max() > 250


def _result_batch(splits, errors):
    n = len(splits)
    schema = output_schema("raw", ["cat"])
    columns = {
        "path": [f"p{i}.jpg" for i in range(n)],
        "label": pa.array([0] * n, pa.int32()),
        "label_name": ["cat"] * n,
        "split": splits,
        "order": pa.array(range(n), pa.int64()),
        "sha256": ["0" * 64] * n,
        "height": pa.array([1] * n, pa.int32()),
        "width": pa.array([1] * n, pa.int32()),
        "channels": pa.array([1] * n, pa.int32()),
        "pixels": [bytes([i]) for i in range(n)],
        "error_reason": errors,
        "error_detail": ["why" if e else "" for e in errors],
        "_ray_node": ["n"] * n,
    }
    return pa.table(columns), schema


def test_results_split_into_good_rows_and_rejects_without_ray():
    table, schema = _result_batch(["train"] * 3, ["", "undecodable", ""])
    good, rejects = split_results(table, schema)
    assert good.schema == schema and good.column("path").to_pylist() == ["p0.jpg", "p2.jpg"]
    assert [(r.path, r.reason, r.detail) for r in rejects] == [("p1.jpg", "undecodable", "why")]
    clean_batch, _ = _result_batch(["train"] * 3, [""] * 3)
    good, rejects = split_results(clean_batch, schema)
    assert good.schema == schema and good.num_rows == 3 and rejects == []
    assert good.column("pixels").to_pylist() == clean_batch.column("pixels").to_pylist()


def test_split_files_files_each_split_of_a_mixed_batch_apart(tmp_path):
    table, schema = _result_batch(["train", "val", "train", "test", "val"], [""] * 5)
    good, _ = split_results(table, schema)
    attempt = "ab" * 16
    with SplitFiles(TaskOutput(str(tmp_path / "out"), attempt, schema, rows_per_shard=10, row_group_rows=10), task=2) as files:
        files.add(good.slice(0, 3))
        files.add(good.slice(3))
    assert {e.name: e.rows for e in files.entries} == {
        f"{split}/part-00002-000.a{attempt[:12]}.parquet": n for split, n in {"train": 2, "val": 2, "test": 1}.items()
    }
    for split, paths in {"train": ["p0.jpg", "p2.jpg"], "val": ["p1.jpg", "p4.jpg"], "test": ["p3.jpg"]}.items():
        found = pq.read_table(tmp_path / "out" / split / f"part-00002-000.a{attempt[:12]}.parquet")
        assert found.column("path").to_pylist() == paths


def test_split_files_start_a_new_file_when_the_order_goes_back(tmp_path):
    table, schema = _result_batch(["train"] * 4, [""] * 4)
    good, _ = split_results(table, schema)
    with SplitFiles(TaskOutput(str(tmp_path / "out"), "cd" * 16, schema, rows_per_shard=10, row_group_rows=2), task=0) as files:
        files.add(good.slice(2))  # orders 2, 3
        files.add(good.slice(0, 2))  # then 0, 1
    assert [e.rows for e in files.entries] == [2, 2]
    for entry in files.entries:
        orders = pq.read_table(tmp_path / "out" / entry.name).column("order").to_pylist()
        assert orders == sorted(orders)


def test_data_context_is_set_for_the_run_and_restored():
    from ray.data import DataContext  # importing ray.data starts nothing

    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.execution_no_progress_timeout_s, ctx.max_errored_blocks)
    with _data_context(ResizeConfig(progress_bars=False, no_progress_timeout_s=42.0)) as inside:
        assert inside is ctx
        assert (ctx.enable_progress_bars, ctx.execution_no_progress_timeout_s) == (False, 42.0)
        assert ctx.max_errored_blocks == 0
    assert (ctx.enable_progress_bars, ctx.execution_no_progress_timeout_s, ctx.max_errored_blocks) == before
