"""What a Hugging Face dataset's files say about themselves: its image and label columns, class names, splits.

    columns = resolve_columns(uri, schema, features, image_column=None, label_column=None)
    names = card_class_names(readme_text)          # {"labels": ["angular_leaf_spot", ...]} from the Hub's README
    split = split_from_path("data/validation-00000-of-00001.parquet")   # "val"

Columns are found by name (``image``/``img``, ``label``/``labels``/``fine_label``: what
``datasets`` writes for most image sets, CIFAR-10's ``img``, beans' ``labels``, CIFAR-100's
``fine_label``), then by feature type (the one ``Image`` or ``ClassLabel`` column), or named
by the ``image_column``/``label_column`` settings. Class names come from the Hub README's
``dataset_info`` front matter, ``dataset_info.json`` (``save_to_disk``) or the ``huggingface``
schema metadata ``datasets`` writes into every Parquet and Arrow file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import yaml

from imgpipe.parquet import HF_METADATA_KEY

__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "SPLIT_COLUMN",
    "Columns",
    "schema_features",
    "class_names",
    "card_class_names",
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
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)
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


def class_names(schema: pa.Schema, column: str = "label", features: dict[str, Any] | None = None) -> list[str] | None:
    """The ``ClassLabel`` names of ``column``: from ``features`` (``dataset_info.json``), else the schema metadata.

    Raises:
        ValueError: If the ``ClassLabel`` feature's ``names`` is not a list of strings.
    """
    for source in (features if isinstance(features, dict) else {}, schema_features(schema)):
        feature = source.get(column)
        if not (isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature):
            continue
        names = feature["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"the ClassLabel feature of column {column!r} has names {str(names)[:80]}, not a list of strings")
        return list(names)
    return None


def card_class_names(readme: str) -> dict[str, list[str]]:
    """Each ``class_label`` column's names in a dataset card's YAML front matter (the Hub's ``README.md``).

    ``push_to_hub`` writes ``dataset_info: features: - name: label dtype: class_label: names:
    {'0': cat, '1': dog}`` (``datasets.info.DatasetInfo._to_yaml_dict``); a card with several
    configs has a list of ``dataset_info`` entries, of which the first (or ``default``) counts.
    """
    match = _FRONT_MATTER.match(readme.lstrip("\ufeff"))
    if match is None:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    info = meta.get("dataset_info") if isinstance(meta, dict) else None
    if isinstance(info, list):
        info = next((i for i in info if isinstance(i, dict) and i.get("config_name") == "default"), info[0] if info else None)
    features = info.get("features") if isinstance(info, dict) else None
    out: dict[str, list[str]] = {}
    for feature in features if isinstance(features, list) else []:
        dtype = feature.get("dtype") if isinstance(feature, dict) else None
        names = (dtype.get("class_label") or {}).get("names") if isinstance(dtype, dict) else None
        if isinstance(names, dict):  # {'0': cat, '1': dog}; other keys make it no list of names
            names = [names[k] for k in sorted(names, key=int)] if all(isinstance(k, int) or str(k).isdigit() for k in names) else None
        if isinstance(names, list) and isinstance(feature, dict) and "name" in feature:
            out[str(feature["name"])] = [str(n) for n in names]
    return out


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
