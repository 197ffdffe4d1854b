"""Kubeflow Pipelines refusing a call (multi-user authorization), said in one line a user can act on.

    call("upload pipeline imgpipe into team-a", "create", "pipelines", "team-a", api.upload, ...)

The account, verb, resource and namespace the server named, and the Role that grants them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import urllib3.exceptions

from imgpipe.kfp.connect import caller
from imgpipe.remote.kube import account_name

__all__ = ["KFP_GROUP", "refusal_message", "rejection_message", "unavailable_message", "one_line", "call"]

KFP_GROUP = "pipelines.kubeflow.org"
# How long a read KFP cannot answer is tried again before the call gives up (:func:`call`).
READ_RETRY_S = 120.0
log = logging.getLogger(__name__)
# What the API server's PermissionDenied says (util.NewPermissionDeniedError in
# resource_manager.go IsAuthorized): "User '<user>' is not authorized with reason: ...
# (request: &ResourceAttributes{Namespace:...,Verb:...,Group:...,Version:...,Resource:...,".
_DENIED_USER = re.compile(r"User '([^']*)' is not authorized")
_DENIED_FIELD = re.compile(r"\b(Namespace|Verb|Resource):([^,}]*)")
# The upload endpoints answer a refused authorization with HTTP 400 and only these words
# (pipeline_upload_server.go uploadPipeline/uploadPipelineVersion, writeErrorToResponse).
_UPLOAD_REFUSED = ("Failed to create a pipeline", "Failed to create a pipeline version")


def refusal_message(exc: Exception, verb: str, resource: str, namespace: str | None, doing: str) -> str | None:
    """One line for KFP's refusal of a call, or ``None`` when ``exc`` is no refusal.

    The verb, resource and namespace are the server's own where its message names them
    (a call may check more than one: creating an experiment lists first), else the ones
    given; the account is the server's, else the subject of this process's token.

    Args:
        exc: What the call raised (a ``kfp_server_api`` ``ApiException``).
        verb: The verb KFP checks for the call (``list``, ``create``, ``get``, ``delete``).
        resource: The ``pipelines.kubeflow.org`` resource (``pipelines``, ``experiments``,
            ``runs``, ``jobs``).
        namespace: The namespace of the call.
        doing: What imgpipe was doing, e.g. ``upload pipeline 'imgpipe' into team-a``.
    """
    status, message = _status_and_message(exc)
    if status == 400 and message.strip() in _UPLOAD_REFUSED:
        how = f"HTTP 400 {message.strip()!r}, the upload endpoint's answer to a refused authorization"
    elif status == 403:
        how = "HTTP 403 PermissionDenied"
    else:
        return None
    fields = dict(_DENIED_FIELD.findall(message))
    verb, resource = fields.get("Verb") or verb, fields.get("Resource") or resource
    namespace = fields.get("Namespace") or namespace or "(no namespace)"
    denied = _DENIED_USER.search(message)
    user = denied.group(1) if denied else caller()
    who = account_name(user) if user else "the caller"
    return (
        f"Kubeflow Pipelines refused to {doing} ({how}): {who} may not {verb} {resource}.{KFP_GROUP} in "
        f"namespace {namespace}; grant it with a Role bound to that account in {namespace} (the retraining "
        'submitter\'s: k8s/base/role-retrain.yaml; docs/deploy/permissions.md, "RBAC")'
    )


def _status_and_message(exc: Exception) -> tuple[Any, str]:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    return getattr(exc, "status", None), str(payload.get("message") or payload.get("error_message") or body or "")


def rejection_message(exc: Exception, doing: str) -> str | None:
    """One line for a call the API server rejected as invalid (HTTP 400: a run parameter the pipeline's
    version does not take, or of the wrong type), naming what it named; ``None`` for any other error.
    """
    status, message = _status_and_message(exc)
    if status != 400 or not message.strip() or message.strip() in _UPLOAD_REFUSED:
        return None
    said = " ".join(message.split())[:500]  # the server's words, on one line
    return f"Kubeflow Pipelines rejected the request to {doing} (HTTP 400): {said}"


def unavailable_message(exc: Exception) -> str | None:
    """The server's trouble on one line when ``exc`` is KFP being unavailable, not refusing: an HTTP 5xx
    (its database or metadata store down: the API server answers 500 with the cause) or no answer at all
    (connection refused or reset, a timeout, the Service without endpoints); ``None`` for anything else.
    """
    status, message = _status_and_message(exc)
    if isinstance(status, int) and status >= 500:
        return f"HTTP {status}: {_clip(' '.join(message.split())) or getattr(exc, 'reason', '')}"
    if isinstance(exc, (ConnectionError, TimeoutError, urllib3.exceptions.HTTPError)):
        return f"no answer ({type(exc).__name__}: {_clip(' '.join(str(exc).split()))})"
    return None


def _clip(text: str, head: int = 150, tail: int = 250) -> str:
    """``text`` shortened in its middle: KFP's errors chain their causes, the first and the last say most."""
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def call(doing: str, verb: str, resource: str, namespace: str | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a KFP refusal, rejection or outage raised as one line (:func:`refusal_message`,
    :func:`rejection_message`, :func:`unavailable_message`).

    A read (``list``, ``get``) KFP cannot answer (:func:`unavailable_message`: its database restarting,
    its pod replaced) is tried again for up to :data:`READ_RETRY_S`; a write is not, as it may have
    taken effect.

    Raises:
        RuntimeError: If KFP refuses or rejects the call, or stays unavailable.
    """
    deadline = time.monotonic() + (READ_RETRY_S if verb in ("list", "get") else 0.0)
    delay = 1.0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            trouble = unavailable_message(exc)
            if trouble is not None and time.monotonic() + delay < deadline:
                log.warning("Kubeflow Pipelines could not %s (%s); trying again in %.0f s", doing, trouble, delay)
                time.sleep(delay)
                delay = min(2 * delay, 15.0)
                continue
            said = one_line(exc, verb, resource, namespace, doing)
            if said is exc:
                raise
            raise said from None


def one_line(exc: Exception, verb: str, resource: str, namespace: str | None, doing: str) -> Exception:
    """A ``RuntimeError`` of one line for KFP's refusal, rejection or outage in ``exc``; else ``exc`` itself."""
    trouble = unavailable_message(exc)
    if trouble is not None:
        return RuntimeError(f"Kubeflow Pipelines is unavailable: could not {doing} ({trouble})")
    message = refusal_message(exc, verb, resource, namespace, doing) or rejection_message(exc, doing)
    return exc if message is None else RuntimeError(message)
