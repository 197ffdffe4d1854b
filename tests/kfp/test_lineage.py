"""A model's lineage: the download's sources as its manifest records them, and the class set."""

from __future__ import annotations

import json

from imgpipe import storage
from imgpipe.readpolicy import ReadPolicy
from imgpipe.stepio import artifacts as ka
from imgpipe.stepio import lineage
from imgpipe.steps.download import DownloadConfig, download
from tests.imagefactory import jpeg


def test_the_sources_are_the_download_manifests_own_and_name_the_lineage(tmp_path):
    folder = tmp_path / "photos"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            (folder / name / f"{i}.jpg").write_bytes(jpeg(seed=i))
    out = download([str(folder)], "file://" + str(tmp_path / "dl"), DownloadConfig())
    recorded = lineage.sources_of({"download": out.dest}, ReadPolicy.trusted())
    assert recorded == lineage.dataset_sources([str(folder)]) == lineage.dataset_sources([str(folder) + "/"])
    key = lineage.lineage_key(recorded, ["cat", "dog"])
    assert key.startswith("photos-") and key.startswith(lineage.sources_key(recorded) + "-")
    assert key != lineage.lineage_key(recorded, ["cat", "dog", "fox"]) != lineage.lineage_key(recorded, ["dog", "cat"])


def test_a_uri_is_named_without_its_secrets():
    (named,) = lineage.dataset_sources(["https://user:pw@host/data/pets.tar?X-Amz-Signature=abc"])
    assert named.startswith("https://host/data/pets.tar") and "pw" not in named and "abc" not in named
    key = lineage.lineage_key([named], ["a", "b"])
    assert key.startswith("pets-") and "/" not in key and " " not in key


def test_an_incremental_run_continues_its_own_datasets_newest_record(tmp_path):
    root = "file://" + str(tmp_path / "root")
    pets, shapes = ["s3://team/pets.tar"], ["s3://team/shapes"]
    for run_id, sources, classes in (("r1", pets, ["a", "b"]), ("r2", shapes, ["x", "y"]), ("r3", pets, ["a", "b", "c"])):
        dataset = {"key": lineage.lineage_key(sources, classes), "sources": sources, "classes": classes}
        ka.record_latest(root, run_id, {"clean": ka.run_prefix(root, run_id, "clean")}, dataset)
    assert lineage.newest_for_sources(root, pets)["run_id"] == "r3", "a new class set continues the same source"
    assert lineage.newest_for_sources(root, shapes)["run_id"] == "r2"
    assert lineage.newest_for_sources(root, ["s3://team/other"]) is None
    storage.write_bytes(lineage.record_uri(root, lineage.lineage_key(pets, ["z"])), b"[not a record")
    try:
        lineage.newest_for_sources(root, pets)
    except ValueError as exc:
        assert "not a record imgpipe wrote" in str(exc)
    else:
        raise AssertionError("a damaged record is named, not skipped")
    assert json.loads(storage.read_bytes(storage.join(root, ka.LATEST)))["run_id"] == "r3"
