"""Label parsing: Oxford names, folders, CSV, and the index order."""

from __future__ import annotations

import pytest

from imgpipe.data.labels import (
    Labeler,
    choose_label_source,
    encode_labels,
    folder_label,
    oxford_label,
    read_label_csv,
)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("images/Abyssinian_100.jpg", "Abyssinian"),
        ("images/British_Shorthair_3.jpg", "British_Shorthair"),
        ("images/great_pyrenees_12.jpg", "great_pyrenees"),
        ("images/staffordshire_bull_terrier_1.png", "staffordshire_bull_terrier"),
        ("Bengal_7.jpeg", "Bengal"),
        ("images/Abyssinian_100.mat", "Abyssinian"),  # a label, but clean rejects it as not_an_image first
        ("images/README.jpg", None),
        ("images/_12.jpg", None),
        ("images/Bengal.jpg", None),
        ("images/Bengal_x1.jpg", None),
        ("images/12_34.jpg", None),
    ],
)
def test_oxford_label(path, label):
    assert oxford_label(path) == label


def test_folder_label():
    assert folder_label("train/cat/1.jpg") == "cat"
    assert folder_label("pets/dogs/beagle/x.png") == "beagle"
    assert folder_label("loose.jpg") is None


def test_choose_label_source():
    assert choose_label_source(["images/a_1.jpg", "images/b_2.jpg"]) == "oxford"
    assert choose_label_source(["cat/1.jpg", "dog/2.jpg"]) == "folder"


def test_read_label_csv():
    data = "\ufeffpath,label,extra\n./train/a.jpg,cat,x\nb.jpg,dog,y\n,skip,z\n".encode()
    assert read_label_csv(data) == {"train/a.jpg": "cat", "b.jpg": "dog"}
    with pytest.raises(ValueError, match="header"):
        read_label_csv(b"file,class\na.jpg,cat\n")
    with pytest.raises(ValueError, match="line 3"):
        read_label_csv(b"path,label\na.jpg,cat\na.jpg,dog\n")


def test_labeler_csv_matches_member_path_or_basename():
    lab = Labeler("csv", {"train/a.jpg": "cat", "b.jpg": "dog"})
    assert lab("train/a.jpg") == "cat" and lab("deep/dir/b.jpg") == "dog" and lab("c.jpg") is None
    assert "labels_csv" in lab.describe_missing("c.jpg")
    with pytest.raises(ValueError, match="labels_csv"):
        Labeler("csv")


def test_encode_labels_case_insensitive_like_oxford():
    names = ["beagle", "Abyssinian", "american_bulldog", "Bengal", "beagle"]
    assert encode_labels(names) == ["Abyssinian", "american_bulldog", "beagle", "Bengal"]
