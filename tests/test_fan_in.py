"""Every pipeline that collects a ``ParallelFor``'s outputs runs on Kubeflow v1.11's KFP 2.15.0.

Before 2.16.0, KFP's Argo compiler gave a loop's driver the loop's ``taskInfo.name`` where the
driver of the task that collects its outputs looks it up by its task key
(kubeflow/pipelines#13239, fixed by #12808 in 2.16.0). A loop named with ``ParallelFor(name=...)``
then fails the fan-in with ``cannot find producer task "for-loop-4_112"``: imgpipe's sweep and
audit did on a three-node Kubeflow v1.11 cluster (docs/cluster-tested-on.md). So every loop's name
is its key, in each package imgpipe compiles with a loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from imgpipe.kfp import package as kfp_package
from imgpipe.steps.audit import AUDIT_PIPELINE_NAME
from imgpipe.sweep import SWEEP_PIPELINE_NAME
from tests.helpers import ir_dags


def _loops(spec: dict) -> Iterator[tuple[str, dict]]:
    for dag in ir_dags(spec):
        for key, task in dag["tasks"].items():
            if "parameterIterator" in task or "artifactIterator" in task:
                yield key, task


def _collected_from(spec: dict) -> set[str]:
    """The producers of every task output a task takes (a loop's: a dsl.Collected)."""
    producers = set()
    for dag in ir_dags(spec):
        for task in dag["tasks"].values():
            for kind in ("parameters", "artifacts"):
                for given in task.get("inputs", {}).get(kind, {}).values():
                    output = given.get("taskOutputParameter") or given.get("taskOutputArtifact")
                    if output:
                        producers.add(output["producerTask"])
    return producers


@pytest.mark.parametrize(("pipeline", "shards"), [(SWEEP_PIPELINE_NAME, 1), (AUDIT_PIPELINE_NAME, 1), (kfp_package.PIPELINE_NAME, 4)])
def test_each_loop_whose_outputs_are_collected_is_named_by_its_task_key(tmp_path, monkeypatch, pipeline, shards):
    monkeypatch.delenv("IMGPIPE_TRAIN_GPU", raising=False)
    spec = next(yaml.safe_load_all(kfp_package.compile_package(tmp_path / "p.yaml", pipeline=pipeline, shards=shards).read_text()))
    loops = dict(_loops(spec))
    assert loops and set(loops) & _collected_from(spec), "the package collects a loop's outputs"
    assert {key: task["taskInfo"]["name"] for key, task in loops.items()} == {key: key for key in loops}
