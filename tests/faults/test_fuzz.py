"""5,000 mutated JPEG/PNG/GIF/WebP/TIFF files through download, clean and resize.

Every file is kept or rejected with a reason, no step crashes or hangs, and each
step's peak memory (the process and its workers) is recorded.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from imgpipe import contract, storage
from tests.faults.conftest import Runner
from tests.faults.mutate import mutate

SEED = 2026
PER_FORMAT = 1000
FORMATS = {  # format: (PIL save format, modes of the base images)
    "jpg": ("JPEG", ("RGB", "L", "CMYK")),
    "png": ("PNG", ("RGB", "RGBA", "P", "I;16")),
    "gif": ("GIF", ("P", "L")),
    "webp": ("WEBP", ("RGB", "RGBA")),
    "tif": ("TIFF", ("RGB", "L", "I;16", "CMYK")),
}
STEP_TIMEOUT_S = 900  # a hang fails the test instead of stalling it
# Some mutated TIFFs keep libtiff busy for minutes: the per-image limit ends them (the
# default, 60 s, is for real photographs; the fuzzed files are tiny).
IMAGE_TIMEOUT_S = 5
MAX_RSS_MB = 3000  # the bound each step's peak memory must stay under on this set


def _base(rng: random.Random, fmt: str, mode: str) -> bytes:
    w, h = rng.randint(40, 160), rng.randint(40, 160)
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _fuzz_archive(path: str) -> Counter:
    rng = random.Random(SEED)
    kinds: Counter = Counter()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for ext, (fmt, modes) in FORMATS.items():
            bases = [_base(rng, fmt, modes[i % len(modes)]) for i in range(8)]
            for i in range(PER_FORMAT):
                data, kind = mutate(rng, rng.choice(bases))
                kinds[kind] += 1
                # Oxford-style names, so clean labels them (class = name before the last _).
                info = tarfile.TarInfo(f"images/{ext}_class_{'ABCDE'[i % 5]}_{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return kinds


@pytest.mark.ray
def test_mutated_images_are_kept_or_rejected_with_a_reason(tmp_path, s3_endpoint, figures):
    root = "file://" + str(tmp_path / "store")
    archive = str(tmp_path / "fuzz.tar.gz")
    mutations = _fuzz_archive(archive)
    runner = Runner(s3_endpoint)
    dl, cl, rs = (storage.join(root, s) for s in ("download", "clean", "resize"))
    runs = {
        "download": runner.run("download", archive, dl, timeout=STEP_TIMEOUT_S).check(),
        "clean": runner.run("clean", dl, cl, "--workers", "2", "--set", f"image_timeout_s={IMAGE_TIMEOUT_S}", timeout=STEP_TIMEOUT_S).check(),
        "resize": runner.run("resize", cl, rs, "--size", "32", timeout=STEP_TIMEOUT_S).check(),
    }
    manifests = {s: contract.read_manifest(p) for s, p in (("download", dl), ("clean", cl), ("resize", rs))}
    total = len(FORMATS) * PER_FORMAT
    assert manifests["download"]["inputs"] == total
    for step, m in manifests.items():
        assert m["inputs"] == m["outputs"] + m["rejected"], step
        rejects = contract.read_rejects(storage.join(root, step)).to_pylist()
        assert len(rejects) == m["rejected"] and all(r["reason"] for r in rejects), step
    assert manifests["clean"]["inputs"] == manifests["download"]["outputs"]
    assert manifests["resize"]["inputs"] == manifests["clean"]["outputs"]
    for step, run in runs.items():
        assert run.max_rss_mb < MAX_RSS_MB, (step, run.max_rss_mb)
    assert not runner.wait_no_leftovers()
    figures.update(
        files=total,
        mutations=dict(mutations),
        kept_after_clean=manifests["clean"]["outputs"],
        clean_rejects=manifests["clean"]["rejects_by_reason"],
        resize_rejects=manifests["resize"]["rejects_by_reason"],
        kept_after_resize=manifests["resize"]["outputs"],
        seconds={s: round(r.seconds, 1) for s, r in runs.items()},
        peak_rss_mb={s: round(r.max_rss_mb) for s, r in runs.items()},
    )
