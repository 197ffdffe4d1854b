"""Label encoding: class names from Oxford-style file names, folders, a CSV, or the source itself.

Class indices are assigned in a deterministic order (case-insensitive sort of the
names, as the Oxford-IIIT Pet ``list.txt`` numbers its breeds), so the same set of
names always maps to the same indices.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Literal

__all__ = [
    "LabelSource",
    "oxford_label",
    "folder_label",
    "escape_csv_cell",
    "unescape_csv_cell",
    "read_label_csv",
    "choose_label_source",
    "Labeler",
    "encode_labels",
]

LabelSource = Literal["auto", "oxford", "folder", "csv", "given"]

# Oxford-IIIT Pet names images "<Breed_Name>_<number>.<ext>": cats capitalized, dogs not.
_OXFORD_NAME = re.compile(r"^(?P<breed>[A-Za-z][A-Za-z_]*?)_(?P<num>\d+)$")


def oxford_label(path: str) -> str | None:
    """The breed in an Oxford-IIIT Pet style name (``images/Bengal_12.jpg`` -> ``Bengal``)."""
    stem = posixpath.splitext(posixpath.basename(path))[0]
    match = _OXFORD_NAME.match(stem)
    return match.group("breed") if match else None


def folder_label(path: str) -> str | None:
    """The parent folder of a file in a folder-per-class layout (``train/cat/1.jpg`` -> ``cat``)."""
    parent = posixpath.basename(posixpath.dirname(path))
    return parent or None


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: one starting with ``= + - @``, tab or CR gets a leading ``'``."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unescape_csv_cell(value: str) -> str:
    """Undoes :func:`escape_csv_cell`: a ``'`` before a formula character is dropped, anything else is kept."""
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_START) else value


def read_label_csv(data: bytes, what: str = "label CSV") -> dict[str, str]:
    """Parses a ``path,label`` CSV (header required) into a mapping.

    Paths may be archive member paths or bare file names. Cells escaped against formula
    injection (:func:`escape_csv_cell`, as imgpipe writes them) are read back unescaped.
    Errors name ``what`` (the field and URI) and a line number, never a cell: the file
    is whatever a run parameter named, and an error is shown to everyone who can view runs.

    Raises:
        ValueError: If the bytes are not UTF-8 CSV, the header lacks ``path`` and
            ``label`` columns, or a path repeats with different labels.
    """
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        fields = reader.fieldnames
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text; expected a path,label CSV") from None
    except csv.Error as exc:
        raise ValueError(f"{what} is not a readable CSV ({exc})") from None
    if not fields or not {"path", "label"} <= {f.strip() for f in fields}:
        raise ValueError(f"{what} needs a header row with 'path' and 'label' columns; its first row has {len(fields or [])} cell(s) and lacks them")
    out: dict[str, str] = {}
    try:
        for lineno, row in enumerate(reader, start=2):
            path = unescape_csv_cell((row.get("path") or "").strip()).removeprefix("./")
            label = unescape_csv_cell((row.get("label") or "").strip())
            if not path or not label:
                continue
            if path in out and out[path] != label:
                raise ValueError(f"{what} line {lineno}: a path listed on an earlier line has another label here")
            out[path] = label
    except csv.Error as exc:
        raise ValueError(f"{what} line {reader.line_num}: not readable CSV ({exc})") from None
    return out


def choose_label_source(paths: Iterable[str], given: bool = False) -> Literal["oxford", "folder", "given"]:
    """Picks ``given`` when the source labelled its images, else ``folder`` when they sit in two or more sibling folders, else ``oxford``."""
    if given:
        return "given"
    parents = {posixpath.dirname(p) for p in paths}
    return "folder" if len(parents) >= 2 else "oxford"


class Labeler:
    """Maps a member path (and the label its source gave it, if any) to its class name under one labelling scheme."""

    def __init__(self, source: Literal["oxford", "folder", "csv", "given"], csv_labels: Mapping[str, str] | None = None) -> None:
        if source == "csv" and csv_labels is None:
            raise ValueError("label_source 'csv' needs labels_csv (a path,label CSV)")
        self.source = source
        self.csv_labels = dict(csv_labels or {})

    def __call__(self, path: str, given: str | None = None) -> str | None:
        """The class name for ``path``, or ``None`` when it has none (reject ``no_label``).

        ``given`` is the label the download step's source recorded with it (a URI list's, a
        WebDataset sample's, a Hugging Face ``ClassLabel``): the ``given`` scheme's answer.
        """
        if self.source == "given":
            return given
        if self.source == "oxford":
            return oxford_label(path)
        if self.source == "folder":
            return folder_label(path)
        return self.csv_labels.get(path) or self.csv_labels.get(posixpath.basename(path))

    def describe_missing(self, path: str) -> str:
        """Why ``path`` has no label, for the rejects table."""
        if self.source == "oxford":
            return f"file name {posixpath.basename(path)!r} does not match <Class_Name>_<number>"
        if self.source == "folder":
            return "file is not inside a class folder"
        if self.source == "given":
            return "its source gave it no label"
        return "path not listed in labels_csv"


def encode_labels(names: Iterable[str]) -> list[str]:
    """Class names in index order: sorted case-insensitively, ties broken by exact name."""
    return sorted(set(names), key=lambda n: (n.lower(), n))
