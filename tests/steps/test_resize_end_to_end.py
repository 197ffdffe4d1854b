"""The resize step end to end: on a real local Ray, then on the local process pool (the same files either way).

The Ray tests share one small Ray session for the module and must run inside the
loopback-only network namespace (``scripts/in-loopback-netns``), because Ray binds
to the machine's external interface otherwise.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import imgpipe.steps.resize as resize_module
from imgpipe import contract, storage, writer
from imgpipe.clean.decode import OUTPUT_SCHEMA as CLEAN_SCHEMA
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.ops import resize_image
from imgpipe.resize.spec import ResizeSpec, plan_geometry
from imgpipe.steps.resize import (
    _shut_down_local_ray,
    _warm_worker,
    output_schema,
    read_pixels,
    resize,
)
from imgpipe.writer import OutputWriter
from tests import imagefactory as f
from tests.helpers import CLASSES, build_clean, clean_members, read_table

# ------------------------------------------------------------------ Ray

ray_test = pytest.mark.ray

SIZE = 24


def check_output(source: str, dest: str, cfg: ResizeConfig) -> dict[str, pa.Table]:
    """Asserts the contract and layout of a resize output; returns each data file's table."""
    manifest = contract.read_manifest(dest, expect_step="resize")
    clean_rows = pa.concat_tables([read_table(u) for u in contract.data_files(source)])
    assert manifest["inputs"] == clean_rows.num_rows == manifest["outputs"] + manifest["rejected"]
    assert manifest["upstream"]["source"] == storage.normalize_uri(source)
    tables = {}
    for entry, uri in zip(manifest["files"], contract.data_files(dest, manifest)):
        table = read_table(uri)
        split, name = entry["name"].split("/")
        assert name.startswith("part-") and entry["rows"] == table.num_rows
        assert table.schema.equals(output_schema(cfg.format), check_metadata=False)
        assert set(table.column("split").to_pylist()) == {split}
        orders = table.column("order").to_pylist()
        assert orders == sorted(orders), f"{entry['name']} must be sorted by order"
        assert table.num_rows <= cfg.rows_per_shard
        meta = pq.read_metadata(io.BytesIO(storage.read_bytes(uri)))
        assert all(meta.row_group(i).num_rows <= cfg.row_group_rows for i in range(meta.num_row_groups))
        codecs = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
        payload = "pixels" if cfg.format == "raw" else "image.bytes"
        assert (codecs[payload], codecs["order"]) == ("UNCOMPRESSED", "ZSTD"), "parquet.parquet_write_options"
        tables[entry["name"]] = table
    if contract.side_file(source, contract.LABELS):
        labels = contract.read_side_file(source, contract.LABELS)
        assert storage.read_bytes(storage.join(dest, contract.LABELS)) == labels
    return tables


@ray_test
def test_end_to_end_local_partitioned_ordered_idempotent(ray_session, tmp_path):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    cfg = ResizeConfig(size=SIZE, batch_size=4, concurrency=1, rows_per_shard=5, row_group_rows=2, executor="ray")
    report = resize(source, dest, cfg)
    assert ray_session.is_initialized(), "the step must not shut down a Ray it did not start"
    n = len(clean_members())
    assert (report.inputs, report.outputs, report.rejected) == (n, n, 0)
    tables = check_output(source, dest, cfg)

    # Partitioned by split, each split's files together hold that split's orders, in order.
    clean_rows = pa.concat_tables([read_table(u) for u in contract.data_files(source)])
    by_split: dict[str, list[int]] = {}
    for row in clean_rows.select(["split", "order"]).to_pylist():
        by_split.setdefault(row["split"], []).append(row["order"])
    for split, orders in by_split.items():
        names = sorted(name for name in tables if name.startswith(split + "/"))
        got = [o for name in names for o in tables[name].column("order").to_pylist()]
        assert got == sorted(orders), f"{split}: files in name order must continue the order"
    assert report.extra["splits"] == {s: len(o) for s, o in by_split.items()}
    assert report.extra["split_modes"] == {s: "short-side-crop" for s in by_split}
    assert report.extra["train_mode"] == report.extra["mode"] == "short-side-crop"
    assert Counter(report.extra["classes"]) == Counter(CLASSES)

    # Raw pixels: plain pyarrow + numpy, equal to resizing clean's bytes directly.
    clean_by_path = {r["path"]: r for r in clean_rows.to_pylist()}
    for table in tables.values():
        for row in table.to_pylist():
            arr = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], row["channels"])
            assert arr.shape == (SIZE, SIZE, 3)
            src = clean_by_path[row["path"]]
            assert (row["label"], row["label_name"], row["sha256"]) == (src["label"], src["label_name"], src["sha256"])
            assert np.array_equal(arr, resize_image(src["image"]["bytes"], cfg.spec))
            assert np.array_equal(read_pixels(row), arr)

    # A re-run replaces the output with identical data files, under the new attempt's names;
    # stale files disappear.
    storage.write_bytes(storage.join(dest, "train", "part-99999.parquet"), b"stale")
    first = {writer.unscoped_name(name): storage.read_bytes(storage.join(dest, name)) for name in tables}
    again = resize(source, dest, cfg)
    assert (again.outputs, again.rejected) == (report.outputs, report.rejected)
    assert [writer.unscoped_name(e.name) for e in again.files] == sorted(first)
    assert {writer.unscoped_name(e.name): storage.read_bytes(storage.join(dest, e.name)) for e in again.files} == first
    assert not storage.exists(storage.join(dest, "train", "part-99999.parquet"))
    assert not set(tables) & {e.name for e in again.files}, "each attempt names its own files"


