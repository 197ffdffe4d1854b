"""The Kubernetes API as imgpipe's remote jobs use it: credentials, one kind of custom object, refusals in one line.

    api = load_api()                                     # in-cluster service account, else kubeconfig
    rayjobs = CustomObjects(api, "ray.io", "v1", "rayjobs", "RayJob", role="k8s/base/role-rayjobs.yaml")
    obj = rayjobs.get(namespace, name)                   # None when absent
    obj, created = rayjobs.create_or_attach(body)        # 409: the existing one
    rayjobs.delete(namespace, name)                      # a refusal is a warning

A call the service account may not make (403) becomes one line naming the verb, the resource,
the namespace and the account the API server saw, and the Role that grants it
(:func:`forbidden_message`); a 403 that is an admission webhook's denial quotes the webhook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_ID_LABEL",
    "STEP_LABEL",
    "PULL_SECRETS_ENV",
    "load_api",
    "load_core_api",
    "current_namespace",
    "status_code",
    "admission_denial",
    "forbidden_message",
    "account_name",
    "api_failure",
    "field_at",
    "label_value",
    "pull_secrets",
    "run_metadata",
    "CustomObjects",
    "ObjectTarget",
]

log = logging.getLogger(__name__)

# Every object a remote step creates carries these (kubectl delete rayjobs -l imgpipe.dev/run-id=...).
RUN_ID_LABEL = "imgpipe.dev/run-id"
STEP_LABEL = "imgpipe.dev/step"
# The Secrets pods pull the step images with (a private registry), comma-separated; set at
# compile time on the tasks that create pods (imgpipe compile; docs/deploy/install.md, "Private registries").
PULL_SECRETS_ENV = "IMGPIPE_IMAGE_PULL_SECRETS"
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
# The API server's refusal names the user: `<resource> ["<name>"] is forbidden: User "<user>"
# cannot <verb> resource ...` (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/
# handlers/responsewriters/errors.go, forbiddenMessage).
_FORBIDDEN_USER = re.compile(r'User "([^"]*)"')
_SA_USER = re.compile(r"system:serviceaccount:([^:]+):(.+)")
_RBAC_HINT = '{role}, bound to imgpipe-pipeline; docs/deploy/permissions.md, "RBAC"'


def _load_config() -> None:
    """The Kubernetes client's configuration: in-cluster service account first, then kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def load_api() -> Any:
    """A ``CustomObjectsApi`` (see :func:`_load_config` for the credentials)."""
    from kubernetes import client

    _load_config()
    return client.CustomObjectsApi()


def load_core_api() -> Any:
    """A ``CoreV1Api`` (pods and their logs) with the same credentials as :func:`load_api`."""
    from kubernetes import client

    _load_config()
    return client.CoreV1Api()


def current_namespace() -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else ``default``."""
    if _SA_NAMESPACE.is_file():
        return _SA_NAMESPACE.read_text().strip()
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts()
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: load_api reports that, with its own message
        return "default"


def status_code(exc: Exception) -> int | None:
    """The HTTP status of a Kubernetes client's ``ApiException`` (``None`` for any other error)."""
    return getattr(exc, "status", None)


def _status_message(exc: Exception) -> str:
    """The ``message`` of the API server's ``Status`` body, or the body as text."""
    body = getattr(exc, "body", None)
    try:
        return str(json.loads(body).get("message", "")) if body else ""
    except (TypeError, ValueError, AttributeError):
        return str(body)


def admission_denial(exc: Exception) -> str | None:
    """The webhook's own message when a 403 is an admission webhook's denial, not RBAC's.

    The API server answers a validating webhook's ``allowed: false`` with 403 and the message
    ``admission webhook "NAME" denied the request: REASON`` (k8s.io/apiserver
    ``pkg/admission/plugin/webhook/errors``); RBAC's 403 says ``... is forbidden: User ...``.
    """
    message = _status_message(exc)
    return message.splitlines()[0][:1000] if message.startswith("admission webhook ") else None


