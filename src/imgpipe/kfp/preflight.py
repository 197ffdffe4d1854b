"""The check before a run starts: every parameter, every step's config, every source, in one pass.

    arguments, configs = check_arguments(cfg.pipeline_arguments(), local=True)   # imgpipe run
    check_locations(source, annotations, data_root)                               # before any server starts
    step_configs(typed_params)                                                    # imgpipe submit, schedule

Each step's config is built here as its component builds it (:func:`imgpipe.config.step_config`
over the typed parameters and the step's section), so the config classes' own checks (ranges,
choices, model names, presets) refuse a mistake before any store, kfp or output folder exists.
A refusal is one ``ValueError``/``TypeError`` line that names the setting and what would do.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from imgpipe import storage
from imgpipe.config import changed_fields, coerce, config_from_dict, did_you_mean, step_config
from imgpipe.config_flags import field_default
from imgpipe.step_table import STEPS

__all__ = [
    "parameter_fields",
    "RUN_OWNED",
    "check_arguments",
    "check_params",
    "step_configs",
    "check_locations",
    "check_uri_form",
    "changed_settings",
]

# Pipeline parameters `imgpipe run` sets from its own options, never from --param.
RUN_OWNED = {"data_root": "--data-root", "source_uri": "--source", "annotations_uri": "--annotations"}


@functools.cache
def _pipeline_signature() -> inspect.Signature:
    """The main pipeline's run parameters (the function kfp traces; nothing is traced here)."""
    from imgpipe.pipelines.imgpipe_pipeline import pipeline_function
    from imgpipe.pipelines.options import PipelineOptions

    return inspect.signature(pipeline_function(PipelineOptions()))


@functools.cache
def parameter_fields() -> dict[str, tuple[str, str]]:
    """Each typed pipeline parameter that sets a step config field -> ``(step, field)``.

    The pipeline's own table (``PARAMETER_FIELDS``), plus the two resize parameters it
    passes under other names; the promotion tolerance is no step's section.
    """
    from imgpipe.pipelines.imgpipe_pipeline import PARAMETER_FIELDS

    sections = {STEPS[name].config_class(): name for name in STEPS}
    found = {param: (sections[cls], name) for param, (cls, name) in PARAMETER_FIELDS.items() if cls in sections}
    return {**found, "resize_train_mode": ("resize", "train_mode"), "ray_address": ("resize", "ray_address")}


def check_arguments(arguments: Mapping[str, Any], *, local: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks a local run's pipeline arguments: names, types, and every step's config they make.

    Args:
        arguments: Parameter name -> value (``step_config`` included), as the run would pass them.
        local: ``imgpipe run``'s arguments: the data locations are its options' (:data:`RUN_OWNED`).

    Returns:
        The arguments typed as the pipeline declares them, and step name (and ``promote``) -> config.

    Raises:
        ValueError: For an unknown parameter (naming the nearest) or a value a config refuses.
        TypeError: For a value of the wrong type.
    """
    signature = _pipeline_signature()
    typed: dict[str, Any] = {}
    for name, value in arguments.items():
        if local and name in RUN_OWNED:
            raise ValueError(f"--param {name}: imgpipe run sets it from {RUN_OWNED[name]}; pass {RUN_OWNED[name]} instead")
        if name not in signature.parameters:
            valid = sorted(p for p in signature.parameters if not (local and p in RUN_OWNED))
            raise ValueError(f"unknown pipeline parameter {name!r}{did_you_mean(name, valid)}; parameters: {', '.join(valid)}")
        typed[name] = coerce(f"parameter {name}", value, signature.parameters[name].annotation)
    return typed, step_configs(typed)


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a cluster run's typed parameters (``imgpipe submit``, ``schedule``) before anything is sent.

    Every step's config as its task will build it, and the form of the URIs (a pod's source
    policy decides what it may read; only the pod can see whether it exists).

    Returns:
        Step name (and ``promote``) -> config.

    Raises:
        ValueError, TypeError: In one line naming the parameter and what would do.
    """
    for name in ("data_root", "source_uri", "annotations_uri", "previous_run_prefix"):
        value = params.get(name)
        if isinstance(value, str) and value and value != "latest":
            check_uri_form(value, f"parameter {name}")
    return step_configs(params)


def step_configs(params: Mapping[str, Any]) -> dict[str, Any]:
    """Each step's config (and the promotion gate's) as its component builds it from these run parameters.

    A typed parameter left ``""`` means the field's default, as the components read it.

    Raises:
        ValueError: Naming the step (``train: unknown model 'resnet19'; ...``) for a value its config refuses.
        TypeError: For a value of the wrong type.
    """
    from imgpipe.steps.promote import PromoteConfig

    sections = params.get("step_config") or {}
    if not isinstance(sections, Mapping):
        raise TypeError(f'parameter step_config: expected a mapping of step sections, e.g. {{"train": {{"lr": 0.001}}}}, got {sections!r}')
    unknown = sorted(set(sections) - set(STEPS))
    if unknown:
        raise ValueError(f"step_config: unknown section(s) {', '.join(u + did_you_mean(u, STEPS) for u in unknown)}; sections: {', '.join(STEPS)}")
    fields = parameter_fields()
    configs: dict[str, Any] = {}
    for name, entry in STEPS.items():
        cls = entry.config_class()
        named = {key: _unset_to_none(cls, key, params[p]) for p, (step, key) in fields.items() if step == name and p in params}
        try:
            configs[name] = step_config(cls, sections, name, **named)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        except ModuleNotFoundError as exc:
            # Where the step's libraries are not installed (`imgpipe submit` in the cpu image has no
            # torch to list the models), its task checks its config when it starts.
            if exc.name not in _STEP_ONLY_MODULES:
                raise
    tolerance = params.get("promotion_tolerance")
    try:
        configs["promote"] = config_from_dict(PromoteConfig, {} if tolerance is None else {"tolerance": tolerance})
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"promotion_tolerance: {exc}") from None
    return configs


