"""What a Hugging Face dataset's files say about themselves: its image and label columns, class names, splits.

    columns = resolve_columns(uri, schema, features, image_column=None, label_column=None)
    names = class_names(schema, "labels", features, uri)   # ("angular_leaf_spot", ...) of a ClassLabel, or None
    split = split_from_path("data/validation-00000-of-00001.parquet")   # "val"

Columns are found by name (``image``/``img``, ``label``/``labels``/``fine_label``: what
``datasets`` writes for most image sets, CIFAR-10's ``img``, beans' ``labels``, CIFAR-100's
``fine_label``), then by feature type (the one ``Image`` or ``ClassLabel`` column), or named
by the ``image_column``/``label_column`` settings. Class names come from the Hub README's
``dataset_info`` front matter (:mod:`imgpipe.data.readers.card`), ``dataset_info.json``
(``save_to_disk``) or the ``huggingface`` schema metadata ``datasets`` writes into every Parquet
and Arrow file, each through the label gate (:func:`imgpipe.data.labelgate.check_class_list`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from imgpipe.data.labelgate import check_class_list
from imgpipe.parquet import HF_METADATA_KEY

__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "SPLIT_COLUMN",
    "Columns",
    "schema_features",
    "class_names",
    "normalize_split",
    "split_from_path",
    "resolve_columns",
]

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
SPLIT_COLUMN = "split"
# The split keywords datasets' data-file patterns recognise (datasets/data_files.py,
# KEYWORDS_IN_FILENAME_BASE_PATTERNS), each mapped to the split clean uses.
_SPLITS = {
    "train": "train",
    "training": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "eval": "val",
    "test": "test",
    "testing": "test",
}
_SETTING = "set the download step's {0} (config `download: {{{0}: NAME}}`, or step_config download.{0})"


@dataclass(frozen=True)
class Columns:
    """The columns a reader takes from a Hugging Face dataset file.

    Attributes:
        image: The image column: an ``Image`` feature (``struct<bytes, path>``) or plain binary.
        label: The label column: integers (``ClassLabel``) or strings.
        split: ``"split"`` where the file has a string column of that name, else ``None``.
        struct: Whether ``image`` is a ``struct<bytes, path>`` (else bare bytes).
    """

    image: str
    label: str
    split: str | None
    struct: bool


def schema_features(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features the ``huggingface`` schema metadata records (``{}`` if none)."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(info, dict):
        return {}
    inner = info.get("info")
    features = (inner.get("features") if isinstance(inner, dict) else None) or info.get("features") or {}
    return features if isinstance(features, dict) else {}


def class_names(schema: pa.Schema, column: str, features: dict[str, Any] | None, uri: str) -> tuple[str, ...] | None:
    """The ``ClassLabel`` names of ``column``: from ``features`` (``dataset_info.json``), else the schema metadata.

    Raises:
        ValueError: Naming ``uri`` and where in it, when the names break the label gate's rule
            (:func:`imgpipe.data.labelgate.check_class_list`).
    """
    given = features if isinstance(features, dict) else {}
    for source, what in ((given, "dataset_info.json features"), (schema_features(schema), "huggingface schema metadata")):
        feature = source.get(column)
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature:
            return check_class_list(feature["names"], f"{uri}: ClassLabel names of column {column!r} in the {what}")
    return None


def normalize_split(name: Any) -> str | None:
    """``train``, ``val`` or ``test`` for a split name (``validation``, ``valid``, ``dev`` are ``val``); ``None`` for any other."""
    return _SPLITS.get(str(name).strip().lower()) if name is not None else None


def split_from_path(path: str) -> str | None:
    """The split a dataset file's name gives: its name's first word, else its folders' (``data/train-00000-of-00002.parquet``)."""
    parts = path.replace("\\", "/").split("/")
    for part in (parts[-1].split(".", 1)[0], *reversed(parts[:-1])):
        word = re.split(r"[^A-Za-z]+", part)[0]
        split = normalize_split(word) if word else None
        if split is not None:
            return split
    return None


def resolve_columns(
    uri: str, schema: pa.Schema, features: dict[str, Any] | None = None, *, image_column: str | None = None, label_column: str | None = None
) -> Columns:
    """The image, label and split columns of one file, found as the module docstring says.

    Raises:
        ValueError: Naming the columns the file has, what was expected, and the setting to
            use, when the image or the label column is missing or of another type.
    """
    feats = {**schema_features(schema), **(features if isinstance(features, dict) else {})}
    image = _pick(schema, feats, image_column, IMAGE_COLUMNS, "Image", _is_image)
    label = _pick(schema, feats, label_column, LABEL_COLUMNS, "ClassLabel", _is_label)
    problems = []
    if image is None:
        wanted = f"'{image_column}' column" if image_column else "'image' column (or 'img')"
        problems.append(
            f"it needs an {wanted} of struct<bytes: binary, path: string> (the Image feature) or of bytes; " + _SETTING.format("image_column")
        )
    if label is None:
        wanted = f"a '{label_column}' column" if label_column else "a label column (" + ", ".join(f"'{c}'" for c in LABEL_COLUMNS) + ")"
        problems.append(f"it needs {wanted} of ClassLabel integers or strings; " + _SETTING.format("label_column"))
    if problems:
        raise ValueError(f"{uri} is not a Hugging Face image classification set: {'; '.join(problems)}; its columns are {schema.names}")
    assert image is not None and label is not None
    split = SPLIT_COLUMN if SPLIT_COLUMN in schema.names and _is_string(schema.field(SPLIT_COLUMN).type) else None
    return Columns(image, label, split, pa.types.is_struct(schema.field(image).type))


def _pick(schema: pa.Schema, features: dict[str, Any], named: str | None, names: tuple[str, ...], feature: str, fits: Any) -> str | None:
    if named:
        return named if named in schema.names and fits(schema.field(named).type) else None
    for name in names:
        if name in schema.names and fits(schema.field(name).type):
            return name
    typed = [n for n in schema.names if isinstance(features.get(n), dict) and features[n].get("_type") == feature and fits(schema.field(n).type)]
    return typed[0] if len(typed) == 1 else None


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        kids = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        path = kids.get("path")
        if path is not None and not (_is_string(path) or pa.types.is_null(path)):
            return False  # a path that is no text is no Image feature
        return "bytes" in kids and (_is_binary(kids["bytes"]) or (pa.types.is_null(kids["bytes"]) and path is not None))
    return _is_binary(t)


def _is_label(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or _is_string(t)) and not pa.types.is_boolean(t)
