"""configs/own-data.yaml, the settings README suggests for a first run on your own images, learns an easy set.

The images are what a user has: a folder of class folders (tests/imagefactory.py ``shapes_folder``:
circles, squares and triangles of random size and colour on random backgrounds). The fast test
runs the config's sections through the steps as the pipeline does (download -> clean -> resize ->
train on ``file://`` prefixes, resize on its process pool: no Ray, no store); the slow one is the
whole ``imgpipe run`` README shows, on the 300 images README's figure is measured on.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.cli import main
from imgpipe.config import config_from_dict, read_config_file
from imgpipe.local.run import LOCAL_STEP_CONFIG
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.resize import resize
from imgpipe.steps.train import train
from imgpipe.train.config import TrainConfig
from tests.imagefactory import SHAPES, shapes_folder

ROOT = Path(__file__).resolve().parents[1]
OWN_DATA = ROOT / "configs" / "own-data.yaml"
CHANCE = 1 / len(SHAPES)


def _step_config(cls: type, section: str, **here: Any) -> Any:
    """A step's config as `imgpipe run --config configs/own-data.yaml` resolves it: the local run's settings, then the file's section."""
    values = {**LOCAL_STEP_CONFIG.get(section, {}), **(read_config_file(OWN_DATA).get(section) or {}), **here}
    return config_from_dict(cls, values)


@pytest.mark.usefixtures("no_exports")
def test_the_own_data_config_learns_an_easy_folder_of_class_folders(tmp_path):
    """README's 300 images (240 train, 30 test): measured test macro-F1 0.93-1.0 on 4 seeds, in about 25 s on 2 idle cores."""
    folder = shapes_folder(tmp_path / "shapes", per_class=100, seed=0)
    root = "file://" + str(tmp_path / "store")
    started = time.monotonic()
    dl = download(str(folder), f"{root}/download", DownloadConfig())
    cl = clean(dl.dest, f"{root}/clean", _step_config(CleanConfig, "clean"))
    rs = resize(cl.dest, f"{root}/resize", _step_config(ResizeConfig, "resize", executor="pool"))
    tr = train(rs.dest, f"{root}/train", _step_config(TrainConfig, "train", device="cpu"))
    seconds = time.monotonic() - started
    metrics = json.loads(storage.read_bytes(storage.join(tr.dest, contract.METRICS)))
    assert metrics["labels"] == list(SHAPES)
    assert metrics["selection"]["epochs_trained"] == metrics["selection"]["epochs_planned"], "every epoch trains (patience 0)"
    test = metrics["test"]
    assert test["images"] == 30
    assert test["macro_f1"] >= 0.8, f"test macro-F1 {test['macro_f1']:.3f} (chance {CHANCE:.2f}) after {seconds:.0f} s"


@pytest.mark.ray
@pytest.mark.slow  # the whole pipeline (about a minute); the config's steps on the same images: the test above
def test_readme_s_first_own_data_run_learns_three_easy_classes(tmp_path, capsys):
    folder = shapes_folder(tmp_path / "shapes", per_class=100, seed=0)
    argv = ["run", "--source", str(folder), "--config", str(OWN_DATA), "--workdir", str(tmp_path / "w"), "--data-root", str(tmp_path / "d")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    found = re.search(r"^result: test macro-F1 ([0-9.]+), accuracy [0-9.]+ on 30 test images$", out, re.MULTILINE)
    assert found, out
    assert float(found.group(1)) >= 0.8, out
