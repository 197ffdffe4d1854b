"""synth -> download -> clean: every archive member ends up in exactly one place."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_members_accounted_once_across_steps(backend, tmp_path, request):
    root = str(tmp_path) if backend == "file" else request.getfixturevalue("s3_bucket")
    synth_dir = storage.join(root, "synth")
    generate(synth_dir, SynthConfig(classes=4, per_class=6, seed=2), progress=False)
    expected = json.loads(storage.read_bytes(storage.join(synth_dir, "synth.json")))
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(synth_dir, "images.tar.gz")))) as tar:
        members = {m.name for m in tar.getmembers() if m.isfile()}

    dl = download([storage.join(synth_dir, "images.tar.gz")], storage.join(root, "dl"), DownloadConfig())
    cl = clean(dl.dest, storage.join(root, "clean"), CleanConfig(workers=2 if backend == "s3" else 1))

    kept = (
        pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["path"]) for u in contract.data_files(cl.dest)])
        .column("path")
        .to_pylist()
    )
    rejected = contract.read_rejects(dl.dest).to_pylist() + contract.read_rejects(cl.dest).to_pylist()
    places = kept + [r["path"] for r in rejected]
    assert sorted(places) == sorted(members), "each member exactly once, output or rejects"
    assert {r["path"]: r["reason"] for r in rejected} == expected["expected_rejects"]
    assert dl.inputs == cl.outputs + cl.rejected + dl.rejected
    assert cl.outputs == 4 * 6
