"""Class names are checked once, where a label is first read: a name no labels file could carry is a ``bad_label`` reject.

Folder names, a label CSV and a URI list's labels, through download -> clean (-> resize -> train
for the folder source), and the Triton repository accepting every class clean kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.data.labels import BAD_LABEL, MAX_CLASS_NAME, check_class_name
from imgpipe.resize.config import ResizeConfig
from imgpipe.serving import triton as serving
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.resize import resize
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from tests.imagefactory import jpeg

pytestmark = pytest.mark.usefixtures("no_exports")  # the exports are tests/train/test_export.py's
FAST = DownloadConfig(retries=1, backoff_s=0.0, timeout_s=5.0, fetch_workers=2)
PER_CLASS = 4


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cat", None),
        ("golden retriever", None),
        ("Chat_noir-été 2", None),
        ("x" * MAX_CLASS_NAME, None),
        ("", "empty"),
        ("x" * (MAX_CLASS_NAME + 1), "129 characters"),
        ("dog\nx", "U+000A"),
        ("bad\tname", "U+0009"),
        ("a\rb", "U+000D"),
        ("zero\u200bwidth", "U+200B"),
        ("bidi\u202eevil", "U+202E"),
        ("line\u2028sep", "U+2028"),
        (" cat", "white space"),
        ("cat ", "white space"),
    ],
)
def test_check_class_name_refuses_what_a_labels_file_cannot_carry(name, reason):
    got = check_class_name(name)
    assert got is None if reason is None else reason in got
    if got is not None:
        assert name not in got or not name  # the reason names the code point, never echoes the name


def _reasons(prefix: str) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in contract.read_rejects(prefix).to_pylist()}


def test_a_folder_named_with_a_line_break_is_a_bad_label_and_the_rest_trains(tmp_path: Path):
    source = tmp_path / "pets"
    for c, name in enumerate(("cat", "dog", "dog\nx")):
        (source / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            (source / name / f"{i}.jpg").write_bytes(jpeg(64, 48, seed=100 * c + i))
    out = f"file://{tmp_path}/run"
    dl = download(str(source), f"{out}/download", FAST)
    cl = clean(dl.dest, f"{out}/clean", CleanConfig(workers=1, seed=1, min_images_per_split=0))
    rejects = _reasons(cl.dest)
    assert sorted(p for p, r in rejects.items() if r == BAD_LABEL) == sorted(f"dog\nx/{i}.jpg" for i in range(PER_CLASS))
    assert cl.outputs == 2 * PER_CLASS and dl.inputs == cl.outputs + cl.rejected + dl.rejected
    classes = contract.read_manifest(cl.dest)["extra"]["classes"]
    assert classes == ["cat", "dog"]
    rs = resize(cl.dest, f"{out}/resize", ResizeConfig(size=32, executor="pool", concurrency=1, batch_size=8))
    cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=4, num_workers=0, device="cpu", shuffle_buffer=8)
    tr = train(rs.dest, f"{out}/train", cfg)
    assert json.loads(storage.read_bytes(storage.join(tr.dest, contract.METRICS)))["labels"] == classes
    # What clean accepted, Triton's repository accepts: the check is the same function.
    files = serving.repository_files({"classes": classes, "input": {"size": 32, "channels": 3}}, b"")
    assert files[f"{serving.MODEL_NAME}/{serving.LABELS}"] == b"cat\ndog\n"


def test_a_label_csv_cell_with_a_tab_is_a_bad_label(tmp_path: Path):
    source = tmp_path / "flat"
    source.mkdir()
    lines, names = ["path,label"], ("cat", "dog", "bad\tname")
    for i in range(3 * PER_CLASS):
        (source / f"img{i}.jpg").write_bytes(jpeg(64, 48, seed=i))
        lines.append(f'img{i}.jpg,"{names[i % 3]}"')
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = f"file://{tmp_path}/run"
    dl = download(str(source), f"{out}/download", FAST)
    cfg = CleanConfig(workers=1, seed=1, label_source="csv", labels_csv=f"file://{tmp_path}/labels.csv", min_images_per_split=0)
    cl = clean(dl.dest, f"{out}/clean", cfg)
    bad = {p for p, r in _reasons(cl.dest).items() if r == BAD_LABEL}
    assert bad == {f"img{i}.jpg" for i in range(2, 3 * PER_CLASS, 3)}
    assert contract.read_manifest(cl.dest)["extra"]["classes"] == ["cat", "dog"]


def test_a_uri_list_label_with_a_carriage_return_is_a_bad_label_at_download(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    lines, names = ["uri,label"], ("cat", "dog", "a\rb")
    for i in range(3 * PER_CLASS):
        (store / f"{i}.jpg").write_bytes(jpeg(64, 48, seed=i))
        lines.append(f'{i}.jpg,"{names[i % 3]}"')
    (store / "list.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    out = f"file://{tmp_path}/run"
    dl = download(f"{store}/list.csv", f"{out}/download", FAST)
    bad = {r["reason"] for r in contract.read_rejects(dl.dest).to_pylist() if "U+000D" in r["detail"]}
    assert bad == {BAD_LABEL}
    assert dl.rejected == PER_CLASS and dl.outputs == 2 * PER_CLASS
    cl = clean(dl.dest, f"{out}/clean", CleanConfig(workers=1, seed=1, min_images_per_split=0))
    assert contract.read_manifest(cl.dest)["extra"]["classes"] == ["cat", "dog"]
