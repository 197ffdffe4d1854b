"""Typed, frozen step configuration: defaults in code, YAML overrides, resolved dump.

Every step owns one frozen dataclass (``CleanConfig``, ``DownloadConfig``, ...).
This module holds the machinery they share: building a config from a YAML file
plus ``key=value`` overrides with type checking at the boundary, and writing the
resolved config next to a step's outputs (as timm writes ``args.yaml``). The flags and
pipeline parameters derived from a config live in :mod:`imgpipe.config_flags`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from imgpipe.step_table import STEPS
from imgpipe.storage.redact import redact_value

__all__ = [
    "SECTIONS",
    "check_sections",
    "load_yaml",
    "read_config_file",
    "config_from_dict",
    "step_config",
    "load_config",
    "config_to_dict",
    "config_record",
    "config_to_yaml",
    "changed_fields",
    "parse_override",
    "coerce",
    "check_range",
    "check_numbers",
    "MAX_NUMBER",
    "did_you_mean",
]

C = TypeVar("C")
# The sections a multi-step config file may hold: the pipeline's parameters (imgpipe run),
# the sample data set, and one per step.
# A config file's sections: the pipeline's parameters, the sample data set, and one per step.
SECTIONS = ("pipeline", "synth", *STEPS)


# The largest magnitude of any numeric setting: past it a float no longer holds every integer,
# and what the code derives from a setting (bytes, int64 tensors, seeds) may overflow.
MAX_NUMBER = 2**53


class NotANumberError(TypeError, ValueError):
    """A config value of the wrong type: a ``TypeError`` that callers catching bad values (``ValueError``) also catch."""


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
    allow_inf: bool = False,
) -> None:
    """Refuses a config value that is not a number in its range, in one message for every config.

    ``check_range("lr", 0.5, 0, 1, high_open=True)`` passes; ``check_range("epochs", 0, 1,
    integer=True, note="0 trains nothing")`` raises ``epochs must be an integer >= 1 (0
    trains nothing), got 0``. A ``bool`` is never a number here. NaN is refused, and so are
    ``inf``, ``-inf`` (unless ``allow_inf``) and magnitudes past :data:`MAX_NUMBER`, whatever
    the range: ``loader_cache_gb=inf`` names its field instead of overflowing later.

    Args:
        name: The field, as the message names it.
        value: What was given.
        low: The lowest allowed (``low_open``: the bound it must exceed); ``None``: none.
        high: The highest allowed (``high_open``: the bound it must stay below); ``None``: none.
        integer: Whether only an ``int`` will do.
        low_open: Whether ``low`` itself is refused.
        high_open: Whether ``high`` itself is refused.
        note: What a special value means, e.g. ``0 disables``.
        allow_inf: Whether ``inf`` and ``-inf`` (where the range holds them) are allowed.

    Raises:
        NotANumberError: For anything but a number (an ``int`` with ``integer``).
        ValueError: For a number outside the range, NaN, or one not finite or past
            :data:`MAX_NUMBER`.
    """
    bad_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    # NaN fails every comparison, so it is never within bounds.
    unbounded = not bad_type and not (math.isinf(value) and allow_inf) and not -MAX_NUMBER <= value <= MAX_NUMBER
    outside = not bad_type and (
        unbounded
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if not (bad_type or outside):
        return
    kind = "an integer" if integer else "a finite number" if unbounded and not allow_inf else "a number"
    text = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    if low is not None and high is not None:
        bound = f"in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
    elif low is not None:
        bound = f"{'>' if low_open else '>='} {text(low)}"
    elif high is not None:
        bound = f"{'<' if high_open else '<='} {text(high)}"
    else:
        bound = ""
    if unbounded:
        bound += f"{' and ' if bound else ''}of at most 2**53 in size{' (or inf)' if allow_inf else ''}"
    message = f"{name} must be {kind}{' ' + bound if bound else ''}{f' ({note})' if note else ''}, got {value!r}"
    raise (NotANumberError if bad_type else ValueError)(message)


def check_numbers(cfg: Any, *, allow_inf: Iterable[str] = ()) -> None:
    """Refuses NaN, infinities and magnitudes past :data:`MAX_NUMBER` in every numeric field of a config.

    A config's ``__post_init__`` calls it first, so that a field its own range checks miss (a
    seed, a ratio compared only one way) cannot hold ``nan`` or ``1e300`` either; tuples of
    numbers are checked item by item. The message names the field.

    Args:
        cfg: The config dataclass instance.
        allow_inf: Fields that may be ``inf`` or ``-inf`` (documented as such on the field).

    Raises:
        ValueError: Naming the first field that holds such a value.
    """
    allowed = set(allow_inf)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                check_range(f.name if i is None else f"{f.name}[{i}]", item, allow_inf=f.name in allowed)


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Coerces a YAML/CLI/JSON value to an annotated type, or raises a clear error.

    The one coercer of the project: config fields, CLI flags and KFP run parameters
    (:mod:`imgpipe.kfp.client`) all go through it. pydantic's ``TypeAdapter`` in lax
    mode does the work; this adds what a command line needs and pydantic does not do:
    ``"0.8,0.1,0.1"`` for a tuple, config dataclasses through :func:`config_from_dict`
    (unknown keys named with the nearest valid one), unions tried left to right, and
    ``True`` never an integer or a number. Errors name the field and, for a choice,
    the nearest valid one.

    Args:
        name: What the value is, for the error message.
        value: The value as read.
        annotation: The target type: ``int``, ``float``, ``bool``, ``str``, ``dict``,
            ``list``, ``Literal``, ``Optional``/unions, tuples or a config dataclass.

    Raises:
        TypeError: For a value of the wrong type.
        ValueError: For a value outside a ``Literal``'s choices or a tuple's length.
    """
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{name}: expected a mapping for {annotation.__name__}, got {value!r}")
        return config_from_dict(annotation, value, _prefix=f"{name}.")
    if _already(value, annotation):
        return value
    import pydantic  # here: a step that is given only well-typed values never imports it

    try:
        return _adapter(annotation).validate_python(value)
    except pydantic.ValidationError as exc:
        raise _user_error(name, value, annotation, exc.errors(include_url=False)[0]) from None


