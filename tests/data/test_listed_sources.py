"""Sources whose members are listed: a bucket prefix's keys, a URI list's rows.

Each kind goes through the download step itself, against real parts: the SeaweedFS S3 server of
``conftest.py`` for buckets, and a real HTTP server on 127.0.0.1 for URI lists (ETags and 304s
included). Every test checks that each input ends in the output or in the rejects with a reason,
and that the counts reconcile; second runs fetch only what changed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.data.readers import base, listing
from imgpipe.data.readers.hffolder import SNIFF_OBJECTS
from imgpipe.data.sources import SourcePolicy
from imgpipe.steps.download import DownloadConfig, download
from tests import serving
from tests.data.conftest import FAST, reconciles, rejects, rows
from tests.imagefactory import jpeg

# --------------------------------------------------------------------------- a bucket prefix


@pytest.fixture
def pets(s3_bucket: str) -> str:
    """``s3://bucket/pets/<class>/<id>.jpg``: 3 classes x 4 images, a folder marker, one big object."""
    return _pets(s3_bucket)


def _pets(s3_bucket: str) -> str:
    for c, name in enumerate(("cat", "dog", "fox")):
        for i in range(4):
            storage.write_bytes(f"{s3_bucket}/pets/{name}/{i}.jpg", jpeg(48, 40, seed=10 * c + i))
    storage.S3Backend.client().put_object(Bucket=s3_bucket[5:], Key="pets/empty-folder/", Body=b"")
    storage.write_bytes(f"{s3_bucket}/pets/fox/huge.jpg", b"\xff\xd8" + b"x" * 50_000)
    return f"{s3_bucket}/pets/"


def test_a_bucket_prefix_of_loose_images_is_a_source_with_keys_sizes_and_etags(pets, s3_bucket):
    cfg = DownloadConfig(max_member_bytes=20_000, fetch_workers=4)
    report = download(pets, f"{s3_bucket}/out/download", cfg)
    got, refused = rows(report.dest), rejects(report.dest)
    assert len(got) == 12 and set(refused) == {"fox/huge.jpg"} and refused["fox/huge.jpg"] == "member_too_large"
    listed = {o.uri[len(pets) :]: o for o in storage.iter_objects(pets) if not o.uri.endswith("/")}
    for path, row in got.items():
        assert row["etag"] == listed[path].etag and row["size"] == listed[path].size and row["label"] is None
        assert row["sha256"] == hashlib.sha256(row["bytes"]).hexdigest()
    (source,) = contract.read_manifest(report.dest)["extra"]["sources"]
    assert source["format"] == "prefix" and source["objects"] == 13
    reconciles(report, report.dest)


def test_the_store_lists_a_prefix_once_per_run_and_the_fetch_reads_the_census_listing(pets, s3_bucket, monkeypatch):
    listed = []
    real = storage.S3Backend.iter_objects

    def counting(self, prefix):
        for info in real(self, prefix):
            listed.append(info.uri)
            yield info

    monkeypatch.setattr(storage.S3Backend, "iter_objects", counting)
    report = download(pets, f"{s3_bucket}/out/download", DownloadConfig(max_member_bytes=20_000, fetch_workers=4))
    below = [u for u in listed if u.startswith(pets)]
    # The census lists all 14 keys once; the source's recognition (loose images or a Hugging Face
    # dataset) reads at most its first page (hffolder.SNIFF_OBJECTS keys); the fetch lists nothing again.
    assert len(set(below)) == 14 and len(below) - len(set(below)) <= min(14, SNIFF_OBJECTS)
    assert len(rows(report.dest)) == 12
    reconciles(report, report.dest)


