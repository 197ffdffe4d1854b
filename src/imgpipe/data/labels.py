"""Label encoding: class names from Oxford-style file names, folders, a CSV, or the source itself.

Class indices are assigned in a deterministic order (:func:`encode_labels`): the source's own
class list where it has one (a ``ClassLabel``, a WebDataset ``class_names``), kept whole;
otherwise integer-like names by value, and other names as torchvision's ``ImageFolder`` sorts
them (case-sensitive ``sorted``), or case-insensitively when every class came from Oxford
file names (as the Oxford-IIIT Pet ``list.txt`` numbers its breeds). docs/sources.md, "Class
indices", has the rule.

``label_source: auto`` decides per image (:class:`AutoLabeler`): the source's label where it
gave one, else the class folder of a multi-folder layout, else the Oxford file name.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "LabelSource",
    "BAD_LABEL",
    "MAX_CLASS_NAME",
    "check_class_name",
    "oxford_label",
    "folder_label",
    "escape_csv_cell",
    "unescape_csv_cell",
    "read_label_csv",
    "Labeler",
    "AutoLabeler",
    "auto_layout",
    "merge_class_orders",
    "source_class_order",
    "nested_prefixes",
    "encode_labels",
]

LabelSource = Literal["auto", "oxford", "folder", "csv", "given"]

# The reject reason of an image whose class name fails check_class_name.
BAD_LABEL = "bad_label"
# The longest class name, in characters: a label, not a caption.
MAX_CLASS_NAME = 128


def check_class_name(name: str) -> str | None:
    """Why ``name`` cannot be a class name, or ``None`` when it can.

    A class name travels to every format that lists classes: Triton's ``labels.txt`` (one
    per line), CSV tables, ``labels.json``, HTML reports. Each can carry what this allows: a
    non-empty string of at most :data:`MAX_CLASS_NAME` characters without control, format,
    private-use or unassigned characters (Unicode category ``C*``: tab, CR, LF, zero-width
    and bidirectional marks), without line or paragraph separators, without a path separator
    (``/``, ``\\``) and other than ``.`` and ``..`` (a class becomes a folder name in an
    ImageFolder export), and without leading or trailing white space. It is checked once,
    where a label is first read (a reader's given label, a folder or file name, a label CSV);
    a name that fails makes its image a :data:`BAD_LABEL` reject, and a declared list that
    holds one refuses its source (:func:`imgpipe.data.labelgate.check_class_list`).

    Returns:
        The reason, naming the offending character by code point (never echoing it), or ``None``.
    """
    if not isinstance(name, str) or not name:
        return "the class name is empty"
    if len(name) > MAX_CLASS_NAME:
        return f"the class name has {len(name)} characters; at most {MAX_CLASS_NAME} are allowed"
    for i, char in enumerate(name):
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            what = f"U+{ord(char):04X} ({unicodedata.name(char, category)}) at position {i}"
            return f"the class name holds {what}; control characters and line breaks are not allowed"
    if name != name.strip():
        return "the class name starts or ends with white space"
    at = next((i for i, char in enumerate(name) if char in "/\\"), None)
    if at is not None:
        return f"the class name holds a path separator (U+{ord(name[at]):04X}) at position {at}"
    if name in (".", ".."):
        return "the class name is a path component (. or ..)"
    return None


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


def auto_layout(rows: Iterable[tuple[str, str | None]]) -> frozenset[str]:
    """The class folders of a multi-folder layout: the folders holding images the source gave no label.

    ``rows`` are ``(path, given label)`` pairs. When those unlabelled images sit in two or more
    sibling folders, each folder (but the top level) is a class folder; otherwise there are none
    and :class:`AutoLabeler` falls back to Oxford file names.
    """
    parents = {posixpath.dirname(path) for path, given in rows if not given}
    return frozenset(p for p in parents if p) if len(parents) >= 2 else frozenset()


def nested_prefixes(sources: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The member prefixes (``B/x/``) of the nested archives the download manifest's ``sources`` entries list (``nested``)."""
    return frozenset(str(p) for entry in sources for p in (entry.get("nested") or []) if isinstance(p, str) and p.endswith("/"))


def merge_class_orders(orders: Iterable[Sequence[str] | None]) -> tuple[str, ...]:
    """One class list from several sources' lists: each name at its first place, in source order."""
    merged: dict[str, None] = {}
    for order in orders:
        for name in order or ():
            merged.setdefault(str(name), None)
    return tuple(merged)


def source_class_order(sources: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The class list the download manifest's ``sources`` entries give (``classes``: a ``ClassLabel``'s names, a WebDataset's)."""
    return merge_class_orders(entry.get("classes") for entry in sources if isinstance(entry.get("classes"), list))


class Labeler:
    """Maps a member path (and the label its source gave it, if any) to its class name under one labelling scheme.

    Attributes:
        source: The scheme (``oxford``, ``folder``, ``csv``, ``given``; ``auto`` for :class:`AutoLabeler`).
        class_order: The source's own class list (:func:`source_class_order`), whose order the
            class indices keep (:func:`encode_labels`); empty when the source has none.
    """

    def __init__(
        self,
        source: Literal["oxford", "folder", "csv", "given", "auto"],
        csv_labels: Mapping[str, str] | None = None,
        class_order: Sequence[str] = (),
    ) -> None:
        if source == "csv" and csv_labels is None:
            raise ValueError("label_source 'csv' needs labels_csv (a path,label CSV)")
        self.source = source
        self.csv_labels = dict(csv_labels or {})
        self.class_order = tuple(class_order)

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

    @property
    def folds_case(self) -> bool:
        """Whether class names sort case-insensitively: Oxford breeds only (the release's ``list.txt`` numbers them so)."""
        return self.source == "oxford"

    @property
    def resolved(self) -> str:
        """The scheme that labelled the images, as the clean manifest's ``label_source`` records it."""
        return self.source

    def auto_counts(self) -> dict[str, int] | None:
        """Images labelled per scheme under ``auto`` (:class:`AutoLabeler`); ``None`` for a fixed scheme."""
        return None


class AutoLabeler(Labeler):
    """``label_source: auto``, decided per image.

    An image takes the label its source gave it (``given``); else, when it sits in a class folder
    of a multi-folder layout (:func:`auto_layout`), that folder's name (``folder``); else the
    class in its Oxford file name (``oxford``). A member of a nested archive that sits inside a
    class folder (``B/x.tar`` beside ``B/1.png``) takes that folder's class, not the archive's
    name: the archive is part of the folder's content. A nested archive elsewhere (ImageNet's
    tar of per-class tars) keeps the archive's name, which the download step gave it.

    Attributes:
        folders: The class folders.
        nested: Member prefixes of nested archives (``B/x/`` for ``B/x.tar``), from the download manifest.
        counts: Images labelled per scheme so far (``none``: no scheme gave a label).
    """

    def __init__(self, folders: Iterable[str], nested: Iterable[str] = (), class_order: Sequence[str] = ()) -> None:
        super().__init__("auto", class_order=class_order)
        self.folders, self.nested = frozenset(folders), frozenset(nested)
        self.counts: Counter[str] = Counter({"given": 0, "folder": 0, "oxford": 0, "none": 0})

    def _archive_folder(self, path: str) -> str | None:
        """The class folder holding the nested archive ``path`` came from, if it came from one inside a class folder."""
        head = path
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            if head + "/" in self.nested:
                folder = posixpath.dirname(head)
                return folder if folder in self.folders else None
        return None

    def __call__(self, path: str, given: str | None = None) -> str | None:
        folder = self._archive_folder(path) if self.nested and given else None
        if folder is not None:
            scheme, name = "folder", posixpath.basename(folder)
        elif given:
            scheme, name = "given", given
        elif posixpath.dirname(path) in self.folders:
            scheme, name = "folder", folder_label(path)
        else:
            scheme, name = "oxford", oxford_label(path)
        self.counts[scheme if name else "none"] += 1
        return name

    def describe_missing(self, path: str) -> str:
        return (
            f"label_source auto: its source gave it no label, it is not inside a class folder, and its file name "
            f"{posixpath.basename(path)!r} does not match <Class_Name>_<number>"
        )

    @property
    def folds_case(self) -> bool:
        return self.counts["oxford"] > 0 and not (self.counts["given"] or self.counts["folder"])

    @property
    def resolved(self) -> str:
        used = [k for k in ("given", "folder", "oxford") if self.counts[k]]
        return used[0] if len(used) == 1 else "auto"

    def auto_counts(self) -> dict[str, int] | None:
        return dict(self.counts)


_INTEGER = re.compile(r"[+-]?\d+")


def _sort_key(name: str, fold_case: bool) -> tuple:
    if _INTEGER.fullmatch(name):
        return (0, int(name), name)
    return (1, name.lower(), name) if fold_case else (1, name)


def encode_labels(names: Iterable[str], order: Sequence[str] = (), *, fold_case: bool = False) -> list[str]:
    """Class names in index order.

    The source's own list (``order``) comes first and whole, so a class's index is its place in
    that list even when it has no image (the model's output index is the team's label table).
    The names it lacks follow: integer-like names by value (``"2"`` before ``"10"``), then the
    others as torchvision's ``ImageFolder`` sorts them (plain ``sorted``: ``"Bee"``, ``"Cat"``,
    ``"ant"``), or case-insensitively with ``fold_case`` (Oxford breeds: ``"Abyssinian"``,
    ``"american_bulldog"``), ties broken by exact name.
    """
    head = list(dict.fromkeys(order))
    known = set(head)
    return head + sorted({n for n in names if n not in known}, key=lambda n: _sort_key(n, fold_case))