def _caller(exc: Exception) -> str:
    """Who the API server refused, from its message; else where this process's credentials come from."""
    message = _status_message(exc)
    found = _FORBIDDEN_USER.search(message)
    if found:
        return account_name(found.group(1))
    return "this pod's service account" if _SA_NAMESPACE.is_file() else "the kubeconfig's user"


def account_name(user: str) -> str:
    """A Kubernetes user as a message names it: ``service account NS/NAME`` or ``user NAME``."""
    sa = _SA_USER.fullmatch(user)
    return f"service account {sa.group(1)}/{sa.group(2)}" if sa else f"user {user}"


def forbidden_message(exc: Exception, verb: str, resource: str, namespace: str, doing: str, role: str = "k8s/base/role-rayjobs.yaml") -> str:
    """One line for a 403: what was refused, to whom, and where the grant belongs.

    A 403 that is an admission webhook's denial (a TrainJob's runtime missing, a reserved
    variable) is no RBAC matter: the line quotes the webhook's own message instead.

    Args:
        exc: The ``ApiException`` (its body names the user the API server saw).
        verb: The RBAC verb of the call (``create``, ``get``, ``list``, ``delete``).
        resource: The RBAC resource, ``rayjobs.ray.io``, ``pods`` or ``pods/log``.
        namespace: The namespace of the call.
        doing: What imgpipe was doing, e.g. ``create RayJob ml/x``.
        role: The manifest of the Role that grants it.
    """
    denial = admission_denial(exc)
    if denial is not None:
        return f"the Kubernetes API refused to {doing} (403): {denial}"
    return (
        f"the Kubernetes API refused to {doing} (403 Forbidden): {_caller(exc)} may not {verb} {resource} "
        f"in namespace {namespace}; grant it to the run's service account ({_RBAC_HINT.format(role=role)})"
    )


def api_failure(exc: Exception, doing: str) -> RuntimeError:
    """One line for an API error that is neither a refusal (403) nor an absence (404).

    The client's own ``str`` of an ``ApiException`` runs over several lines (its headers and
    body); this keeps the status, the API server's message and, for a 401, what to renew.
    """
    code, reason = status_code(exc), getattr(exc, "reason", None) or type(exc).__name__
    if code == 401:
        whose = "this pod's service account token" if _SA_NAMESPACE.is_file() else "the kubeconfig's credentials"
        return RuntimeError(
            f"the Kubernetes API did not accept {whose} to {doing} (401 Unauthorized): they expired or were revoked "
            "(a pod's projected token is renewed by its kubelet; a kubeconfig's, by whoever issued it)"
        )
    message = " ".join(_status_message(exc).split())[:500]
    return RuntimeError(f"the Kubernetes API failed to {doing} ({code} {reason})" + (f": {message}" if message else ""))


