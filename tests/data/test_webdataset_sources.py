"""WebDataset shards as webdataset's own writers write them: classes only from label parts, indices as the source gives them.

The shards are written by ``webdataset.ShardWriter`` and ``webdataset.TarWriter`` (the library
users write them with), then read by the download step, and where the class index matters,
cleaned: a ``.cls`` integer is its class index, a caption ``.txt`` is never a class unless
``label_key`` names it, and an img2dataset-shaped shard (image, caption, url JSON) is refused
sample by sample with the fix in each reject's detail.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.data.readers.webdataset import looks_like_webdataset
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from tests.imagefactory import jpeg

wds = pytest.importorskip("webdataset")

FAST = DownloadConfig(retries=1, backoff_s=0.0, timeout_s=5.0, fetch_workers=2)
# Twelve classes: as text, "10" and "11" sort before "2".
CLASSES = 12
PER_CLASS = 2


def _cleaned(tmp_path: Path, dl: str, **kw) -> tuple[dict, dict[str, tuple[int, str]]]:
    """The clean manifest and ``path -> (label, label_name)`` of a clean of ``dl``."""
    cfg = CleanConfig(workers=1, split=(1.0, 0.0, 0.0), near_duplicates="off", **kw)
    report = clean(dl, str(tmp_path / "clean"), cfg)
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["path", "label", "label_name"]) for u in contract.data_files(report.dest)]
    rows = pa.concat_tables(tables).to_pylist()
    return contract.read_manifest(report.dest), {r["path"]: (r["label"], r["label_name"]) for r in rows}


def _download_rows(dest: str) -> dict[str, str]:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["path", "label"]) for u in contract.data_files(dest)]
    return {r["path"]: r["label"] for r in pa.concat_tables(tables).to_pylist()}


def _rejects(dest: str) -> dict[str, tuple[str, str]]:
    return {r["path"]: (r["reason"], r["detail"]) for r in contract.read_rejects(dest).to_pylist()}


def _cls_shards(root: Path) -> str:
    """Two shards by ``ShardWriter`` of ``.jpg`` + ``.cls`` samples, classes 0..11; the brace pattern that names them."""
    root.mkdir()
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=CLASSES * PER_CLASS // 2, verbose=0) as sink:
        for i in range(PER_CLASS):
            for c in range(CLASSES):
                sink.write({"__key__": f"s{c:02d}-{i}", "jpg": jpeg(48, 40, seed=100 * c + i), "cls": c})
    assert sorted(p.name for p in root.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    return str(root / "train-{000000..000001}.tar")


def test_cls_integers_are_the_class_indices_even_past_ten(tmp_path):
    dl = download(_cls_shards(tmp_path / "wds"), str(tmp_path / "download"), FAST)
    assert dl.outputs == CLASSES * PER_CLASS and dl.rejected == 0
    sources = contract.read_manifest(dl.dest)["extra"]["sources"]
    assert [s["format"] for s in sources] == ["webdataset/tar"] * 2
    manifest, rows = _cleaned(tmp_path, dl.dest)
    assert manifest["extra"]["classes"] == [str(c) for c in range(CLASSES)]
    assert all(label == int(name) == int(path[1:3]) for path, (label, name) in rows.items()), "a .cls integer is its class index"
    assert manifest["extra"]["label_source"] == "given"


def test_class_names_name_the_cls_indices_in_the_order_given(tmp_path):
    names = tuple(f"class-{c:02d}" for c in reversed(range(CLASSES)))  # not in sorted order
    dl = download(_cls_shards(tmp_path / "wds"), str(tmp_path / "download"), DownloadConfig(fetch_workers=2, class_names=names))
    assert {s["classes"][0] for s in contract.read_manifest(dl.dest)["extra"]["sources"]} == {"class-11"}
    manifest, rows = _cleaned(tmp_path, dl.dest)
    assert manifest["extra"]["classes"] == list(names)
    assert all(names[label] == name and label == int(path[1:3]) for path, (label, name) in rows.items())
    # An index past the names is that sample's bad label: a reject that says so, the rest kept.
    short = download(_cls_shards(tmp_path / "wds2"), str(tmp_path / "download2"), DownloadConfig(fetch_workers=2, class_names=names[:10]))
    found = _rejects(short.dest)
    assert len(found) == 2 * PER_CLASS and {reason for reason, _ in found.values()} == {"bad_label"}
    assert all("outside the 10 class names the source declares" in detail for _, detail in found.values())


def _odd_index_shard(path: Path, odd: bytes) -> None:
    """Six samples of classes 0 and 1, and one whose .cls is ``odd``."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "jpg": jpeg(48, 40, seed=i), "cls": i % 2})
        sink.write({"__key__": "odd", "jpg": jpeg(48, 40, seed=99), "cls": odd})


@pytest.mark.parametrize(
    ("odd", "why"),
    [
        (b"9" * 5000, "has 5000 digits"),  # past Python's int-string limit: int() raised, the shard failed
        (b"cat", "is not an integer"),
        (b"-3", "is negative"),
        (str(10**7).encode(), "is past 99999"),
    ],
)
def test_an_unparsable_or_unbounded_class_index_is_one_samples_bad_label(tmp_path, odd, why):
    _odd_index_shard(tmp_path / "shard.tar", odd)
    dl = download(str(tmp_path / "shard.tar"), str(tmp_path / "download"), FAST)
    (path, (reason, detail)), *others = _rejects(dl.dest).items()
    assert (path, reason, others) == ("odd.jpg", "bad_label", []) and detail.startswith("its .cls class index") and why in detail
    assert dl.outputs == 6 and set(_download_rows(dl.dest).values()) == {"0", "1"}


