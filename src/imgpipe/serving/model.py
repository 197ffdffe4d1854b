"""The model behind imgpipe's serving runtime, without the server: finding it, checking it, answering a request.

:mod:`imgpipe.serving.runtime` puts this behind the ``kserve`` SDK's model server (the ``serve``
image); nothing here imports kserve, so the step images' venv, whose pandas 3 kserve 0.20
excludes, imports and tests it too (``make test`` runs the server itself from ``.venv/serve``).

The model directory is a model prefix, ``model.json`` beside the ONNX file its ``files.onnx``
names (a train output), or a folder holding one such prefix: the Triton repository a promotion
writes (:mod:`imgpipe.serving.triton`), which is what KServe's storage initializer puts in
``/mnt/models``. :func:`open_model` checks the ONNX graph against the card.

A request has one input, named as the card's (``image``), in one of two forms (docs/serving.md):

* ``BYTES``, shape ``[N]``: encoded pictures (JPEG, PNG, whatever clean accepts), each a base64
  string; they are prepared as ``imgpipe predict`` prepares raw images
  (:func:`imgpipe.serving.prepare.prepare_encoded`: clean's decode, the card's resize, the
  evaluation view, then the card's scaling and normalization);
* ``FP32``, shape ``[N, C, S, S]``: the model's input, prepared by the client (Triton's request).

The answer (:func:`answer`): ``logits`` and ``probabilities`` (FP32 ``[N, K]``, the softmax
``imgpipe predict`` computes), ``predicted`` (INT32 ``[N]``) and ``predicted_name`` (BYTES
``[N]``, the card's class names). What the model cannot take raises :class:`BadRequest`, which
the runtime answers as a 400.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe import contract, storage
from imgpipe.data.images import ImageRejected
from imgpipe.serving.prepare import prepare_encoded, softmax
from imgpipe.serving.triton import MAX_BATCH_SIZE
from imgpipe.train.card import read_card, to_input

__all__ = [
    "OUTPUTS",
    "DATATYPES",
    "MAX_IMAGES",
    "BadRequest",
    "locate",
    "open_model",
    "input_types",
    "output_types",
    "check_outputs",
    "model_input",
    "answer",
]

# The outputs of every answer, in order, and their v2 datatypes; a request may ask for some of them by name.
OUTPUTS = ("logits", "probabilities", "predicted", "predicted_name")
DATATYPES = {"logits": "FP32", "probabilities": "FP32", "predicted": "INT32", "predicted_name": "BYTES"}
# Pictures or tensors per request: Triton's max_batch_size for the same model (imgpipe.serving.triton).
MAX_IMAGES = MAX_BATCH_SIZE


class BadRequest(ValueError):
    """A request the model cannot take, in one sentence (the runtime's 400)."""


def locate(model_dir: str | Path) -> Path:
    """The model prefix in ``model_dir``: itself where it holds ``model.json``, else its one subfolder that does.

    Raises:
        ValueError: If there is none, or more than one.
    """
    root = Path(model_dir)
    if (root / contract.MODEL_CARD).is_file():
        return root
    found = sorted(p.parent for p in root.glob(f"*/{contract.MODEL_CARD}"))
    if len(found) != 1:
        held = f"{len(found)} ({', '.join(p.name for p in found)})" if found else "none"
        raise ValueError(f"{root} must hold one imgpipe model ({contract.MODEL_CARD} and its ONNX), in it or in one subfolder; it holds {held}")
    return found[0]


def _shape(dims: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "N" for d in dims) + "]"


def _graph_mismatch(card: Mapping[str, Any], session: Any) -> str | None:
    """How the ONNX graph differs from what the card says of its input and output; ``None``: they agree."""
    spec, classes = card["input"], len(card["classes"])
    want_in, want_out = [None, int(spec["channels"]), int(spec["size"]), int(spec["size"])], [None, classes]
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    name_in, name_out = spec.get("name"), (card.get("output") or {}).get("name")
    if len(ins) != 1 or name_in not in ins:
        return f"the graph's inputs are {sorted(ins)}, the card's is {name_in!r}"
    if name_out not in outs:
        return f"the graph's outputs are {sorted(outs)}, the card's is {name_out!r}"
    for what, node, want in (("input", ins[name_in], want_in), ("output", outs[name_out], want_out)):
        dims = list(node.shape)
        fixed = [d if isinstance(d, int) else None for d in dims]
        if node.type != "tensor(float)" or fixed != want:
            return f"{what} {node.name!r} is {node.type} {_shape(dims)}, the card says tensor(float) {_shape(want)}"
    return None


def open_model(model_dir: str | Path, threads: int = 1) -> tuple[Path, dict[str, Any], Any]:
    """``(prefix, card, onnxruntime session)`` of the model in ``model_dir``, its graph checked against its card.

    Raises:
        ValueError: In one line: no model, an unreadable card or ONNX, or a graph that is not
            the card's (input name, float32 ``N x C x S x S``; output name, ``N x classes``).
    """
    import onnxruntime as ort

    prefix = locate(model_dir)
    card = read_card(storage.normalize_uri(str(prefix)))
    name = card["files"].get("onnx")
    if not name:
        raise ValueError(f"{prefix} has no ONNX export ({card.get('export_failures', {}).get('model.onnx', 'not written')})")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(str(prefix / name), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; one line either way
        raise ValueError(f"onnxruntime cannot load {prefix / name}: {' '.join(str(exc).split())[:400]}") from None
    mismatch = _graph_mismatch(card, session)
    if mismatch:
        raise ValueError(f"{prefix}: the ONNX graph and {contract.MODEL_CARD} disagree: {mismatch}; not serving a model its card does not describe")
    return prefix, card, session


def input_types(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The model's input as the v2 metadata gives it (``-1``: any number of images)."""
    spec = card["input"]
    return [{"name": spec["name"], "datatype": "FP32", "shape": [-1, int(spec["channels"]), int(spec["size"]), int(spec["size"])]}]


def output_types(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The answer's outputs (:data:`OUTPUTS`) as the v2 metadata gives them."""
    k = len(card["classes"])
    shapes = {"logits": [-1, k], "probabilities": [-1, k], "predicted": [-1], "predicted_name": [-1]}
    return [{"name": name, "datatype": DATATYPES[name], "shape": shapes[name]} for name in OUTPUTS]


def check_outputs(wanted: Sequence[str]) -> None:
    """Raises :class:`BadRequest` if a request asks for an output the model does not answer."""
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise BadRequest(f"unknown output(s) {unknown}; this model answers {list(OUTPUTS)}")


def _numpy(tensor: Any) -> np.ndarray:
    try:
        return tensor.as_numpy()
    except (ValueError, TypeError) as exc:  # data that does not fill the shape, or is not numbers
        raise BadRequest(f"input {tensor.name!r}: its data is not a {tensor.datatype} tensor of shape {tensor.shape}: {exc}") from None


def model_input(card: Mapping[str, Any], spec: Any, inputs: Sequence[Any]) -> np.ndarray:
    """A request's inputs as the model's ``N x C x S x S`` float32.

    Args:
        card: The model's card.
        spec: Its resize settings (:func:`imgpipe.train.card.preprocessing_spec`), ``None``
            where it records none.
        inputs: The request's tensors, each with ``name``, ``datatype``, ``shape`` and
            ``as_numpy()`` (kserve's ``InferInput``).

    Raises:
        BadRequest: For anything else: another name or datatype, a shape that is not the
            model's, data that does not fill it, or a picture that cannot be prepared.
    """
    expected = card["input"]["name"]
    names = [i.name for i in inputs]
    if names != [expected]:
        raise BadRequest(f"the model takes one input named {expected!r}; the request has {names}")
    (tensor,) = inputs
    shape = list(tensor.shape)
    if not shape or not all(isinstance(d, int) and d >= 0 for d in shape) or not 1 <= shape[0] <= MAX_IMAGES:
        raise BadRequest(f"input {expected!r}: shape {shape}; the first axis counts images, 1 to {MAX_IMAGES} a request")
    if tensor.datatype == "BYTES":
        return _pictures(card, spec, tensor, shape)
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {expected!r} is {tensor.datatype}; send BYTES (encoded pictures, base64) or FP32 (the prepared tensor)")
    size, channels = int(card["input"]["size"]), int(card["input"]["channels"])
    if shape != [shape[0], channels, size, size]:
        raise BadRequest(f"input {expected!r}: FP32 shape {shape}; the model takes {_shape([None, channels, size, size])} (N x C x S x S)")
    return np.ascontiguousarray(_numpy(tensor), np.float32)


def _pictures(card: Mapping[str, Any], spec: Any, tensor: Any, shape: list[int]) -> np.ndarray:
    """Encoded pictures (base64 strings, or raw bytes) prepared as predict prepares raw images."""
    if len(shape) != 1:
        raise BadRequest(f"input {tensor.name!r}: BYTES shape {shape}; encoded pictures go as shape [N]")
    if spec is None or spec.roi_crop:
        why = "records no preprocessing (it predates it)" if spec is None else "crops to annotated boxes (roi_crop), absent here"
        raise BadRequest(f"this model's card {why}: send the prepared FP32 tensor instead of pictures")
    views = []
    for i, item in enumerate(_numpy(tensor).tolist()):
        try:
            data = item if isinstance(item, bytes) else base64.b64decode(str(item), validate=True)
            views.append(prepare_encoded(data, card, spec))
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"input {tensor.name!r}[{i}] is not base64: {exc}") from None
        except ImageRejected as exc:
            raise BadRequest(f"input {tensor.name!r}[{i}] is not a picture the model can take: {exc.reason}: {exc.detail}"[:500]) from None
        except Exception as exc:  # noqa: BLE001 - as predict: one picture that fails is the picture's fault (undecodable)
            raise BadRequest(f"input {tensor.name!r}[{i}] is undecodable: {type(exc).__name__}: {exc}"[:500]) from None
    return to_input(views, card)


def answer(card: Mapping[str, Any], session: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's answer to ``x`` (``N x C x S x S`` float32), by output name, in :data:`OUTPUTS` order."""
    (logits,) = session.run([card["output"]["name"]], {card["input"]["name"]: x})
    logits = np.asarray(logits, np.float32)
    probs = softmax(logits)
    top = np.argmax(probs, axis=1)  # the first of equal maxima, as predict's stable sort picks
    names = np.asarray(card["classes"], dtype=object)[top]
    return {"logits": logits, "probabilities": probs, "predicted": top.astype(np.int32), "predicted_name": names}
