"""Benchmark: clean's throughput against the full-decode floor, on the same files, in one run.

Validation is a full decode, so decoding every image on all cores with nothing else is the floor
clean cannot beat; the target is to stay within 1.5x of it. Both sides start from the same
download output; the floor reads the image bytes from it too, outside the timed region.

    python bench/clean.py [--classes 12 --per-class 100 --repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from imgpipe import contract, storage
from imgpipe.steps.clean import CleanConfig, clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.synth import SynthConfig, generate


def decode_only(blobs: list[bytes]) -> int:
    """The floor's work: a full decode of every image, errors ignored."""
    ok = 0
    for data in blobs:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
            ok += 1
        except Exception:  # noqa: BLE001 - the bad files are part of the set
            pass
    return ok


def time_floor(blobs: list[bytes], workers: int) -> float:
    chunks = [blobs[i::workers * 4] for i in range(workers * 4)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(decode_only, [[] for _ in range(workers)])  # start-up outside the timing
        t0 = time.perf_counter()
        pool.map(decode_only, chunks)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        root = Path(tmp)
        generate(str(root / "synth"), SynthConfig(classes=args.classes, per_class=args.per_class))
        dl = download([str(root / "synth" / "images.tar.gz")], str(root / "download"), DownloadConfig())
        blobs = []
        for uri in contract.data_files(dl.dest):
            blobs.extend(pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["bytes"]).column("bytes").to_pylist())
        megapixels = 0.0
        for data in blobs:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    megapixels += img.width * img.height / 1e6
            except Exception:  # noqa: BLE001
                pass

        floor, ours = [], []
        for _ in range(args.repeats):
            floor.append(time_floor(blobs, args.workers))
            t0 = time.perf_counter()
            report = clean(dl.dest, str(root / "clean"), CleanConfig(workers=args.workers))
            ours.append(time.perf_counter() - t0)

    n = len(blobs)
    f_med, o_med = statistics.median(floor), statistics.median(ours)
    result = {
        "images": n,
        "megapixels": round(megapixels, 1),
        "workers": args.workers,
        "repeats": args.repeats,
        "floor_s": round(f_med, 3),
        "clean_s": round(o_med, 3),
        "floor_img_s": round(n / f_med, 1),
        "clean_img_s": round(n / o_med, 1),
        "ratio_clean_over_floor": round(o_med / f_med, 2),
        "clean_outputs": report.outputs,
        "clean_rejected": report.rejected,
    }
    print(f"| what | images/s | time (s, median of {args.repeats}) | ratio to floor |")
    print("| --- | --- | --- | --- |")
    print(f"| full-decode floor ({args.workers} processes) | {result['floor_img_s']} | {f_med:.2f} | 1.00 |")
    print(f"| imgpipe clean ({args.workers} workers, end to end) | {result['clean_img_s']} | {o_med:.2f} | {o_med / f_med:.2f} |")
    print(json.dumps(result), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
