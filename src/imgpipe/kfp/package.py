"""The pipeline package: compiling the pipelines and reading and checking the parameters a run is given.

    compile_package("imgpipe.yaml", pipeline="imgpipe"); params = parse_params(["data_root=s3://b/x"], "imgpipe.yaml")

Parameters are checked against the compiled package's own inputs (name and type) before anything is sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from imgpipe.config import coerce, did_you_mean
from imgpipe.config_flags import env_flag
from imgpipe.stepio.artifacts import PIPELINE_NAME
from imgpipe.steps.audit import AUDIT_PIPELINE_NAME
from imgpipe.sweep import SWEEP_PIPELINE_NAME

__all__ = [
    "PIPELINES",
    "GPU_ENV",
    "GPUS_ENV",
    "PARAM_ENV_PREFIX",
    "import_pipelines",
    "compile_package",
    "package_digest",
    "version_name",
    "pipeline_inputs",
    "parse_params",
    "params_from_env",
    "collect_params",
]

# The pipelines imgpipe compiles and submits: the pipeline, and the augmentation sweep over its data steps.
PIPELINES = (PIPELINE_NAME, SWEEP_PIPELINE_NAME, AUDIT_PIPELINE_NAME)
GPU_ENV = "IMGPIPE_TRAIN_GPU"
# GPUs (one training process each) the train task gets, when it runs on GPU nodes.
GPUS_ENV = "IMGPIPE_TRAIN_GPUS"
PARAM_ENV_PREFIX = "IMGPIPE_PARAM_"


def import_pipelines() -> Any:
    """The pipeline package, :mod:`imgpipe.pipelines` (imported on demand: it imports kfp's DSL)."""
    from imgpipe import pipelines

    return pipelines


def compile_package(
    out: str | Path,
    *,
    caching: bool = False,
    gpu: bool | None = None,
    pipeline: str = PIPELINE_NAME,
    parallelism: int | None = None,
    train_gpus: int | None = None,
    shards: int = 1,
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
        shards: Pods download and clean run on (``PipelineOptions.shards``; 1: one task each).

    Raises:
        ValueError: For an unknown pipeline, ``parallelism`` with a pipeline that has no
            branches, or a GPU count out of range or without GPU nodes.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; pipelines: {', '.join(PIPELINES)}")
    if parallelism is not None and pipeline not in (SWEEP_PIPELINE_NAME, AUDIT_PIPELINE_NAME):
        raise ValueError(f"parallelism bounds the branches of {SWEEP_PIPELINE_NAME} and the folds of {AUDIT_PIPELINE_NAME}; {pipeline} has none")
    pipelines = import_pipelines()
    gpu = env_flag(os.environ, GPU_ENV, default=True) if gpu is None else gpu
    gpus = _train_gpus(train_gpus)
    options = pipelines.PipelineOptions(caching=caching, shards=shards)
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
            raise ValueError(f"unknown pipeline parameter {key!r}{did_you_mean(key, spec)}; parameters: {', '.join(sorted(spec))}")
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
