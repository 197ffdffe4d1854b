"""imgpipe's KServe serving runtime (imgpipe.serving.runtime): the real kserve model server, real HTTP v2 requests.

The server runs as KServe runs it (``python -m imgpipe.serving.runtime --model_dir ...``), with the
serve venv's python (kserve needs pandas < 3: tests/serve_venv.py, which make test builds), on the
Triton repository a promotion writes (imgpipe.serving.triton, with its model.json). Oracles:
``imgpipe predict`` on the same pictures (top-1 equal, probabilities within 1e-4), the train
step's own test predictions for the prepared-tensor form, and the v2 protocol's error body. The
model's discovery and checks (imgpipe.serving.model, no kserve) run here, in this venv.
The runtime listens on 127.0.0.1 unless told (kserve's own server has no host setting; the
runtime sets it); the tests that start it still run inside scripts/in-loopback-netns (make test
does), so that a server that did bind every interface would reach the loopback alone.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from imgpipe import contract, storage
from imgpipe.serving import triton as serving
from imgpipe.serving.model import MAX_IMAGES, OUTPUTS, open_model
from imgpipe.serving.prepare import prepare_encoded, softmax
from imgpipe.train.card import preprocessing_spec, to_input
from tests import serve_venv
from tests.train.test_loader import class_image, write_resize_output

ROOT = Path(__file__).resolve().parents[1]
NAME = serving.MODEL_NAME
LOOPBACK_ONLY = os.environ.get("IMGPIPE_IN_NETNS") == "1" or os.environ.get("IMGPIPE_RAY_OUTSIDE_NETNS") == "1"
needs_netns = pytest.mark.skipif(not LOOPBACK_ONLY, reason="KServe's server listens on 0.0.0.0: run under scripts/in-loopback-netns (make test does)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on 16 px pictures, and the Triton repository a promotion would write for it."""
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig

    root = tmp_path_factory.mktemp("serve")
    data = write_resize_output("file://" + str(root / "resize"), counts={"train": 48, "val": 12, "test": 16}, size=16)
    model = "file://" + str(root / "model")
    train(data, model, TrainConfig(model="tiny_cnn", epochs=2, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=16, mixup=0.0, cutmix=0.0))
    card = json.loads(storage.read_bytes(storage.join(model, contract.MODEL_CARD)))
    repository = root / "repository"
    for name, body in serving.repository_files(card, storage.read_bytes(storage.join(model, "model.onnx"))).items():
        (repository / name).parent.mkdir(parents=True, exist_ok=True)
        (repository / name).write_bytes(body)
    return {"root": root, "data": data, "model": model, "card": card, "repository": repository}


@pytest.fixture(scope="module")
def server(trained):
    """The runtime serving the repository, as the ServingRuntime starts it; its base URL."""
    if not LOOPBACK_ONLY:
        pytest.skip("KServe's server listens on 0.0.0.0: run under scripts/in-loopback-netns (make test does)")
    with serve_venv.runtime(trained["repository"], trained["root"] / "server.log", "--enable_grpc=false") as (_, url, _):
        yield url


def _infer(url: str, inputs: list[dict], **extra) -> requests.Response:
    return requests.post(f"{url}/v2/models/{NAME}/infer", json={"inputs": inputs, **extra}, timeout=120)


def _pictures(url: str, pictures: list[bytes]) -> dict[str, np.ndarray]:
    """The answer to encoded pictures, by output name."""
    data = [base64.b64encode(p).decode() for p in pictures]
    response = _infer(url, [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}])
    assert response.status_code == 200, response.text
    return _outputs(response.json())


def _outputs(body: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"]) for o in body["outputs"]}


def _encoded(pixels: np.ndarray, fmt: str, mode: str | None = None, **save) -> bytes:
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    (image.convert(mode) if mode else image).save(buf, fmt, **save)
    return buf.getvalue()


def _test_split(trained) -> list[dict]:
    """The resize output's test rows: path, sha256, the stored 16 x 16 pixels."""
    rows = []
    for uri in contract.data_files(trained["data"]):
        if "/test/" in uri:
            rows += pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    for r in rows:
        r["view"] = np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], r["channels"])
    return rows


# ----------------------------------------------------------------------------------------
# The same answers as imgpipe's own.


