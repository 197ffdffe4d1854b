"""Tier 4, KubeRay: resize runs as a RayJob that the real operator turns into a RayCluster and a finished job.

imgpipe's own code (``remote.kuberay.run_step_rayjob``) creates the RayJob from the dev overlay's
template, as the pipeline's account, and waits for it. The template's resources are cut to fit
the test node's 2 cores (head, autoscaler, submitter and one worker), which is what an overlay for
a small cluster would do. The data are in SeaweedFS on the node's address, behind the
``seaweedfs.kubeflow`` Service the dev overlay's ``imgpipe-s3-config`` names.
"""

from __future__ import annotations

import copy
import io
import os
import uuid

import pytest

from imgpipe import contract
from imgpipe.data.synth import SynthConfig
from imgpipe.remote import kuberay
from imgpipe.resize.config import ResizeConfig
from tests.cluster.conftest import assert_ray_crossed_nodes, cleaned_data, placements, settings, step_image
from tests.cluster.test_remote_objects import (
    NAMESPACE,
    _api_as,
    dev_overlay,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.cluster
SMALL = {
    "ray-head": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}},
    "ray-worker": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}},
    "ray-job-submitter": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}},
}


def _small(template: dict, image: str) -> dict:
    """The template with requests a 2-core node can hold (one worker of one CPU), its image the one built here."""
    out = copy.deepcopy(template)
    spec = out["spec"]
    pods = [spec["submitterPodTemplate"]["spec"], spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            container["image"] = image
            if container["name"] in SMALL:
                container["resources"] = SMALL[container["name"]]
    spec["rayClusterSpec"]["autoscalerOptions"]["resources"] = {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    return out


def test_resize_runs_as_a_rayjob_the_operator_runs_to_the_end(dev_overlay, tmp_path):  # noqa: F811
    if not os.path.exists(f"{settings()['CLUSTER_STATE']}/run/ray-operator.pid"):
        pytest.skip("KubeRay's operator is not running: make cluster-build builds it, make cluster-up starts it")
    image = step_image("ray")
    template = next(d for d in dev_overlay if d["kind"] == "RayJob")
    with (
        cleaned_data(tmp_path, NAMESPACE, f"kuberay-{uuid.uuid4().hex[:6]}", SynthConfig(classes=3, per_class=8, seed=3)) as (root, cl),
        placements(NAMESPACE) as pods,
    ):
        out = io.StringIO()
        report = kuberay.run_step_rayjob(
            "resize",
            cl.dest,
            f"{root}/resize",
            ResizeConfig(size=32, ray_address="kuberay"),
            namespace=NAMESPACE,
            run_id=f"cluster-{uuid.uuid4().hex[:8]}",
            api=_api_as("imgpipe-pipeline"),
            core_api=kuberay.NO_LOGS,
            template=_small(template, image),
            image=image,
            max_workers=1,
            timeout_s=900,
            poll_s=5,
            out=out,
        )
        assert report.inputs == cl.outputs and report.outputs + report.rejected == report.inputs, out.getvalue()[-2000:]
        assert contract.is_committed(f"{root}/resize")
        manifest = contract.read_manifest(f"{root}/resize", expect_step="resize")
        extra = manifest["extra"]
        # Where the work ran: Ray, on the RayCluster's worker (the head has num-cpus 0).
        assert extra["executor"] == "ray" and len(extra["ray_nodes"]) == 1, extra
        assert "SUCCEEDED" in out.getvalue(), out.getvalue()
    if int(settings()["NODES"]) > 1:  # the work crossed nodes: the Ray worker ran on another node than the head
        assert_ray_crossed_nodes(pods)
