"""Tier 3: imgpipe's other two pipelines through KFP's own backend: the augmentation sweep and the label audit.

Each is compiled for this 2-core node (the main pipeline's small requests, one branch or fold
training at a time), submitted with ``imgpipe submit --wait`` as a profile's account, and run to the
end by KFP's driver and launcher: the data steps once, a ``ParallelFor`` over the sweep's branches
or the audit's folds, then the ranking. What each hands back is read from the object store.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from imgpipe import contract, storage
from imgpipe.data.synth import SynthConfig, generate
from tests.cluster.conftest import object_store
from tests.cluster.test_kfp import RUN_TIMEOUT_S, SMALL_TASK, kfp, small_options, step_images, submit_run  # noqa: F401 - the fixtures
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(RUN_TIMEOUT_S + 300)]
GRID = [
    {"name": "light", "policy": "basic", "mixup_alpha": 0, "cutmix_alpha": 0},
    {"name": "strong", "randaugment_n": 2, "randaugment_m": 15, "mixup_prob": 0.5},
]
# Over the tier-3 sample run: two epochs at 32 px, resize inside its pod (no RayJob beside the fan-out).
# The sweep and the audit train in their fan-out's pods: no train_nodes parameter.
BASE = {"epochs": "2", "image_size": "32", "batch_size": "8", "ray_address": "", "train_nodes": None}


def _small(resources: dict) -> dict:
    from imgpipe.pipelines.options import Resources

    return {name: Resources(*SMALL_TASK) for name in resources}


def _submit(host: str, package: Path, root: str, **params: str | None) -> tuple[str, str]:
    return submit_run(host, package, root, **{**BASE, **params})


def audit_package(path: Path) -> Path:
    """The audit pipeline compiled for this node: the small run's options, one fold at a time, small requests."""
    from imgpipe.pipelines.imgpipe_audit import AuditOptions, compile_audit

    return compile_audit(path, AuditOptions(pipeline=small_options(), parallelism=1, resources=_small(AuditOptions().resources)))


@pytest.fixture
def sample(tmp_path):
    with object_store(tmp_path, NAMESPACE):
        root = f"s3://mlpipeline/private/{NAMESPACE}/fanout-{uuid.uuid4().hex[:8]}"
        generate(f"{root}/synth", SynthConfig(classes=3, per_class=16, seed=0, min_side=48, max_side=96), progress=False)
        yield root


def test_the_sweep_trains_each_branch_and_ranks_them_on_kfp(kfp, step_images, sample, tmp_path):  # noqa: F811
    from imgpipe.pipelines.imgpipe_sweep import SweepOptions, compile_sweep

    defaults = SweepOptions()
    package = compile_sweep(tmp_path / "sweep.yaml", SweepOptions(pipeline=small_options(), parallelism=1, resources=_small(defaults.resources)))
    run_id, out = _submit(kfp, package, sample, grid=json.dumps(GRID))
    run = f"{sample}/runs/{run_id}"
    for branch in ("light", "strong"):
        manifest = contract.read_manifest(f"{run}/train-{branch}", expect_step="train")
        assert manifest["upstream"]["source"] == f"{run}/resize", "every branch trains on the one resize output"
    comparison = json.loads(storage.read_bytes(f"{run}/compare/comparison.json"))
    assert {b["branch"] for b in comparison["branches"]} == {"light", "strong"} and comparison["winner"]["branch"] in ("light", "strong")
    print(f"sweep run {run_id}: winner {comparison['winner']['branch']}\n{out[-800:]}")


def test_the_audit_trains_its_folds_and_ranks_suspected_labels_on_kfp(kfp, step_images, sample, tmp_path):  # noqa: F811
    package = audit_package(tmp_path / "audit.yaml")
    run_id, out = _submit(kfp, package, sample, folds="2")
    run = f"{sample}/runs/{run_id}"
    manifest = contract.read_manifest(f"{run}/audit", expect_step="audit")
    assert manifest["upstream"]["folds"] and len(manifest["upstream"]["folds"]) == 2, manifest["upstream"]
    print(f"audit run {run_id}: {json.dumps(manifest.get('outputs', manifest.get('counts', {})))[:400]}\n{out[-800:]}")
