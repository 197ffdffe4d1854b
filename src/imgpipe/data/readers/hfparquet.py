"""A Hugging Face ``datasets`` Parquet file as a source: the ``image`` column's bytes, classes from ``ClassLabel``.

    reader = HfParquetReader(uri, local_file, max_member_bytes=...)

The file is what ``datasets`` writes (``Dataset.to_parquet``, the Hub's ``refs/convert/parquet``)
and what imgpipe's own clean and resize steps write: ``image`` a struct of ``bytes`` and
``path`` (the ``Image`` feature), ``label`` an integer whose names the schema metadata's
``huggingface`` features give (``ClassLabel``), or a string. It is read a row group at a time.
A file without a ``label`` column is refused. A row's member is named ``<file stem>/<row:08d>-<file name of image.path>`` (the path a
``datasets`` row keeps is often absolute, from the machine that made it); its label is the
class name. A row without image bytes is a ``sample_without_image`` reject, one whose label is
null or outside the names a ``no_label`` reject. A file with another schema is refused whole,
naming what it lacks.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe.data.archive import Member
from imgpipe.data.readers.base import Reader
from imgpipe.data.readers.listing import fetched
from imgpipe.data.readers.webdataset import NO_IMAGE, NO_LABEL
from imgpipe.parquet import HF_METADATA_KEY

__all__ = ["PARQUET_MAGIC", "is_parquet", "class_names", "HfParquetReader"]

PARQUET_MAGIC = b"PAR1"


def is_parquet(local: Path) -> bool:
    """Whether a local file starts (and ends) with Parquet's magic bytes."""
    with open(local, "rb") as fh:
        head = fh.read(4)
        fh.seek(0, 2)
        if fh.tell() < 8:
            return False
        fh.seek(-4, 2)
        return head == PARQUET_MAGIC and fh.read(4) == PARQUET_MAGIC


def class_names(schema: pa.Schema, column: str = "label") -> list[str] | None:
    """The ``ClassLabel`` names the ``huggingface`` schema metadata gives ``column``, if any."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    feature = (info.get("info", {}).get("features", {}) or {}).get(column) if isinstance(info, dict) else None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) else None


class HfParquetReader(Reader):
    """The rows of one Hugging Face Parquet file."""

    kind = "hf-parquet"

    def __init__(self, uri: str, local: Path, *, sha256: str | None, size: int | None, max_member_bytes: int) -> None:
        self.uri, self.local, self.sha256, self.bytes, self.max_member_bytes = uri, local, sha256, size, max_member_bytes
        self._file = pq.ParquetFile(local)
        self.names, self.label_type = self._check(self._file.schema_arrow)

    def _check(self, schema: pa.Schema) -> tuple[list[str] | None, pa.DataType]:
        image = schema.field("image") if "image" in schema.names else None
        kids = (
            {image.type.field(i).name: image.type.field(i).type for i in range(image.type.num_fields)}
            if image and pa.types.is_struct(image.type)
            else {}
        )
        if not (pa.types.is_binary(kids.get("bytes", pa.null())) or pa.types.is_large_binary(kids.get("bytes", pa.null()))):
            raise ValueError(
                f"{self.uri} is Parquet but not a Hugging Face image dataset: it needs an 'image' column of "
                f"struct<bytes: binary, path: string> (the Image feature); its columns are {schema.names}"
            )
        if "label" not in schema.names:
            raise ValueError(f"{self.uri} has no 'label' column (a ClassLabel or a string): an image classification set needs one")
        label = schema.field("label").type
        if not (pa.types.is_integer(label) or pa.types.is_string(label) or pa.types.is_large_string(label)):
            raise ValueError(f"{self.uri}: its 'label' column is {label}; an integer (ClassLabel) or a string is expected")
        names = class_names(schema)
        return names, label

    def declared_members(self) -> int | None:
        return self._file.metadata.num_rows

    def manifest_entry(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": self.kind, "sha256": self.sha256, "bytes": self.bytes, "classes": self.names}

    def members(self) -> Iterator[Member]:
        stem = Path(self.uri.rsplit("/", 1)[-1]).stem or "data"
        columns = ["image", "label"]
        row = 0
        for group in range(self._file.metadata.num_row_groups):
            table = self._file.read_row_group(group, columns=columns)
            images = table.column("image").combine_chunks()
            data, paths = images.field("bytes"), images.field("path") if images.type.get_field_index("path") >= 0 else None
            labels = table.column("label").to_pylist()
            for i in range(table.num_rows):
                yield self._member(stem, row, data[i].as_py(), paths[i].as_py() if paths is not None else None, labels[i])
                row += 1

    def _member(self, stem: str, row: int, data: bytes | None, source_path: str | None, label: Any) -> Member:
        base = posixpath.basename((source_path or "").replace("\\", "/"))
        path = f"{stem}/{row:08d}" + (f"-{base}" if base else "")
        if data is None:
            return Member(path, 0, NO_IMAGE, "the row's image has no bytes (a path alone is not read)")
        if len(data) > self.max_member_bytes:
            return Member(path, len(data), "member_too_large", f"{len(data)} bytes > max_member_bytes={self.max_member_bytes}")
        name = self._name(label)
        if name is None:
            return Member(path, len(data), NO_LABEL, f"label {label!r} names no class" + (f" of {len(self.names)}" if self.names else ""))
        return fetched(path, data, label=name)

    def _name(self, label: Any) -> str | None:
        if label is None or isinstance(label, bool):
            return None
        if isinstance(label, int):
            if self.names is None:
                return str(label)
            return self.names[label] if 0 <= label < len(self.names) else None
        text = str(label).strip()
        return text or None
