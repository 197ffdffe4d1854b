"""The Triton model repository a promotion writes, checked against Triton's own contract and the ONNX it loads.

Oracles: Triton's ``ModelConfig`` proto at the release KServe ships (tests/contracts/triton/),
compiled with protoc; the ONNX file itself (its graph's input and output); onnxruntime loading
it (this one here, and in ``make test-slow`` the 1.15 that tritonserver 23.05 bundles).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from imgpipe import contract, storage
from imgpipe.serving import triton as serving
from imgpipe.steps.promote import promote
from imgpipe.train.export import MAX_IR_VERSION, OPSET

PROTO = Path(__file__).resolve().parent / "contracts" / "triton" / "model_config-r23.05.proto"


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """Triton's ``inference.ModelConfig`` message class, compiled from the vendored proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    out = tmp_path_factory.mktemp("proto") / "model_config.pb"
    # protoc in its own process: grpc_tools' extension stays out of the test process.
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name]
    subprocess.run(args, check=True, timeout=120)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig
    from tests.train.test_loader import write_resize_output

    root = tmp_path_factory.mktemp("serving")
    data = write_resize_output("file://" + str(root / "resize"), classes=3, counts={"train": 24, "val": 6, "test": 6}, size=16)
    model = "file://" + str(root / "train")
    train(data, model, TrainConfig(model="tiny_cnn", epochs=1, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=8))
    dest = "file://" + str(root / "promote")
    decision = promote(model, None, dest)
    return {"model": model, "dest": dest, "decision": decision}


def test_a_promotion_writes_the_repository_kserve_points_at(promoted):
    decision, dest = promoted["decision"], promoted["dest"]
    assert decision.promoted and decision.serving == storage.join(dest, serving.REPOSITORY)
    names = {f["name"] for f in contract.read_manifest(dest)["files"]}
    base = f"{serving.REPOSITORY}/{serving.MODEL_NAME}"
    assert {f"{base}/config.pbtxt", f"{base}/{serving.LABELS}", f"{base}/{serving.VERSION}/model.onnx"} <= names
    onnx_bytes = storage.read_bytes(storage.join(dest, base, serving.VERSION, "model.onnx"))
    assert onnx_bytes == storage.read_bytes(storage.join(promoted["model"], "model.onnx")), "the promoted export itself"


def test_config_pbtxt_is_a_model_config_that_matches_the_onnx_graph(promoted, model_config):
    from google.protobuf import text_format

    base = storage.join(promoted["dest"], serving.REPOSITORY, serving.MODEL_NAME)
    config = text_format.Parse(storage.read_bytes(storage.join(base, "config.pbtxt")).decode(), model_config())
    graph = onnx.load_from_string(storage.read_bytes(storage.join(base, serving.VERSION, "model.onnx"))).graph

    def dims(value_info):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]

    assert config.name == serving.MODEL_NAME and config.platform == "onnxruntime_onnx" and config.max_batch_size > 0
    ((inp,), (out,)) = config.input, config.output
    assert inp.name == graph.input[0].name and out.name == graph.output[0].name
    # With max_batch_size > 0 Triton's dims leave out the batch axis, which the export keeps dynamic.
    assert dims(graph.input[0])[0] == -1 and list(inp.dims) == dims(graph.input[0])[1:]
    assert list(out.dims) == dims(graph.output[0])[1:]
    assert (
        model_config.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type.values_by_number[inp.data_type].name
        == "TYPE_FP32"
    )
    labels = storage.read_bytes(storage.join(base, out.label_filename)).decode().splitlines()
    assert len(labels) == out.dims[0] == 3


def test_the_export_is_an_onnx_the_shipped_triton_can_load(promoted):
    import onnxruntime as ort

    base = storage.join(promoted["dest"], serving.REPOSITORY, serving.MODEL_NAME, serving.VERSION)
    data = storage.read_bytes(storage.join(base, "model.onnx"))
    model = onnx.load_from_string(data)
    assert model.ir_version <= MAX_IR_VERSION and {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    onnx.checker.check_model(model, full_check=True)
    out = ort.InferenceSession(data).run(None, {"image": np.zeros((2, 3, 16, 16), np.float32)})[0]
    assert out.shape == (2, 3)


def test_a_class_name_with_a_line_break_cannot_become_two_labels():
    card = {"classes": ["cat", "dog\nfox"], "input": {"size": 8, "channels": 3}}
    with pytest.raises(ValueError, match="line break"):
        serving.repository_files(card, b"")


@pytest.mark.slow
def test_onnxruntime_1_15_the_one_tritonserver_23_05_bundles_runs_the_export(promoted, tmp_path):
    """Runs the promoted export under onnxruntime 1.15.0 (``make test-slow`` installs it beside the venv)."""
    python = os.environ.get("IMGPIPE_ORT115_PYTHON", "")
    assert python and Path(python).is_file(), "run make test-slow: it installs onnxruntime 1.15.0 and sets $IMGPIPE_ORT115_PYTHON"
    base = storage.join(promoted["dest"], serving.REPOSITORY, serving.MODEL_NAME, serving.VERSION)
    model = tmp_path / "model.onnx"
    model.write_bytes(storage.read_bytes(storage.join(base, "model.onnx")))
    script = (
        "import sys, numpy as np, onnxruntime as ort; "
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
        "print(ort.__version__, s.run(None, {'image': np.zeros((2, 3, 16, 16), np.float32)})[0].shape)"
    )
    done = subprocess.run([python, "-c", script, str(model)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1.15.0", "(2,", "3)"]


def test_a_model_triton_cannot_load_is_refused_in_one_line_before_anything_is_registered_or_written(promoted, tmp_path, monkeypatch):
    monkeypatch.setattr(serving, "MAX_IR_VERSION", 8)  # as if the shipped Triton's onnxruntime took IR 8 at most
    registered = []
    dest = "file://" + str(tmp_path / "promote")
    with pytest.raises(ValueError) as caught:
        promote(promoted["model"], None, dest, before_commit=registered.append)
    message = str(caught.value)
    assert "IR 9" in message and serving.TRITON in message and "export it again" in message and "\n" not in message
    assert registered == [] and not contract.is_committed(dest) and not (tmp_path / "promote").exists()