@ray_test
def test_the_driver_writes_no_data_file_and_handles_no_pixel(ray_session, tmp_path, monkeypatch):
    """Only the Ray tasks write data files: in the driver's process every data-file writer raises."""
    from imgpipe.resize import task as task_module

    def refuse(*args, **kwargs):
        raise AssertionError("the resize driver must not write a data file")

    source = build_clean("file://" + str(tmp_path))
    monkeypatch.setattr(writer, "stream_parquet", refuse)
    monkeypatch.setattr(writer.ParquetSink, "write", refuse)
    monkeypatch.setattr(task_module, "run_task", refuse)
    dest = "file://" + str(tmp_path / "resize")
    cfg = ResizeConfig(size=SIZE, batch_size=4, rows_per_shard=5, row_group_rows=2, executor="ray")
    report = resize(source, dest, cfg)
    assert report.outputs == len(clean_members()) and report.extra["tasks"] > 1
    assert sum(report.extra["ray_node_files"].values()) == len(report.files)
    assert sum(report.extra["ray_nodes"].values()) == report.inputs
    assert report.extra["executor"] == "ray"
    check_output(source, dest, cfg)
    contract.verify_output(dest)


@ray_test
def test_end_to_end_on_s3(ray_session, s3_bucket):
    root = s3_bucket + "/run"
    source = build_clean(root)
    dest = storage.join(root, "resize")
    cfg = ResizeConfig(preset="resnet", mode="pad", pad_value=114, batch_size=8, rows_per_shard=100, executor="ray")
    report = resize(source, dest, cfg)
    assert (report.outputs, report.rejected) == (len(clean_members()), 0)
    assert report.dest == dest and all(o.uri.startswith(s3_bucket) for o in storage.list_objects(dest))
    tables = check_output(source, dest, cfg)
    assert {n.split("/")[0] for n in tables} == set(report.extra["splits"])
    wide = next(r for t in tables.values() for r in t.to_pylist() if r["path"] == "images/beagle_20.jpg")
    arr = read_pixels(wide)
    assert arr.shape == (224, 224, 3)
    assert (arr[:90] == 114).all() and (arr[-90:] == 114).all()  # 600x40 letterboxed


