"""Tier 4, Kubeflow Trainer: train on two nodes as a TrainJob that Trainer turns into JobSet pods, on CPU.

imgpipe's own code (``remote.trainjob.run_train_job``) creates the TrainJob as the pipeline's
account (Trainer v2.1's form, the CRD installed) and waits for it, as the poller branch of the
pipeline does; the two node pods run torchrun in the gpu step image (made by make images, run
on CPU here) and rank 0 commits the train output to SeaweedFS on the node's address.
"""

from __future__ import annotations

import io
import uuid

import pytest

from imgpipe import contract
from imgpipe.data.synth import SynthConfig
from imgpipe.remote import trainjob
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.resize import resize
from imgpipe.train.config import TrainConfig
from tests.cluster.conftest import assert_ranks_crossed_nodes, cleaned_data, kubectl_json, placements, settings, step_image
from tests.cluster.test_remote_objects import (
    NAMESPACE,
    _api_as,
    dev_overlay,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.cluster
NODE = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}}


def test_a_two_node_trainjob_trains_and_rank_0_commits(dev_overlay, tmp_path):  # noqa: F811
    if not kubectl_json("get", "clustertrainingruntimes", "--ignore-not-found")["items"]:
        pytest.skip("Kubeflow Trainer is not installed: make cluster-build builds it, make cluster-up installs it")
    image = step_image("gpu")
    with (
        cleaned_data(tmp_path, NAMESPACE, f"trainer-{uuid.uuid4().hex[:6]}", SynthConfig(classes=3, per_class=10, seed=5)) as (root, cl),
        placements(NAMESPACE) as pods,
    ):
        rs = resize(cl.dest, f"{root}/resize", ResizeConfig(size=32, executor="pool"))
        cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=4, num_workers=0, device="cpu", nodes=2, max_steps_per_epoch=3)
        stream = io.StringIO()
        report = trainjob.run_train_job(
            rs.dest,
            f"{root}/train",
            cfg,
            procs=1,
            namespace=NAMESPACE,
            run_id=f"cluster-{uuid.uuid4().hex[:8]}",
            api=_api_as("imgpipe-pipeline"),
            image=image,
            resources=NODE,
            secret="imgpipe-s3-credentials",
            active_deadline_s=900,
            poll_s=5,
            stream=stream,
        )
        assert contract.is_committed(f"{root}/train"), stream.getvalue()[-2000:]
        manifest = contract.read_manifest(f"{root}/train", expect_step="train")
        assert report.outputs == manifest["outputs"]
        assert manifest["extra"]["world_size"] == 2, "two node pods trained as one process group"
        assert manifest["extra"]["device"] == "cpu"
        assert "Complete" in stream.getvalue() or "Succeeded" in stream.getvalue(), stream.getvalue()
    if int(settings()["NODES"]) > 1:  # rank 1 trained on another node than rank 0 (the Job's completion index)
        assert_ranks_crossed_nodes(pods)
