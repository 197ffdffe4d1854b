"""img2dataset's own output as a source: its WebDataset shards and its Parquet files, written by img2dataset itself.

img2dataset (1.47, its own venv: it pins webdataset<0.3 and albumentations<2, which this venv's
newer ones exclude; ``make test`` builds it, ``IMGPIPE_IMG2DATASET_PYTHON`` names it) fetches a
URL list from an HTTP server on 127.0.0.1 and writes what a team would point imgpipe at. A label
it carries (``save_additional_columns``) is the class; a caption is never one unless asked.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import subprocess
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgpipe import contract, storage
from imgpipe.outcome import DegenerateOutput
from imgpipe.steps.download import DownloadConfig, download
from tests import imagefactory as f

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("IMGPIPE_IMG2DATASET_PYTHON") or ROOT / ".venv" / "img2dataset" / "bin" / "python")
CLASSES = ("cat", "dog")
PER_CLASS = 5
SHARDS = "{00000..00001}.tar"

# make test names the venv it builds: there a missing one fails; a bare pytest skips.
pytestmark = pytest.mark.skipif(
    not PYTHON.exists() and "IMGPIPE_IMG2DATASET_PYTHON" not in os.environ, reason=f"no img2dataset venv at {PYTHON} (make test builds it)"
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What img2dataset writes from a list of url,caption,label served on 127.0.0.1.

    ``wds/``: WebDataset with the label column kept; ``captions/``: WebDataset, captions only;
    ``pq/``: Parquet with the label column.
    """
    tmp = tmp_path_factory.mktemp("img2dataset")
    root = tmp / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = ["url,caption,label"]
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            (root / f"{name}{i}.jpg").write_bytes(f.jpeg(64, 48, seed=10 * c + i))
            rows.append(f"http://127.0.0.1:{server.server_address[1]}/{name}{i}.jpg,a photo of {name} number {i},{name}")
    (tmp / "list.csv").write_text("\n".join(rows) + "\n")
    common = (
        "input_format='csv', url_col='url', caption_col='caption', processes_count=1, thread_count=2, image_size=64, "
        "resize_mode='no', enable_wandb=False, distributor='multiprocessing', number_sample_per_shard=6"
    )
    runs = (
        ("wds", "webdataset", "save_additional_columns=['label'], "),
        ("captions", "webdataset", ""),
        ("pq", "parquet", "save_additional_columns=['label'], "),
    )
    code = "from img2dataset import download\n" + "".join(
        f"download(url_list='list.csv', output_folder={out!r}, output_format={fmt!r}, {extra}{common})\n" for out, fmt, extra in runs
    )
    try:
        done = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp)
    finally:
        server.shutdown()
        server.server_close()
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-2000:]
    assert log.count("total   - success: 1.000") >= len(runs), log[-2000:]
    return tmp


def _labels(uri: str) -> set[str]:
    return {r["label"] for r in pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["label"]).to_pylist()}


def test_its_webdataset_shards_with_a_label_column_give_those_classes(written, tmp_path):
    assert len(list((written / "wds").glob("*.tar"))) == 2
    report = download(str(written / "wds" / SHARDS), str(tmp_path / "dl"), DownloadConfig())
    assert (report.inputs, report.outputs, report.rejected) == (10, 10, 0)
    assert set().union(*map(_labels, contract.data_files(report.dest))) == set(CLASSES), "the json's label, not the caption"


def test_its_captions_alone_are_no_classes(written, tmp_path):
    with pytest.raises(DegenerateOutput, match="kept no image from 10 input") as caught:
        download(str(written / "captions" / SHARDS), str(tmp_path / "dl"), DownloadConfig())
    assert "no_label 10" in str(caught.value)
    details = contract.read_rejects(str(tmp_path / "dl")).column("detail").to_pylist()
    assert all("label_key" in d for d in details), details[:2]
    report = download(str(written / "captions" / SHARDS), str(tmp_path / "dl2"), DownloadConfig(label_key="txt"))
    assert report.outputs == 10, "captions as classes, when that is what the user asks"


def test_its_parquet_output_is_refused_naming_the_columns(written, tmp_path):
    (first, *_) = sorted((written / "pq").glob("*.parquet"))
    with pytest.raises(ValueError) as caught:
        download(str(first), str(tmp_path / "dl"), DownloadConfig())
    message = str(caught.value)
    assert "image_column" in message and "\n" not in message, message