def _folder(path: Path, trained) -> dict[str, bytes]:
    """Pictures as users send them: the test split as PNG, and larger, grey, RGBA, palette and JPEG pictures that need the card's resize."""
    pictures = {f"test_{i:02d}.png": _encoded(r["view"], "PNG") for i, r in enumerate(_test_split(trained))}
    for i in range(8):
        pixels = class_image(i % 4, 500 + i, 24 + 9 * i)[:, : 20 + 5 * i]  # sides 20 to 87, aspects up to 1.6:1, both ways
        pixels = np.ascontiguousarray(pixels.transpose(1, 0, 2) if i % 2 else pixels)
        fmt, mode = [("JPEG", None), ("PNG", None), ("PNG", "L"), ("PNG", "RGBA"), ("GIF", "P"), ("WEBP", None), ("BMP", None), ("JPEG", "L")][i]
        ext = {"JPEG": "jpg"}.get(fmt, fmt.lower())
        pictures[f"odd_{i}.{ext}"] = _encoded(pixels, fmt, mode, **({"quality": 90} if fmt == "JPEG" else {}))
    path.mkdir()
    for name, body in pictures.items():
        (path / name).write_bytes(body)
    return pictures


@needs_netns
@pytest.mark.ray
def test_pictures_get_imgpipe_predicts_top1_and_probabilities(trained, server, ray_session, tmp_path, record_property):
    from imgpipe.steps.predict import PredictConfig, predict

    pictures = _folder(tmp_path / "pictures", trained)
    classes = trained["card"]["classes"]
    dest = "file://" + str(tmp_path / "pred")
    report = predict(trained["model"], str(tmp_path / "pictures"), dest, PredictConfig(actors=1, top_k=len(classes)))
    assert report.outputs == len(pictures) and report.rejected == 0
    (uri,) = contract.data_files(dest)
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()}
    names = sorted(pictures)
    answer = _pictures(server, [pictures[n] for n in names])
    assert answer["probabilities"].shape == (len(names), len(classes))
    theirs = np.array([[dict(zip(rows[n]["top_classes"], rows[n]["top_probs"]))[c] for c in classes] for n in names], np.float64)
    diff = float(np.abs(answer["probabilities"].astype(np.float64) - theirs).max())
    agree = sum(answer["predicted_name"][i] == rows[n]["predicted_name"] for i, n in enumerate(names))
    record_property("max_probability_difference", diff)
    record_property("top1_agreement", f"{agree}/{len(names)}")
    print(f"serve vs predict: top-1 {agree}/{len(names)}, max |dp| {diff:.3g}")
    assert agree == len(names) and diff <= 1e-4
    assert [classes[i] for i in answer["predicted"]] == list(answer["predicted_name"])
    assert np.allclose(answer["probabilities"].sum(axis=1), 1.0, atol=1e-5)


@needs_netns
def test_the_prepared_tensor_gets_the_train_steps_own_test_predictions(trained, server):
    rows = _test_split(trained)
    x = to_input([r["view"] for r in rows], trained["card"])
    response = _infer(server, [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}])
    assert response.status_code == 200, response.text
    tensor = _outputs(response.json())
    own = {r["sha256"]: r for r in pq.read_table(io.BytesIO(storage.read_bytes(storage.join(trained["model"], "predictions.parquet")))).to_pylist()}
    classes = trained["card"]["classes"]
    for i, r in enumerate(rows):
        mine = own[r["sha256"]]
        assert tensor["predicted_name"][i] == mine["predicted_name"], r["path"]
        probs = dict(zip(mine["top_classes"], mine["top_probs"]))
        assert np.abs(tensor["probabilities"][i] - [probs[c] for c in classes]).max() <= 1e-4, r["path"]
    # The same pictures, encoded: prepared as raw pictures are (clean's decode and JPEG store first), in one batch.
    pngs = [_encoded(r["view"], "PNG") for r in rows]
    pictures = _pictures(server, pngs)
    _, card, session = open_model(trained["repository"])
    views = [prepare_encoded(png, card, preprocessing_spec(card)) for png in pngs]
    assert np.array_equal(pictures["probabilities"], softmax(session.run(None, {"image": to_input(views, card)})[0]))


@needs_netns
def test_health_metadata_and_chosen_outputs(trained, server):
    assert requests.get(f"{server}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{server}/v2/models/{NAME}/ready", timeout=10).status_code == 200
    meta = requests.get(f"{server}/v2/models/{NAME}", timeout=10).json()
    k = len(trained["card"]["classes"])
    assert meta["name"] == NAME and meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", [-1, k]),
        ("probabilities", [-1, k]),
        ("predicted", [-1]),
        ("predicted_name", [-1]),
    ]
    picture = base64.b64encode(_encoded(_test_split(trained)[0]["view"], "PNG")).decode()
    response = _infer(
        server, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [picture]}], outputs=[{"name": "predicted_name"}], id="req-1"
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-1" and [o["name"] for o in body["outputs"]] == ["predicted_name"]
    assert body["outputs"][0]["data"][0] in trained["card"]["classes"]
    assert set(OUTPUTS) == {o["name"] for o in meta["outputs"]}


