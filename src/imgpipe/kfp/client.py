"""Compiling, submitting and scheduling the pipeline on Kubeflow Pipelines.

    submit(["data_root=s3://b/imgpipe"], target=Target(host=..., namespace="team-a")); schedule("0 0 3 * * *", params, target=...)

How it works in detail: docs/internals.md, "imgpipe.kfp.client".
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imgpipe.config import coerce
from imgpipe.kfp.artifacts import PIPELINE_NAME
from imgpipe.steps.audit import AUDIT_PIPELINE_NAME
from imgpipe.sweep import SWEEP_PIPELINE_NAME

__all__ = [
    "PIPELINES",
    "DEFAULT_EXPERIMENT",
    "TERMINAL_STATES",
    "validate_cron",
    "import_pipelines",
    "pipeline_inputs",
    "parse_params",
    "params_from_env",
    "collect_params",
    "compile_package",
    "package_digest",
    "version_name",
    "connect",
    "refusal_message",
    "ensure_pipeline_version",
    "Submitted",
    "Scheduled",
    "Target",
    "submit",
    "schedule",
]

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "imgpipe"
# The pipelines imgpipe compiles and submits: the pipeline, and the augmentation sweep over its data steps.
PIPELINES = (PIPELINE_NAME, SWEEP_PIPELINE_NAME, AUDIT_PIPELINE_NAME)
TOKEN_ENV = "KF_PIPELINES_TOKEN"
HOST_ENV = "KF_PIPELINES_ENDPOINT"
EXPERIMENT_ENV = "IMGPIPE_EXPERIMENT"
NAMESPACE_ENV = "IMGPIPE_KFP_NAMESPACE"
SERVICE_ACCOUNT_ENV = "IMGPIPE_SERVICE_ACCOUNT"
# The account k8s/base creates for imgpipe's runs (k8s/base/serviceaccount-pipeline.yaml): the
# only one the RayJob Role is bound to. Runs in a profile namespace use it unless told otherwise.
PIPELINE_SERVICE_ACCOUNT = "imgpipe-pipeline"
GPU_ENV = "IMGPIPE_TRAIN_GPU"
# GPUs (one training process each) the train task gets, when it runs on GPU nodes.
GPUS_ENV = "IMGPIPE_TRAIN_GPUS"
PARAM_ENV_PREFIX = "IMGPIPE_PARAM_"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"})
_EQUALS = 1  # kfp filter.proto Predicate.Operation.EQUALS

# ----------------------------------------------------------------------------------------
# Cron: KFP's scheduler parses six fields, seconds first (robfig/cron), e.g. "0 0 3 * * *".

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# name, lowest, highest, names for lowest.. (month names start at 1, day names at 0), '?' allowed
_CRON_FIELDS = (
    ("second", 0, 59, (), False),
    ("minute", 0, 59, (), False),
    ("hour", 0, 23, (), False),
    ("day of month", 1, 31, (), True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _DAYS, True),
)
_CRON_ITEM = re.compile(r"^(?P<base>\*|\?|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>\d+))?$")


def _cron_value(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    if names and text.upper() in names:
        return names.index(text.upper()) + low
    if not text.isdigit():
        raise ValueError(f"{name} {text!r} is not a number" + (f" or one of {','.join(names)}" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}-{high}")
    return value


def validate_cron(expression: str) -> str:
    """Checks a KFP cron expression and returns it with single spaces.

    KFP recurring runs take six fields, seconds first: ``second minute hour
    day-of-month month day-of-week`` (``"0 0 3 * * *"`` is 03:00:00 every day). A
    five-field crontab line is refused with the six-field form to use instead.

    Raises:
        ValueError: Saying which field is wrong and why.
    """
    fields = (expression or "").split()
    example = "e.g. '0 0 3 * * *' for 03:00:00 every day"
    if len(fields) == 5:
        raise ValueError(f"cron {expression!r} has 5 fields (crontab style); KFP schedules take 6, seconds first: {'0 ' + ' '.join(fields)!r}")
    if len(fields) != 6:
        raise ValueError(
            f"cron {expression!r} has {len(fields)} field(s); KFP schedules take 6 (second minute hour day-of-month month day-of-week), {example}"
        )
    for text, (name, low, high, names, question) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            m = _CRON_ITEM.match(item)
            try:
                if not m:
                    raise ValueError(f"{name} {item!r} is not '*', '?', N, N-M or one of those with /STEP")
                base, step = m.group("base"), m.group("step")
                if base == "?" and not question:
                    raise ValueError(f"'?' is only valid for day of month and day of week, not {name}")
                if step is not None and int(step) < 1:
                    raise ValueError(f"{name} step must be >= 1")
                if base not in ("*", "?"):
                    ends = [_cron_value(v, name, low, high, names) for v in base.split("-")]
                    if len(ends) == 2 and ends[0] > ends[1]:
                        raise ValueError(f"{name} range {base!r} runs backwards")
            except ValueError as exc:
                raise ValueError(f"cron {expression!r}: {exc} ({example})") from None
    return " ".join(fields)


# ----------------------------------------------------------------------------------------
# The package and its parameters.


def import_pipelines() -> Any:
    """The pipeline package, :mod:`imgpipe.pipelines` (imported on demand: it imports kfp's DSL)."""
    from imgpipe import pipelines

    return pipelines


def _env_flag(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", "none"):
        return False
    raise ValueError(f"${name}={text!r}: expected true or false")


def compile_package(
    out: str | Path,
    *,
    caching: bool = False,
    gpu: bool | None = None,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
    train_gpus: int | None = None,
) -> Path:
    """Compiles a pipeline to ``out`` (YAML), images from the environment (see ``imgpipe.containers.catalog``).

    Args:
        out: The package path.
        caching: kfp caching of every task; off for scheduled retraining.
        gpu: Schedule train on a GPU node (accelerator, toleration, node selector);
            ``None`` reads ``$IMGPIPE_TRAIN_GPU`` (default true).
        pipeline: One of :data:`PIPELINES`.
        parallelism: The sweep's branches, or the audit's folds, training at once (their options' default when ``None``).
        train_gpus: GPUs of the train task, one training process each (1 to
            :data:`imgpipe.remote.ranks.MAX_PROCS`); ``None`` reads ``$IMGPIPE_TRAIN_GPUS`` (default 1).

    Raises:
        ValueError: For an unknown pipeline, ``parallelism`` with a pipeline that has no
            branches, or a GPU count out of range or without GPU nodes.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; pipelines: {', '.join(PIPELINES)}")
    if parallelism is not None and pipeline not in (SWEEP_PIPELINE_NAME, AUDIT_PIPELINE_NAME):
        raise ValueError(f"parallelism bounds the branches of {SWEEP_PIPELINE_NAME} and the folds of {AUDIT_PIPELINE_NAME}; {pipeline} has none")
    pipelines = import_pipelines()
    gpu = _env_flag(GPU_ENV, True) if gpu is None else gpu
    gpus = _train_gpus(train_gpus)
    options = pipelines.PipelineOptions(caching=caching)
    if not gpu:
        if gpus != 1:
            raise ValueError(f"train_gpus={gpus} needs the train task on GPU nodes; drop --no-gpu (or ${GPU_ENV}=false)")
        options = dataclasses.replace(options, gpu=None)
    elif gpus != 1:
        options = dataclasses.replace(options, gpu=dataclasses.replace(options.gpu, count=gpus))
    extra = {} if parallelism is None else {"parallelism": parallelism}
    if pipeline == SWEEP_PIPELINE_NAME:
        return pipelines.compile_sweep(out, pipelines.SweepOptions(pipeline=options, **extra))
    if pipeline == AUDIT_PIPELINE_NAME:
        return pipelines.compile_audit(out, pipelines.AuditOptions(pipeline=options, **extra))
    return pipelines.compile_pipeline(out, options)


def _train_gpus(value: int | None) -> int:
    """The train task's GPU count: ``value``, else ``$IMGPIPE_TRAIN_GPUS``, else 1; checked."""
    from imgpipe.remote.ranks import check_procs

    if value is None:
        text = os.environ.get(GPUS_ENV, "").strip()
        if not text:
            return 1
        if not text.isdigit():
            raise ValueError(f"${GPUS_ENV}={text!r}: expected a whole number of GPUs")
        value = int(text)
    return check_procs(value, "train_gpus")


def package_digest(package: str | Path) -> str:
    """The first 12 hex digits of the package's SHA-256 (what names its version)."""
    return hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]


def version_name(package: str | Path, pipeline_name: str = PIPELINE_NAME) -> str:
    """The idempotent version name of a package: ``{pipeline}-{digest}``."""
    return f"{pipeline_name}-{package_digest(package)}"


def pipeline_inputs(package: str | Path) -> dict[str, dict[str, Any]]:
    """The root parameters of a compiled package: name -> ``{"parameterType", "defaultValue"?, "isOptional"?}``."""
    doc = next(yaml.safe_load_all(Path(package).read_text()))
    return dict(((doc.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {})


# The Python type of each KFP parameter type (kfp/pipeline_spec's ParameterType).
_PARAMETER_TYPES: dict[str, type] = {
    "STRING": str,
    "BOOLEAN": bool,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": float,
    "STRUCT": dict,
    "LIST": list,
}


def _coerce_param(name: str, raw: Any, kind: str) -> Any:
    if kind == "STRING":
        return raw if isinstance(raw, str) else json.dumps(raw)
    try:
        value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    except yaml.YAMLError as exc:
        raise ValueError(f"parameter {name}: {raw!r} is not valid YAML/JSON: {exc}") from None
    if kind not in _PARAMETER_TYPES:
        raise ValueError(f"parameter {name}: the package declares an unknown type {kind!r}")
    try:
        return coerce(f"parameter {name}", value, _PARAMETER_TYPES[kind])
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def parse_params(pairs: Iterable[str] | Mapping[str, Any], package: str | Path) -> dict[str, Any]:
    """Checks ``key=value`` pairs (or a mapping) against the package's parameters and types them.

    Values are read as YAML for non-string parameters (``epochs=3``, ``grayscale=true``,
    ``step_config={"train": {"lr": 0.001}}``) and kept verbatim for string ones.

    Raises:
        ValueError: On a malformed pair, an unknown parameter, a wrong type, or a
            required parameter left out.
    """
    spec = pipeline_inputs(package)
    if isinstance(pairs, Mapping):
        items = list(pairs.items())
    else:
        items = []
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"--param {pair!r} must look like key=value")
            key, value = pair.split("=", 1)
            items.append((key.strip(), value))
    params: dict[str, Any] = {}
    for key, value in items:
        if key not in spec:
            raise ValueError(f"unknown pipeline parameter {key!r}; parameters: {', '.join(sorted(spec))}")
        params[key] = _coerce_param(key, value, spec[key]["parameterType"])
    missing = sorted(k for k, v in spec.items() if not v.get("isOptional") and k not in params)
    if missing:
        raise ValueError(f"missing required pipeline parameter(s): {', '.join(missing)} (pass --param {missing[0]}=...)")
    return params


def params_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Pipeline parameters from ``IMGPIPE_PARAM_<NAME>`` variables (``IMGPIPE_PARAM_DATA_ROOT`` -> ``data_root``)."""
    env = os.environ if environ is None else environ
    return {k[len(PARAM_ENV_PREFIX) :].lower(): v for k, v in sorted(env.items()) if k.startswith(PARAM_ENV_PREFIX)}


def collect_params(pairs: Iterable[str], *, from_env: bool = False) -> dict[str, str]:
    """``--param key=value`` pairs over (optionally) :func:`params_from_env`; typed later by :func:`parse_params`.

    Raises:
        ValueError: On a pair without ``=``.
    """
    params = params_from_env() if from_env else {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {pair!r} must look like key=value")
        params[key.strip()] = value
    return params


# ----------------------------------------------------------------------------------------
# The API.


def connect(host: str | None = None, *, namespace: str | None = None, existing_token: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (default ``$KF_PIPELINES_ENDPOINT``) with this process's credentials.

    Raises:
        ValueError: If there is no host.
    """
    host = host or os.environ.get(HOST_ENV)
    if not host:
        raise ValueError(f"no KFP endpoint: pass --host URL or set ${HOST_ENV} (e.g. http://ml-pipeline.kubeflow:8888)")
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    token = existing_token or os.environ.get(TOKEN_ENV) or None
    credentials = None
    sa_path = os.environ.get(SA_TOKEN_PATH_ENV)
    if token is None and sa_path and Path(sa_path).is_file():
        credentials = ServiceAccountTokenVolumeCredentials(sa_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
        return kfp.Client(
            host=host,
            namespace=namespace or "kubeflow",
            existing_token=token,
            credentials=credentials,
        )


# ----------------------------------------------------------------------------------------
# Refusals: multi-user KFP authorizes each call (module docstring, "Permissions").

KFP_GROUP = "pipelines.kubeflow.org"
# What the API server's PermissionDenied says (util.NewPermissionDeniedError in
# resource_manager.go IsAuthorized): "User '<user>' is not authorized with reason: ...
# (request: &ResourceAttributes{Namespace:...,Verb:...,Group:...,Version:...,Resource:...,".
_DENIED_USER = re.compile(r"User '([^']*)' is not authorized")
_DENIED_FIELD = re.compile(r"\b(Namespace|Verb|Resource):([^,}]*)")
# The upload endpoints answer a refused authorization with HTTP 400 and only these words
# (pipeline_upload_server.go uploadPipeline/uploadPipelineVersion, writeErrorToResponse).
_UPLOAD_REFUSED = ("Failed to create a pipeline", "Failed to create a pipeline version")
_SA_USER = re.compile(r"system:serviceaccount:([^:]+):(.+)")


def _token_subject(token: str) -> str | None:
    """The ``sub`` claim of a JWT (unverified: it only names the caller in a message)."""
    try:
        payload = token.strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    return claims.get("sub") if isinstance(claims, dict) else None


def _caller() -> str | None:
    """Who this process calls KFP as: the subject of its token (``connect``'s sources), if it tells."""
    token = os.environ.get(TOKEN_ENV)
    path = os.environ.get(SA_TOKEN_PATH_ENV)
    if not token and path and Path(path).is_file():
        token = Path(path).read_text()
    return _token_subject(token) if token else None


def _account(user: str) -> str:
    sa = _SA_USER.fullmatch(user)
    return f"service account {sa.group(1)}/{sa.group(2)}" if sa else f"user {user}"


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
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    message = str(payload.get("message") or payload.get("error_message") or body or "")
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
    user = denied.group(1) if denied else _caller()
    who = _account(user) if user else "the caller"
    return (
        f"Kubeflow Pipelines refused to {doing} ({how}): {who} may not {verb} {resource}.{KFP_GROUP} in "
        f"namespace {namespace}; grant it with a Role bound to that account in {namespace} (the retraining "
        'submitter\'s: k8s/base/role-retrain.yaml; docs/deploy.md, "RBAC")'
    )


def _call(doing: str, verb: str, resource: str, namespace: str | None, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a KFP refusal raised as one line (:func:`refusal_message`).

    Raises:
        RuntimeError: If KFP refuses the call.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        message = refusal_message(exc, verb, resource, namespace, doing)
        if message is None:
            raise
        raise RuntimeError(message) from None


def _by_name(name: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})


def _find_pipeline(client: Any, name: str, namespace: str | None) -> str | None:
    """The id of pipeline ``name`` in ``namespace`` (``None``: the shared pipelines)."""
    doing = f"find pipeline {name!r} in {namespace or 'the shared pipelines'}"
    if namespace is None:
        return _call(doing, "list", "pipelines", namespace, client.get_pipeline_id, name)
    found = _call(doing, "list", "pipelines", namespace, client.list_pipelines, filter=_by_name(name), namespace=namespace, page_size=2)
    return found.pipelines[0].pipeline_id if found.pipelines else None


def ensure_pipeline_version(
    client: Any, package: str | Path, *, pipeline_name: str = PIPELINE_NAME, namespace: str | None = None
) -> tuple[str, str, str]:
    """Finds or uploads the pipeline and the package's version.

    Args:
        client: A ``kfp.Client``.
        package: The compiled package.
        pipeline_name: The pipeline's display name.
        namespace: The profile namespace of a multi-user deployment: the pipeline is
            uploaded into it and looked up there; ``None`` uses shared pipelines
            (single-user deployments).

    Returns:
        ``(pipeline_id, version_id, version_name)``.
    """
    package = str(package)
    version = version_name(package, pipeline_name)
    pipeline_id = _find_pipeline(client, pipeline_name, namespace)
    if pipeline_id is None:
        # Creates the pipeline with a first version named like the pipeline; ours follows.
        pipeline_id = _call(
            f"upload pipeline {pipeline_name!r} into {namespace or 'the shared pipelines'}",
            "create",
            "pipelines",
            namespace,
            client.upload_pipeline,
            package,
            pipeline_name=pipeline_name,
            description="imgpipe: download -> clean -> resize -> train",
            namespace=namespace,
        ).pipeline_id
        log.info("created pipeline %s (%s) in %s", pipeline_name, pipeline_id, namespace or "the shared namespace")
    # Version calls are authorized as `pipelines` on the version's pipeline (module docstring).
    found = _call(
        f"list the versions of pipeline {pipeline_name!r}",
        "list",
        "pipelines",
        namespace,
        client.list_pipeline_versions,
        pipeline_id=pipeline_id,
        filter=_by_name(version),
        page_size=1,
    )
    if found.pipeline_versions:
        version_id = found.pipeline_versions[0].pipeline_version_id
        log.info("pipeline version %s exists (%s)", version, version_id)
        return pipeline_id, version_id, version
    uploaded = _call(
        f"upload version {version} of pipeline {pipeline_name!r}",
        "create",
        "pipelines",
        namespace,
        client.upload_pipeline_version,
        package,
        pipeline_version_name=version,
        pipeline_id=pipeline_id,
        description=f"package sha256 {package_digest(package)}",
    )
    log.info("uploaded pipeline version %s (%s)", version, uploaded.pipeline_version_id)
    return pipeline_id, uploaded.pipeline_version_id, version


@dataclass(frozen=True)
class Submitted:
    """A run created (or re-attached to) by :func:`submit`."""

    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    run_id: str
    created: bool = True
    state: str | None = None


@dataclass(frozen=True)
class Scheduled:
    """A recurring run created (or found) by :func:`schedule`."""

    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str
    recurring_run_id: str
    cron: str
    created: bool


@dataclass(frozen=True)
class Target:
    """Where and as whom runs go; ``None`` fields come from the environment (module docstring).

    Attributes:
        host: The KFP API endpoint, e.g. ``http://ml-pipeline.kubeflow:8888``.
        experiment: Experiment name (created if missing).
        namespace: The Kubeflow profile namespace (multi-user deployments).
        service_account: The Kubernetes service account of the run's pods; in a
            namespace, :data:`PIPELINE_SERVICE_ACCOUNT` unless set.
    """

    host: str | None = None
    experiment: str | None = None
    namespace: str | None = None
    service_account: str | None = None

    def resolved(self) -> Target:
        """With the environment's values for unset fields."""
        env = os.environ
        namespace = self.namespace or env.get(NAMESPACE_ENV) or None
        return Target(
            host=self.host or env.get(HOST_ENV) or None,
            experiment=self.experiment or env.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT,
            namespace=namespace,
            service_account=self.service_account or env.get(SERVICE_ACCOUNT_ENV) or (PIPELINE_SERVICE_ACCOUNT if namespace else None),
        )


def _package(
    package: str | Path | None,
    caching: bool,
    gpu: bool | None,
    tmp: str,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
) -> Path:
    if package is not None:
        path = Path(package)
        if not path.is_file():
            raise ValueError(f"pipeline package {path} does not exist")
        return path
    return compile_package(Path(tmp) / f"{pipeline}.yaml", caching=caching, gpu=gpu, pipeline=pipeline, parallelism=parallelism)


def _prepare(
    target: Target,
    params: Iterable[str] | Mapping[str, Any],
    package: str | Path | None,
    caching: bool,
    gpu: bool | None,
    client: Any,
    tmp: str,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
) -> tuple[Any, dict[str, Any], str, str, str, str, str | None]:
    path = _package(package, caching, gpu, tmp, pipeline, parallelism)
    typed = parse_params(params, path)
    client = client or connect(target.host, namespace=target.namespace)
    namespace = _namespace(client, target)
    pipeline_id, version_id, version = ensure_pipeline_version(client, path, pipeline_name=pipeline, namespace=namespace)
    # kfp's create_experiment lists experiments by name first, then creates one if none.
    experiment_id = _call(
        f"find or create experiment {target.experiment!r} in {namespace or 'the default namespace'}",
        "list and create",
        "experiments",
        namespace,
        client.create_experiment,
        target.experiment,
        namespace=namespace,
    ).experiment_id
    return client, typed, pipeline_id, version_id, version, experiment_id, namespace


def _namespace(client: Any, target: Target) -> str | None:
    """The profile namespace in multi-user mode (required there), else ``None``.

    Raises:
        ValueError: If the server runs multi-user and no namespace is set.
    """
    multi_user = bool(getattr(client.get_kfp_healthz(), "multi_user", False))
    if not multi_user:
        return None
    if not target.namespace:
        raise ValueError(
            "this Kubeflow Pipelines runs in multi-user mode: pass --namespace (or set "
            f"{NAMESPACE_ENV}) to your Kubeflow profile's namespace; experiments, pipelines and runs live there"
        )
    return target.namespace


def _wait(client: Any, run_id: str, timeout_s: float, poll_s: float, namespace: str | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(_call(f"read run {run_id}", "get", "runs", namespace, client.get_run, run_id).state or "").upper()
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {state or 'pending'} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def submit(
    params: Iterable[str] | Mapping[str, Any] = (),
    *,
    target: Target | None = None,
    run_name: str | None = None,
    package: str | Path | None = None,
    caching: bool = False,
    gpu: bool | None = None,
    wait: bool = False,
    timeout_s: float = 6 * 3600,
    poll_s: float = 30.0,
    client: Any = None,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
) -> Submitted:
    """Uploads the pipeline version (idempotently) and creates a run of it.

    Args:
        params: ``key=value`` pairs or a mapping of pipeline parameters.
        target: Host, experiment, namespace, service account (default: environment).
        run_name: The run's display name (default ``<version> <UTC time>``). A run of
            that name already in the experiment is re-attached to instead of starting
            another, so a retried submitter (the CronWorkflow passes its workflow
            name) never runs the pipeline twice.
        package: A compiled package; default: compile now with ``caching`` and ``gpu``.
        caching: Compile-time caching (ignored with ``package``).
        gpu: Compile-time GPU scheduling of train (see :func:`compile_package`).
        wait: Wait for the run to end; a run that does not succeed raises.
        timeout_s: How long to wait.
        poll_s: Status poll interval while waiting.
        client: A ``kfp.Client`` (default: :func:`connect`).
        pipeline: Which pipeline (:data:`PIPELINES`), compiled when ``package`` is not given;
            also the Kubeflow pipeline the version is uploaded under.
        parallelism: The sweep's branches at once, when compiling it (see :func:`compile_package`).

    Raises:
        ValueError: For bad parameters or no host.
        RuntimeError: With ``wait``, if the run ends in another state than SUCCEEDED; if
            KFP refuses a call (multi-user RBAC), naming the missing permission.
        TimeoutError: With ``wait``, if the run is still going after ``timeout_s``.
    """
    target = (target or Target()).resolved()
    with tempfile.TemporaryDirectory(prefix="imgpipe-kfp-") as tmp:
        client, typed, pipeline_id, version_id, version, experiment_id, namespace = _prepare(
            target, params, package, caching, gpu, client, tmp, pipeline, parallelism
        )
    run_id, created = None, True
    if run_name:
        found = _call(
            f"look for run {run_name!r}",
            "list",
            "runs",
            namespace,
            client.list_runs,
            experiment_id=experiment_id,
            filter=_by_name(run_name),
            page_size=1,
        )
        if found.runs:
            run_id, created = found.runs[0].run_id, False
            log.info("run %r exists (%s): attaching to it", run_name, run_id)
    if run_id is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        run_id = _call(
            f"start a run of {version}",
            "create",
            "runs",
            namespace,
            client.run_pipeline,
            experiment_id=experiment_id,
            job_name=run_name or f"{version} {stamp}",
            params=typed,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=target.service_account,
        ).run_id
    state = None
    if wait:
        state = _wait(client, run_id, timeout_s, poll_s, namespace)
        if state != "SUCCEEDED":
            raise RuntimeError(f"run {run_id} ended {state}")
    return Submitted(pipeline_id, version_id, version, experiment_id, run_id, created, state)


def schedule(
    cron: str,
    params: Iterable[str] | Mapping[str, Any] = (),
    *,
    target: Target | None = None,
    name: str = "imgpipe-retrain",
    package: str | Path | None = None,
    caching: bool = False,
    gpu: bool | None = None,
    replace: bool = False,
    client: Any = None,
) -> Scheduled:
    """Creates a KFP recurring run of the pipeline's current version.

    One schedule per ``name`` in the experiment: if it exists with this version and
    cron it is left as is; otherwise ``replace`` deletes it and creates the new one,
    and without ``replace`` this raises.

    Args:
        cron: Six fields, seconds first (:func:`validate_cron`). KFP starts at most one
            run at a time (``max_concurrency=1``) and does not replay runs missed while
            paused (``no_catchup``).
        params: As in :func:`submit`; ``previous_run_prefix=latest`` makes every
            scheduled run incremental.
        target: As in :func:`submit`.
        name: The schedule's display name.
        package: As in :func:`submit`.
        caching: As in :func:`submit` (keep it off for retraining: new data behind an
            unchanged URI would be a cache hit).
        gpu: As in :func:`submit`.
        replace: Swap an existing schedule of the same name.
        client: As in :func:`submit`.

    Raises:
        ValueError: For a bad cron expression or parameters, or an existing schedule of
            another version or cron without ``replace``.
        RuntimeError: If KFP refuses a call (multi-user RBAC), naming the missing permission.
    """
    cron = validate_cron(cron)
    target = (target or Target()).resolved()
    with tempfile.TemporaryDirectory(prefix="imgpipe-kfp-") as tmp:
        client, typed, pipeline_id, version_id, version, experiment_id, namespace = _prepare(target, params, package, caching, gpu, client, tmp)
    existing = _call(
        f"look for recurring run {name!r}",
        "list",
        "jobs",
        namespace,
        client.list_recurring_runs,
        experiment_id=experiment_id,
        filter=_by_name(name),
        page_size=10,
    )
    for rr in existing.recurring_runs or []:
        ref = rr.pipeline_version_reference
        same_version = ref is not None and ref.pipeline_version_id == version_id
        same_cron = bool(rr.trigger and rr.trigger.cron_schedule and rr.trigger.cron_schedule.cron == cron)
        if same_version and same_cron:
            return Scheduled(pipeline_id, version_id, version, experiment_id, rr.recurring_run_id, cron, False)
        if not replace:
            raise ValueError(f"recurring run {name!r} ({rr.recurring_run_id}) already exists with another version or cron; pass --replace to swap it")
        _call(f"replace recurring run {name!r}", "delete", "jobs", namespace, client.delete_recurring_run, rr.recurring_run_id)
    created = _call(
        f"create recurring run {name!r}",
        "create",
        "jobs",
        namespace,
        client.create_recurring_run,
        experiment_id=experiment_id,
        job_name=name,
        description=f"imgpipe retraining, {version}",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=typed,
        pipeline_id=pipeline_id,
        version_id=version_id,
        enabled=True,
        service_account=target.service_account,
    )
    return Scheduled(pipeline_id, version_id, version, experiment_id, created.recurring_run_id, cron, True)
