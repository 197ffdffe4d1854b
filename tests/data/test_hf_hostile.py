"""Hugging Face folders as hostile data: the card, ``dataset_info.json`` and ``state.json`` are claims checked before use.

Each dataset is written by ``datasets`` itself (``to_parquet``, ``save_to_disk``, the card
``push_to_hub`` writes), then one of its own files is edited as a hostile publisher would:
a card whose aliases expand into millions of nodes, class names that repeat or are no
strings, a ``state.json`` naming one data file many times, a FIFO or a link out of the
folder where a data file should be. Each is refused in one line naming the file and the
rule, before anything is written and without waiting on anything.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from imgpipe import contract
from imgpipe.steps.download import download
from tests.data.conftest import FAST
from tests.imagefactory import jpeg

NAMES = ["cat", "dog"]


def _dataset(hf, n: int = 4, names=NAMES):
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=names)})
    return hf.Dataset.from_dict({"image": [jpeg(32, 24, seed=i) for i in range(n)], "label": [i % len(names) for i in range(n)]}, features=features)


def _card(hf, features) -> str:
    """The README.md ``push_to_hub`` writes (dataset_info and configs in the YAML front matter)."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData()
    DatasetInfosDict({"default": DatasetInfo(features=features)}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": "train", "path": "data/train-*"}]}}).to_dataset_card_data(data)
    return str(DatasetCard(f"---\n{data}\n---\n"))


def _hub_folder(hf, root: Path, names=NAMES) -> str:
    """The Hub's layout of a dataset (data/train-*.parquet and its card); the card's text."""
    (root / "data").mkdir(parents=True)
    ds = _dataset(hf, names=names)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    card = _card(hf, ds.features)
    (root / "README.md").write_text(card)
    return card


def _refused(source: Path, out: Path) -> str:
    """The one-line refusal of a download of ``source``; nothing was written."""
    with pytest.raises(ValueError) as caught:
        download(str(source), str(out), FAST)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert not out.exists(), "a refused source writes nothing"
    return message


# --------------------------------------------------------------------------- the card


def test_a_card_whose_aliases_expand_into_millions_of_names_is_refused_at_once(hf_datasets, tmp_path):
    card = _hub_folder(hf_datasets, tmp_path / "hub")
    # A few hundred bytes: six levels of ten aliases each stand for a million names.
    bomb = "x0: &x0 [a, b, c, d, e, f, g, h, i, j]\n" + "".join(f"x{k}: &x{k} [{', '.join([f'*x{k - 1}'] * 10)}]\n" for k in range(1, 6))
    hostile = card.replace("---\ndataset_info:", "---\n" + bomb + "dataset_info:", 1).replace("          '0': cat\n", "          '0': *x5\n")
    assert len(hostile) - len(card) < 600
    (tmp_path / "hub" / "README.md").write_text(hostile)
    started = time.monotonic()
    message = _refused(tmp_path / "hub", tmp_path / "out")
    assert time.monotonic() - started < 10
    assert "README.md: the YAML front matter" in message and "aliases" in message


@pytest.mark.parametrize(
    ("names", "rule"),
    [
        ("          '0': cat\n          '1': cat\n", "class 1 repeats class 0 ('cat')"),
        ("          '0': cat\n          '1': null\n", "class 1 is null, not a string"),
        ("          '0': cat\n          '1': [dog, fox]\n", "class 1 is a list, not a string"),
        ("          '0': cat\n          '1': {a: b}\n", "class 1 is a mapping, not a string"),
        ("          '0': cat\n          '1': 7\n", "class 1 is a number, not a string"),
        ("          '0': cat\n          '1': dog/x\n", "class 1: the class name holds a path separator"),
        ("          '0': cat\n          '5': dog\n", "keys are not 0..1"),
        ("          '0': cat\n          '-1': dog\n", "is not a class index"),
    ],
)
def test_card_names_that_break_the_rule_refuse_the_source_naming_the_card_and_the_rule(hf_datasets, tmp_path, names, rule):
    card = _hub_folder(hf_datasets, tmp_path / "hub")
    (tmp_path / "hub" / "README.md").write_text(card.replace("          '0': cat\n          '1': dog\n", names))
    message = _refused(tmp_path / "hub", tmp_path / "out")
    assert "hub/README.md: dataset_info features[1] class_label names" in message and rule in message


def test_a_class_name_with_a_control_character_in_the_card_never_reaches_a_labels_file(hf_datasets, tmp_path):
    # datasets itself writes it (as "dog\a"): the rows of that class were bad_label rejects, the name stayed in labels.json.
    _hub_folder(hf_datasets, tmp_path / "hub", names=["cat", "dog\x07"])
    message = _refused(tmp_path / "hub", tmp_path / "out")
    assert "README.md" in message and "class 1: the class name holds U+0007" in message


def test_a_card_that_is_not_yaml_is_refused_naming_its_line(hf_datasets, tmp_path):
    card = _hub_folder(hf_datasets, tmp_path / "hub")
    (tmp_path / "hub" / "README.md").write_text(card.replace("  features:\n", "  features: [\n", 1))
    assert "README.md: the YAML front matter cannot be read as plain YAML data at line" in _refused(tmp_path / "hub", tmp_path / "out")


# --------------------------------------------------------------------------- save_to_disk's own files


def _saved(hf, root: Path) -> Path:
    _dataset(hf).save_to_disk(str(root))
    return root


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def test_dataset_info_names_that_break_the_rule_refuse_the_source(hf_datasets, tmp_path):
    root = _saved(hf_datasets, tmp_path / "saved")
    _edit_json(root / "dataset_info.json", lambda v: v["features"]["label"].update(names=["cat", "cat"]))
    message = _refused(root, tmp_path / "out")
    assert "saved/dataset_info.json: ClassLabel names of column 'label': class 1 repeats class 0 ('cat')" in message


def test_schema_metadata_names_that_break_the_rule_refuse_the_file(hf_datasets, tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "set").mkdir()
    path = tmp_path / "set" / "train.parquet"
    _dataset(hf_datasets).to_parquet(str(path))
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"]["label"]["names"] = ["cat", "dog", None]
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), path)
    message = _refused(path, tmp_path / "out")
    assert "train.parquet: ClassLabel names of column 'label' in the huggingface schema metadata: class 2 is null" in message


