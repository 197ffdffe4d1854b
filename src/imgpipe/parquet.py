"""How imgpipe's data files are written: Parquet options per column, and the Hugging Face features that make them open as datasets.

    pq.write_table(table, sink, **parquet_write_options(table.schema))   # images uncompressed, the rest zstd
    schema = with_hf_features(schema, classes)     # datasets reads image as Image, label as ClassLabel

The image and label columns are typed as the ``datasets`` library types its ``Image`` and
``ClassLabel`` features (:data:`IMAGE_FIELD`, :data:`LABEL_FIELD`), so the outputs load with
``datasets.load_dataset("parquet", ...)`` unchanged.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["table_to_parquet_bytes", "parquet_write_options", "IMAGE_FIELD", "LABEL_FIELD", "HF_METADATA_KEY", "hf_features", "with_hf_features"]


def table_to_parquet_bytes(table: pa.Table, **kwargs: Any) -> bytes:
    """Serializes a table to Parquet in memory (for small tables such as rejects)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def _leaf_paths(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    out: list[tuple[str, pa.DataType]] = []

    def walk(prefix: str, dtype: pa.DataType) -> None:
        if pa.types.is_struct(dtype):
            for child in dtype:
                walk(f"{prefix}.{child.name}", child.type)
        else:
            out.append((prefix, dtype))

    for f in schema:
        walk(f.name, f.type)
    return out


def parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet settings for a step's data files.

    Binary columns hold encoded images (JPEG/PNG) or raw pixels: compressing them again
    costs about 4x the write time for a fraction of a percent, dictionary encoding them
    is pointless, and min/max statistics on them are never used. Everything else gets
    zstd and statistics.
    """
    leaves = _leaf_paths(schema)
    binary = [p for p, t in leaves if pa.types.is_binary(t) or pa.types.is_large_binary(t)]
    return {
        "compression": {p: ("none" if p in binary else "zstd") for p, _ in leaves},
        "use_dictionary": [p for p, _ in leaves if p not in binary],
        "write_statistics": [p for p, _ in leaves if p not in binary],
    }


# The image and label columns of clean and resize, typed as the Hugging Face `datasets` Image
# and ClassLabel features store them (datasets 5.2.0 src/datasets/features/image.py
# Image.pa_type, features.py ClassLabel.pa_type), nullable included: datasets applies a feature
# from the schema metadata only to a field equal to its own (with_hf_features). No step writes
# nulls there.
IMAGE_FIELD = pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))


LABEL_FIELD = pa.field("label", pa.int64())


# The Parquet schema metadata key `datasets` reads features from (arrow_writer.py _build_metadata).
HF_METADATA_KEY = b"huggingface"


def hf_features(schema: pa.Schema, classes: Sequence[str]) -> dict[str, Any]:
    """The Hugging Face ``datasets`` features of a step's data files, as ``Features.to_dict()`` writes them.

    Only the columns whose meaning the Arrow type does not carry are described: ``image``
    is an ``Image``, ``label`` a ``ClassLabel`` named by ``classes``, and any other binary
    column (resize's raw ``pixels``) a plain ``Value("binary")``, never an image. ``datasets``
    infers every other column from its Arrow type (datasets 5.2.0
    src/datasets/features/features.py ``Features.from_arrow_schema``), which also keeps the
    metadata readable by versions whose nested feature names differ (``List``/``Sequence``).

    Args:
        schema: The data files' schema; it must have ``label`` typed as :data:`LABEL_FIELD`,
            and ``image``, if present, as :data:`IMAGE_FIELD`.
        classes: Class names in label order.

    Raises:
        TypeError: If a class name is not a string.
        ValueError: If class names repeat, or ``label``/``image`` are typed otherwise (datasets
            would silently ignore their features).
    """
    if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise TypeError(f"classes must be a list of class names (strings), got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique (they name the label indices), got {list(classes)}")
    expected = {LABEL_FIELD.name: LABEL_FIELD, IMAGE_FIELD.name: IMAGE_FIELD}
    if LABEL_FIELD.name not in schema.names:
        raise ValueError(f"the schema has no {LABEL_FIELD.name!r} column to carry the class names")
    features: dict[str, Any] = {}
    for f in schema:
        if f.name in expected and not f.equals(expected[f.name]):
            raise ValueError(
                f"column {f.name!r} is {f.type} (nullable={f.nullable}); the datasets library applies its "
                f"feature only to {expected[f.name].type} (nullable=True): use imgpipe.parquet.{f.name.upper()}_FIELD"
            )
        if f.name == IMAGE_FIELD.name:
            features[f.name] = {"_type": "Image"}
        elif f.name == LABEL_FIELD.name:
            features[f.name] = {"names": list(classes), "_type": "ClassLabel"}
        elif pa.types.is_binary(f.type):
            features[f.name] = {"dtype": "binary", "_type": "Value"}
    return features


def with_hf_features(schema: pa.Schema, classes: Sequence[str]) -> pa.Schema:
    """``schema`` with its :func:`hf_features` in the metadata, as ``datasets`` writes them.

    ``datasets.load_dataset("parquet", ...)`` then reads ``image`` as ``Image`` and ``label`` as
    ``ClassLabel(names=classes)``; other readers ignore the key. The JSON is deterministic,
    so a re-run still writes byte-identical files.

    Raises:
        TypeError: As :func:`hf_features`.
        ValueError: As :func:`hf_features`.
    """
    body = json.dumps({"info": {"features": hf_features(schema, classes)}})
    return schema.with_metadata({**(schema.metadata or {}), HF_METADATA_KEY: body.encode()})
