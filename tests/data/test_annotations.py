"""VOC head-box parsing."""

from __future__ import annotations

import pytest

from imgpipe.data.annotations import image_stem, parse_voc_xml
from tests.steps.test_clean import voc_xml


def test_parse_normalizes_one_based_inclusive_boxes():
    head = parse_voc_xml(voc_xml("a.jpg", 200, 100, (1, 51, 200, 100)))
    assert (head.width, head.height) == (200, 100)
    assert head.box == pytest.approx((0.0, 0.5, 1.0, 1.0))


def test_missing_object_and_bad_boxes():
    assert parse_voc_xml(b"<annotation><size><width>5</width><height>5</height></size></annotation>") is None
    with pytest.raises(ValueError, match="does not fit"):
        parse_voc_xml(voc_xml("a.jpg", 10, 10, (5, 5, 11, 8)))
    with pytest.raises(ValueError, match="malformed"):
        parse_voc_xml(b"<annotation")


def test_image_stem():
    assert image_stem("images/Bengal_12.jpg") == image_stem("annotations/xmls/Bengal_12.xml") == "Bengal_12"
