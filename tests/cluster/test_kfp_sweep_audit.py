"""Tier 3: imgpipe's other two pipelines through KFP's own backend: the augmentation sweep and the label audit.

Each is compiled for this 2-core node (the main pipeline's small requests, one branch or fold
training at a time), submitted with ``imgpipe submit --wait`` as a profile's account, and run to the
end by KFP's driver and launcher: the data steps once, a ``ParallelFor`` over the sweep's branches
or the audit's folds, then the ranking. What each hands back is read from the object store.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from imgpipe import contract, storage
from imgpipe.data.synth import SynthConfig, generate
from tests.cluster.conftest import object_store
from tests.cluster.kfp_backend import token
from tests.cluster.test_kfp import RUN_TIMEOUT_S, SMALL_TASK, _imgpipe, kfp  # noqa: F401 - the fixture
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(RUN_TIMEOUT_S + 300)]
GRID = [
    {"name": "light", "policy": "basic", "mixup_alpha": 0, "cutmix_alpha": 0},
    {"name": "strong", "randaugment_n": 2, "randaugment_m": 15, "mixup_prob": 0.5},
]
BASE = {"annotations_uri": "", "epochs": "2", "image_size": "32", "model": "resnet18", "batch_size": "8", "ray_address": ""}


def _options():
    from imgpipe.pipelines import PipelineOptions
    from imgpipe.pipelines.options import Resources

    options = PipelineOptions(gpu=None)
    return dataclasses.replace(options, resources={step: Resources(*SMALL_TASK) for step in options.resources})


def _small(resources: dict) -> dict:
    from imgpipe.pipelines.options import Resources

    return {name: Resources(*SMALL_TASK) for name in resources}


def _submit(host: str, package: Path, root: str, **params: str) -> tuple[str, str]:
    """Runs ``package`` over ``root``'s sample to the end; (run id, imgpipe's output)."""
    args = [f"--param={k}={v}" for k, v in {"data_root": root, "source_uri": f"{root}/synth/images.tar.gz", **BASE, **params}.items()]
    env = {"KF_PIPELINES_TOKEN": token("default-editor", NAMESPACE)}
    command = ["submit", "--host", host, "--namespace", NAMESPACE, "--package", str(package), *args, "--wait", "--timeout", str(RUN_TIMEOUT_S)]
    proc = _imgpipe(*command, env=env, timeout=RUN_TIMEOUT_S + 60)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_id = next(line.rsplit("/", 1)[-1] for line in proc.stdout.splitlines() if "/#/runs/details/" in line)
    return run_id, proc.stdout


@pytest.fixture
def sample(tmp_path):
    with object_store(tmp_path, NAMESPACE):
        root = f"s3://mlpipeline/private/{NAMESPACE}/fanout-{uuid.uuid4().hex[:8]}"
        generate(f"{root}/synth", SynthConfig(classes=3, per_class=16, seed=0, min_side=48, max_side=96), progress=False)
        yield root


def test_the_sweep_trains_each_branch_and_ranks_them_on_kfp(kfp, sample, tmp_path):  # noqa: F811
    from imgpipe.pipelines.imgpipe_sweep import SweepOptions, compile_sweep

    defaults = SweepOptions()
    package = compile_sweep(tmp_path / "sweep.yaml", SweepOptions(pipeline=_options(), parallelism=1, resources=_small(defaults.resources)))
    run_id, out = _submit(kfp, package, sample, grid=json.dumps(GRID))
    run = f"{sample}/runs/{run_id}"
    for branch in ("light", "strong"):
        manifest = contract.read_manifest(f"{run}/train-{branch}", expect_step="train")
        assert manifest["upstream"]["source"] == f"{run}/resize", "every branch trains on the one resize output"
    comparison = json.loads(storage.read_bytes(f"{run}/compare/comparison.json"))
    assert {b["branch"] for b in comparison["branches"]} == {"light", "strong"} and comparison["winner"]["branch"] in ("light", "strong")
    print(f"sweep run {run_id}: winner {comparison['winner']['branch']}\n{out[-800:]}")


def test_the_audit_trains_its_folds_and_ranks_suspected_labels_on_kfp(kfp, sample, tmp_path):  # noqa: F811
    from imgpipe.pipelines.imgpipe_audit import AuditOptions, compile_audit

    defaults = AuditOptions()
    package = compile_audit(tmp_path / "audit.yaml", AuditOptions(pipeline=_options(), parallelism=1, resources=_small(defaults.resources)))
    run_id, out = _submit(kfp, package, sample, folds="2")
    run = f"{sample}/runs/{run_id}"
    manifest = contract.read_manifest(f"{run}/audit", expect_step="audit")
    assert manifest["upstream"]["folds"] and len(manifest["upstream"]["folds"]) == 2, manifest["upstream"]
    print(f"audit run {run_id}: {json.dumps(manifest.get('outputs', manifest.get('counts', {})))[:400]}\n{out[-800:]}")
