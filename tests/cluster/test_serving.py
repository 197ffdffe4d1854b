"""Tier 5: a promoted model registered in Kubeflow's Model Registry and served by KServe (cluster/serving.sh).

Both servers are upstream's code built from their pinned sources (Model Registry v0.3.8 on tier
3's MariaDB, KServe v0.20.0's controller in RawDeployment mode). The model comes from a real run
through KFP (tier 3): ``imgpipe submit`` of the pipeline compiled with the registry named, so its
promote task registers what the gate promotes. KServe turns the InferenceService of
``k8s/serving`` (imgpipe's runtime, ``imgpipe-onnx``) into a Deployment whose storage initializer
fetches the promoted repository from SeaweedFS; its answers are compared with ``imgpipe predict``'s
on the test split. A second promotion rolls it while requests keep coming.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import yaml

from imgpipe import contract, storage
from imgpipe.data.synth import SynthConfig
from imgpipe.serving.registry import API_PATH, DEFAULT_MODEL_NAME
from imgpipe.train.card import read_card
from tests.cluster.conftest import ROOT, apply_docs, kubectl, kubectl_json, object_store, step_image
from tests.cluster.test_kfp import RUN_TIMEOUT_S, _rayjob_template, kfp, small_options, submit_run  # noqa: F401 - the fixture
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(3 * RUN_TIMEOUT_S)]  # a fixture runs the pipeline through KFP
NAME = DEFAULT_MODEL_NAME  # the InferenceService, and the model the runtime serves
SERVING_REQUESTS = {"cpu": "100m", "memory": "512Mi"}  # a 2-core node: old and new predictor side by side during a roll


def registry() -> str:
    """``http://<model-registry-service's address>:8080``, or a skip saying how to bring tier 5 up."""
    if kubectl("get", "deployment", "model-registry-deployment", "-n", "kubeflow", check=False).returncode != 0:
        pytest.skip("the Model Registry is not running: make cluster-build MODEL_REGISTRY_SOURCE=... KSERVE_SOURCE=..., then make cluster-up")
    ip = kubectl_json("get", "service", "model-registry-service", "-n", "kubeflow")["spec"]["clusterIP"]
    return f"http://{ip}:8080"


def _in_cluster_registry() -> str:
    return "http://model-registry-service.kubeflow.svc.cluster.local:8080"


def _kserve() -> None:
    if kubectl("get", "deployment", "kserve-controller-manager", "-n", "kserve", check=False).returncode != 0:
        pytest.skip("KServe is not running: make cluster-build MODEL_REGISTRY_SOURCE=... KSERVE_SOURCE=..., then make cluster-up")


def _package(path: Path) -> Path:
    """The pipeline compiled for this node, its promote task naming the in-cluster registry."""
    from imgpipe.pipelines import compile_pipeline

    return compile_pipeline(path, small_options(model_registry=_in_cluster_registry()))


def _run(host: str, package: Path, root: str, **extra: str) -> str:
    """One run of the small pipeline over ``root``'s sample; the run's id."""
    # A test split of over 20 pictures: the gate compares a second model with the first only on
    # that many it never trained or validated on (the same split seed for both runs).
    return submit_run(host, package, root, split="0.5,0.1,0.4", **extra)[0]


@dataclasses.dataclass
class Promotion:
    run_id: str
    train: str  # the train output the gate promoted
    serving: str  # the repository it wrote: the InferenceService's storageUri


def _promotion(root: str, run_id: str) -> Promotion:
    from imgpipe.steps.promote import read_decision

    decision = read_decision(f"{root}/runs/{run_id}/promote")
    assert decision.promoted and decision.serving, decision
    return Promotion(run_id, decision.candidate_prefix, decision.serving)


