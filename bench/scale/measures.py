"""Benchmark: what clean's measures find, and what they cost an image, through clean's own per-image path.

Photo-like JPEGs (bench/scale/scale.py's set); for ``--copies`` of them a copy re-encoded as JPEG
quality 60, one resized to 90% (LANCZOS, re-encoded at the set's quality) and one mirrored
left-right (re-encoded likewise). Every file goes through what clean's decode workers run on
it (``imgpipe.clean.decode.decode_row``, then ``measure_row``). Reported:

* the share of copies whose pHash (or, for the mirrored, the original's mirrored pHash) is
  within 2 and 4 bits of the original's, and the distinct pairs of originals within 4 bits;
* the per-image time of that path, one process;
* the measures of each original decoded that way against the same image decoded whole
  (the largest differences), so a reduced decode's effect on the outlier measures is stated.

Run it against an older tree with ``PYTHONPATH=OLD/src`` to compare two definitions:

    python bench/scale/measures.py [--images 1200 --copies 300]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from imgpipe.clean import quality
from imgpipe.clean.config import CleanConfig
from imgpipe.data.images import validate_and_normalize

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]
from scale import QUALITY, generate_archive  # noqa: E402


def _clean_path() -> tuple[Callable[[bytes], quality.Measures], str]:
    """How clean's workers measure one file (:func:`imgpipe.clean.decode.decode_row` and ``measure_row``), and its name.

    A tree from before them (through ``PYTHONPATH``) measured the full decode.
    """
    from imgpipe.clean import decode

    if hasattr(decode, "measure_row"):
        cfg = CleanConfig()
        return (lambda data: decode.measure_row(decode.decode_row(data, cfg))), (
            f"reduced decode (>= {quality.MEASURE_SIDE} px a side, luma), antialiased thumbnail"
        )
    return (lambda data: quality.measure(validate_and_normalize(data).pixels)), "full decode, 128-px grid + boxes"


def _bits(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _jpeg(img: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    measure_file, path_name = _clean_path()
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        import tarfile

        archive = Path(tmp) / "photos.tar"
        generate_archive(archive, args.images, seed=0)
        with tarfile.open(archive) as tar:
            originals = [tar.extractfile(m).read() for m in tar if m.isfile()]
    t0 = time.perf_counter()
    measured = [measure_file(data) for data in originals]
    per_image_ms = (time.perf_counter() - t0) / len(originals) * 1e3
    kinds: dict[str, list[int]] = {"re-encoded q60": [], "resized 90%": [], "mirrored": []}
    for k in range(min(args.copies, len(originals))):
        img = Image.open(io.BytesIO(originals[k])).convert("RGB")
        small = img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.Resampling.LANCZOS)
        kinds["re-encoded q60"].append(_bits(measured[k].phash, measure_file(_jpeg(img, 60)).phash))
        kinds["resized 90%"].append(_bits(measured[k].phash, measure_file(_jpeg(small, QUALITY)).phash))
        flipped = measure_file(_jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), QUALITY))
        kinds["mirrored"].append(_bits(measured[k].phash_mirror, flipped.phash))
    hashes = np.array([m.phash for m in measured], np.uint64)
    close = 0
    for i in range(len(hashes)):
        x = np.bitwise_xor(hashes[i + 1 :], hashes[i])
        close += int((np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1) <= 4).sum())
    whole = [quality.measure(validate_and_normalize(data).pixels) for data in originals[: args.copies]]
    diffs = np.abs(np.array([m.metrics for m in measured[: args.copies]]) - np.array([w.metrics for w in whole]))
    blur = quality.METRICS.index("blur")
    ratio = np.array([m.metrics[blur] / max(w.metrics[blur], 1e-9) for m, w in zip(measured, whole)])
    result = {
        "path": path_name,
        "images": len(originals),
        "per_image_ms": round(per_image_ms, 3),
        "within": {k: {"2": round(float(np.mean(np.array(v) <= 2)), 3), "4": round(float(np.mean(np.array(v) <= 4)), 3)} for k, v in kinds.items()},
        "distinct_pairs_within_4": close,
        "against_whole_decode": {
            "max_abs": {name: round(float(diffs[:, i].max()), 3) for i, name in enumerate(quality.METRICS) if name != "blur"},
            "blur_ratio_min_max": [round(float(ratio.min()), 3), round(float(ratio.max()), 3)],
            "phash_bits_max": max(_bits(m.phash, w.phash) for m, w in zip(measured, whole)),
        },
    }
    print("| path | ms an image | re-encoded q60, <= 2 / 4 bits | resized 90%, <= 2 / 4 | mirrored, <= 2 / 4 | distinct pairs <= 4 bits |")
    print("| --- | ---: | --- | --- | --- | ---: |")
    w = result["within"]
    cells = [f"{100 * w[k]['2']:.1f}% / {100 * w[k]['4']:.1f}%" for k in kinds]
    print(f"| {path_name} | {per_image_ms:.3f} | {' | '.join(cells)} | {close} |")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
