"""Shared fixtures of the remote tests: the CRDs and RBAC the fake Kubernetes APIs check against, their runs' arguments, a small clean output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from imgpipe import storage
from imgpipe.clean.config import CleanConfig
from imgpipe.remote import attempts, rayjob_spec, trainjob_spec
from imgpipe.remote.attempts import job_id
from imgpipe.remote.payload import step_entrypoint
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.train.config import TrainConfig
from tests import imagefactory as f
from tests import rbac
from tests.conftest import ROOT
from tests.helpers import write_download_output
from tests.remote.fake_kuberay import K8S, FakeCustomObjects, strict
from tests.remote.fake_trainer import CRDS, GPU_NODE, GPU_POD, SUCCESS, FakeTrainer
from tests.train.test_loader import write_resize_output

# ------------------------------------------------------------------ the RBAC of k8s/base, for every fake


@pytest.fixture(scope="module")
def base_rbac(tmp_path_factory) -> list[dict]:
    """k8s/base as ``kubectl kustomize`` renders it into the namespace ``ml``."""
    return rbac.render(ROOT / "k8s" / "base", tmp_path_factory.mktemp("rbac"), namespace="ml")


# ------------------------------------------------------------------ KubeRay


@pytest.fixture(scope="module")
def validators(schemas_dir: Path) -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for kind, file in (("RayJob", "kuberay-v1.7-ray.io_rayjobs.yaml"), ("RayCluster", "kuberay-v1.7-ray.io_rayclusters.yaml")):
        # The CRDs are 1-1.4 MB of YAML: libyaml's loader reads them ten times faster.
        crd = yaml.load((schemas_dir / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return out


@pytest.fixture
def fakes_authorize_with_the_rendered_role(base_rbac, monkeypatch):
    monkeypatch.setattr(FakeCustomObjects, "authorizer", rbac.Authorizer(base_rbac))


@pytest.fixture
def run_args(tmp_path, monkeypatch):
    for name in (rayjob_spec.IMAGE_ENV, rayjob_spec.MAX_WORKERS_ENV, attempts.RUN_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    source, dest = storage.normalize_uri(str(tmp_path / "clean")), storage.normalize_uri(str(tmp_path / "resize"))
    template = rayjob_spec.load_template(K8S / "rayjob-resize.yaml")
    cfg = ResizeConfig(size=16, ray_address="kuberay://ml")
    job_cfg = rayjob_spec.sized_for_autoscaling(ResizeConfig(size=16), template, None, "cpu")
    return dict(
        source=source,
        dest=dest,
        cfg=cfg,
        template=template,
        base=attempts.job_id("resize", source, dest, job_cfg, "run-7"),
        entrypoint=step_entrypoint("resize", source, dest, job_cfg),
    )


# ------------------------------------------------------------------ Kubeflow Trainer


@pytest.fixture(scope="module")
def trainjob_schemas() -> dict[str, dict]:
    """Each vendored TrainJob CRD's ``v1alpha1`` schema, by Trainer release."""
    out = {}
    for release, path in CRDS.items():
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        out[release] = version["schema"]["openAPIV3Schema"]
    return out


@pytest.fixture(params=list(CRDS))
def trainer_release(request) -> str:
    return request.param


@pytest.fixture
def trainjob_schema(trainjob_schemas, trainer_release) -> dict:
    return trainjob_schemas[trainer_release]


@pytest.fixture
def setup(tmp_path, monkeypatch, trainjob_schema, base_rbac):
    for name in (trainjob_spec.IMAGE_ENV, trainjob_spec.SECRET_ENV, trainjob_spec.MAX_NODES_ENV, trainjob_spec.SHM_ENV, "IMGPIPE_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(trainjob_spec.NODE_RESOURCES_ENV, json.dumps(GPU_NODE))
    monkeypatch.setenv(trainjob_spec.POD_ENV, json.dumps(GPU_POD))
    data = write_resize_output("file://" + str(tmp_path / "resize"), classes=3, size=16)
    out = "file://" + str(tmp_path / "train")
    cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=4, num_workers=0, device="cpu", shuffle_buffer=8, nodes=2)

    def fake(script=SUCCESS, authorizer: Any = "role", **kwargs) -> FakeTrainer:
        chosen = rbac.Authorizer(base_rbac) if authorizer == "role" else authorizer
        return FakeTrainer(trainjob_schema, chosen, script, **kwargs)

    return {"data": data, "out": out, "cfg": cfg, "fake": fake, "base": job_id("train", data, out, cfg, "run-9")}


# ------------------------------------------------------------------ the Ray Jobs API


def build_clean(root: str, n: int = 6) -> str:
    members = {f"images/{name}_{i}.jpg": f.jpeg(48 + 3 * i, 40 + 2 * i, seed=i) for i, name in enumerate(["cat", "dog"] * (n // 2))}
    download = write_download_output(storage.join(root, "download"), members)
    dest = storage.join(root, "clean")
    report = clean(download, dest, CleanConfig(workers=1, seed=1, rows_per_shard=4, row_group_rows=2))
    assert (report.outputs, report.rejected) == (n, 0)
    return dest
