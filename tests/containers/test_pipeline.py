"""Steps in their images: one component through DockerRunner, the whole pipeline, a killed step.

The engine's containers share this process's network namespace (make test-containers
runs inside scripts/in-loopback-netns with a private Podman service), so they reach the
SeaweedFS S3 server of the ``s3_endpoint`` fixture on 127.0.0.1, and nothing else.
"""

from __future__ import annotations

import time
import uuid

import pytest

from imgpipe import contract, storage, writer
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.local.containers import container_env, container_writable, docker_runner
from imgpipe.local.run import LocalRunConfig, run_local

# Small enough to run twice in a few minutes on 2 cores, big enough for several row groups.
SYNTH = {"classes": 4, "per_class": 16, "seed": 3}
TRAIN = {"epochs": 1, "max_steps_per_epoch": 2, "num_workers": 0, "batch_size": 8}
# Row groups of 8: one resize task each, so both Ray nodes get some.
CLEAN = {"row_group_rows": 8}


def _data_files(prefix: str) -> dict[str, bytes]:
    """Name (without its attempt, writer.unscoped_name) -> bytes of the data files a committed output lists."""
    manifest = contract.read_manifest(prefix)
    return {writer.unscoped_name(f["name"]): storage.read_bytes(storage.join(prefix, f["name"])) for f in manifest["files"]}


@pytest.fixture
def synth_archive(s3_bucket) -> str:
    report = generate(storage.join(s3_bucket, "synth"), SynthConfig(classes=2, per_class=6, seed=1))
    assert report.files
    return storage.join(s3_bucket, "synth", "images.tar.gz")


def test_one_component_runs_in_its_image_as_non_root(engine, built_images, s3_bucket, synth_archive, tmp_path):
    from imgpipe.components.download import download
    from kfp import local

    root = tmp_path / "kfp"
    with container_writable(root):
        local.init(runner=docker_runner(container_env()), pipeline_root=str(root), raise_on_error=True)
        task = download(source_uri=synth_archive, data_root=f"{s3_bucket}/root", run_id="r1")
    prefix = task.outputs["dataset"].metadata["prefix"]
    manifest = contract.read_manifest(prefix, expect_step="download")
    assert manifest["inputs"] == manifest["outputs"] + manifest["rejected"] > 0
    assert prefix == f"{s3_bucket}/root/runs/r1/download"
    owners = {p.stat().st_uid for p in root.rglob("*") if p.is_file()}
    assert 10001 in owners, "the task's outputs were written by the image's non-root user"


@pytest.mark.slow
def test_docker_run_reconciles_and_matches_the_subprocess_run_byte_for_byte(engine, built_images, s3_bucket, tmp_path):
    """The same compiled pipeline under both runners, same seed: identical clean and resize data."""
    results = {}
    for runner in ("subprocess", "docker"):
        cfg = LocalRunConfig(
            data_root=f"{s3_bucket}/{runner}",
            workdir=str(tmp_path / runner),
            runner=runner,
            step_config={"train": TRAIN, "clean": CLEAN},
            params={"image_size": 48},
            **SYNTH,
        )
        started = time.monotonic()
        results[runner] = run_local(cfg)
        print(f"{runner} runner: {time.monotonic() - started:.0f} s")
    sub, dock = results["subprocess"], results["docker"]
    assert sub.reconciled and dock.reconciled
    for step in ("clean", "resize"):
        a, b = _data_files(sub.prefixes[step]), _data_files(dock.prefixes[step])
        assert a.keys() == b.keys() and a, step
        different = [name for name in a if a[name] != b[name]]
        assert not different, f"{step}: {different} differ between the subprocess and docker runs"
    nodes = dock.reports["resize"]["extra"]["ray_nodes"]
    assert len(nodes) == 2 and all(rows > 0 for rows in nodes.values()), f"both Ray containers resize: {nodes}"
    assert sum(nodes.values()) == dock.reports["resize"]["inputs"]
    files = dock.reports["resize"]["extra"]["ray_node_files"]
    assert files.keys() == nodes.keys() and all(n > 0 for n in files.values()), f"both Ray containers write files: {files}"
    assert dock.reports["train"]["extra"]["device"] == "cpu"


def test_a_step_container_killed_mid_step_leaves_nothing_committed_and_a_rerun_succeeds(engine, built_images, s3_bucket):
    """``kill -9`` of the clean step's container while it writes, then the same step again."""
    src = generate(storage.join(s3_bucket, "synth"), SynthConfig(classes=6, per_class=40, seed=2))
    assert src.files
    download_dest = f"{s3_bucket}/dl"
    env = container_env()
    command = ["imgpipe", "download", storage.join(s3_bucket, "synth", "images.tar.gz"), download_dest]
    engine.containers.run(built_images.cpu, command, network_mode="host", environment=env, remove=True)
    dest = f"{s3_bucket}/clean"
    clean = ["imgpipe", "clean", download_dest, dest, "--workers", "2"]
    # A previous committed output makes the point sharper: the killed run must invalidate it.
    engine.containers.run(built_images.cpu, clean, network_mode="host", environment=env, remove=True)
    assert contract.is_committed(dest)
    container = engine.containers.run(
        built_images.cpu, clean, network_mode="host", environment=env, detach=True, name=f"imgpipe-kill-{uuid.uuid4().hex[:6]}"
    )
    try:
        deadline = time.monotonic() + 120
        while contract.is_committed(dest):  # begin() has dropped _SUCCESS: the step is writing
            assert time.monotonic() < deadline, "clean never started writing"
            time.sleep(0.05)
        container.kill(signal="SIGKILL")
        assert container.wait(timeout=60)["StatusCode"] != 0
    finally:
        container.remove(force=True)
    assert not contract.is_committed(dest)
    with pytest.raises(contract.UncommittedOutputError):
        contract.read_manifest(dest)
    engine.containers.run(built_images.cpu, clean, network_mode="host", environment=env, remove=True)
    manifest = contract.read_manifest(dest, expect_step="clean")
    assert manifest["inputs"] == manifest["outputs"] + manifest["rejected"]