def test_a_prefix_without_the_trailing_slash_is_recognised_and_a_key_with_dotdot_is_refused(moto_bucket):
    # S3 keys are strings: "pets/cat/../../up.jpg" lists below "pets/" yet names a path above it.
    # AWS keeps such a key; SeaweedFS refuses to store it, so the bucket is moto's (tests/moto_s3.py).
    s3_bucket = moto_bucket
    pets = _pets(s3_bucket)
    storage.S3Backend.client().put_object(Bucket=s3_bucket[5:], Key="pets/cat/../../up.jpg", Body=jpeg(seed=98))
    report = download(pets.rstrip("/"), f"{s3_bucket}/out/download", FAST)
    assert rejects(report.dest) == {"cat/../../up.jpg": "unsafe_member"}
    assert len(rows(report.dest)) == 13
    reconciles(report, report.dest)


def test_a_listing_is_consumed_a_few_objects_ahead_never_held_whole(monkeypatch):
    pulled = []

    def endless(prefix):
        for i in range(10**9):
            pulled.append(i)
            yield storage.ObjectInfo(f"s3://b/p/{i:09d}.jpg", 3, f"e{i}")

    monkeypatch.setattr(storage, "iter_objects", endless)
    monkeypatch.setattr(listing, "read_object", lambda uri, limit: (b"abc", storage.ObjectInfo(uri, 3, "x")))
    reader = listing.PrefixReader("s3://b/p/", base.ReaderSettings(fetch_workers=4))
    members = reader.members()
    first = [next(members) for _ in range(5)]
    members.close()
    assert [m.path for m in first] == [f"{i:09d}.jpg" for i in range(5)]
    assert len(pulled) <= 5 + 2 * 4 + 1, f"pulled {len(pulled)} objects from the listing for 5 members"


def _forge(prefix: str, edit) -> None:
    """Rewrites a committed download output's one data file, ``edit(path, row) -> row`` on every row."""
    (shard,) = contract.data_files(prefix)
    table = pq.read_table(io.BytesIO(storage.read_bytes(shard)))
    forged = pa.Table.from_pylist([edit(r["path"], r) for r in table.to_pylist()], schema=table.schema)
    buf = io.BytesIO()
    pq.write_table(forged, buf, row_group_size=4)
    storage.write_bytes(shard, buf.getvalue())


def _record_reads(monkeypatch, key=lambda uri: uri) -> list[str]:
    """What ``storage.read_some`` fetches from now on, each URI through ``key``."""
    reads: list[str] = []
    real = storage.read_some

    def read_some(uri: str, limit: int):
        reads.append(key(uri))
        return real(uri, limit)

    monkeypatch.setattr(storage, "read_some", read_some)
    return reads


def _under_pets(uri: str) -> str:
    return uri.rsplit("/pets/", 1)[1]


def test_a_second_run_fetches_only_what_changed_and_counts_what_was_deleted(pets, s3_bucket, monkeypatch):
    first = download(pets, f"{s3_bucket}/runs/1/download", FAST)
    for i in range(10):
        storage.write_bytes(f"{s3_bucket}/pets/cat/new-{i}.jpg", jpeg(48, 40, seed=500 + i))
    storage.delete(f"{s3_bucket}/pets/dog/0.jpg")
    storage.delete(f"{s3_bucket}/pets/dog/1.jpg")
    reads = _record_reads(monkeypatch)
    second = download(pets, f"{s3_bucket}/runs/2/download", FAST, previous=first.dest)
    assert sorted(reads) == sorted(f"{s3_bucket}/pets/cat/new-{i}.jpg" for i in range(10)), "exactly the 10 new objects"
    counts = contract.read_manifest(second.dest)["extra"]["incremental"]
    assert counts == {"previous": first.dest, "new": 10, "changed": 0, "unchanged": 13 - 2, "deleted": 2, "carried_refused": 0, "carried_unproved": 0}
    before, after = rows(first.dest), rows(second.dest)
    assert {p: r["sha256"] for p, r in after.items() if p in before} == {p: before[p]["sha256"] for p in after if p in before}
    assert not {"dog/0.jpg", "dog/1.jpg"} & set(after) and len(after) == 13 - 2 + 10
    reconciles(second, second.dest)


