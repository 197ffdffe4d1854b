"""The sharded download + clean (``PipelineOptions.shards``): compiled as a ``ParallelFor`` and a merge, run under ``kfp.local``.

The run reads a bucket prefix of loose images on the SeaweedFS server, so that every shard has
objects of its own; resize and train then read the merged clean output as they read an
unsharded run's (marked ``ray``: run inside scripts/in-loopback-netns).
"""

from __future__ import annotations

import pytest
import yaml

from imgpipe import contract, storage
from imgpipe.data.sharding import Shard
from imgpipe.kfp import package as kfp_package
from imgpipe.local.run import LocalRunConfig, run_local
from tests.imagefactory import jpeg

CLASSES = ("cat", "dog", "fox")


def _spec(path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))


def test_the_sharded_package_is_a_parallel_for_of_shard_tasks_then_a_merge(tmp_path, monkeypatch):
    monkeypatch.delenv("IMGPIPE_TRAIN_GPU", raising=False)
    spec = _spec(kfp_package.compile_package(tmp_path / "p.yaml", shards=4))
    tasks = spec["root"]["dag"]["tasks"]
    (loop,) = (t for t in tasks.values() if "parameterIterator" in t)
    items = yaml.safe_load(loop["parameterIterator"]["items"]["raw"])
    assert items == [{"index": i, "count": 4} for i in range(4)]
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["prepare-shard"]
    merge = tasks["merge-shards"]
    assert merge["inputs"]["parameters"]["shards"]["taskOutputParameter"]["producerTask"] == "for-loop-2"
    assert "download" not in tasks and "clean" not in tasks, "one shape or the other, never both"
    # The unsharded package is unchanged: download then clean.
    plain = _spec(kfp_package.compile_package(tmp_path / "q.yaml"))["root"]["dag"]["tasks"]
    assert {"download", "clean"} <= set(plain) and "merge-shards" not in plain
    with pytest.raises(ValueError, match="shards must be an integer in"):
        kfp_package.compile_package(tmp_path / "r.yaml", shards=0)


@pytest.mark.ray
def test_a_sharded_run_through_kfp_local_accounts_for_every_object_once(s3_bucket, tmp_path):
    prefix = f"{s3_bucket}/pets/"
    names = []
    for c, name in enumerate(CLASSES):
        for i in range(8):
            storage.write_bytes(f"{prefix}{name}/{i}.jpg", jpeg(64, 48, seed=100 * c + i))
            names.append(f"{name}/{i}.jpg")
    storage.write_bytes(f"{prefix}dog/broken.jpg", b"\xff\xd8 not really")
    # A copy in shard 1 of an original in shard 0: only the merge sees both (it keeps the lower shard's).
    original = next(n for n in names if Shard(0, 2).owns(n))
    copy = next(f"cat/copy-{k}.jpg" for k in range(100) if Shard(1, 2).owns(f"cat/copy-{k}.jpg"))
    storage.write_bytes(prefix + copy, storage.read_bytes(prefix + original))
    cfg = LocalRunConfig(
        data_root=f"{s3_bucket}/imgpipe",
        workdir=str(tmp_path / "work"),
        source=prefix,
        annotations="",
        shards=2,
        params={"image_size": 32, "model": "tiny_cnn", "epochs": 1, "batch_size": 4},
        step_config={"clean": {"workers": 1}, "train": {"max_steps_per_epoch": 2, "device": "cpu"}},
    )
    result = run_local(cfg)

    assert result.reconciled, result.summary()
    run = f"{s3_bucket}/imgpipe/runs/{result.run_id}"
    shards = [contract.read_manifest(f"{run}/shards/{Shard(i, 2).name}/download", expect_step="download") for i in range(2)]
    assert all(m["inputs"] > 0 for m in shards), "every shard has objects of its own"
    assert sum(m["inputs"] for m in shards) == len(names) + 2
    merged = result.reports["clean"]
    assert merged["inputs"] == len(names) + 2 and merged["outputs"] + merged["rejected"] == merged["inputs"]
    rejects = {r["path"]: r for r in contract.read_rejects(result.prefixes["clean"]).to_pylist()}
    assert rejects[copy]["reason"] == "duplicate" and rejects[copy]["detail"] == f"same bytes as {original}"
    assert rejects["dog/broken.jpg"]["reason"] != "duplicate"
    assert merged["extra"]["merge"]["duplicates_across_shards"] == 1
    assert merged["extra"]["classes"] == list(CLASSES)
    assert result.reports["resize"]["inputs"] == merged["outputs"]
    assert result.reports["train"]["inputs"] == result.reports["resize"]["outputs"]
