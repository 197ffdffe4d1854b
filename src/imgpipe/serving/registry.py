"""Registering a promoted model in Kubeflow's Model Registry (optional: the ``model-registry`` client).

Where a team runs Kubeflow's Model Registry, :func:`register_model` records a train output as
a version of a registered model: the ONNX export's URI (``model-artifact``, format ``onnx``
at the export's opset), the run id as the version's name, and the model card's facts as the
version's custom properties (architecture, classes, input size, test metrics, which weights
were kept, the data's manifest digest). The train component calls it after a promotion when
``$IMGPIPE_MODEL_REGISTRY`` names the registry (set when compiling; the in-cluster service,
e.g. ``http://model-registry-service.kubeflow.svc.cluster.local:8080``); ``imgpipe register``
does it by hand. Registering the same version again is a no-op, so a retried task is safe.

The client (``model_registry.ModelRegistry``, model-registry 0.3.5 to 0.3.11) speaks the REST
API the servers Kubeflow ships serve, ``/api/model_registry/v1alpha3`` (which versions, and why
not a newer client: docs/deploy/serving.md, "Model Registry"). A registry that answers another API
version is named in one line (:class:`RegistryError`). The client sends the pod's token when it
has one.

In the pipeline, :func:`register_promoted` runs after the gate promotes a model and before the
decision is committed and ``latest.json`` moves: a registration that fails fails the train task
and promotes nothing, so a run is never half-promoted; ``$IMGPIPE_MODEL_REGISTRY_OPTIONAL=1``
makes a failure a warning instead.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from imgpipe import contract, storage
from imgpipe.config_flags import env_flag
from imgpipe.train.card import read_card

__all__ = [
    "REGISTRY_ENV",
    "OPTIONAL_ENV",
    "MODEL_NAME_ENV",
    "DEFAULT_MODEL_NAME",
    "API_PATH",
    "RegistryError",
    "register_model",
    "register_promoted",
]

log = logging.getLogger(__name__)

REGISTRY_ENV = "IMGPIPE_MODEL_REGISTRY"
OPTIONAL_ENV = "IMGPIPE_MODEL_REGISTRY_OPTIONAL"
# The REST API the client speaks, and the one newer servers (Kubeflow Hub) serve instead.
API_PATH = "/api/model_registry/v1alpha3"
_NEWER_API_PATH = "/api/model_registry/v1"
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
    uri = storage.join(prefix, card["files"]["onnx"])
    try:
        registry = ModelRegistry(server_address=address, author=_AUTHOR, is_secure=address.startswith("https://"))
        existing = registry.get_registered_model(name)
        if existing is not None and registry.get_model_version(name, version) is not None:
            log.info("register: %s version %s is registered already", name, version)
            return {"registered_model_id": existing.id, "name": name, "version": version, "uri": uri, "created": False}
        model = registry.register_model(
            name,
            uri,
            model_format_name="onnx",
            model_format_version=str(card.get("onnx_opset", "")),
            version=version,
            version_description=f"{card['architecture']} on {card['data']['uri']}",
            metadata=_properties(prefix, card),
        )
    except Exception as exc:  # noqa: BLE001 - whatever the client raises becomes one line naming the server
        raise RegistryError(_diagnose(address, name, version, exc)) from exc
    log.info("register: %s version %s -> %s (%s)", name, version, address, uri)
    return {"registered_model_id": model.id, "name": name, "version": version, "uri": uri, "created": True}


class RegistryError(ValueError):
    """A registration the Model Registry refused or could not take, in one line naming the server and the fix."""


def _answers(address: str, path: str) -> int | None:
    """The HTTP status of ``GET {address}{path}/registered_models?pageSize=1``; ``None`` if nothing answers."""
    import requests  # only once a registration failed

    try:
        return requests.get(f"{address.rstrip('/')}{path}/registered_models", params={"pageSize": 1}, timeout=10).status_code
    except requests.RequestException:
        return None


def _diagnose(address: str, name: str, version: str, exc: Exception) -> str:
    """Why registering failed, as one line: a registry on another API version, none there, or the client's error."""
    what = f"registering {name} version {version} at the Model Registry {address}"
    ours, newer = _answers(address, API_PATH), _answers(address, _NEWER_API_PATH)
    if ours is None:
        return f"{what}: nothing answers there; check ${REGISTRY_ENV} (the in-cluster service, port 8080)"
    if ours == 404 and newer is not None and newer != 404:
        return (
            f"{what}: the server serves {_NEWER_API_PATH} (a Kubeflow Hub / model-registry server newer than "
            f"v0.3.x), not {API_PATH}, the API of the servers Kubeflow 1.10 to 26.03 ship, which imgpipe's "
            "client (model-registry 0.3.5 to 0.3.11) speaks; point it at a v0.3.x registry"
        )
    detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return f"{what} failed ({API_PATH} answers {ours}): {type(exc).__name__}: {detail}"


def register_promoted(prefix: str, version: str) -> dict[str, Any] | None:
    """Registers a promoted train output where the operator named a registry (``$IMGPIPE_MODEL_REGISTRY``).

    Returns:
        What :func:`register_model` returned; ``None`` with no registry named, or when it
        failed and ``$IMGPIPE_MODEL_REGISTRY_OPTIONAL`` is ``1`` (logged as a warning).

    Raises:
        RegistryError: If registering failed and the registry is not optional.
    """
    if not os.environ.get(REGISTRY_ENV):
        return None
    try:
        return register_model(prefix, version)
    except ValueError as exc:
        if env_flag(os.environ, OPTIONAL_ENV):
            log.warning("register: %s; promoting without it (%s=1)", exc, OPTIONAL_ENV)
            return None
        raise RegistryError(f"{exc}; nothing was promoted (set {OPTIONAL_ENV}=1 to promote without registering)") from exc