@pytest.fixture(scope="module")
def promoted(kfp, tmp_path_factory) -> Iterator[tuple[str, Promotion]]:  # noqa: F811
    from imgpipe.data.synth import generate

    registry()
    _kserve()
    _rayjob_template(step_image("ray"))
    step_image("cpu"), step_image("gpu")
    tmp = tmp_path_factory.mktemp("serving")
    with object_store(tmp, NAMESPACE):
        root = f"s3://mlpipeline/private/{NAMESPACE}/serving-{uuid.uuid4().hex[:8]}"
        generate(f"{root}/synth", SynthConfig(classes=3, per_class=24, seed=0, min_side=64, max_side=160), progress=False)
        package = _package(tmp / "imgpipe.yaml")
        yield root, _promotion(root, _run(kfp, package, root))


# ----------------------------------------------------------------------------------------
# The Model Registry: what the promote task registered, read back through its own REST API.


def _get(path: str, **params: str) -> requests.Response:
    return requests.get(f"{registry()}{API_PATH}{path}", params=params, timeout=30)


def test_the_registry_is_upstreams_and_refuses_what_it_does_not_know():
    answer = _get("/registered_models")
    assert answer.status_code == 200 and "items" in answer.json(), answer.text
    missing = _get("/registered_model", name=f"none-{uuid.uuid4().hex[:6]}")
    assert missing.status_code == 404 and set(missing.json()) >= {"code", "message"}, missing.text


def test_the_promote_task_registered_the_model_version_and_artifact(promoted):
    root, first = promoted
    model = _get("/registered_model", name=NAME)
    assert model.status_code == 200, model.text
    versions = _get(f"/registered_models/{model.json()['id']}/versions").json()["items"]
    version = next((v for v in versions if v["name"] == first.run_id), None)
    assert version is not None, [v["name"] for v in versions]
    # {"architecture": {"metadataType": "MetadataStringValue", "string_value": "resnet18"}, ...}
    props = {k: next(x for field, x in v.items() if field != "metadataType") for k, v in version["customProperties"].items()}
    card = read_card(first.train)
    assert props["imgpipe_train_prefix"] == first.train and props["architecture"] == card["architecture"]
    assert props["test_macro_f1"] == pytest.approx(card["metrics"]["test"]["macro_f1"])
    artifacts = _get(f"/model_versions/{version['id']}/artifacts").json()["items"]
    assert [a["uri"] for a in artifacts] == [storage.join(first.train, card["files"]["onnx"])], artifacts
    assert artifacts[0]["modelFormatName"] == "onnx"


# ----------------------------------------------------------------------------------------
# KServe: the InferenceService of k8s/serving on imgpipe's runtime.


def _serving_docs(storage_uri: str) -> list[dict]:
    from imgpipe.containers import catalog

    serving = ROOT / "k8s" / "serving"
    docs = []
    for doc in [yaml.safe_load((serving / name).read_text()) for name in yaml.safe_load((serving / "kustomization.yaml").read_text())["resources"]]:
        doc["metadata"]["namespace"] = NAMESPACE
        if doc["kind"] == "ServingRuntime":
            container = doc["spec"]["containers"][0]
            container["image"] = catalog.image("serve")
            container["resources"] = {"requests": SERVING_REQUESTS, "limits": {"cpu": "1", "memory": "2Gi"}}
        if doc["kind"] == "InferenceService":
            model = doc["spec"]["predictor"]["model"]
            model.update(runtime="imgpipe-onnx", storageUri=storage_uri)
            model["resources"] = {"requests": SERVING_REQUESTS, "limits": {"cpu": "1", "memory": "2Gi"}}
        docs.append(doc)
    return docs


def _credentials_for_kserve() -> None:
    """KServe reads the endpoint of the store from the account's Secret's annotations (docs/deploy.md)."""
    kubectl(
        "annotate", "secret", "imgpipe-s3-credentials", "-n", NAMESPACE, "--overwrite",
        "serving.kserve.io/s3-endpoint=seaweedfs.kubeflow:9000", "serving.kserve.io/s3-usehttps=0",
    )  # fmt: skip


