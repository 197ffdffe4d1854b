"""Typed, frozen step configuration: defaults in code, YAML overrides, resolved dump.

Every step owns one frozen dataclass (``CleanConfig``, ``DownloadConfig``, ...).
This module holds the machinery they share: building a config from a YAML file
plus ``key=value`` overrides with type checking at the boundary, and writing the
resolved config next to a step's outputs (as timm writes ``args.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "SECTIONS",
    "check_sections",
    "read_config_file",
    "config_from_dict",
    "load_config",
    "config_to_dict",
    "config_to_yaml",
    "parse_override",
]

C = TypeVar("C")
# The sections a multi-step config file may hold: the pipeline's parameters (imgpipe run),
# the sample data set, and one per step.
SECTIONS = ("pipeline", "synth", "download", "clean", "resize", "train")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Coerces a YAML/CLI value to the annotated field type or raises a clear error."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{name}: {value!r} matches none of {annotation}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{name}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{name}: expected a mapping for {annotation.__name__}, got {value!r}")
        return config_from_dict(annotation, value, _prefix=f"{name}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise TypeError(f"{name}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"{name}: expected a string, got {value!r}")
    return value


def config_from_dict(cls: type[C], values: Mapping[str, Any], _prefix: str = "") -> C:
    """Builds a frozen config from a mapping, rejecting unknown keys.

    Args:
        cls: The config dataclass.
        values: Field values; missing fields keep their defaults in code.

    Returns:
        The config instance; its ``__post_init__`` validation has run.

    Raises:
        ValueError: On an unknown key or a value the config rejects.
        TypeError: On a value of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a config dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} option(s) {', '.join(_prefix + u + _nearest(u, fields) for u in unknown)}; "
            f"valid options: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(_prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _nearest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or nothing."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_sections(doc: Mapping[str, Any], where: str, sections: Sequence[str] = SECTIONS) -> None:
    """Refuses a section name no step reads: a typo would otherwise run with defaults.

    Raises:
        ValueError: Naming each unknown section and the nearest valid one.
    """
    unknown = sorted(set(doc) - set(sections))
    if unknown:
        raise ValueError(
            f"{where}: unknown section(s) {', '.join(u + _nearest(u, sections) for u in unknown)}; "
            f"sections: {', '.join(sections)}"
        )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's YAML: a mapping (of options, or of sections), ``{}`` when empty.

    Raises:
        ValueError: If the file is missing or does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"config file {p} must hold a mapping (options, or sections {', '.join(SECTIONS)}), got {type(loaded).__name__}")
    return dict(loaded)


def parse_override(text: str) -> tuple[str, Any]:
    """Parses one ``key=value`` override; the value is read as YAML (``true``, ``3``, ``[1, 2]``)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Resolves a step config: defaults in code, then a YAML file, then explicit overrides.

    Args:
        cls: The config dataclass.
        path: Optional YAML file. It may hold the fields directly, or one section per
            step (``clean: {...}``), in which case ``section`` picks it.
        overrides: Values that win over the file (typically from the command line);
            ``None`` values are ignored so unset CLI flags keep the file/default value.
        section: Key of this step's section in a multi-step file.

    Returns:
        The resolved, frozen config.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_config_file(p)
        if section is not None and any(isinstance(v, Mapping) for v in loaded.values()):
            check_sections(loaded, f"config file {p}")
            # A multi-step file: this step's section, or its defaults when it has none.
            loaded = loaded.get(section) or {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"config file {p}: section {section!r} must hold a mapping of options")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return config_from_dict(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Returns the config as plain YAML/JSON-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    """Returns the resolved config as YAML, the form written next to a step's outputs."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