def test_a_state_file_that_names_one_data_file_many_times_is_refused(hf_datasets, tmp_path):
    root = _saved(hf_datasets, tmp_path / "saved")
    _edit_json(root / "state.json", lambda v: v.update(_data_files=v["_data_files"] * 50))
    message = _refused(root, tmp_path / "out")
    assert "saved/state.json: _data_files[1] names 'data-00000-of-00001.arrow' again; each data file is named once" in message


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ({"filename": "data-00001-of-00001.arrow"}, "which is not a file of the folder"),
        ({"filename": "../saved/data-00000-of-00001.arrow"}, "is no plain file name"),
        ({"filename": ""}, "is no plain file name"),
        ({"filename": ["x"]}, "is no plain file name"),
    ],
)
def test_a_state_file_that_names_what_is_not_a_data_file_of_the_folder_is_refused(hf_datasets, tmp_path, entry, rule):
    root = _saved(hf_datasets, tmp_path / "saved")
    _edit_json(root / "state.json", lambda v: v["_data_files"].append(entry))
    assert rule in _refused(root, tmp_path / "out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["save_to_disk", "hub"])
def test_a_fifo_where_a_data_file_should_be_is_refused_without_waiting(hf_datasets, tmp_path, layout):
    if layout == "hub":
        _hub_folder(hf_datasets, tmp_path / "ds")
        data = tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"
    else:
        data = _saved(hf_datasets, tmp_path / "ds") / "data-00000-of-00001.arrow"
    data.unlink()
    os.mkfifo(data)  # opened for reading the usual way, it waits for a writer for ever
    message = _refused(tmp_path / "ds", tmp_path / "out")
    assert f"{data.name} is a FIFO (named pipe), not a regular file" in message


def test_a_data_file_that_links_out_of_the_folder_is_refused(hf_datasets, tmp_path):
    elsewhere = _saved(hf_datasets, tmp_path / "elsewhere") / "data-00000-of-00001.arrow"
    root = _saved(hf_datasets, tmp_path / "saved")
    (root / "data-00000-of-00001.arrow").unlink()
    os.symlink(elsewhere, root / "data-00000-of-00001.arrow")
    assert "is a link that leads outside the dataset's folder" in _refused(root, tmp_path / "out")


def test_an_honest_save_to_disk_folder_still_reads_once_per_row(hf_datasets, tmp_path):
    root = _saved(hf_datasets, tmp_path / "saved")
    report = download(str(root), str(tmp_path / "out"), FAST)
    assert (report.inputs, report.outputs, report.rejected) == (4, 4, 0)
    (entry,) = contract.read_manifest("file://" + str(tmp_path / "out"))["extra"]["sources"]
    assert entry["classes"] == NAMES and entry["files"] == 1