# ----------------------------------------------------------------------------------------
# Bad input: 4xx with the v2 error body, never 5xx.

_PNG = _encoded(np.zeros((20, 20, 3), np.uint8), "PNG")
_B64 = base64.b64encode(_PNG).decode()
_ZEROS = [0.0] * (3 * 16 * 16)


def _binary(datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict[str, str]]:
    """A request in the v2 binary data extension: the JSON header, then the tensor's bytes."""
    header = json.dumps({"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def _request(datatype: str, shape: list, data: list, name: str = "image", **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], **extra}


MALFORMED = {
    "another input name": (_request("BYTES", [1], [_B64], name="pixels"), "one input named 'image'"),
    "two inputs": ({"inputs": _request("BYTES", [1], [_B64])["inputs"] * 2}, "one input named"),
    "no input": ({"inputs": []}, "one input named"),
    "another datatype": (_request("INT32", [1], [7]), "send BYTES"),
    "a tensor of another shape": (_request("FP32", [1, 3, 8, 8], [0.0] * 192), "N x C x S x S"),
    "data that does not fill the shape": (_request("FP32", [2, 3, 16, 16], _ZEROS), "cannot reshape"),
    "data that are not numbers": (_request("FP32", [1, 3, 16, 16], ["x"] * 768), "not a FP32"),
    "undecodable picture": (_request("BYTES", [1], [base64.b64encode(b"hello").decode()]), "not_an_image"),
    "truncated picture": (_request("BYTES", [1], [base64.b64encode(_PNG[:40]).decode()]), "image'[0]"),
    "not base64": (_request("BYTES", [1], ["@@not base64@@"]), "not base64"),
    "pictures as a 2-D tensor": (_request("BYTES", [1, 1], [_B64]), "shape [N]"),
    "too many pictures": (_request("BYTES", [MAX_IMAGES + 1], [_B64] * (MAX_IMAGES + 1)), "1 to"),
    "an unknown output": (_request("BYTES", [1], [_B64], outputs=[{"name": "scores"}]), "unknown output"),
    "no inputs field": ({"id": "x"}, "not a v2 inference request"),
    "inputs not a list": ({"inputs": {"name": "image"}}, "not a v2 inference request"),
    "a shape of strings": (_request("FP32", ["N"], [1.0]), "not a v2 inference request"),
    "invalid JSON": (b'{"inputs": [{"name": "image", ', "not a v2 inference request"),
    "an empty body": (b"", "not a v2 inference request"),
    "the v1 protocol": ({"instances": [[1.0]]}, "v2 protocol only"),
    "pictures in the binary extension": (_binary("BYTES", [1], struct.pack("<I", len(_PNG)) + _PNG), "base64 strings"),
    "a short binary tensor": (_binary("FP32", [1, 3, 16, 16], b"\0" * 10), "cannot be decoded"),
}


@needs_netns
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_gets_a_4xx_with_the_v2_error_body(server, case):
    body, expected = MALFORMED[case]
    path = f"/v1/models/{NAME}:predict" if case == "the v1 protocol" else f"/v2/models/{NAME}/infer"
    if isinstance(body, tuple):  # the binary extension: bytes and headers
        response = requests.post(server + path, data=body[0], headers=body[1], timeout=60)
    elif isinstance(body, bytes):
        response = requests.post(server + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        response = requests.post(server + path, json=body, timeout=60)
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()
    assert set(error) == {"error"} and isinstance(error["error"], str), error
    assert expected in error["error"], error["error"]
    assert len(error["error"]) <= 1000, "one readable message, not a dump"
    # ...and the server goes on answering.
    assert requests.post(f"{server}/v2/models/{NAME}/infer", json=_request("BYTES", [1], [_B64]), timeout=60).status_code == 200


# ----------------------------------------------------------------------------------------
# A model its card does not describe is refused at load.


def _altered(trained, folder: Path, change) -> Path:
    """A model prefix in ``folder``: the trained model's ONNX, its card as ``change`` leaves it."""
    folder.mkdir(parents=True)
    card = json.loads(json.dumps(trained["card"]))
    change(card)
    (folder / contract.MODEL_CARD).write_text(json.dumps(card))
    (folder / "model.onnx").write_bytes(storage.read_bytes(storage.join(trained["model"], "model.onnx")))
    return folder


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["input"].update(size=32), r"input 'image' is tensor\(float\) \[N, 3, 16, 16\], the card says tensor\(float\) \[N, 3, 32, 32\]"),
        (
            lambda c: c["input"].update(channels=1),
            r"input 'image' is tensor\(float\) \[N, 3, 16, 16\], the card says tensor\(float\) \[N, 1, 16, 16\]",
        ),
        (lambda c: c.update(classes=c["classes"][:3]), r"output 'logits' is tensor\(float\) \[N, 4\], the card says tensor\(float\) \[N, 3\]"),
        (lambda c: c["input"].update(name="pixels"), r"the graph's inputs are \['image'\], the card's is 'pixels'"),
        (lambda c: c["output"].update(name="scores"), r"the graph's outputs are \['logits'\], the card's is 'scores'"),
    ],
    ids=["size", "channels", "classes", "input name", "output name"],
)
def test_a_graph_its_card_does_not_describe_is_refused(trained, tmp_path, change, expected):
    with pytest.raises(ValueError, match=r"the ONNX graph and model.json disagree: " + expected):
        open_model(_altered(trained, tmp_path / "model", change))


