"""The label gate: class names and class indices a source declares pass one rule before anything uses them.

    names = check_class_list(value, "file:///d/beans/README.md: dataset_info class_label names of column 'labels'")
    index, why = class_index("17", declared=len(names))   # (17, "") or (None, "the .cls class index 17 is ...")

A declared list of class names (a dataset card's, a ``ClassLabel``'s in the schema metadata or
``dataset_info.json``, a WebDataset's ``class_names``, a download manifest's ``classes``) is a
list of strings, at most :data:`MAX_CLASSES` of them, each a usable class name
(:func:`imgpipe.data.labels.check_class_name`: no control or bidirectional characters, no path
separator, 1..128 characters), none twice. A list that breaks the rule refuses its source in one
``ValueError`` naming where it was read and the rule it broke: a repair (merging duplicates,
``str()`` of a mapping or a number) would move class indices without a word.

A class index one sample gives (a WebDataset ``.cls``, an integer label) is an integer below the
number of declared names, or below :data:`MAX_CLASSES` where the source declares none; anything
else is that sample's ``bad_label`` reject, never the source's failure.
"""

from __future__ import annotations

import re
from typing import Any

from imgpipe.data.labels import check_class_name

__all__ = ["MAX_CLASSES", "describe", "check_class_list", "class_index"]

# The most classes one source may declare, and the bound of an index where it declares none.
MAX_CLASSES = 100_000
# Digits an index may have before it is parsed: int() of a longer string costs quadratic time,
# and past 4300 digits Python refuses it (sys.get_int_max_str_digits).
_MAX_INDEX_DIGITS = len(str(MAX_CLASSES)) + 2
_INDEX = re.compile(r"([+-]?)0*([0-9]+)")


def describe(value: Any) -> str:
    """What a value is, for a message that must not echo it (``"a mapping"``, ``"null"``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def check_class_list(value: Any, where: str) -> tuple[str, ...]:
    """``value`` as a tuple of class names, when it passes the rule of the module docstring.

    Args:
        value: The declared list, as parsed (anything: it comes from a file).
        where: The file (and the place in it) the list was read from, for the message.

    Raises:
        ValueError: One line naming ``where`` and the rule broken; a name that failed is
            named by its index (and a repeated one, which passed every other check, by itself).
    """
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: the class names are {describe(value)}, not a list of strings")
    if len(value) > MAX_CLASSES:
        raise ValueError(f"{where}: {len(value)} class names; at most {MAX_CLASSES} are allowed")
    first: dict[str, int] = {}
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise ValueError(f"{where}: class {i} is {describe(name)}, not a string")
        bad = check_class_name(name)
        if bad is not None:
            raise ValueError(f"{where}: class {i}: {bad}")
        if name in first:
            raise ValueError(f"{where}: class {i} repeats class {first[name]} ({name!r}); a name listed more than once would merge two classes")
        first[name] = i
    return tuple(value)


def class_index(value: int | str, declared: int | None, what: str = "class index") -> tuple[int | None, str]:
    """The class index ``value`` gives, or ``None`` and why it gives none (a ``bad_label`` detail).

    Args:
        value: An integer, or the text of one (a ``.cls`` part).
        declared: How many class names the source declares; ``None``: it declares none, and
            the bound is :data:`MAX_CLASSES`.
        what: What the value is, for the detail (``"the .cls class index"``).
    """
    if isinstance(value, bool):
        return None, f"{what} is a boolean, not an integer"
    if isinstance(value, str):
        text = value.strip()
        match = _INDEX.fullmatch(text)
        if match is None:
            return None, f"{what} is not an integer"
        sign, digits = match.groups()
        if len(digits) > _MAX_INDEX_DIGITS:
            return None, f"{what} has {len(digits)} digits, more than any class index"
        value = -int(digits) if sign == "-" else int(digits)
    bound = MAX_CLASSES if declared is None else declared
    if value < 0:
        return None, f"{what} {value} is negative"
    if value >= bound:
        if declared is None:
            return None, f"{what} {value} is past {MAX_CLASSES - 1}, the largest index a source without class names may give"
        return None, f"{what} {value} is outside the {declared} class names the source declares"
    return value, ""
