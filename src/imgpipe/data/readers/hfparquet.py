"""A Hugging Face ``datasets`` file as a source: a Parquet file, or an Arrow file of ``save_to_disk``.

    reader = HfParquetReader(uri, local_file, sha256=..., size=..., max_member_bytes=...)
    reader = HfArrowReader(uri, local_arrow_file, max_member_bytes=..., features=dataset_info["features"])

The file is what ``datasets`` writes (``Dataset.to_parquet``, ``push_to_hub``, the Hub's
``refs/convert/parquet``, ``save_to_disk``'s Arrow stream files) and what imgpipe's own clean
and resize steps write. The image and label columns are found as
:mod:`~imgpipe.data.readers.hfschema` says (``image``/``img``, ``label``/``labels``/``fine_label``,
or the ``image_column``/``label_column`` settings); class names from the Hub card, the
``dataset_info.json`` or the schema's ``huggingface`` metadata (``ClassLabel``). It is read a
row group (a record batch) at a time.

A row's member is named ``<stem>/<row:08d>-<file name of image.path>``; its label is the class
name, its split the file's (``train-00000-of-00001.parquet``) or the row's ``split`` column.
A row whose image has no bytes but a path (``Dataset.to_parquet`` of an ``Image`` column made
from file paths stores only the path) is read from that path relative to the file's folder
when :class:`ImageFiles` allows it: never outside the dataset's folder (an ``unsafe_member``),
and an absolute path refuses the whole source with the fix. A row with neither is a
``sample_without_image`` reject, one whose label is null (or ``-1``) a ``no_label`` reject,
and one whose class index is outside the declared names (or past the label gate's cap where
none are declared) a ``bad_label`` reject (:func:`imgpipe.data.labelgate.class_index`). A
FIFO, device or socket where a data file should be is refused before it is read.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from abc import abstractmethod
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.data import archive
from imgpipe.data.archive import Member
from imgpipe.data.labelgate import class_index
from imgpipe.data.labels import BAD_LABEL
from imgpipe.data.readers.base import Reader
from imgpipe.data.readers.hfschema import Columns, class_names, normalize_split, resolve_columns, split_from_path
from imgpipe.data.readers.listing import read_object
from imgpipe.data.readers.webdataset import NO_IMAGE, NO_LABEL
from imgpipe.data.sources import SourcePolicy, SourceRefused
from imgpipe.data.transport import REFUSED, TOO_LARGE

__all__ = ["PARQUET_MAGIC", "EMBED_FIX", "is_parquet", "ImageFiles", "HfTableReader", "HfParquetReader", "HfArrowReader"]

PARQUET_MAGIC = b"PAR1"
# What makes datasets write the bytes of an Image column made from paths (datasets 5.2.0:
# to_parquet writes the column's storage as it is; push_to_hub and save_to_disk embed it).
EMBED_FIX = (
    "embed the images before writing: `from datasets.table import embed_table_storage; "
    "ds = ds.with_format('arrow').map(embed_table_storage, batched=True).with_format(None); ds.to_parquet(...)` "
    "(ds.save_to_disk() and ds.push_to_hub() embed them too)"
)
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_parquet(local: Path) -> bool:
    """Whether a local file starts (and ends) with Parquet's magic bytes.

    Raises:
        NotRegularFile: For a FIFO, device or socket (refused, never waited on): a ``ValueError``.
    """
    with storage.open_regular(local) as fh:
        head = fh.read(4)
        fh.seek(0, 2)
        if fh.tell() < 8:
            return False
        fh.seek(-4, 2)
        return head == PARQUET_MAGIC and fh.read(4) == PARQUET_MAGIC


class ImageFiles:
    """Where the path of a path-only image row may lead: below the dataset's folder, as the source policy allows.

    Args:
        root: The dataset's folder (a ``file://`` or ``s3://`` URI); nothing outside it is read.
        folder: The data file's folder relative to ``root`` (``data``), which paths are relative to.
        policy: The download's source policy (the rows are run input, like a URI list's entries).
    """

    def __init__(self, root: str, folder: str, policy: SourcePolicy) -> None:
        self.root, self.folder, self.policy = storage.normalize_uri(root).rstrip("/"), folder.strip("/"), policy

    def locate(self, path: str) -> tuple[str | None, str]:
        """The URI of ``path`` (``None`` where it may not be read) and why not.

        Raises:
            ValueError: If ``path`` is absolute (a file on the machine that wrote the dataset).
        """
        text = path.replace("\\", "/")
        if text.startswith(("/", "~")) or _DRIVE.match(text) or "://" in text:
            raise ValueError(f"absolute path {path!r}")
        joined = posixpath.normpath(posixpath.join(self.folder, text))
        if joined == ".." or joined.startswith("../"):
            return None, f"image path {path!r} leads outside the dataset's folder"
        uri = storage.join(self.root, joined)
        if storage.is_local(uri):
            real, top = os.path.realpath(storage.local_path(uri)), os.path.realpath(storage.local_path(self.root))
            if os.path.commonpath([real, top]) != top:
                return None, f"image path {path!r} is a link that leads outside the dataset's folder"
        try:
            self.policy.check_source(uri, pinned=False)
        except SourceRefused as exc:
            return None, f"{REFUSED}: {exc}"
        return uri, ""


class HfTableReader(Reader):
    """The rows of one ``datasets`` file (see the module docstring); subclasses give its schema and tables."""

    kind = "hf-parquet"

    def __init__(
        self,
        uri: str,
        *,
        max_member_bytes: int,
        stem: str | None = None,
        split: str | None = None,
        card: dict[str, tuple[str, ...]] | None = None,
        features: dict[str, Any] | None = None,
        images: ImageFiles | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        self.uri, self.max_member_bytes, self.images = uri, max_member_bytes, images
        self.stem = stem or Path(uri.rsplit("/", 1)[-1]).stem or "data"
        self.split = split if split is not None else split_from_path(uri.rsplit("/", 1)[-1])
        schema = self.schema()
        self.columns: Columns = resolve_columns(uri, schema, features, image_column=image_column, label_column=label_column)
        try:
            self.names = (card or {}).get(self.columns.label) or class_names(schema, self.columns.label, features, uri)
        except ValueError as exc:
            raise ValueError(f"{exc}; fix or drop the metadata") from None

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The file's Arrow schema (its metadata included)."""

    @abstractmethod
    def tables(self, columns: list[str]) -> Iterator[pa.Table]:
        """The file's rows, a row group (record batch) at a time, only ``columns``."""

    def manifest_entry(self) -> dict[str, Any]:
        classes = list(self.names) if self.names is not None else None
        return {"uri": self.uri, "format": self.kind, "sha256": getattr(self, "sha256", None), "bytes": self.bytes, "classes": classes}

    def members(self) -> Iterator[Member]:
        try:
            yield from self._rows()
        except (pa.ArrowException, OSError) as exc:  # ArrowInvalid is a ValueError, without the file's name
            raise ValueError(f"{self.uri} is corrupt: {type(exc).__name__}: {str(exc)[:200]}") from None

    def _rows(self) -> Iterator[Member]:
        cols = self.columns
        wanted = [cols.image, cols.label, *([cols.split] if cols.split else [])]
        row = 0
        for table in self.tables(wanted):
            image = table.column(cols.image).combine_chunks()
            if cols.struct:
                data = image.field("bytes")
                paths = image.field("path") if image.type.get_field_index("path") >= 0 else None
            else:
                data, paths = image, None
            labels = table.column(cols.label).to_pylist()
            splits = table.column(cols.split).to_pylist() if cols.split else None
            for i in range(table.num_rows):
                split = normalize_split(splits[i]) if splits is not None else self.split
                source_path = paths[i].as_py() if paths is not None else None
                yield self._member(row, data[i].as_py(), source_path, labels[i], split)
                row += 1

    def _member(self, row: int, data: bytes | None, source_path: str | None, label: Any, split: str | None) -> Member:
        base = posixpath.basename((source_path or "").replace("\\", "/"))
        path = f"{self.stem}/{row:08d}" + (f"-{base}" if base else "")
        if data is None and source_path:
            return self._from_path(path, source_path, label, split)
        if data is None:
            return Member(path, 0, NO_IMAGE, "the row's image has neither bytes nor a path")
        if len(data) > self.max_member_bytes:
            return Member(path, len(data), TOO_LARGE, f"{len(data)} bytes > max_member_bytes={self.max_member_bytes}")
        return self._labelled(path, data, label, split)

    def _labelled(self, path: str, data: bytes, label: Any, split: str | None) -> Member:
        name, reason, detail = self._name(label)
        if name is None:
            return Member(path, len(data), reason, detail)
        return Member(path, len(data), opener=partial(io.BytesIO, data), label=name, split=split)

    def _from_path(self, path: str, source_path: str, label: Any, split: str | None) -> Member:
        try:
            if self.images is None:
                raise ValueError("a file fetched over HTTP has no folder to read it from")
            uri, problem = self.images.locate(source_path)
        except ValueError as exc:
            raise ValueError(
                f"{self.uri}: the {self.columns.image!r} column holds paths, not bytes ({exc}, row {path}), "
                f"which name files on the machine that wrote it: {EMBED_FIX}"
            ) from None
        if uri is None:
            reason = REFUSED if problem.startswith(REFUSED) else archive.UNSAFE_MEMBER
            return Member(path, 0, reason, problem.removeprefix(f"{REFUSED}: "))
        try:
            data, _ = read_object(uri, self.max_member_bytes)
        except archive.MemberTooLarge:
            return Member(path, 0, TOO_LARGE, f"{source_path} is over max_member_bytes={self.max_member_bytes}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return Member(path, 0, NO_IMAGE, f"the row's image path {source_path!r} names no file below the dataset's folder")
        except storage.NotRegularFile:
            return Member(path, 0, archive.UNSAFE_MEMBER, f"the row's image path {source_path!r} names no regular file (a FIFO, device or socket)")
        return self._labelled(path, data, label, split)

    def _name(self, label: Any) -> tuple[str | None, str, str]:
        """The class name of a row's label, else ``None`` with the reject's reason and detail.

        An integer is a class index below the declared names' count (or the label gate's cap
        where the file declares none): anything else is this row's ``bad_label``. ``-1`` is
        ``datasets``' own mark of a row without a label (``no_label``).
        """
        if label is None or isinstance(label, bool):
            return None, NO_LABEL, "the row's label is null"
        if isinstance(label, int):
            if label == -1:
                return None, NO_LABEL, "the row's label is -1 (datasets' mark of a row without a label)"
            index, why = class_index(label, None if self.names is None else len(self.names), "the row's class index")
            if index is None:
                return None, BAD_LABEL, why
            return (str(index) if self.names is None else self.names[index]), "", ""
        text = str(label).strip()
        return (text, "", "") if text else (None, NO_LABEL, "the row's label is empty")


class HfParquetReader(HfTableReader):
    """The rows of one Hugging Face Parquet file (local, or spooled)."""

    kind = "hf-parquet"

    def __init__(self, uri: str, local: Path, *, sha256: str | None, size: int | None, **kwargs: Any) -> None:
        self.local, self.sha256, self.bytes = local, sha256, size
        try:
            storage.check_regular(local)  # pyarrow would wait on a FIFO for ever
            self._file = pq.ParquetFile(local)
        except (pa.ArrowException, OSError, storage.NotRegularFile) as exc:
            raise ValueError(f"{uri} is not a readable Parquet file: {type(exc).__name__}: {str(exc)[:200]}") from None
        super().__init__(uri, **kwargs)

    def schema(self) -> pa.Schema:
        return self._file.schema_arrow

    def declared_members(self) -> int | None:
        return self._file.metadata.num_rows

    def tables(self, columns: list[str]) -> Iterator[pa.Table]:
        for group in range(self._file.metadata.num_row_groups):
            yield self._file.read_row_group(group, columns=columns)


class HfArrowReader(HfTableReader):
    """The rows of one Arrow stream file of ``Dataset.save_to_disk`` (``data-00000-of-00001.arrow``)."""

    kind = "hf-arrow"

    def __init__(self, uri: str, local: Path, **kwargs: Any) -> None:
        self.local, self.sha256, self.bytes = local, None, None
        try:
            source = storage.ArrowInput.mapped(local)  # a FIFO or device is refused, never waited on
            try:
                self._schema = pa.ipc.open_stream(source.file).schema
            finally:
                source.close()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ValueError(f"{uri} is not an Arrow stream file as datasets' save_to_disk writes them: {str(exc)[:200]}") from None
        super().__init__(uri, **kwargs)

    def schema(self) -> pa.Schema:
        return self._schema

    def tables(self, columns: list[str]) -> Iterator[pa.Table]:
        source = storage.ArrowInput.mapped(self.local)
        try:
            for batch in pa.ipc.open_stream(source.file):
                yield pa.Table.from_batches([batch]).select(columns)
        finally:
            source.close()
