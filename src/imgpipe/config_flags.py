"""Command-line flags and pipeline parameters derived from a config: its fields' types, choices, defaults and docs.

    add_field_flags(parser, CleanConfig, ("seed", "split"))      # --seed, --split: type, choices, help
    args = parser.parse_args()
    cfg = load_config(CleanConfig, args.config, flag_overrides(args), "clean")
    field_default(CleanConfig, "seed"), field_docs(CleanConfig)["seed"]   # a pipeline parameter

:func:`env_flag` reads a yes/no environment variable. Loading and checking a config live in
:mod:`imgpipe.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import docstring_parser

from imgpipe.config import did_you_mean, parse_override

__all__ = [
    "field_docs",
    "plain_text",
    "field_default",
    "add_field_flags",
    "flag_overrides",
    "env_flag",
]


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description, from the ``Attributes:`` section of the class docstring."""
    parsed = docstring_parser.parse(cls.__doc__ or "")
    return {p.arg_name: " ".join(p.description.split()) for p in parsed.params if p.args[:1] == ["attribute"]}


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of config ``cls`` (the one place it is written).

    Raises:
        ValueError: If ``cls`` has no such field, or the field has no default.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{cls.__name__} has no field {name!r}{did_you_mean(name, fields)}")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def plain_text(doc: str) -> str:
    """A docstring fragment without reST literals and roles (``x``, :data:`X`), for terminals and UIs."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc).replace("``", "")


def _flag_help(doc: str, default: Any) -> str:
    doc = plain_text(doc)
    text = doc if default is None or default == () else f"{doc} (default: {_shown(default)})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_field_flags(parser: argparse.ArgumentParser, cls: type, names: Sequence[str], *, flags: Mapping[str, str] | None = None) -> None:
    """Adds one flag per config field, its type, choices, default and help taken from ``cls``.

    Every flag's value defaults to ``None`` ("not given"): the config file, then the
    field's default, apply (:func:`~imgpipe.config.load_config`). Booleans get ``--x/--no-x``; a
    ``Literal`` gets its choices; a ``tuple[str, ...]`` field a repeatable flag; other
    tuples one comma-separated value. :func:`flag_overrides` reads them back.

    Args:
        parser: The sub-command's parser.
        cls: The step's config dataclass.
        names: The fields to expose, in help order.
        flags: Flag names that differ from ``--field-name`` (``{"num_workers": "--workers"}``).

    Raises:
        ValueError: For a name that is not a field of ``cls``.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for name in names:
        default = field_default(cls, name)
        annotation = _strip_optional(hints[name])
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _flag_help(docs.get(name, ""), default)}
        args = typing.get_args(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs.update(choices=list(args), type=type(args[0]))
        elif typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
            kwargs.update(action="append", type=args[0])
        elif annotation in (int, float):
            kwargs["type"] = annotation
        if "choices" not in kwargs and annotation is not bool:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, **kwargs)
    known = parser.get_default("config_fields") or ()
    parser.set_defaults(config_fields=(*known, *names))


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags (see :func:`add_field_flags`) and ``--set`` pairs.

    A flag wins over a ``--set`` of the same field; flags not given are left out.
    """
    values = dict(parse_override(o) for o in getattr(args, "overrides", None) or [])
    for name in getattr(args, "config_fields", ()):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """Whether the variable ``name`` of ``env`` says yes (``1``, ``true``, ``yes``, ``on``); unset or empty is ``default``.

    Raises:
        ValueError: For a value that is neither yes nor no.
    """
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={env[name]!r} must be 1 (yes) or 0 (no)")
