"""A promoted model as the Triton model repository KServe serves ONNX from.

KServe serves ``modelFormat: onnx`` with its Triton runtime (``kserve-tritonserver``), which loads
a model repository, not a file: ``<repository>/<model>/config.pbtxt`` and
``<repository>/<model>/<version>/model.onnx``. The promotion gate writes one for every model it
promotes (:func:`repository_files`, below its promote prefix as ``serving/``), and ``latest.json``
names it (``prefixes.serving``): that is the ``storageUri`` of ``k8s/serving``.

    files = repository_files(card, onnx_bytes)   # {"imgpipe-classifier/config.pbtxt": b"...", ...}

The model is :data:`MODEL_NAME` (the InferenceService's name, and the Model Registry's default
registered model), version :data:`VERSION`. ``config.pbtxt`` names the export's input
(``image``, ``C x S x S`` float32 after the card's preprocessing) and output (``logits``, one per
class) with the batch dimension left to Triton (``max_batch_size``), and ``labels.txt`` lists the
classes in output order, so Triton's classification extension answers with class names. Which
Triton and ONNX versions this was checked against: docs/deploy/serving.md, "Serving".

The model's folder also holds its card, ``model.json`` (:data:`CARD`, with ``files.onnx``
naming ``1/model.onnx``): Triton ignores a file there, and imgpipe's own runtime
(:mod:`imgpipe.serving.runtime`, ServingRuntime ``imgpipe-onnx``) serves the same
``storageUri`` from it, preprocessing included (docs/serving.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imgpipe.data.labels import check_class_name
from imgpipe.train.card import INPUT_NAME, OUTPUT_NAME

__all__ = [
    "MODEL_NAME",
    "VERSION",
    "REPOSITORY",
    "MAX_BATCH_SIZE",
    "LABELS",
    "CARD",
    "TRITON",
    "MAX_IR_VERSION",
    "MAX_OPSET",
    "triton_config",
    "check_loadable",
    "repository_files",
]

# The InferenceService's name (k8s/serving/inferenceservice.yaml) and the model's in the repository.
MODEL_NAME = "imgpipe-classifier"
# Triton versions are whole numbers; the repository holds the one promoted model.
VERSION = "1"
# The repository's folder below the promote prefix.
REPOSITORY = "serving"
# Triton batches requests up to this (the export's batch axis is dynamic).
MAX_BATCH_SIZE = 64
LABELS = "labels.txt"
# The model card beside config.pbtxt: what imgpipe's runtime (imgpipe.serving.runtime) loads.
CARD = "model.json"
# The Triton KServe runs for onnx in Kubeflow 1.11 and 26.03, and the newest ONNX its onnxruntime
# (1.15.0) loads: IR 9 (IR 10 is refused, measured), opset 19 (onnxruntime's compatibility
# table). docs/deploy/serving.md, "Serving", cites both.
TRITON = "tritonserver 23.05 (onnxruntime 1.15.0)"
MAX_IR_VERSION = 9
MAX_OPSET = 19


def triton_config(card: Mapping[str, Any], name: str = MODEL_NAME, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """``config.pbtxt`` (Triton's ``ModelConfig`` in protobuf text format) for the ONNX export a card describes."""
    size, channels, classes = int(card["input"]["size"]), int(card["input"]["channels"]), len(card["classes"])
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f'input [\n  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_FP32\n'
        f"    dims: [ {channels}, {size}, {size} ]\n  }}\n]\n"
        f'output [\n  {{\n    name: "{OUTPUT_NAME}"\n    data_type: TYPE_FP32\n    dims: [ {classes} ]\n'
        f'    label_filename: "{LABELS}"\n  }}\n]\n'
    )


def check_loadable(onnx: bytes) -> None:
    """Refuses an ONNX model the shipped Triton's onnxruntime cannot load (IR or opset too new).

    Raises:
        ValueError: In one line naming the model's versions, the runtime's and the fix.
    """
    from onnx import ModelProto  # only the header fields are needed; the parse is protobuf's

    model = ModelProto.FromString(onnx)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if model.ir_version > MAX_IR_VERSION or opset > MAX_OPSET:
        raise ValueError(
            f"the ONNX export is IR {model.ir_version}, opset {opset}; KServe's Triton runtime in Kubeflow 1.11 and 26.03, "
            f"{TRITON}, loads IR <= {MAX_IR_VERSION} and opset <= {MAX_OPSET}: export it again with this imgpipe "
            "(imgpipe.train.export writes IR 9, opset 18), or serve it from a newer Triton"
        )


def repository_files(card: Mapping[str, Any], onnx: bytes, name: str = MODEL_NAME) -> dict[str, bytes]:
    """The repository's files, by path below its root: ``config.pbtxt``, ``labels.txt``, ``model.json`` and ``1/model.onnx``.

    ``model.json`` is the card with ``files`` naming what the folder holds (``onnx``:
    ``1/model.onnx``), so that the folder is a model prefix :func:`imgpipe.train.card.read_card` reads.

    Raises:
        ValueError: If a class name is one clean would have rejected
            (:func:`imgpipe.data.labels.check_class_name`: ``labels.txt`` has one per line), or
            the model is one Triton cannot load (:func:`check_loadable`).
    """
    check_loadable(onnx)
    classes = [str(c) for c in card["classes"]]
    for index, c in enumerate(classes):
        bad = check_class_name(c)
        if bad is not None:
            raise ValueError(f"class {index} of the model card cannot be written to Triton's {LABELS}: {bad}; clean rejects such names (bad_label)")
    return {
        f"{name}/config.pbtxt": triton_config(card, name).encode(),
        f"{name}/{LABELS}": ("\n".join(classes) + "\n").encode(),
        f"{name}/{CARD}": (json.dumps({**card, "files": {"onnx": f"{VERSION}/model.onnx"}}, indent=2) + "\n").encode(),
        f"{name}/{VERSION}/model.onnx": onnx,
    }