@serve_venv.needs_serve_venv
def test_the_runtime_refuses_such_a_model_at_load_in_one_line(trained, tmp_path):
    folder = _altered(trained, tmp_path / "model", lambda c: c["input"].update(size=32))
    args = [serve_venv.python(), "-m", "imgpipe.serving.runtime", f"--model_name={NAME}", f"--model_dir={folder}", "--enable_grpc=false"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"imgpipe.serving.runtime: {folder}: the ONNX graph and model.json disagree: input 'image'"), line


def test_the_model_is_found_in_a_train_output_or_a_repository_and_nowhere_else(trained, tmp_path):
    assert open_model(trained["repository"])[0] == trained["repository"] / NAME, "the Triton repository a promotion writes"
    assert open_model(trained["repository"] / NAME)[1]["files"] == {"onnx": f"{serving.VERSION}/model.onnx"}
    assert open_model(trained["root"] / "model")[0] == trained["root"] / "model", "a train output"
    with pytest.raises(ValueError, match="must hold one imgpipe model .* it holds none"):
        open_model(tmp_path)
    for name in ("a", "b"):
        _altered(trained, tmp_path / "two" / name, lambda c: None)
    with pytest.raises(ValueError, match=r"it holds 2 \(a, b\)"):
        open_model(tmp_path / "two")
    (tmp_path / "two" / "a" / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ValueError, match="onnxruntime cannot load .*model.onnx: "):
        open_model(tmp_path / "two" / "a")


def test_requests_are_decoded_and_answered_here_without_kserve(trained):
    """serve_model, the runtime's kserve-free half, in this venv (which has pandas 3 and no kserve)."""
    from types import SimpleNamespace

    from imgpipe.serving import model as serve_model

    _, card, session = open_model(trained["repository"])
    spec = preprocessing_spec(card)
    rows = _test_split(trained)[:3]
    x = to_input([r["view"] for r in rows], card)
    tensor = SimpleNamespace(name="image", datatype="FP32", shape=list(x.shape), as_numpy=lambda: x)
    got = serve_model.answer(card, session, serve_model.model_input(card, spec, [tensor]))
    assert list(got) == list(OUTPUTS) and np.array_equal(got["probabilities"], softmax(session.run(None, {"image": x})[0]))
    pngs = [_encoded(r["view"], "PNG") for r in rows]
    data = np.array([base64.b64encode(p).decode() for p in pngs], dtype=object)
    pictures = SimpleNamespace(name="image", datatype="BYTES", shape=[3], as_numpy=lambda: data)
    assert np.array_equal(serve_model.model_input(card, spec, [pictures]), to_input([prepare_encoded(p, card, spec) for p in pngs], card))
    with pytest.raises(serve_model.BadRequest, match="one input named 'image'"):
        serve_model.model_input(card, spec, [SimpleNamespace(name="pixels", datatype="FP32", shape=[1], as_numpy=lambda: x)])
    with pytest.raises(serve_model.BadRequest, match="unknown output"):
        serve_model.check_outputs(["scores"])
    assert [o["name"] for o in serve_model.output_types(card)] == list(OUTPUTS)
