"""Each kind of source the download step reads, through download -> clean -> resize -> train.

The S3 ones against the SeaweedFS server, resize on a local Ray (marked ``ray``: run inside
scripts/in-loopback-netns). Each run must end with a model of the classes the source gave,
and every input accounted for once: download's inputs = clean's outputs + both steps' rejects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.resize import resize
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from tests.helpers import tar_bytes
from tests.imagefactory import jpeg

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("no_exports")]  # the exports are tests/train/test_export.py's
CLASSES = ("cat", "dog", "fox")
PER_CLASS = 6
FAST = DownloadConfig(retries=1, backoff_s=0.0, timeout_s=5.0, fetch_workers=4)


def _image(c: int, i: int) -> bytes:
    return jpeg(64, 48, seed=100 * c + i)


def _prefix(root: str, tmp_path: Path, request) -> str:
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            storage.write_bytes(f"{root}/bucket/pets/{name}/{i}.jpg", _image(c, i))
    storage.write_bytes(f"{root}/bucket/pets/dog/broken.jpg", b"\xff\xd8 not really")
    return f"{root}/bucket/pets/"


def _uri_list(root: str, tmp_path: Path, request) -> str:
    lines = ["uri,label"]
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            storage.write_bytes(f"{root}/store/{name}-{i}.jpg", _image(c, i))
            lines.append(f"{name}-{i}.jpg,{name}" if i % 2 else f"{root}/store/{name}-{i}.jpg,{name}")  # relative, or a URI
    lines.append(f"{root}/store/missing.jpg,cat")
    storage.write_bytes(f"{root}/store/train.csv", ("\n".join(lines) + "\n").encode())
    return f"{root}/store/train.csv"


def _webdataset(root: str, tmp_path: Path, request) -> str:
    for shard in range(2):
        samples = {}
        for c, name in enumerate(CLASSES):
            for i in range(shard * PER_CLASS // 2, (shard + 1) * PER_CLASS // 2):
                samples[f"{name}{i:03d}.jpg"] = _image(c, i)
                samples[f"{name}{i:03d}.json"] = json.dumps({"label": name}).encode()
        storage.write_bytes(f"{root}/wds/train-{shard:03d}.tar", tar_bytes(samples))
    return f"{root}/wds/train-{{000..001}}.tar"


def _hf_parquet(root: str, tmp_path: Path, request) -> str:
    datasets = request.getfixturevalue("hf_datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = [(c, i) for c in range(len(CLASSES)) for i in range(PER_CLASS)]
    data = {"image": [{"bytes": _image(c, i), "path": f"{c}-{i}.jpg"} for c, i in rows], "label": [c for c, _ in rows]}
    local = tmp_path / "train-00000-of-00001.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(local))
    storage.upload_file(local, f"{root}/hf/train-00000-of-00001.parquet")
    return f"{root}/hf/train-00000-of-00001.parquet"


def _nested(root: str, tmp_path: Path, request) -> str:
    outer = {f"{name}.tar": tar_bytes({f"{name}_{i}.JPEG": _image(c, i) for i in range(PER_CLASS)}) for c, name in enumerate(CLASSES)}
    storage.write_bytes(f"{root}/imagenet/train.tar", tar_bytes(outer))
    return f"{root}/imagenet/train.tar"


KINDS = {"prefix": _prefix, "urilist": _uri_list, "webdataset": _webdataset, "hf-parquet": _hf_parquet, "nested": _nested}


# A bucket prefix and WebDataset shards in make test; the others' readers are tested on their
# own (tests/data/test_listed_sources.py, tests/data/test_file_sources.py), and run end to end in make test-slow.
IN_MAKE_TEST = ("webdataset",)  # a prefix is tests/test_sharded_pipeline.py's kfp.local run's source too


@pytest.mark.parametrize("kind", [pytest.param(k, marks=() if k in IN_MAKE_TEST else pytest.mark.slow) for k in KINDS])
def test_each_source_kind_trains_a_model_of_its_classes(kind, s3_bucket, ray_session, tmp_path, request):
    root = s3_bucket
    source = KINDS[kind](root, tmp_path, request)

    def uri(step: str) -> str:
        return f"{root}/runs/{kind}/{step}"

    dl = download(source, uri("download"), FAST)
    cl = clean(dl.dest, uri("clean"), CleanConfig(workers=1, seed=1))
    rs = resize(cl.dest, uri("resize"), ResizeConfig(size=32, concurrency=1, batch_size=8))
    cfg = TrainConfig(model="tiny_cnn", epochs=1, batch_size=8, num_workers=0, device="cpu", shuffle_buffer=16)
    tr = train(rs.dest, uri("train"), cfg)
    assert dl.inputs == cl.outputs + cl.rejected + dl.rejected, "every input once, in the output or a rejects table"
    assert cl.outputs == len(CLASSES) * PER_CLASS and rs.inputs == cl.outputs
    history = json.loads(storage.read_bytes(storage.join(tr.dest, contract.METRICS)))
    assert history["labels"] == list(CLASSES), "the classes the source gave, in label order"
    assert contract.read_manifest(uri("clean"))["extra"]["label_source"] == ("folder" if kind == "prefix" else "given")