def test_a_changed_object_and_a_forged_previous_row_are_fetched_again(pets, s3_bucket, monkeypatch):
    first = download(pets, f"{s3_bucket}/runs/1/download", FAST)
    storage.write_bytes(f"{s3_bucket}/pets/cat/0.jpg", jpeg(48, 40, seed=777))  # a new ETag
    # Forge the previous output: one carried row's bytes no longer hash to its recorded sha256.
    forged = jpeg(48, 40, seed=12345)
    _forge(first.dest, lambda path, row: {**row, "bytes": forged} if path == "dog/2.jpg" else row)
    monkeypatch.setattr(contract, "check_sizes", lambda prefix, files: None)  # the forger also fixed the manifest's sizes
    reads = _record_reads(monkeypatch, _under_pets)
    second = download(pets, f"{s3_bucket}/runs/2/download", FAST, previous=first.dest)
    assert sorted(reads) == ["cat/0.jpg", "dog/2.jpg"], "the changed object, and the row that failed its check"
    counts = contract.read_manifest(second.dest)["extra"]["incremental"]
    assert (counts["changed"], counts["unchanged"], counts["carried_refused"]) == (2, 13 - 2, 1)
    got = rows(second.dest)
    assert got["dog/2.jpg"]["bytes"] == storage.read_bytes(f"{s3_bucket}/pets/dog/2.jpg"), "the source's bytes, not the forged ones"


def test_carried_bytes_are_proved_against_the_store_s_etag_not_the_previous_record(pets, s3_bucket, monkeypatch):
    # A multipart upload (one part): its ETag is "<md5 of the part MD5s>-1", no MD5 of the object.
    client, bucket = storage.S3Backend.client(), s3_bucket[5:]
    upload = client.create_multipart_upload(Bucket=bucket, Key="pets/fox/multi.jpg")["UploadId"]
    part = client.upload_part(Bucket=bucket, Key="pets/fox/multi.jpg", UploadId=upload, PartNumber=1, Body=jpeg(48, 40, seed=4321))
    client.complete_multipart_upload(
        Bucket=bucket, Key="pets/fox/multi.jpg", UploadId=upload, MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}
    )
    first = download(pets, f"{s3_bucket}/runs/1/download", FAST)
    assert rows(first.dest)["fox/multi.jpg"]["etag"].endswith("-1")
    real = storage.read_bytes(f"{s3_bucket}/pets/dog/2.jpg")
    other = jpeg(48, 40, seed=12345)
    other = (other + bytes(len(real)))[: len(real)]  # other content, of the listed size

    def forge(path: str, row: dict) -> dict:
        # The whole record forged: bytes, their sha256, and the ETag the listing gives now.
        return {**row, "bytes": other, "sha256": hashlib.sha256(other).hexdigest()} if path == "dog/2.jpg" else row

    _forge(first.dest, forge)
    monkeypatch.setattr(contract, "check_sizes", lambda prefix, files: None)  # the forger also fixed the manifest's sizes
    reads = _record_reads(monkeypatch, _under_pets)
    second = download(pets, f"{s3_bucket}/runs/2/download", FAST, previous=first.dest)
    assert sorted(reads) == ["dog/2.jpg", "fox/multi.jpg"], "the forged row and the unprovable one; every honest row is carried"
    counts = contract.read_manifest(second.dest)["extra"]["incremental"]
    # The forged row counts as changed (its record was refused); the multipart one as unproved, neither changed nor not.
    assert (counts["unchanged"], counts["changed"], counts["carried_refused"], counts["carried_unproved"]) == (14 - 2, 1, 1, 1)
    got = rows(second.dest)
    assert got["dog/2.jpg"]["bytes"] == real, "the store's bytes, not the forged ones"
    assert got["dog/2.jpg"]["sha256"] == hashlib.sha256(real).hexdigest()
    assert got["cat/3.jpg"]["bytes"] == storage.read_bytes(f"{s3_bucket}/pets/cat/3.jpg"), "an honest row, carried"
    reconciles(second, second.dest)