def _ready(generation_uri: str, timeout: float = 600) -> str:
    """Waits for the InferenceService to be Ready on ``generation_uri``; its predictor's address."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        isvc = kubectl_json("get", "inferenceservice", NAME, "-n", NAMESPACE)
        ready = {c["type"]: c["status"] for c in isvc.get("status", {}).get("conditions", [])}
        pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"serving.kserve.io/inferenceservice={NAME}")["items"]
        live = [p for p in pods if p["metadata"].get("deletionTimestamp") is None]
        current = [p for p in live if generation_uri in str(p["spec"].get("initContainers", []))]
        serving = [p for p in current if any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))]
        if ready.get("Ready") == "True" and serving and len(serving) == len(pods):
            ip = kubectl_json("get", "service", f"{NAME}-predictor", "-n", NAMESPACE)["spec"]["clusterIP"]
            return f"http://{ip}"
        time.sleep(3)
    described = kubectl("describe", "inferenceservice,pods", "-n", NAMESPACE, "-l", f"serving.kserve.io/inferenceservice={NAME}", check=False).stdout
    raise AssertionError(f"InferenceService {NAME} not ready on {generation_uri} in {timeout:.0f} s\n{described[-4000:]}")


@pytest.fixture(scope="module")
def served(promoted) -> Iterator[tuple[str, Promotion, str]]:
    root, first = promoted
    step_image("serve")
    _credentials_for_kserve()
    apply_docs(_serving_docs(first.serving))
    try:
        yield root, first, _ready(first.serving)
    finally:
        kubectl("delete", "inferenceservice", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=false", check=False)


def _test_pictures(train: str) -> dict[str, bytes]:
    """The test split the model was scored on, as PNG files of the resize output's stored pixels (as a client sends them)."""
    from PIL import Image

    data = read_card(train)["data"]["uri"]
    pictures = {}
    for uri in contract.data_files(data):
        if "/test/" not in uri:
            continue
        for r in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist():
            buf = io.BytesIO()
            Image.fromarray(np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], r["channels"]).squeeze()).save(buf, "PNG")
            pictures[r["sha256"][:16] + ".png"] = buf.getvalue()
    assert pictures, f"no test split in {data}"
    return pictures


def _infer(url: str, pictures: list[bytes]) -> requests.Response:
    data = [base64.b64encode(p).decode() for p in pictures]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}]}
    return requests.post(f"{url}/v2/models/{NAME}/infer", json=body, timeout=60)


def _outputs(response: requests.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    return {o["name"]: np.asarray(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"]) for o in outputs}


def test_the_inference_service_answers_as_imgpipe_predict_does_on_the_test_split(served, tmp_path):
    from imgpipe.steps.predict import PredictConfig, predict

    _, first, url = served
    pictures = _test_pictures(first.train)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name, body in pictures.items():
        (folder / name).write_bytes(body)
    classes = read_card(first.train)["classes"]
    dest = "file://" + str(tmp_path / "predicted")
    report = predict(first.train, str(folder), dest, PredictConfig(actors=1, top_k=len(classes)))
    assert report.outputs == len(pictures) and report.rejected == 0
    (uri,) = contract.data_files(dest)
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()}
    names = sorted(pictures)
    answer = _outputs(_infer(url, [pictures[n] for n in names]))
    theirs = np.array([[dict(zip(rows[n]["top_classes"], rows[n]["top_probs"]))[c] for c in classes] for n in names], np.float64)
    diff = float(np.abs(answer["probabilities"].astype(np.float64) - theirs).max())
    agree = sum(answer["predicted_name"][i] == rows[n]["predicted_name"] for i, n in enumerate(names))
    print(f"KServe vs imgpipe predict on {len(names)} test pictures: top-1 {agree}/{len(names)}, max |dp| {diff:.3g}")
    assert agree == len(names) and diff <= 1e-4


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]},  # "not an image"
        {"inputs": [{"name": "nothing", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {"no": "inputs"},
    ],
    ids=["not a picture", "an input the model has not", "no inputs"],
)
def test_a_malformed_request_gets_a_4xx_with_the_v2_error_body(served, body):
    _, _, url = served
    answer = requests.post(f"{url}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert 400 <= answer.status_code < 500 and "error" in answer.json(), (answer.status_code, answer.text)


class _Load:
    """Requests sent one after another until stopped, each answer's status kept (0: no answer)."""

    def __init__(self, url: str, picture: bytes) -> None:
        self.url, self.picture, self.statuses, self._stop = url, picture, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(_infer(self.url, [self.picture]).status_code)
            except requests.RequestException:
                self.statuses.append(0)
            time.sleep(0.2)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def test_the_predictors_pod_killed_is_replaced_and_requests_resume(served):
    _, first, url = served
    picture = next(iter(_test_pictures(first.train).values()))
    (pod,) = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"serving.kserve.io/inferenceservice={NAME}")["items"]
    kubectl("delete", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "--grace-period=0", "--force")
    url = _ready(first.serving)
    deadline = time.monotonic() + 120
    while True:
        try:
            if _infer(url, [picture]).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "requests did not resume after the predictor's pod was replaced"
        time.sleep(2)
    (replaced,) = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"serving.kserve.io/inferenceservice={NAME}")["items"]
    assert replaced["metadata"]["name"] != pod["metadata"]["name"]