def test_a_far_class_index_makes_no_table_of_that_many_classes(tmp_path):
    _odd_index_shard(tmp_path / "shard.tar", b"99999")
    # With the class names declared, 99,999 among 0 and 1 is outside them: that sample's bad label.
    named = download(str(tmp_path / "shard.tar"), str(tmp_path / "named"), DownloadConfig(fetch_workers=2, class_names=("cat", "dog")))
    assert _rejects(named.dest) == {"odd.jpg": ("bad_label", "its .cls class index 99999 is outside the 2 class names the source declares")}
    # Without names the classes are the indices present, in value order: three, not 100,000.
    dl = download(str(tmp_path / "shard.tar"), str(tmp_path / "download"), FAST)
    assert "classes" not in contract.read_manifest(dl.dest)["extra"]["sources"][0]
    manifest, rows = _cleaned(tmp_path, dl.dest, min_images_per_class=0)
    assert manifest["extra"]["classes"] == ["0", "1", "99999"]
    assert rows["odd.jpg"] == (2, "99999")


def test_json_labels_are_classes_and_sort_like_imagefolder(tmp_path):
    shard = tmp_path / "labelled.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, name in enumerate(["tabby", "Siamese", "tabby", "Siamese", "bengal", "bengal"]):
            sink.write({"__key__": f"{i:04d}", "png": jpeg(48, 40, seed=i), "json": {"label": name, "url": f"https://x/{i}"}})
    dl = download(str(shard), str(tmp_path / "download"), FAST)
    assert set(_download_rows(dl.dest).values()) == {"tabby", "Siamese", "bengal"}
    manifest, _ = _cleaned(tmp_path, dl.dest)
    assert manifest["extra"]["classes"] == ["Siamese", "bengal", "tabby"] == sorted(["tabby", "Siamese", "bengal"])


def _img2dataset_shard(path: Path) -> list[str]:
    """A shard shaped as img2dataset writes one (jpg, caption txt, json of url and caption); the captions."""
    captions = [f"a photo of thing number {i}" for i in range(4)]
    with wds.TarWriter(str(path)) as sink:
        for i, caption in enumerate(captions):
            meta = {"url": f"https://example.com/{i}.jpg", "caption": caption, "key": f"{i:09d}", "status": "success"}
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg(48, 40, seed=i), "txt": caption, "json": meta})
    return captions


def test_a_captions_only_shard_is_webdataset_and_every_sample_is_refused_with_the_fix(tmp_path):
    shard = tmp_path / "00000.tar"
    _img2dataset_shard(shard)
    assert looks_like_webdataset(shard, "tar"), "img2dataset's output is WebDataset, not a loose archive"
    dest = str(tmp_path / "download")
    try:
        download(str(shard), dest, FAST)
    except ValueError as exc:  # a download that kept nothing may be refused as degenerate, after it committed its rejects
        assert "kept no image" in str(exc)
    manifest = contract.read_manifest("file://" + dest)
    assert [s["format"] for s in manifest["extra"]["sources"]] == ["webdataset/tar"]
    assert manifest["outputs"] == 0
    found = _rejects("file://" + dest)
    assert set(found) == {f"{i:09d}.jpg" for i in range(4)}
    for reason, detail in found.values():
        assert reason == "no_label"
        assert "['jpg', 'json', 'txt']" in detail and "set label_key" in detail and "label_key: txt" in detail


@pytest.mark.parametrize("label_key", ["txt", "json:caption"])
def test_captions_are_classes_when_label_key_names_them(tmp_path, label_key):
    shard = tmp_path / "00000.tar"
    captions = _img2dataset_shard(shard)
    dl = download(str(shard), str(tmp_path / "download"), DownloadConfig(fetch_workers=2, label_key=label_key))
    assert _download_rows(dl.dest) == {f"{i:09d}.jpg": caption for i, caption in enumerate(captions)}
    assert dl.rejected == 0


def test_a_named_part_with_a_longer_extension_is_read(tmp_path):
    shard = tmp_path / "parts.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, name in enumerate(["cat", "dog"]):
            sink.write({"__key__": f"k{i}", "jpg": jpeg(48, 40, seed=i), "class.txt": name, "txt": "a caption"})
    dl = download(str(shard), str(tmp_path / "download"), DownloadConfig(fetch_workers=2, label_key="class.txt"))
    assert _download_rows(dl.dest) == {"k0.jpg": "cat", "k1.jpg": "dog"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"label_key": "jpg"}, "names the image part"),
        ({"label_key": "json:"}, "PART:KEY needs both"),
        ({"label_key": "a/b"}, "not a sample part"),
        ({"class_names": ("cat", "dog", "cat")}, "more than once"),
        ({"class_names": ("cat", "")}, "class 1: the class name is empty"),
        ({"class_names": ("cat", "dog/x")}, "class 1: the class name holds a path separator"),
    ],
)
def test_label_settings_are_checked_with_a_message_to_act_on(settings, message):
    with pytest.raises(ValueError, match=message):
        DownloadConfig(**settings)