def field_at(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` in a nested mapping (a custom object), ``None`` where it is absent."""
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def label_value(text: str) -> str:
    """``text`` as a Kubernetes label value: itself when valid, else a readable prefix plus a digest."""
    if _LABEL_VALUE.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    head = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:50].strip("-_.")
    return f"{head}-{digest}" if head else digest


def pull_secrets(text: str | None = None) -> tuple[str, ...]:
    """The names :data:`PULL_SECRETS_ENV` lists.

    Raises:
        ValueError: For a name that is not a Secret's (a DNS subdomain).
    """
    text = os.environ.get(PULL_SECRETS_ENV, "") if text is None else text
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", n)]
    if bad:
        raise ValueError(f"${PULL_SECRETS_ENV}: {bad} are not Secret names (lower-case DNS subdomains, comma-separated)")
    return names


def run_metadata(run_id: str, base: str, step: str, attempt: int) -> tuple[dict[str, str], dict[str, str]]:
    """The labels and annotations of a run's object: run id and step as label values, the full run id and attempt as annotations."""
    labels = {RUN_ID_LABEL: label_value(run_id or base), STEP_LABEL: label_value(step)}
    return labels, {"imgpipe.io/run-id": run_id, "imgpipe.io/attempt": str(attempt)}


@dataclass(frozen=True)
class CustomObjects:
    """One kind of namespaced custom object through a ``CustomObjectsApi``, with refusals in one line.

    Attributes:
        api: The ``CustomObjectsApi``.
        group: API group (``ray.io``).
        version: API version (``v1``).
        plural: Resource name (``rayjobs``).
        kind: Kind, for messages (``RayJob``).
        role: The manifest of the Role that grants the calls (named in a 403's message).
        field_validation: Sent with a create (``Strict``: the API server refuses unknown fields with 400).
        on_create_error: Called with the ``ApiException`` of a create before the shared handling; it may raise.
    """

    api: Any
    group: str
    version: str
    plural: str
    kind: str
    role: str
    field_validation: str | None = None
    on_create_error: Callable[[Exception, str, str], None] | None = None

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"

    def refused(self, exc: Exception, verb: str, namespace: str, doing: str) -> RuntimeError:
        """The one-line error of a 403."""
        return RuntimeError(forbidden_message(exc, verb, self.resource, namespace, doing, self.role))

    def get(self, namespace: str, name: str, doing: str | None = None) -> dict[str, Any] | None:
        """The object, ``None`` if there is none.

        Raises:
            RuntimeError: If RBAC refuses the read (naming the permission), or any other API error, in one line.
        """
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(self.group, self.version, namespace, self.plural, name)
        except ApiException as exc:
            if status_code(exc) == 404:
                return None
            doing = doing or f"read {self.kind} {namespace}/{name}"
            if status_code(exc) == 403:
                raise self.refused(exc, "get", namespace, doing) from None
            raise api_failure(exc, doing) from None

    def create_or_attach(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Creates the object, or returns the existing one of that name (409 AlreadyExists).

        Returns:
            The object as the API server has it, and whether this call created it.

        Raises:
            RuntimeError: If RBAC refuses the create (403), in one line naming the permission; any other API error in one line.
        """
        from kubernetes.client.exceptions import ApiException

        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        extra = {"field_validation": self.field_validation} if self.field_validation else {}
        try:
            return self.api.create_namespaced_custom_object(self.group, self.version, namespace, self.plural, body, **extra), True
        except ApiException as exc:
            if self.on_create_error is not None:
                self.on_create_error(exc, namespace, name)
            if status_code(exc) == 403:
                raise self.refused(exc, "create", namespace, f"create {self.kind} {namespace}/{name}") from None
            if status_code(exc) != 409:
                raise api_failure(exc, f"create {self.kind} {namespace}/{name}") from None
        existing = self.get(namespace, name)
        if existing is None:  # deleted between the two calls: a retry creates it again
            raise RuntimeError(f"{self.kind} {namespace}/{name} already existed but is gone now; retry")
        return existing, False

    def delete(self, namespace: str, name: str) -> bool:
        """Deletes one object (what it owns follows, in the background); a refusal or failure is a warning."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(self.group, self.version, namespace, self.plural, name, propagation_policy="Background")
            return True
        except ApiException as exc:
            if status_code(exc) == 403:
                log.warning("%s", forbidden_message(exc, "delete", self.resource, namespace, f"delete {self.kind} {namespace}/{name}", self.role))
            elif status_code(exc) != 404:
                log.warning("could not delete %s %s/%s: %s", self.kind, namespace, name, exc)
            return False


class ObjectTarget:
    """What a remote job whose attempts are custom objects shares (:class:`imgpipe.remote.runner.RemoteJob`).

    The subclass has ``objects`` (:class:`CustomObjects`) and ``namespace``.
    """

    objects: CustomObjects
    namespace: str

    def find(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(self.namespace, name)

    def clean_up(self, names: list[str]) -> None:
        for name in names:  # what each owns (a Ray cluster, a JobSet and its pods) follows
            self.objects.delete(self.namespace, name)