def rows_with_two_bad(good: dict[str, bytes], g4_split: str) -> list[tuple[str, bytes, str, int]]:
    """Six good JPEGs and two bad rows (garbage, empty) over splits, orders deliberately not ascending."""
    return [
        ("g0.jpg", good["g0.jpg"], "train", 7),
        ("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(40), "train", 3),
        ("g1.jpg", good["g1.jpg"], "train", 1),
        ("g2.jpg", good["g2.jpg"], "val", 6),
        ("g3.jpg", good["g3.jpg"], "train", 0),
        ("empty.jpg", b"", "val", 5),
        ("g4.jpg", good["g4.jpg"], g4_split, 2),
        ("g5.jpg", good["g5.jpg"], "train", 4),
    ]


def _size_of(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - a bad row of the fixture: any size, it is rejected anyway
        return 1, 1


def write_clean_by_hand(dest: str, rows: list[tuple[str, bytes, str, int]]) -> str:
    """A clean-shaped committed output, rows in file order exactly as given (any order)."""
    out = OutputWriter(dest, "clean")
    out.begin()
    sizes = [_size_of(data) for _, data, *_ in rows]  # clean records each image's size (resize checks it)
    table = pa.table(
        {
            "path": [p for p, *_ in rows],
            "image": [{"bytes": data, "path": p} for p, data, *_ in rows],
            "width": pa.array([w for w, _ in sizes], pa.int32()),
            "height": pa.array([h for _, h in sizes], pa.int32()),
            "mode": ["RGB"] * len(rows),
            "format": ["jpeg"] * len(rows),
            "label": pa.array([0] * len(rows), pa.int32()),
            "label_name": ["cat"] * len(rows),
            "split": [split for *_, split, _ in rows],
            "order": pa.array([order for *_, order in rows], pa.int64()),
            "sha256": [f"{i:064x}" for i in range(len(rows))],
            "bbox": pa.array([None] * len(rows), pa.list_(pa.float32())),
            # clean's measurements (hashes, quality) are nullable: a hand-built table leaves them out
            **{
                f.name: pa.nulls(len(rows), f.type)
                for f in CLEAN_SCHEMA
                if f.name not in ("path", "image", "width", "height", "mode", "format", "label", "label_name", "split", "order", "sha256", "bbox")
            },
        },
        schema=CLEAN_SCHEMA,
    )
    out.write_table("part-00000.parquet", table.slice(0, 4), row_group_size=2)
    out.write_table("part-00001.parquet", table.slice(4), row_group_size=2)
    out.commit(inputs=len(rows), rejects=[], config={"generated_by": "tests"}, extra={"classes": ["cat"]})
    return out.dest


@ray_test
def test_bad_rows_become_rejects_and_good_rows_survive(ray_session, tmp_path):
    good = {f"g{i}.jpg": f.jpeg(50 + i, 40, seed=i) for i in range(6)}
    # Orders deliberately not ascending in file order: every output file must still be sorted.
    rows = rows_with_two_bad(good, g4_split="train")
    source = write_clean_by_hand(str(tmp_path / "clean"), rows)
    dest = str(tmp_path / "resize")
    cfg = ResizeConfig(size=SIZE, format="jpeg", batch_size=2, rows_per_shard=3, row_group_rows=2, ops=("equalize",), executor="ray")
    report = resize(source, dest, cfg)
    assert (report.inputs, report.outputs, report.rejected) == (8, 6, 2)
    assert report.rejects_by_reason == {"missing_image": 1, "undecodable": 1}
    rejects = {r["path"]: r for r in contract.read_rejects(dest).to_pylist()}
    assert set(rejects) == {"garbage.jpg", "empty.jpg"} and all(r["detail"] for r in rejects.values())

    tables = check_output(source, dest, cfg)
    kept = {r["path"]: r for t in tables.values() for r in t.to_pylist()}
    assert set(kept) == set(good)
    assert sorted(o for t in tables.values() for o in t.column("order").to_pylist()) == [0, 1, 2, 4, 6, 7]
    for path, row in kept.items():
        img = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert img.format == "JPEG" and img.size == (SIZE, SIZE) and row["image"]["path"] == path
        expected = resize_image(good[path], ResizeSpec(size=SIZE, ops=("equalize",)))
        assert np.abs(np.asarray(img).astype(int) - expected.astype(int)).mean() < 4.0


@ray_test
def test_train_split_stored_whole_and_the_others_cropped(ray_session, tmp_path):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    cfg = ResizeConfig(size=SIZE, train_mode="whole", batch_size=4, rows_per_shard=5, row_group_rows=2, executor="ray")
    report = resize(source, dest, cfg)
    n = len(clean_members())
    assert (report.inputs, report.outputs, report.rejected) == (n, n, 0)
    tables = check_output(source, dest, cfg)
    splits = sorted({name.split("/")[0] for name in tables})
    assert {"train", "val"} <= set(splits)
    assert report.extra["split_modes"] == {s: ("whole" if s == "train" else "short-side-crop") for s in splits}
    assert (report.extra["mode"], report.extra["train_mode"], report.extra["max_aspect"]) == ("short-side-crop", "whole", 2.0)
    manifest = contract.read_manifest(dest, expect_step="resize")
    assert manifest["extra"]["split_modes"] == report.extra["split_modes"], "the manifest says what each split holds"

    clean_by_path = {r["path"]: r for u in contract.data_files(source) for r in read_table(u).to_pylist()}
    short = round(SIZE / 0.875)  # 27
    shapes = set()
    for name, table in tables.items():
        for row in table.to_pylist():
            arr = read_pixels(row)
            src = clean_by_path[row["path"]]
            assert np.array_equal(arr, resize_image(src["image"]["bytes"], cfg.spec_for(row["split"])))
            if row["split"] == "train":
                # Whole: aspect kept (the source's upright size is in clean's columns), no crop.
                w, h = src["width"], src["height"]
                assert min(arr.shape[:2]) <= short and max(arr.shape[:2]) <= 2 * short
                assert min(abs(arr.shape[1] - arr.shape[0] * w / h), abs(arr.shape[0] - arr.shape[1] * h / w)) <= 0.5
                shapes.add(arr.shape[:2])
            else:
                assert arr.shape[:2] == (SIZE, SIZE), name
    assert len(shapes) > 1, "train rows vary in size"


@ray_test
def test_whole_train_split_jpeg_and_rejects(ray_session, tmp_path):
    good = {f"g{i}.jpg": f.jpeg(50 + 20 * i, 40, seed=i) for i in range(6)}
    rows = rows_with_two_bad(good, g4_split="test")
    source = write_clean_by_hand(str(tmp_path / "clean"), rows)
    dest = str(tmp_path / "resize")
    cfg = ResizeConfig(size=SIZE, format="jpeg", train_mode="whole", batch_size=3, rows_per_shard=3, row_group_rows=2, executor="ray")
    report = resize(source, dest, cfg)
    # The same accounting as without train_mode: every input is an output or a reject.
    assert (report.inputs, report.outputs, report.rejected) == (8, 6, 2)
    assert report.rejects_by_reason == {"missing_image": 1, "undecodable": 1}
    assert report.extra["splits"] == {"test": 1, "train": 4, "val": 1}
    assert report.extra["split_modes"] == {"test": "short-side-crop", "train": "whole", "val": "short-side-crop"}
    tables = check_output(source, dest, cfg)
    for row in (r for t in tables.values() for r in t.to_pylist()):
        img = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert img.size == (row["width"], row["height"]), "the columns give each JPEG's size"
        source_size = Image.open(io.BytesIO(good[row["path"]])).size
        expected = plan_geometry(*source_size, cfg.spec_for(row["split"])).out_size
        assert img.size == expected and (row["split"] == "train") == (img.size != (SIZE, SIZE))


# ------------------------------------------------------------------ the local process pool


def _written(dest: str, report: contract.StepReport) -> dict[str, bytes]:
    """Each data file's bytes, by its name without the attempt (which differs run to run)."""
    return {writer.unscoped_name(e.name): storage.read_bytes(storage.join(dest, e.name)) for e in report.files}


@ray_test
@pytest.mark.parametrize("inputs", ["clean", "bad_rows"])
def test_the_pool_and_ray_write_the_same_files(ray_session, tmp_path, inputs):
    """The plan depends on the input alone, so either executor writes byte-identical files and rows.

    Ray runs in this process (the module's session), so the pool starts its workers from a
    forkserver here, as it does for S3 inputs.
    """
    if inputs == "clean":
        source = build_clean("file://" + str(tmp_path))
        settings = {"train_mode": "whole"}
    else:
        good = {f"g{i}.jpg": f.jpeg(50 + 20 * i, 40, seed=i) for i in range(6)}
        source = write_clean_by_hand(str(tmp_path / "clean"), rows_with_two_bad(good, g4_split="test"))
        settings = {"format": "jpeg", "ops": ("equalize",)}
    reports, files = {}, {}
    for executor in ("pool", "ray"):
        dest = str(tmp_path / executor)
        cfg = ResizeConfig(size=SIZE, batch_size=3, rows_per_shard=3, row_group_rows=2, executor=executor, **settings)
        reports[executor] = resize(source, dest, cfg)
        files[executor] = _written(dest, reports[executor])
        check_output(source, dest, cfg)
    pool, ray = reports["pool"], reports["ray"]
    assert files["pool"] == files["ray"] and len(files["pool"]) > 1
    assert contract.read_rejects(str(tmp_path / "pool")).equals(contract.read_rejects(str(tmp_path / "ray")))
    assert (pool.inputs, pool.outputs, pool.rejected, pool.rejects_by_reason) == (ray.inputs, ray.outputs, ray.rejected, ray.rejects_by_reason)
    assert (pool.extra["executor"], ray.extra["executor"]) == ("pool", "ray")
    where = ("executor", "ray_nodes", "ray_node_files")
    assert {k: v for k, v in pool.extra.items() if k not in where} == {k: v for k, v in ray.extra.items() if k not in where}
    assert pool.extra["ray_nodes"] == {"local-pool": pool.inputs}
    assert pool.extra["ray_node_files"] == {"local-pool": len(pool.files)}
    assert sum(ray.extra["ray_nodes"].values()) == ray.inputs and "local-pool" not in ray.extra["ray_nodes"]


def _die(task: int, units: list, **kwargs: object) -> None:
    """A task whose worker dies as the OOM killer's SIGKILL would end it: no exception, no cleanup."""
    os._exit(1)


def test_a_pool_worker_that_dies_fails_the_step_and_commits_nothing(tmp_path, monkeypatch):
    source = build_clean("file://" + str(tmp_path))
    dest = "file://" + str(tmp_path / "resize")
    cfg = ResizeConfig(size=SIZE, batch_size=4, rows_per_shard=5, row_group_rows=2, executor="pool")
    assert resize(source, dest, cfg).extra["executor"] == "pool"  # a previous output, committed
    monkeypatch.setattr(resize_module, "run_task", _die)  # the function the step hands its pool
    with pytest.raises(RuntimeError, match="a pool worker died .* nothing is committed"):
        resize(source, dest, cfg)
    assert not contract.is_committed(dest)
    with pytest.raises(contract.UncommittedOutputError):
        contract.read_manifest(dest)


def test_the_pool_path_imports_no_ray(tmp_path):
    """``imgpipe resize`` of a small local input, as a pod runs it: a pool, and Ray never imported (``-X importtime``)."""
    source = build_clean("file://" + str(tmp_path))
    dest = str(tmp_path / "resize")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-X", "importtime", "-m", "imgpipe.cli", "resize", source, dest, "--size", str(SIZE)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=True, timeout=300)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "imgpipe.resize.executor" in imported and "cv2" in imported, "the listing covers the step's imports"
    assert sorted(m for m in imported if m.split(".")[0] == "ray") == []
    manifest = contract.read_manifest(dest, expect_step="resize")
    assert manifest["extra"]["executor"] == "pool" and manifest["outputs"] == len(clean_members())


@pytest.mark.ray
def test_a_local_ray_it_started_is_shut_down_with_its_monitor_killed_first():
    # A fresh interpreter: the step starts its own local Ray only where none runs. When
    # ray.shutdown() begins, the monitor must be dead already (it ignores the SIGTERM that
    # shutdown would send it, and would hold the step for a second).
    code = (
        "import ray\n"
        "from imgpipe.steps.resize import ResizeConfig, _ray_session\n"
        "shutdown = ray.shutdown\n"
        "def watched():\n"
        "    print('monitor at shutdown:', monitor.wait(timeout=5))\n"
        "    shutdown()\n"
        "with _ray_session(ResizeConfig()) as r:\n"
        "    processes = r._private.worker._global_node.all_processes\n"
        "    monitor, raylet = processes['monitor'][0].process, processes['raylet'][0].process\n"
        "    ray.shutdown = watched\n"
        "print('raylet stopped:', raylet.poll() is not None, 'initialized:', ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip().split("\n") == ["monitor at shutdown: -9", "raylet stopped: True initialized: False"], out


def test_warm_worker_imports_what_the_resize_tasks_need():
    _warm_worker()  # an import that fails here would fail in every worker


@pytest.mark.ray
def test_a_local_ray_it_started_has_its_task_workers_warmed():
    # Tasks that run after the step's own start-up find Ray Data and OpenCV imported:
    # Ray reuses the workers that ran the warm-up tasks. The warm-up is not waited for (it
    # overlaps the driver's planning), so on a loaded machine a probe may come first and get
    # a worker of its own: probing again until a 30 s deadline keeps the check about reuse,
    # not about which task Ray happened to schedule first (this failed once in three
    # fresh-clone runs of make test).
    code = (
        "import sys, time\n"
        "from imgpipe.steps.resize import TASK_CPUS, ResizeConfig, _ray_session\n"
        "with _ray_session(ResizeConfig()) as r:\n"
        "    probe = r.remote(num_cpus=TASK_CPUS)(lambda: 'imgpipe.resize.ops' in sys.modules)\n"
        "    deadline = time.monotonic() + 30\n"
        "    while not all(found := r.get([probe.remote() for _ in range(2)])) and time.monotonic() < deadline:\n"
        "        time.sleep(0.5)\n"
        "    print('warm:', found)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "warm: [True, True]", out


def test_shutting_down_falls_back_to_a_plain_shutdown_without_rays_internals():
    calls = []
    _shut_down_local_ray(SimpleNamespace(shutdown=lambda: calls.append("shutdown")))
    assert calls == ["shutdown"]
