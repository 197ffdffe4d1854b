"""Bounding-box annotations in the PASCAL VOC form the Oxford-IIIT Pet release uses.

``annotations/xmls/<image stem>.xml`` holds the image size and one ``<object>`` with a
``<bndbox>`` around the pet's head. VOC coordinates are 1-based, inclusive pixel
indices; we store boxes normalized to ``0..1`` as ``(xmin, ymin, xmax, ymax)`` so they
survive any later resize.
"""

from __future__ import annotations

import io
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pyarrow.parquet as pq

from imgpipe import contract, storage

__all__ = ["HeadBox", "parse_voc_xml", "read_head_boxes", "read_official_split", "image_stem"]


@dataclass(frozen=True)
class HeadBox:
    """One annotated box.

    Attributes:
        width: Image width the annotation was made on.
        height: Image height the annotation was made on.
        box: Normalized ``(xmin, ymin, xmax, ymax)``, each within ``0..1``.
    """

    width: int
    height: int
    box: tuple[float, float, float, float]


def image_stem(path: str) -> str:
    """The file name without folder and extension, the key that pairs images and XMLs."""
    return posixpath.splitext(posixpath.basename(path))[0]


def _int(node: ET.Element, tag: str) -> int:
    text = node.findtext(tag)
    if text is None:
        raise ValueError(f"missing <{tag}>")
    return int(round(float(text)))


def parse_voc_xml(data: bytes) -> HeadBox | None:
    """Parses a VOC annotation; returns the first object's box, or ``None`` if it has none.

    Raises:
        ValueError: For XML that is malformed or describes an impossible box.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"malformed annotation XML: {exc}") from exc
    size = root.find("size")
    bnd = root.find("object/bndbox")
    if size is None or bnd is None:
        return None
    width, height = _int(size, "width"), _int(size, "height")
    xmin, ymin, xmax, ymax = (_int(bnd, t) for t in ("xmin", "ymin", "xmax", "ymax"))
    if width <= 0 or height <= 0 or not (1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height):
        raise ValueError(f"box ({xmin},{ymin},{xmax},{ymax}) does not fit a {width}x{height} image")
    box = ((xmin - 1) / width, (ymin - 1) / height, xmax / width, ymax / height)
    return HeadBox(width, height, box)


def read_head_boxes(prefix: str) -> tuple[dict[str, HeadBox], dict[str, str]]:
    """Reads every ``*/xmls/*.xml`` member of a committed download output.

    Args:
        prefix: A committed download output of the annotations archive.

    Returns:
        Boxes by image stem, and the XML files that could not be used with the reason.
    """
    manifest = contract.read_manifest(prefix, expect_step="download")
    boxes: dict[str, HeadBox] = {}
    problems: dict[str, str] = {}
    for uri in contract.data_files(prefix, manifest):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["path", "bytes"])
        for path, blob in zip(table.column("path").to_pylist(), table.column("bytes").to_pylist()):
            if not path.endswith(".xml") or posixpath.basename(posixpath.dirname(path)) != "xmls":
                continue
            try:
                head = parse_voc_xml(blob)
            except ValueError as exc:
                problems[path] = str(exc)
                continue
            if head is not None:
                boxes[image_stem(path)] = head
    return boxes, problems


# The Oxford-IIIT Pet release's own split: annotations/trainval.txt and annotations/test.txt,
# one image per line ("Abyssinian_100 1 1 1": stem, class id, species, breed id).
OFFICIAL_LISTS = {"trainval.txt": "trainval", "test.txt": "test"}


def read_official_split(prefix: str) -> dict[str, str]:
    """The release's split of a committed download of the annotations: image stem -> ``trainval`` or ``test``.

    Raises:
        ValueError: If the output holds neither list, or an image is in both.
    """
    manifest = contract.read_manifest(prefix, expect_step="download")
    out: dict[str, str] = {}
    seen_lists = set()
    for uri in contract.data_files(prefix, manifest):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["path", "bytes"])
        for path, blob in zip(table.column("path").to_pylist(), table.column("bytes").to_pylist()):
            which = OFFICIAL_LISTS.get(posixpath.basename(path))
            if which is None:
                continue
            seen_lists.add(which)
            for line in (blob or b"").decode("utf-8", "replace").splitlines():
                stem = line.split("#", 1)[0].strip().split(" ", 1)[0]
                if not stem:
                    continue
                if out.get(stem, which) != which:
                    raise ValueError(f"{prefix}: {stem} is in both trainval.txt and test.txt")
                out[stem] = which
    if not seen_lists:
        raise ValueError(f"{prefix} holds no trainval.txt or test.txt: split_from=annotations needs the release's lists")
    return out
