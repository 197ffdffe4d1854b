"""A sharded download + clean, merged, against the same data cleaned in one pod.

Shards split the inputs by name (:mod:`imgpipe.data.sharding`); each is downloaded and cleaned
alone; :func:`imgpipe.steps.merge.merge` must then give what one clean of everything gives:
the same counts, rejects by reason, classes and split sizes, with the copies that only the
merge can see (an exact copy and a mirrored near-copy in another shard) rejected, and every
input accounted once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import contract
from imgpipe.clean.config import CleanConfig
from imgpipe.clean.splits import split_codes
from imgpipe.data.sharding import Shard
from imgpipe.steps import download as download_step
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.merge import merge
from tests.imagefactory import encode, jpeg, photo

CLASSES = ("Bird", "cat", "dog")
N = 3
CFG = CleanConfig(seed=5, workers=1)


def _owner(name: str) -> int:
    return next(i for i in range(N) if Shard(i, N).owns(name))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    names = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(12):
            (root / name / f"{i}.jpg").write_bytes(jpeg(96, 64, seed=50 * c + i))
            names.append(f"{name}/{i}.jpg")
    original = next(n for n in names if _owner(n) == 0)
    copy = next(f"dog/copy-{k}.jpg" for k in range(200) if _owner(f"dog/copy-{k}.jpg") == 2)
    (root / copy).write_bytes((root / original).read_bytes())
    mirrored = next(n for n in names if _owner(n) == 1 and n.startswith("cat/"))
    near = next(f"cat/mirror-{k}.jpg" for k in range(200) if _owner(f"cat/mirror-{k}.jpg") == 2)
    flipped = Image.open(root / mirrored).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (root / near).write_bytes(encode(flipped, "JPEG", quality=70))
    (root / "Bird" / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    (root / "Bird" / "tiny.png").write_bytes(encode(photo(96, 64, seed=999), "PNG"))
    return root


def _sharded(source: Path, tmp: Path, cfg: CleanConfig = CFG) -> list[str]:
    prefixes = []
    for i in range(N):
        dl = download(str(source), str(tmp / f"dl-{i}"), DownloadConfig(), shard=Shard(i, N))
        assert dl.extra["shard"] == {"index": i, "count": N}
        prefixes.append(clean(dl.dest, str(tmp / f"cl-{i}"), cfg).dest)
    return prefixes


def _rows(prefix: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in contract.data_files(prefix)])


def test_shards_split_the_inputs_disjointly_and_together_hold_them_all(source, tmp_path):
    whole = set(_rows(download(str(source), str(tmp_path / "all"), DownloadConfig()).dest).column("path").to_pylist())
    parts = [
        set(_rows(download(str(source), str(tmp_path / f"s{i}"), DownloadConfig(), shard=Shard(i, N)).dest).column("path").to_pylist())
        for i in range(N)
    ]
    assert all(parts) and set().union(*parts) == whole
    assert sum(len(p) for p in parts) == len(whole), "no input in two shards"


def test_a_file_source_goes_whole_to_one_shard_and_the_others_never_fetch_it(tmp_path, monkeypatch):
    archive = tmp_path / "pets.zip"
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(4):
            zf.writestr(f"cat/{i}.jpg", jpeg(seed=i))
    opened = []
    real = download_step.open_source
    monkeypatch.setattr(download_step, "open_source", lambda uri, **kw: opened.append(uri) or real(uri, **kw))
    counts = [download(str(archive), str(tmp_path / f"d{i}"), DownloadConfig(), shard=Shard(i, N)).inputs for i in range(N)]
    assert sorted(counts) == [0, 0, 4]
    assert len(opened) == 1, "only the owning shard reads the archive"


def test_the_merge_equals_one_clean_of_everything(source, tmp_path):
    single = clean(download(str(source), str(tmp_path / "dl"), DownloadConfig()).dest, str(tmp_path / "cl"), CFG)
    merged = merge(_sharded(source, tmp_path), str(tmp_path / "merged"), CFG)

    assert merged.inputs == single.inputs == 12 * len(CLASSES) + 4
    assert merged.outputs + merged.rejected == merged.inputs
    assert (merged.outputs, merged.rejects_by_reason) == (single.outputs, single.rejects_by_reason)
    assert merged.rejects_by_reason["duplicate"] == 1 and merged.rejects_by_reason["near_duplicate"] == 1
    assert merged.extra["merge"]["duplicates_across_shards"] == 1
    assert merged.extra["merge"]["near_duplicates_across_shards"] == 1
    for key in ("classes", "splits", "per_class"):
        assert merged.extra[key] == single.extra[key], key

    rows = _rows(merged.dest)
    assert sorted(rows.column("order").to_pylist()) == list(range(merged.outputs))
    assert rows.column("order").to_pylist() == list(range(merged.outputs)), "files hold rows in order"
    classes = merged.extra["classes"]
    assert [classes[i] for i in rows.column("label").to_pylist()] == rows.column("label_name").to_pylist()
    # The split is the stratified one over all kept rows, in the merged order.
    expected = split_codes(rows.column("label").to_numpy(), CFG.split, CFG.seed)
    assert rows.column("split").to_pylist() == [("train", "val", "test")[c] for c in expected]
    assert len(set(rows.column("sha256").to_pylist())) == merged.outputs
    rejected = {r["path"]: r for r in contract.read_rejects(merged.dest).to_pylist()}
    assert rejected.keys().isdisjoint(rows.column("path").to_pylist())
    assert len(rejected) == merged.rejected and "Bird/broken.jpg" in rejected
    near = next(r for r in rejected.values() if r["reason"] == "near_duplicate")
    assert near["path"].startswith("cat/mirror-") and "which is kept" in near["detail"]


def test_the_merge_is_reproducible_and_refuses_mixed_configs(source, tmp_path):
    shards = _sharded(source, tmp_path)
    a = merge(shards, str(tmp_path / "a"), CFG)
    b = merge(shards, str(tmp_path / "b"), CFG)
    assert [f.sha256 for f in a.files] == [f.sha256 for f in b.files]
    with pytest.raises(ValueError, match="cleaned with other seed"):
        merge(shards, str(tmp_path / "c"), CleanConfig(seed=6, workers=1))
    with pytest.raises(ValueError, match="listed twice"):
        merge([shards[0], shards[0]], str(tmp_path / "d"), CFG)
    with pytest.raises(ValueError, match="inside|contains|equals|overlap"):
        merge(shards, shards[0], CFG)


def test_a_sharded_run_keeps_every_rule_of_an_unsharded_one_across_two_sources(tmp_path):
    # Two sources hold one member path: a directory (split among shards object by object) and a
    # zip (whole to the shard of its name). Unsharded, the zip's copy is a duplicate_member; sharded,
    # each copy sits alone in its own shard and only the merge sees both. The zip also holds an exact
    # copy of a directory image under a class of its own, which then keeps no image and is no class.
    import zipfile

    root = tmp_path / "src"
    names = []
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            (root / name / f"{i}.jpg").write_bytes(jpeg(96, 64, seed=300 + 50 * c + i))
            names.append(f"{name}/{i}.jpg")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    archive = next(p for k in range(200) if _owner(str(p := tmp_path / f"extra-{k}.zip")) == N - 1)
    same_path, same_bytes = [n for n in names if _owner(n) < N - 1][:2]
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(same_path, jpeg(96, 64, seed=900))  # other bytes, one path
        zf.writestr("fox/0.jpg", (root / same_bytes).read_bytes())
        zf.writestr("dog/zip-only.jpg", jpeg(96, 64, seed=901))
    sources = [str(root), str(archive)]

    whole = download(sources, str(tmp_path / "dl"), DownloadConfig())
    single = clean(whole.dest, str(tmp_path / "cl"), CFG)
    parts, prefixes = [], []
    for i in range(N):
        parts.append(download(sources, str(tmp_path / f"dl-{i}"), DownloadConfig(), shard=Shard(i, N)))
        prefixes.append(clean(parts[-1].dest, str(tmp_path / f"cl-{i}"), CFG).dest)
    merged = merge(prefixes, str(tmp_path / "merged"), CFG)

    def kept(prefix: str) -> dict[str, str]:
        rows = _rows(prefix)
        return dict(zip(rows.column("path").to_pylist(), rows.column("label_name").to_pylist()))

    def refused(*prefixes: str) -> list[tuple[str, str]]:
        return sorted((r["path"], r["reason"]) for p in prefixes for r in contract.read_rejects(p).to_pylist())

    # Unsharded, the download rejects the path; sharded, the merge does: compare download + clean.
    assert whole.inputs == sum(p.inputs for p in parts) == 2 * 10 + 1 + 3
    assert whole.rejects_by_reason == {"duplicate_member": 1} and not any(p.rejected for p in parts)
    assert merged.inputs == sum(p.outputs for p in parts) == merged.outputs + merged.rejected
    assert single.inputs + whole.rejected == merged.inputs and merged.outputs == single.outputs
    assert refused(whole.dest, single.dest) == refused(*(p.dest for p in parts), merged.dest)
    assert (same_path, "duplicate_member") in refused(merged.dest)
    assert kept(merged.dest) == kept(single.dest)
    # The directory's copy is the one kept (its bytes, not the zip's), as unsharded.
    sha = {r["path"]: r["sha256"] for r in _rows(merged.dest).select(["path", "sha256"]).to_pylist()}
    assert sha[same_path] == {r["path"]: r["sha256"] for r in _rows(single.dest).select(["path", "sha256"]).to_pylist()}[same_path]
    assert sha[same_path] == hashlib.sha256((root / same_path).read_bytes()).hexdigest()
    # Not "splits": one clean draws them before decoding (dog/broken.jpg held a place), the merge
    # over the kept images; each is the stratified split of what it drew over.
    for key in ("classes", "per_class"):
        assert merged.extra[key] == single.extra[key], key
    assert "fox" not in merged.extra["classes"]
    assert merged.extra["merge"]["duplicate_paths_across_shards"] == 1
    rows = _rows(merged.dest)
    assert [merged.extra["classes"][i] for i in rows.column("label").to_pylist()] == rows.column("label_name").to_pylist()