def _already(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is exactly of the plain type (or one of the ``Literal`` choices) asked for."""
    if annotation in (int, float, str, bool):
        return type(value) is annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # Only where no order among the members matters: None, or the one type of an Optional.
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        return (value is None and optional) or (len(members) == 1 and _already(value, members[0]))
    if typing.get_origin(annotation) is typing.Literal:
        return any(type(value) is type(choice) and value == choice for choice in typing.get_args(annotation))
    return False


@functools.cache
def _adapter(annotation: Any) -> Any:
    """One validator (a pydantic ``TypeAdapter``) per annotation; building one costs more than using it."""
    import pydantic

    return pydantic.TypeAdapter(_lax(annotation), config=pydantic.ConfigDict(coerce_numbers_to_str=True))


def _not_bool(kind: str) -> Callable[[Any], Any]:
    """A validator refusing ``True``/``False`` where pydantic's lax mode would take 1/0."""
    import pydantic_core

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise pydantic_core.PydanticCustomError(kind, "a boolean is not a number")
        return value

    return check


def _comma_separated(value: Any) -> Any:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _lax(annotation: Any) -> Any:
    """``annotation`` with the rules above as pydantic validators, recursively."""
    import pydantic

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float):
        return Annotated[annotation, pydantic.BeforeValidator(_not_bool(f"{annotation.__name__}_type"))]
    if origin in (typing.Union, types.UnionType):
        members = [_lax(a) for a in args if a is not type(None)]
        lax = members[0] if len(members) == 1 else Annotated[typing.Union[tuple(members)], pydantic.Field(union_mode="left_to_right")]  # noqa: UP007 - built from a tuple
        return lax | None if type(None) in args else lax
    if origin is tuple:
        inner = tuple(a if a is Ellipsis else _lax(a) for a in args)
        return Annotated[tuple[inner] if inner else tuple, pydantic.BeforeValidator(_comma_separated)]
    if annotation is list or origin is list:
        return Annotated[list, pydantic.BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v)]
    return annotation


# pydantic's error type -> what the user is told was expected.
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "string": "a string",
    "dict": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "value_error": "a number",
}