# What only the step images that run them install (the gpu image: train).
_STEP_ONLY_MODULES = ("torch", "torchvision", "timm", "kornia")


def _unset_to_none(cls: type, key: str, value: Any) -> Any:
    """A typed parameter's "unset" (``""``, or ``0`` for a number whose field defaults to none) as the component reads it."""
    if value == "" or (value == 0 and not isinstance(value, bool) and field_default(cls, key) is None):
        return None
    return value


def check_uri_form(uri: str, what: str) -> None:
    """Refuses a URI whose scheme no part of imgpipe reads, or that names no host or bucket.

    Raises:
        ValueError: Naming ``what`` and the form that would do.
    """
    from imgpipe.data.sources import REMOTE_SCHEMES, is_http

    parsed = urlparse(os.fspath(uri))
    scheme = parsed.scheme.lower()
    shown = storage.redact_uri(uri)
    try:
        if storage.serves(uri) and storage.is_local(uri):
            return
    except ValueError as exc:  # storage's own word on a URI of its scheme (an s3:// without a bucket)
        raise ValueError(f"{what}: {exc}") from None
    if scheme not in REMOTE_SCHEMES:
        forms = ", ".join(f"{s}://" for s in sorted(REMOTE_SCHEMES))
        raise ValueError(f"{what} {shown}: unsupported scheme {scheme!r}; use a local path or {forms}")
    if not parsed.netloc:
        place = "HOST/PATH" if is_http(uri) else "BUCKET/KEY"
        raise ValueError(f"{what} {shown}: nothing names the {place.split('/')[0].lower()}; write it as {scheme}://{place}")


def _check_readable(uri: str, what: str) -> None:
    """Refuses a local source (each shard of a ``{000..009}`` pattern) that is missing or unreadable."""
    from imgpipe.data.readers.webdataset import expand_braces

    for one in expand_braces(uri):
        path = storage.local_path(one)
        if not path.exists():
            raise ValueError(f"{what} {path} does not exist; give an existing folder, archive or list (docs/sources.md)")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ValueError(f"{what} {path} is not readable by this user; fix its permissions or copy it somewhere readable")


def check_locations(source: str | None, annotations: str | None, data_root: str | None) -> None:
    """Checks a local run's sources (local ones exist and are readable; remote ones are well formed) and its data root.

    Raises:
        ValueError: Naming the option, the problem and the fix.
    """
    for value, what in ((source, "--source"), (annotations, "--annotations")):
        if value:
            check_uri_form(value, what)
            if storage.serves(value) and storage.is_local(value):
                _check_readable(value, what)
    if data_root:
        check_uri_form(data_root, "--data-root")
        from imgpipe.data.sources import is_http

        if is_http(data_root):
            raise ValueError(f"--data-root {storage.redact_uri(data_root)}: the steps write to a bucket or a local folder, not http(s)")


def changed_settings(arguments: Mapping[str, Any], configs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What differs from the defaults in code: pipeline parameters that are no step field, and each config's fields.

    Returns:
        Section (``pipeline``, a step, ``promote``) -> field -> value, only the sections with a change.
    """
    signature = _pipeline_signature()
    fields = parameter_fields()
    changed: dict[str, dict[str, Any]] = {}
    pipeline = {
        k: v
        for k, v in arguments.items()
        if k != "step_config" and k not in fields and k in signature.parameters and v != signature.parameters[k].default
    }
    if pipeline:
        changed["pipeline"] = pipeline
    for name, cfg in configs.items():
        diff = changed_fields(cfg)
        if diff:
            changed[name] = diff
    return changed
