"""Benchmark: clean's throughput against the full-decode floor, on the same files, in one run.

Validation entropy-decodes every image whole, so a full decode of every image on all cores with
nothing else is the floor (clean decodes a plain JPEG's pixels at a reduced scale, for its measures
only, so its own decode is below that floor); the target is to stay within 1.3x of it cold
(issue 50). Both sides start from the same download output; the floor reads the image bytes from
it too, outside the timed region.

Two figures for clean, both as ratios to the floor of the same repeat:

* **cold**: ``imgpipe clean SOURCE DEST`` in a fresh process, timed from outside, as a
  Kubeflow pod or the CLI runs it: interpreter start, imports, the decode pool's start,
  the first read of every file, the writes and the commit;
* **cold, pandas hidden**: the same with pandas hidden from the process, as in the
  ``imgpipe-cpu`` image a pod runs (it does not install pandas; this venv has it through
  Ray Data, and pyarrow imports it, 0.3 s, the first time it builds an array);
* **warm**: :func:`imgpipe.steps.clean.clean` called again in this process (imports done,
  allocator and plugins warm), the figure earlier versions of this benchmark reported.

    python bench/steps/clean.py [--classes 12 --per-class 100 --repeats 3]

``--in-image`` runs the whole benchmark (floor included) inside the ``imgpipe-cpu`` image,
the one a Kubeflow pod runs clean in, through the engine at ``DOCKER_HOST``
(``scripts/with-engine python bench/steps/clean.py --in-image ...``; ``make images`` first).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from imgpipe import contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download


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
    chunks = [blobs[i :: workers * 4] for i in range(workers * 4)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(decode_only, [[] for _ in range(workers)])  # start-up outside the timing
        t0 = time.perf_counter()
        pool.map(decode_only, chunks)
        return time.perf_counter() - t0


# Runs the CLI with pandas unimportable before anything imports it (as in the imgpipe-cpu image,
# which does not install it), through the same call the `clean` command makes for itself
# (resources.hide_unused_module): since the command hides pandas on its own, the two cold rows
# measure the same process and should agree.
_WITHOUT_PANDAS = """
import sys
from imgpipe import resources
resources.hide_unused_module("pandas")
from imgpipe.cli import main
sys.exit(main())
"""


def time_cold(source: str, dest: Path, workers: int, pandas: bool = True) -> float:
    """Wall time of ``imgpipe clean`` in a fresh interpreter (what a pod pays), output discarded."""
    shutil.rmtree(dest, ignore_errors=True)
    entry = ["-m", "imgpipe.cli"] if pandas else ["-c", _WITHOUT_PANDAS]
    cmd = [sys.executable, *entry, "clean", source, str(dest), "--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_warm(source: str, dest: Path, workers: int) -> tuple[float, object]:
    """Wall time of :func:`clean` in this process, after a first call made it warm."""
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    report = clean(source, str(dest), CleanConfig(workers=workers))
    return time.perf_counter() - t0, report


def run_in_image(argv: list[str]) -> int:
    """Runs this benchmark with ``argv`` in the ``imgpipe-cpu`` image and prints its output."""
    from imgpipe.containers import engine
    from imgpipe.containers.catalog import image

    here = Path(__file__).resolve().parent
    output = engine.connect().containers.run(
        image("cpu"),
        ["python", "/bench/steps/clean.py", *argv],
        volumes={str(here): {"bind": "/bench", "mode": "ro"}},
        network_mode="none",  # file:// only
        remove=True,
    )
    print(output.decode(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--in-image", action="store_true", help="run inside the imgpipe-cpu image (as a pod runs clean)")
    args = parser.parse_args(argv)
    if args.in_image:
        if args.json:
            parser.error("--json writes on this machine: leave it out with --in-image")
        return run_in_image([a for a in argv if a != "--in-image"])

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

        floor, cold, bare, warm = [], [], [], []
        clean(dl.dest, str(root / "clean"), CleanConfig(workers=args.workers))  # makes this process warm
        for _ in range(args.repeats):
            floor.append(time_floor(blobs, args.workers))
            cold.append(time_cold(dl.dest, root / "clean", args.workers))
            bare.append(time_cold(dl.dest, root / "clean", args.workers, pandas=False))
            seconds, report = time_warm(dl.dest, root / "clean", args.workers)
            warm.append(seconds)

    n = len(blobs)
    f_med, c_med, w_med = statistics.median(floor), statistics.median(cold), statistics.median(warm)
    b_med = statistics.median(bare)
    result = {
        "images": n,
        "megapixels": round(megapixels, 1),
        "workers": args.workers,
        "repeats": args.repeats,
        "load_average_1m": os.getloadavg()[0],
        "floor_s": round(f_med, 3),
        "clean_cold_s": round(c_med, 3),
        "clean_cold_without_pandas_s": round(b_med, 3),
        "clean_warm_s": round(w_med, 3),
        "ratio_cold_over_floor": round(c_med / f_med, 2),
        "ratio_cold_without_pandas_over_floor": round(b_med / f_med, 2),
        "ratio_warm_over_floor": round(w_med / f_med, 2),
        "clean_outputs": report.outputs,
        "clean_rejected": report.rejected,
    }
    print(f"| what | images/s | time (s, median of {args.repeats}) | ratio to floor |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| full-decode floor ({args.workers} processes, started and warm) | {n / f_med:.0f} | {f_med:.2f} | 1.00 |")
    print(f"| imgpipe clean, **cold** (fresh `imgpipe clean` process) | {n / c_med:.0f} | {c_med:.2f} | **{c_med / f_med:.2f}** |")
    print(f"| imgpipe clean, cold, pandas hidden (the imgpipe-cpu image has none) | {n / b_med:.0f} | {b_med:.2f} | {b_med / f_med:.2f} |")
    print(f"| imgpipe clean, warm (again in one process) | {n / w_med:.0f} | {w_med:.2f} | {w_med / f_med:.2f} |")
    print(json.dumps(result), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