# --------------------------------------------------------------------------- a URI list


class _Site:
    """A real HTTP server on 127.0.0.1: paths -> bodies, ETags of their content, 304 on a matching If-None-Match."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.log: list[tuple[str, str | None]] = []
        self.answered: list[tuple[str, int]] = []
        self.opaque = False
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                site.log.append((self.path, self.headers.get("If-None-Match")))
                if self.path in site.status:
                    site.answered.append((self.path, site.status[self.path]))
                    self.send_error(site.status[self.path])
                    return
                body = site.bodies.get(self.path)
                if body is None:
                    site.answered.append((self.path, 404))
                    self.send_error(404)
                    return
                # The content's MD5, as S3 (and a static site behind it) answers; `opaque` plays a server whose ETag is a version token.
                digest = hashlib.sha256(body).hexdigest()[:16] if site.opaque else hashlib.md5(body, usedforsecurity=False).hexdigest()
                etag = '"' + digest + '"'
                site.answered.append((self.path, 304 if self.headers.get("If-None-Match") == etag else 200))
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                serving.answer(self, 200, body, {"ETag": etag})

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def transferred(self) -> list[str]:
        """The paths answered with a whole body (200)."""
        return [p for p, status in self.answered if status == 200]


@pytest.fixture
def site(monkeypatch) -> Iterator[_Site]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = _Site()
    thread = serving.start(s.server)
    yield s
    serving.stop(s.server, thread)


def _uri_list(site: _Site, s3_bucket: str, tmp_path: Path) -> Path:
    for i in range(4):
        site.bodies[f"/img/cat-{i}.jpg"] = jpeg(48, 40, seed=100 + i)
        storage.write_bytes(f"{s3_bucket}/dogs/{i}.jpg", jpeg(48, 40, seed=200 + i))
    site.status["/img/broken.jpg"] = 500
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "fox.jpg").write_bytes(jpeg(48, 40, seed=300))
    lines = ["uri,label"]
    lines += [f"{site.base}/img/cat-{i}.jpg,cat" for i in range(4)]
    lines += [f"{s3_bucket}/dogs/{i}.jpg,dog" for i in range(4)]
    lines += [
        "local/fox.jpg,fox",
        f"{site.base}/img/missing.jpg,cat",
        f"{site.base}/img/broken.jpg,cat",
        ",cat",
        "../outside.jpg,cat",
        f"{s3_bucket}/dogs/none.jpg,dog",
    ]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_csv_of_uris_and_labels_fetches_each_entry_and_makes_each_failure_a_reject(site, s3_bucket, tmp_path):
    listed = _uri_list(site, s3_bucket, tmp_path)
    report = download(str(listed), f"{s3_bucket}/out/download", FAST)
    got, refused = rows(report.dest), rejects(report.dest)
    host = site.base.removeprefix("http://")
    assert {p: r["label"] for p, r in got.items()} == {
        **{f"{host}/img/cat-{i}.jpg": "cat" for i in range(4)},
        **{f"{s3_bucket[5:]}/dogs/{i}.jpg": "dog" for i in range(4)},
        "local/fox.jpg": "fox",
    }
    assert got[f"{host}/img/cat-0.jpg"]["bytes"] == site.bodies["/img/cat-0.jpg"]
    assert refused == {
        f"{host}/img/missing.jpg": "http_error",
        f"{host}/img/broken.jpg": "http_error",
        "train.csv#line-13": "bad_row",
        "../outside.jpg": "unsafe_member",
        f"{s3_bucket[5:]}/dogs/none.jpg": "vanished",
    }
    details = {r["path"]: r["detail"] for r in contract.read_rejects(report.dest).to_pylist()}
    assert "HTTP 404" in details[f"{host}/img/missing.jpg"] and "HTTP 500" in details[f"{host}/img/broken.jpg"]
    assert "line 13" in details["train.csv#line-13"]
    reconciles(report, report.dest)


def test_a_jsonl_list_under_a_pipelines_policy_refuses_local_and_loopback_entries_as_rejects(site, s3_bucket, tmp_path):
    site.bodies["/a.jpg"] = jpeg(seed=1)
    storage.write_bytes(f"{s3_bucket}/b.jpg", jpeg(seed=2))
    entries = [
        {"uri": f"{s3_bucket}/b.jpg", "label": "b"},
        {"url": f"{site.base}/a.jpg", "label": "a"},
        {"uri": "file:///etc/hostname", "label": "x"},
        {"label": "no uri"},
    ]
    listed = f"{s3_bucket}/lists/train.jsonl"
    storage.write_bytes(listed, ("\n".join(json.dumps(e) for e in entries) + "\nnot json\n").encode())
    policy = SourcePolicy.from_env({})  # what the kfp component uses: https and s3, public addresses only
    report = download(listed, f"{s3_bucket}/out/download", FAST, policy=policy)
    assert {p: r["label"] for p, r in rows(report.dest).items()} == {f"{s3_bucket[5:]}/b.jpg": "b"}
    refused = rejects(report.dest)
    assert refused == {
        f"{site.base.removeprefix('http://')}/a.jpg": "source_refused",
        "etc/hostname": "source_refused",
        "train.jsonl#line-4": "bad_row",
        "train.jsonl#line-5": "bad_row",
    }
    assert site.log == [], "nothing was sent to a refused address"
    reconciles(report, report.dest)


def test_a_second_run_over_a_uri_list_asks_conditionally_and_fetches_only_what_changed(site, s3_bucket, tmp_path):
    listed = _uri_list(site, s3_bucket, tmp_path)
    first = download(str(listed), f"{s3_bucket}/runs/1/download", FAST)
    site.bodies["/img/cat-1.jpg"] = jpeg(48, 40, seed=9999)  # changed at the source
    site.log.clear()
    site.answered.clear()
    second = download(str(listed), f"{s3_bucket}/runs/2/download", FAST, previous=first.dest)
    conditional = {p: etag for p, etag in site.log if etag is not None}
    assert set(conditional) == {f"/img/cat-{i}.jpg" for i in range(4)}, "each known entry asked with If-None-Match"
    assert site.transferred() == ["/img/cat-1.jpg"], "one body crossed the wire: the changed entry's"
    counts = contract.read_manifest(second.dest)["extra"]["incremental"]
    # The local file is read again: a modification time proves nothing about recorded bytes.
    assert (counts["unchanged"], counts["changed"], counts["carried_unproved"]) == (7, 1, 1) and counts["deleted"] == 0
    assert rows(second.dest)[f"{site.base.removeprefix('http://')}/img/cat-1.jpg"]["bytes"] == site.bodies["/img/cat-1.jpg"]
    reconciles(second, second.dest)


def test_a_304_without_an_md5_etag_proves_nothing_so_the_entry_is_fetched(site, s3_bucket, tmp_path):
    """A server's 304 says its object is unchanged, not that the previous output's bytes are it."""
    site.opaque = True
    listed = _uri_list(site, s3_bucket, tmp_path)
    first = download(str(listed), f"{s3_bucket}/runs/1/download", FAST)
    site.answered.clear()
    second = download(str(listed), f"{s3_bucket}/runs/2/download", FAST, previous=first.dest)
    assert sorted(set(site.transferred())) == [f"/img/cat-{i}.jpg" for i in range(4)], "each 304 followed by a fetch"
    assert contract.read_manifest(second.dest)["extra"]["incremental"]["carried_unproved"] == 4 + 1, "and the local file"
    reconciles(second, second.dest)
