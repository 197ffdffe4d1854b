"""Label parsing: Oxford names, folders, CSV, ``auto`` per image, and the index order."""

from __future__ import annotations

import pytest

from imgpipe.data.labels import (
    AutoLabeler,
    Labeler,
    auto_layout,
    encode_labels,
    folder_label,
    merge_class_orders,
    oxford_label,
    read_label_csv,
    source_class_order,
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


def test_auto_layout_finds_class_folders_among_the_images_without_a_given_label():
    assert auto_layout([("images/a_1.jpg", None), ("images/b_2.jpg", None)]) == frozenset()
    assert auto_layout([("cat/1.jpg", None), ("dog/2.jpg", None)]) == {"cat", "dog"}
    # A nested archive's members carry the archive's name: they do not make a layout multi-folder.
    assert auto_layout([("images/a_1.jpg", None), ("x/1.jpg", "x")]) == frozenset()


def test_auto_decides_per_image_and_counts_each_scheme():
    lab = AutoLabeler(auto_layout([("A/1.png", None), ("B/2.png", None)]), nested=["B/x/", "n01/"])
    assert lab("A/1.png") == "A" and lab("B/2.png") == "B"
    assert lab("B/x/deep/3.png", "x") == "B", "a nested archive inside a class folder takes that folder's class"
    assert lab("n01/4.png", "n01") == "n01", "a nested archive at the top keeps its name (ImageNet's tar of tars)"
    assert lab("list/5.csv", "given") == "given"
    assert lab("loose.png") is None and "label_source auto" in lab.describe_missing("loose.png")
    assert lab.auto_counts() == {"given": 2, "folder": 3, "oxford": 0, "none": 1}
    assert lab.resolved == "auto" and not lab.folds_case
    oxford = AutoLabeler(frozenset())
    assert oxford("images/Bengal_1.jpg") == "Bengal" and oxford.resolved == "oxford" and oxford.folds_case


def test_the_source_class_order_is_merged_from_the_manifest_entries_in_order():
    entries = [{"uri": "a", "classes": ["dog", "cat"]}, {"uri": "b"}, {"uri": "c", "classes": ["cat", "bird"]}]
    assert source_class_order(entries) == ("dog", "cat", "bird")
    assert merge_class_orders([None, ["b", "a"], ["a", "c"]]) == ("b", "a", "c")


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


def test_encode_labels_case_insensitive_for_oxford_breeds_like_list_txt():
    names = ["beagle", "Abyssinian", "american_bulldog", "Bengal", "beagle"]
    assert encode_labels(names, fold_case=True) == ["Abyssinian", "american_bulldog", "beagle", "Bengal"]


def test_encode_labels_sorts_like_imagefolder_and_integers_by_value():
    assert encode_labels(["Cat", "ant", "Bee"]) == sorted(["Cat", "ant", "Bee"]) == ["Bee", "Cat", "ant"]
    assert encode_labels(["10", "2", "0", "1"]) == ["0", "1", "2", "10"]


def test_encode_labels_keeps_the_source_order_whole_and_appends_the_rest():
    assert encode_labels(["bird", "dog"], ["dog", "cat", "bird"]) == ["dog", "cat", "bird"]
    assert encode_labels(["bird", "zebra", "Ant"], ["dog", "cat", "bird"]) == ["dog", "cat", "bird", "Ant", "zebra"]