def _user_error(name: str, value: Any, annotation: Any, error: Mapping[str, Any]) -> TypeError | ValueError:
    """One line naming the field (and the item of a tuple), the value and what would do."""
    kind = str(error["type"])
    where = name + "".join(f"[{p}]" for p in error["loc"] if isinstance(p, int))
    got = error.get("input", value)
    if kind == "literal_error":
        choices = [a for a in typing.get_args(_literal_of(annotation)) if a is not None]
        return ValueError(f"{where}: {got!r} is not one of {choices}{did_you_mean(str(got), map(str, choices))}")
    if typing.get_origin(annotation) is tuple and kind in ("too_short", "too_long", "missing"):
        items = _comma_separated(value)
        return ValueError(f"{name}: expected {len(typing.get_args(annotation))} items, got {len(items)}")
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) not in typing.get_args(annotation):
        return TypeError(f"{where}: {value!r} matches none of {annotation}")
    expected = next((text for prefix, text in _EXPECTED.items() if kind.startswith(prefix)), None)
    if expected is None:
        return TypeError(f"{where}: {got!r} is not valid here: {error['msg']}")
    return TypeError(f"{where}: expected {expected}, got {got!r}")


def _literal_of(annotation: Any) -> Any:
    """The ``Literal`` inside ``annotation`` (itself, or the member of an ``Optional``)."""
    if typing.get_origin(annotation) is typing.Literal:
        return annotation
    return next((a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal), annotation)


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
            f"unknown {cls.__name__} option(s) {', '.join(_prefix + u + did_you_mean(u, fields) for u in unknown)}; "
            f"valid options: {', '.join(sorted(fields))}"
        )
    kwargs = {k: coerce(_prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def step_config(cls: type[C], sections: Mapping[str, Any] | None, section: str, *, policy: Any = None, **named: Any) -> C:
    """Builds a step's frozen config from the pipeline's typed parameters and its free-form section.

    Args:
        cls: The step's config dataclass.
        sections: The pipeline's ``step_config`` parameter: one mapping per step name
            (``{"train": {"epochs": 1}}``); any field of the step's config.
        section: This step's key in ``sections``.
        policy: A :class:`imgpipe.readpolicy.ReadPolicy`: every field the config class lists
            in its ``READS`` (the URIs the step reads) must pass it.
        named: Values from typed pipeline parameters; ``None`` means "not set". A field
            given in the section wins over the typed parameter (it is more specific).

    Raises:
        ValueError: On an unknown field or a value the config rejects; a
            ``ReadRefused`` for a URI outside ``policy``.
        TypeError: On a value of the wrong type (kfp passes JSON numbers as floats;
            whole floats are accepted for integer fields).
    """
    sections = sections or {}
    own = sections.get(section) or {}
    if not isinstance(own, Mapping):
        raise TypeError(f"step_config[{section!r}] must be a mapping of {cls.__name__} fields, got {own!r}")
    values = {k: v for k, v in named.items() if v is not None}
    values.update(own)
    built = config_from_dict(cls, values)
    if policy is not None:
        for name in getattr(cls, "READS", ()):
            value = getattr(built, name)
            if value:
                policy.check(f"{section}.{name}", value)
    return built


def did_you_mean(name: str, valid: Iterable[str]) -> str:
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
        raise ValueError(f"{where}: unknown section(s) {', '.join(u + did_you_mean(u, sections) for u in unknown)}; sections: {', '.join(sections)}")


def load_yaml(text: str, what: str) -> Any:
    """Plain YAML data (``yaml.safe_load``): a tag that builds objects or bad syntax is one ``ValueError``.

    Raises:
        ValueError: Naming ``what`` and the line, never echoing the document.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"{what}{where}: not plain YAML data: {problem}; only mappings, lists, strings and numbers are read") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's YAML: a mapping (of options, or of sections), ``{}`` when empty.

    Raises:
        ValueError: If the file is missing or does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    loaded = load_yaml(p.read_text(), f"config file {p}") or {}
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


def config_record(cfg: Any) -> dict[str, Any]:
    """The config as it is kept at rest (manifests, cards, checkpoints, ``config.yaml``) and compared with
    what was kept: :func:`config_to_dict` with every configured secret cut (:func:`imgpipe.storage.redact_value`).

    What a step runs with stays :func:`config_to_dict` (a remote job's payload needs the real URIs).
    """
    return redact_value(config_to_dict(cfg))


def config_to_yaml(cfg: Any) -> str:
    """Returns the resolved config as YAML, the form written next to a step's outputs (:func:`config_record`)."""
    return yaml.safe_dump(config_record(cfg), sort_keys=False)


def changed_fields(cfg: Any) -> dict[str, Any]:
    """The fields of a config that differ from its defaults in code, as plain data (what a run changed)."""
    defaults, values = config_to_dict(type(cfg)()), config_to_dict(cfg)
    return {k: v for k, v in values.items() if v != defaults.get(k)}