def test_a_second_promotion_rolls_the_service_with_no_failed_request(served, kfp, tmp_path):  # noqa: F811
    root, first, url = served
    picture = next(iter(_test_pictures(first.train).values()))
    with _Load(url, picture) as load:
        # Another model (two epochs) on the same split, promoted whatever its score (a tolerance of 1): what rolls is a new version.
        second = _promotion(root, _run(kfp, _package(tmp_path / "imgpipe.yaml"), root, promotion_tolerance="1.0", epochs="2"))
        model = _get("/registered_model", name=NAME).json()
        names = [v["name"] for v in _get(f"/registered_models/{model['id']}/versions").json()["items"]]
        assert {first.run_id, second.run_id} <= set(names), names
        doc = next(d for d in _serving_docs(second.serving) if d["kind"] == "InferenceService")
        apply_docs([doc])
        _ready(second.serving)
        time.sleep(5)  # requests on the new predictor only
    failed = [s for s in load.statuses if s != 200]
    print(f"during the roll: {len(load.statuses)} requests, {len(failed)} failed")
    assert load.statuses and not failed, failed


# ----------------------------------------------------------------------------------------
# The quick tests' stand-in for KServe (its CRDs' schemas, vendored: tests/test_manifests.py)
# held to the real CRDs and webhooks of the controller built here.


def _schema_errors(doc: dict) -> list[str]:
    from tests.conftest import SCHEMAS
    from tests.manifests import _strict

    name = {"InferenceService": "kserve-kubeflow-manifests-v1.11.0-inferenceservices.serving.kserve.io.yaml"}.get(
        doc["kind"], "kserve-v0.20.0-serving.kserve.io_servingruntimes.yaml"
    )
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1]]
    return [e.message for e in jsonschema.Draft7Validator(_strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))).iter_errors(doc)]


def _server_refusal(doc: dict) -> str:
    """The real API server's (and KServe's webhooks') answer to a strict server-side dry run: '' where it takes the doc."""
    done = kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", check=False, input=yaml.safe_dump(doc))
    return "" if done.returncode == 0 else done.stderr.strip()


@pytest.mark.parametrize("kind", ["InferenceService", "ServingRuntime"])
def test_the_vendored_schemas_take_and_refuse_what_kserve_does(kind):
    _kserve()
    (doc,) = [d for d in _serving_docs("s3://mlpipeline/private/none/promote/serving") if d["kind"] == kind]
    assert _schema_errors(doc) == [] and _server_refusal(doc) == ""
    wrong = {**doc, "spec": {**doc["spec"], "unknownField": 1}}
    assert _schema_errors(wrong) and "unknownField" in _server_refusal(wrong)
