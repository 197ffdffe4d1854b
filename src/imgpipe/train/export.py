"""The kept model in forms that run without imgpipe: ONNX, TorchScript, and the card that says how to feed them.

``model.json`` (:func:`model_card`) is the one description of a trained model that
:mod:`imgpipe.steps.predict` and any serving stack need: the architecture, the input
(clean's decode: EXIF orientation applied and the mode normalized; side, the evaluation
view (a resize and centre crop only where the train step's evaluation made one), scale,
mean and std, channels), the class
names in output order, the recipe, the metrics and which weights were kept, and the
digest of the data's manifest. Reading it back (no torch) is :mod:`imgpipe.train.card`.

ONNX comes from torch's exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript)
with a dynamic batch axis; TorchScript from ``torch.jit.trace``. Both take the kept
weights on the CPU in float32, whatever the run trained with.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from imgpipe import __version__, contract
from imgpipe.data.images import NORMALIZATION
from imgpipe.serving import triton as serving
from imgpipe.train.card import CARD_FORMAT, INPUT_NAME, OUTPUT_NAME, preprocessing_of, view_of

__all__ = ["OPSET", "MAX_IR_VERSION", "export_onnx", "export_torchscript", "model_card"]

log = logging.getLogger(__name__)

# A current opset that onnxruntime 1.20+ runs in full, and that the Triton KServe ships runs.
OPSET = 18
# The newest ONNX IR version that KServe's Triton runs (imgpipe.serving.triton.MAX_IR_VERSION); the
# exporter writes IR 10, which it refuses.
MAX_IR_VERSION = serving.MAX_IR_VERSION
# The exporter's dynamic batch axis needs a bound; no serving batch comes near it.
_MAX_BATCH = 1 << 16


def _cpu_copy(module: nn.Module) -> nn.Module:
    """The model for export: a float32 copy on the CPU, in evaluation mode, contiguous memory."""
    model = copy.deepcopy(module).float().cpu().eval()
    return model.to(memory_format=torch.contiguous_format)


def export_onnx(module: nn.Module, size: int, channels: int) -> bytes:
    """``module`` as an ONNX model: input ``image`` (``N x C x size x size`` float32, N dynamic), output ``logits``."""
    model = _cpu_copy(module)
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    # The exporter reports its progress on stdout; a step's log is for the step.
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
        )
    buf = io.BytesIO()
    program.save(buf)
    return _at_most_ir(buf.getvalue(), MAX_IR_VERSION)


def _at_most_ir(data: bytes, version: int) -> bytes:
    """The model with its IR version lowered to ``version``, once the checker finds nothing of a newer IR in it."""
    import onnx

    model = onnx.load_from_string(data)
    if model.ir_version <= version:
        return data
    model.ir_version = version
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def export_torchscript(module: nn.Module, size: int, channels: int) -> bytes:
    """``module`` traced to TorchScript (for libtorch and serving stacks that load it)."""
    model = _cpu_copy(module)
    with warnings.catch_warnings(), torch.no_grad():
        # torch marks TorchScript deprecated in favour of torch.export; runtimes still load it.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, torch.zeros(1, channels, size, size))
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def model_card(
    *,
    architecture: str,
    classes: Sequence[str],
    size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    recipe: Mapping[str, Any],
    metrics: Mapping[str, Any],
    selection: Mapping[str, Any],
    data: str,
    files: Mapping[str, str | None],
    failures: Mapping[str, str] | None = None,
    divergence: Mapping[str, Any] | None = None,
    whole: bool = False,
    stored_size: int | None = None,
) -> dict[str, Any]:
    """``model.json``: everything needed to run the model and to know what it is.

    Args:
        architecture: The torchvision model name (or ``tiny_cnn``).
        classes: Class names in output order.
        size: The input side.
        channels: 1 (grey) or 3 (RGB).
        mean: Per-channel mean of the normalization (after scaling to [0, 1]).
        std: Per-channel std.
        recipe: The resolved train config.
        metrics: The kept weights' validation and the test metrics.
        selection: Which weights were kept, and why.
        data: The resize output it trained on.
        files: Export name (``onnx``, ``torchscript``, ``state_dict``) -> file, ``None`` when missing.
        failures: Export name -> why it is missing.
        divergence: The run's divergence record (``metrics.json``'s ``divergence``); a
            diverged model says so in ``diverged``, and promotion refuses it.
        whole: The evaluation splits hold whole pictures (resize mode ``whole``).
        stored_size: The side resize stored the evaluation images at (``None``: ``size``).
    """
    manifest = contract.read_side_file(data, contract.MANIFEST)
    preprocessing = preprocessing_of(json.loads(manifest))
    if preprocessing is not None:
        preprocessing = {**preprocessing, "channels": channels, "normalization": {"mean": list(mean), "std": list(std)}}
    return {
        "format": CARD_FORMAT,
        "created_by": f"imgpipe {__version__}",
        "diverged": bool((divergence or {}).get("diverged")),
        "architecture": architecture,
        "classes": list(classes),
        "num_classes": len(classes),
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels,
            "mode": "L" if channels == 1 else "RGB",
            # clean's decode of every picture before the resize below: EXIF orientation and modes.
            **copy.deepcopy(NORMALIZATION),
            "size": size,
            # What prediction does to a stored (resized) picture: only what the train step's evaluation did.
            **view_of(size, whole=whole, stored_size=stored_size),
            "scale": 1 / 255,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        },
        "output": {"name": OUTPUT_NAME, "activation": "softmax"},
        "files": dict(files),
        "export_failures": dict(failures or {}),
        "onnx_opset": OPSET,
        "recipe": dict(recipe),
        "metrics": dict(metrics),
        "selection": dict(selection),
        "divergence": dict(divergence or {}),
        "data": {"uri": data, "manifest_sha256": hashlib.sha256(manifest).hexdigest()},
        # The resize step's preprocessing of the data it trained on: what predict repeats on raw images.
        "preprocessing": preprocessing,
    }
