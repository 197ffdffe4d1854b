"""Registering a promoted model in Kubeflow's Model Registry (optional: the ``model-registry`` client).

Where a team runs Kubeflow's Model Registry, :func:`register_model` records a train output as
a version of a registered model: the ONNX export's URI (``model-artifact``, format ``onnx``
at the export's opset), the run id as the version's name, and the model card's facts as the
version's custom properties (architecture, classes, input size, test metrics, which weights
were kept, the data's manifest digest). The train component calls it after a promotion when
``$IMGPIPE_MODEL_REGISTRY`` names the registry (set when compiling; the in-cluster service,
e.g. ``http://model-registry-service.kubeflow.svc.cluster.local:8080``); ``imgpipe register``
does it by hand. Registering the same version again is a no-op, so a retried task is safe.

The client (``model_registry.ModelRegistry``, model-registry 0.3) talks to the registry's REST
API (``/api/model_registry/v1``); in kubeflow/manifests v1.11.0 the in-cluster service admits
every caller (``applications/model-registry/upstream/options/istio/istio-authorization-policy.yaml``:
``action: ALLOW``, ``rules: [{}]``), and the client sends the pod's token when it has one.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from imgpipe import contract, storage
from imgpipe.train.card import read_card

__all__ = ["REGISTRY_ENV", "MODEL_NAME_ENV", "DEFAULT_MODEL_NAME", "register_model"]

log = logging.getLogger(__name__)

REGISTRY_ENV = "IMGPIPE_MODEL_REGISTRY"
MODEL_NAME_ENV = "IMGPIPE_REGISTERED_MODEL"
DEFAULT_MODEL_NAME = "imgpipe-classifier"
_AUTHOR = "imgpipe"


def _properties(prefix: str, card: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The card's facts as a version's custom properties (the registry keeps scalars only)."""
    test = (card.get("metrics") or {}).get("test") or {}
    out: dict[str, str | int | float | bool] = {
        "imgpipe_train_prefix": prefix,
        "architecture": str(card["architecture"]),
        "num_classes": int(card["num_classes"]),
        "classes": json.dumps(card["classes"]),
        "input_size": int(card["input"]["size"]),
        "channels": int(card["input"]["channels"]),
        "kept_weights": str((card.get("selection") or {}).get("weights", "model")),
        "data_manifest_sha256": str(card["data"]["manifest_sha256"]),
    }
    for key in ("accuracy", "macro_f1", "pr_auc"):
        if test.get(key) is not None:
            out[f"test_{key}"] = float(test[key])
    return out


def register_model(prefix: str, version: str, address: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Registers the train output ``prefix`` as ``version`` of the registered model ``name``.

    Args:
        prefix: A committed train output with ``model.json`` and ``model.onnx``.
        version: The version's name (the run id); registering it twice is a no-op.
        address: The registry (``http(s)://host[:port]``); default ``$IMGPIPE_MODEL_REGISTRY``.
        name: The registered model; default ``$IMGPIPE_REGISTERED_MODEL`` or ``imgpipe-classifier``.

    Returns:
        What was registered (``registered_model_id``, ``name``, ``version``, ``uri``, ``created``).

    Raises:
        ValueError: If no registry is named, the model has no card or ONNX export, or the
            ``model-registry`` client is not installed.
    """
    address = address or os.environ.get(REGISTRY_ENV, "")
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"name the Model Registry as http(s)://host[:port] (or ${REGISTRY_ENV}), got {address!r}")
    name = name or os.environ.get(MODEL_NAME_ENV) or DEFAULT_MODEL_NAME
    prefix = storage.normalize_uri(prefix)
    contract.read_manifest(prefix, expect_step="train")
    card = read_card(prefix)
    if not card["files"].get("onnx"):
        raise ValueError(f"{prefix} has no ONNX export to register ({card.get('export_failures')})")
    try:
        from model_registry import ModelRegistry
    except ImportError as exc:
        raise ValueError("registering needs the model-registry client: pip install 'imgpipe[registry]'") from exc
    registry = ModelRegistry(server_address=address, author=_AUTHOR, is_secure=address.startswith("https://"))
    uri = storage.join(prefix, card["files"]["onnx"])
    existing = registry.get_registered_model(name)
    if existing is not None and registry.get_model_version(name, version) is not None:
        log.info("register: %s version %s is registered already", name, version)
        return {"registered_model_id": existing.id, "name": name, "version": version, "uri": uri, "created": False}
    model = registry.register_model(
        name, uri, model_format_name="onnx", model_format_version=str(card.get("onnx_opset", "")), version=version,
        version_description=f"{card['architecture']} on {card['data']['uri']}", metadata=_properties(prefix, card),
    )  # fmt: skip
    log.info("register: %s version %s -> %s (%s)", name, version, address, uri)
    return {"registered_model_id": model.id, "name": name, "version": version, "uri": uri, "created": True}
