"""Class indices as the source gives them, and ``label_source: auto`` decided per image, through download and clean.

Sources are written by the libraries users write them with (``datasets``, a folder tree that
torchvision's ``ImageFolder`` reads, ``tarfile``); the class order clean writes is compared
with theirs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.clean.plan import Index, Unit, plan_rows
from imgpipe.data.labels import Labeler
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from tests.helpers import tar_bytes
from tests.imagefactory import jpeg

FAST = DownloadConfig(retries=1, backoff_s=0.0, timeout_s=5.0, fetch_workers=2)
ONE_SPLIT = CleanConfig(workers=1, split=(1.0, 0.0, 0.0), near_duplicates="off")


def _clean(source: str, dest: Path, cfg: CleanConfig = ONE_SPLIT) -> tuple[dict, dict[str, tuple[int, str]]]:
    """The clean manifest and ``path -> (label, label_name)`` of every kept row."""
    report = clean(source, str(dest), cfg)
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["path", "label", "label_name"]) for u in contract.data_files(report.dest)]
    rows = pa.concat_tables(tables).to_pylist()
    return contract.read_manifest(report.dest), {r["path"]: (r["label"], r["label_name"]) for r in rows}


def test_a_class_label_keeps_its_order_through_clean(hf_datasets, tmp_path):
    names = ["dog", "cat", "bird"]
    features = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.ClassLabel(names=names)})
    labels = [0, 1, 2] * 3
    data = {"image": [{"bytes": jpeg(48, 40, seed=i), "path": f"{i}.jpg"} for i in range(len(labels))], "label": labels}
    path = tmp_path / "train-00000-of-00001.parquet"
    hf_datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    dl = download(str(path), str(tmp_path / "download"), FAST)
    manifest, rows = _clean(dl.dest, tmp_path / "clean")
    assert manifest["extra"]["classes"] == names, "dog=0, cat=1, bird=2 as the ClassLabel says, not sorted"
    assert manifest["extra"]["class_order"]["source"] == names
    assert json_labels(manifest) == {"0": "dog", "1": "cat", "2": "bird"}
    assert {(label, name) for label, name in rows.values()} == {(0, "dog"), (1, "cat"), (2, "bird")}
    assert len(rows) == len(labels)


def json_labels(manifest: dict) -> dict[str, str]:
    """The ``labels.json`` beside a clean output (the index -> name table resize carries to train's model card)."""
    return json.loads(storage.read_bytes(contract.dest_uri(manifest["dest"], contract.LABELS)))


def test_folder_names_keep_imagefolders_case_sensitive_order(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "pets"
    for c, name in enumerate(["Cat", "ant", "Bee"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.jpg").write_bytes(jpeg(48, 40, seed=10 * c + i))
    dl = download(str(root), str(tmp_path / "download"), FAST)
    manifest, rows = _clean(dl.dest, tmp_path / "clean")
    expected = ImageFolder(str(root)).class_to_idx
    assert {name: i for i, name in enumerate(manifest["extra"]["classes"])} == expected == {"Bee": 0, "Cat": 1, "ant": 2}
    assert all(expected[path.split("/")[0]] == label for path, (label, _) in rows.items())
    assert manifest["extra"]["label_source"] == "folder" and manifest["extra"]["class_order"]["fold_case"] is False


def test_two_class_folders_one_holding_a_nested_tar_keep_every_folder_label(tmp_path):
    nested = tar_bytes({f"inner/{i}.png": jpeg(48, 40, seed=50 + i) for i in range(3)})
    members = {f"A/{i}.png": jpeg(48, 40, seed=i) for i in range(4)}
    members |= {f"B/{i}.png": jpeg(48, 40, seed=20 + i) for i in range(4)}
    members["B/more.tar"] = nested
    path = tmp_path / "images.tar"
    path.write_bytes(tar_bytes(members))
    dl = download(str(path), str(tmp_path / "download"), FAST)
    (source,) = contract.read_manifest(dl.dest)["extra"]["sources"]
    assert source["nested"] == ["B/more/"]
    manifest, rows = _clean(dl.dest, tmp_path / "clean")
    assert contract.read_rejects(manifest["dest"]).num_rows == 0, "no folder-labelled image is lost to no_label"
    assert {p: name for p, (_, name) in rows.items()} == {
        **{f"A/{i}.png": "A" for i in range(4)},
        **{f"B/{i}.png": "B" for i in range(4)},
        **{f"B/more/inner/{i}.png": "B" for i in range(3)},  # the nested archive's images take their folder's class
    }
    assert manifest["extra"]["classes"] == ["A", "B"]
    assert manifest["extra"]["label_auto"] == {"given": 0, "folder": 11, "oxford": 0, "none": 0}
    assert manifest["extra"]["label_source"] == "folder"


def test_a_tar_of_per_class_tars_keeps_the_inner_names_under_auto(tmp_path):
    inner = {f"n0{c}.tar": tar_bytes({f"n0{c}_{i}.JPEG": jpeg(48, 40, seed=10 * c + i) for i in range(2)}) for c in range(2)}
    path = tmp_path / "train.tar"
    path.write_bytes(tar_bytes(inner))
    dl = download(str(path), str(tmp_path / "download"), FAST)
    manifest, rows = _clean(dl.dest, tmp_path / "clean")
    assert manifest["extra"]["classes"] == ["n00", "n01"] and manifest["extra"]["label_source"] == "given"
    assert all(path.split("/")[0] == name for path, (_, name) in rows.items())


def test_the_source_list_is_kept_whole_even_for_a_class_without_images():
    paths = pa.array([f"x/{i}.jpg" for i in range(6)], pa.large_string())
    index = Index(
        [Unit("mem", 0, 0, 6)],
        paths,
        pa.array([f"{i:064x}" for i in range(6)], pa.large_string()),
        pa.array(["dog", "bird", "dog", "bird", "dog", "bird"], pa.large_string()),
    )
    plan = plan_rows(index, Labeler("given", class_order=("dog", "cat", "bird")), CleanConfig(split=(1.0, 0.0, 0.0), split_from="random"))
    assert plan.classes == ["dog", "cat", "bird"] and plan.pinned == 3
    assert sorted(np.unique(plan.label).tolist()) == [0, 2], "bird keeps index 2 although cat has no image"
