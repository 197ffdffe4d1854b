"""Benchmark: the resize step against the baseline recipe, the decode floor and a process pool.

All rows of one set are measured in one run, on the same JPEG bytes, with the methods
interleaved in every repeat so that load from other processes falls on all of them alike;
the tables report medians and the ratios between methods. Sets are real photographs (see
``bench/common/photos.py``) at about 0.2, 3 and 12 megapixels.

* **ours**: :func:`imgpipe.steps.resize.resize` end to end on ``file://`` (Parquet read in
  the tasks, resize, output Parquet written by the tasks), on Ray (``executor="ray"``) with
  the default concurrency and with ``concurrency`` = all CPUs, and on the step's own
  process pool (``executor="pool"``, its workers started in every run, from a forkserver
  because Ray runs in this process). The input is clean's layout with row groups of
  ``ceil(count / (workers * --tasks-per-cpu))`` rows, so a small set still makes several
  tasks.
* **baseline (bytes)**: ``ray.data.read_binary_files`` on the same JPEGs as files, then
  PIL decode + torchvision ``Resize(256)`` + ``CenterCrop(224)`` per image in
  ``map_batches``; **baseline (read_images)**: ``ray.data.read_images`` (full decode in
  the read tasks) + the same transforms in ``map``. Same local Ray; as many blocks and
  rows per batch as our tasks have.
* **decode floor**: only the reduced-scale JPEG decode our fast path picks (``Image.draft``
  at that scale, no resize), in a ``multiprocessing`` pool of all cores.
* **process pool**: a plain ``multiprocessing.Pool`` of all cores mapping
  :func:`imgpipe.resize.ops.resize_image` over the bytes and returning the pixels.
* **process-pool step**: the resize step's own work on a ``multiprocessing.Pool`` instead
  of Ray (:func:`resize_warm.pool_step`): the same row groups, task body, driver loop (rejects, sorted
  shards per split, hashed as written) and commit. It is the baseline for what Ray itself
  costs, where the plain process pool above reads nothing and writes nothing.

Ray runs are steady state in two senses, both reported: *warm* (Ray started once, every
method run once untimed first, so start-up, imports and first-task warm-up are excluded,
but Ray Data's per-execution start-up of a few tenths of a second is included) and
*after the first batch* (rows after the first output batch over the time from its
arrival to the last). Pools are started and warmed outside the timing.

Cold (``--cold``, what a pod pays): each set once more, each method in a fresh process timed
from outside, ``--cold-repeats`` times in turn (medians): ``imgpipe resize SOURCE DEST
--executor ray`` (imports, its own local Ray, the run, the commit) and ``--executor pool``
(the step's own pool; what ``auto`` picks for a small local input), against a fresh process
that reads the same clean output and maps ``resize_image`` over it in a
``multiprocessing.Pool`` (imports, pool start, reading, resizing), and against a fresh
process running the process-pool step (the same output, committed). The fixed cost of each is
its cold time less ``images / steady rate`` (the steady rates measured above), i.e. what it
pays before and around the work itself.

Per-image CPU time: one process, no Ray, ``time.process_time`` per piece (full decode,
draft decode, ``resize_image``, the reference, the baseline recipe, and ``resize_image``
at a smaller DRAFT_MARGIN with its difference from the reference).

Peak memory: the resize step (default config on Ray, its own Ray) runs on 2,000 and on 20,000
small photos in clean's default layout, each count in a fresh driver process, while a
thread samples the summed RSS and PSS of the driver and all its descendants (Ray's GCS,
the raylet with the object store, the workers) from ``/proc``.

Needs the ``bench`` extra (scikit-image, scikit-learn for the photos). Run inside the
loopback-only namespace (Ray binds the external interface otherwise)::

    scripts/in-loopback-netns .venv/bin/python bench/steps/resize.py [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from host import describe  # noqa: E402
from photos import photo_set  # noqa: E402
from resize_cold import measure_cold, pool_run, print_cold
from resize_common import (
    BASE_BYTES,
    BASE_IMAGES,
    OURS,
    OURS_POOL,
    POOL_STEP,
    SetSpec,
    floor_name,
    ours_all_cpus,
    pool_name,
)
from resize_memory import measure_memory, memory_run
from resize_per_image import per_image_cpu, print_per_image
from resize_warm import measure_set, pool_step

from imgpipe.resources import available_cpus  # noqa: E402

# ----------------------------------------------------------------------------------------
# The run.


def parse_set(text: str) -> SetSpec:
    """``LABEL:COUNT:WIDTHxHEIGHT``, e.g. ``3MP:60:2000x1500``."""
    label, count, size = text.split(":")
    width, height = size.lower().split("x")
    return SetSpec(label, int(count), int(width), int(height))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=parse_set,
        help="LABEL:COUNT:WxH, repeatable (default: 0.2MP:300:516x388, 3MP:60:2000x1500, 12MP:20:4000x3000)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method and set (median)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="pool processes and Ray CPUs")
    parser.add_argument(
        "--tasks-per-cpu",
        type=int,
        default=4,
        help="row groups per CPU in our input (rows per row group = ceil(count / (workers * this)))",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-read-images", action="store_true", help="skip the read_images baseline")
    parser.add_argument(
        "--memory-counts",
        type=lambda s: [int(v) for v in s.split(",") if v],
        default=[2000, 20000],
        help="image counts for the peak-memory runs, comma separated ('' skips them)",
    )
    parser.add_argument("--memory-size", default="320x240", help="WxH of the memory runs' photos")
    parser.add_argument(
        "--per-image",
        type=int,
        default=20,
        help="images per set for the one-process CPU-time table (0 skips it)",
    )
    parser.add_argument(
        "--per-image-only",
        action="store_true",
        help="only the CPU-time table: no Ray, pools, memory",
    )
    parser.add_argument("--cold", action="store_true", help="also time each set's step and pool in fresh processes")
    parser.add_argument("--cold-repeats", type=int, default=1, help="fresh processes per cold method (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-run", nargs=2, metavar=("SOURCE", "DEST"), help=argparse.SUPPRESS)
    parser.add_argument("--pool-run", nargs=2, metavar=("SOURCE", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--pool-step-run", nargs=3, metavar=("SOURCE", "DEST", "WORKERS"), help=argparse.SUPPRESS)
    return parser


def summarize(results: list[dict[str, Any]], workers: int, read_images: bool) -> list[dict[str, Any]]:
    """The target checks: one row per (set, ratio), on warm whole runs and from the first batch.

    "Warm" is a whole timed run after an untimed one (Ray up, workers warm; Ray Data's
    per-execution start-up included); "steady" is the rate after the first output batch.
    Pools have no start-up inside their timing, so both use their one rate.
    """
    speedup = {"0.2MP": 1.25, "3MP": 2.5, "12MP": 3.0}
    checks: list[dict[str, Any]] = []

    def rate(r: dict[str, Any], name: str, key: str) -> float | None:
        m = r["methods"][name]
        return m["img_s"] if key == "img_s" or name.startswith(("decode", "process")) else m[key]

    def check(r: dict[str, Any], a: str, b: str, what: str, target: float | None) -> None:
        row: dict[str, Any] = {"set": r["set"], "check": what, "target": target}
        for key, tag in (("img_s", "warm"), ("steady_img_s", "steady")):
            va, vb = rate(r, a, key), rate(r, b, key)
            row[tag] = None if va is None or vb is None else va / vb
            row[f"met_{tag}"] = None if target is None or row[tag] is None else row[tag] >= target
        checks.append(row)

    for r in results:
        bases = [BASE_BYTES] + ([BASE_IMAGES] if read_images else [])
        fastest = max(bases, key=lambda b: r["methods"][b]["img_s"])
        large = r["set"] in ("3MP", "12MP")
        for ours, tag in ((OURS, "Ray"), (ours_all_cpus(workers), f"Ray, concurrency={workers}"), (OURS_POOL, "pool")):
            check(r, ours, fastest, f"ours ({tag}) / fastest baseline", speedup.get(r["set"]))
            check(
                r,
                ours,
                floor_name(workers),
                f"ours ({tag}) / decode floor",
                0.85 if large else None,
            )
            check(r, ours, pool_name(workers), f"ours ({tag}) / process pool", 0.85)
            check(r, ours, POOL_STEP, f"ours ({tag}) / process-pool step", 0.85)
        check(r, pool_name(workers), floor_name(workers), "process pool / decode floor (no Ray)", None)
    return checks


def print_tables(
    env: dict[str, Any],
    results: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    memory: list[dict[str, Any]],
    repeats: int,
) -> None:
    load = ", ".join(f"{v:.2f}" for v in env["loadavg_start"])
    print(f"{env['workers']} workers on {env['cpus_available']} CPUs; 1-min load average at start {load}")
    print()
    print(
        f"| set | images | px | JPEG KB | draft | method | images/s (warm run) "
        f"| images/s (after 1st batch) | 1st batch (s) | s (median of {repeats}) |"
    )
    print("| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        scales = ", ".join(f"1/{round(1 / v)}" for v in r["draft_scales"])
        for name, m in r["methods"].items():
            steady = "" if m["steady_img_s"] is None else f"{m['steady_img_s']:.1f}"
            first = "" if m["first_batch_s"] is None else f"{m['first_batch_s']:.2f}"
            print(
                f"| {r['set']} | {r['images']} | {r['width']}x{r['height']} | {r['mean_jpeg_kb']:.0f} "
                f"| {scales} | {name} | {m['img_s']:.1f} | {steady} | {first} | {m['median_s']:.2f} |"
            )
    print()
    print("| set | ratio | warm | steady | target | met (warm / steady) |")
    print("| --- | --- | ---: | ---: | --- | --- |")

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"

    def verdict(v: bool | None) -> str:
        return "-" if v is None else ("yes" if v else "**no**")

    for c in checks:
        target = "(info)" if c["target"] is None else f">= {c['target']:g}"
        met = "" if c["target"] is None else f"{verdict(c['met_warm'])} / {verdict(c['met_steady'])}"
        print(f"| {c['set']} | {c['check']} | {fmt(c['warm'])} | {fmt(c['steady'])} | {target} | {met} |")
    if memory:
        print()
        print("| images | s | images/s | peak RSS sum (MiB) | peak PSS sum (MiB) | PSS before (MiB) | peak driver RSS (MiB) | processes |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for m in memory:
            print(
                f"| {m['images']} | {m['seconds']:.1f} | {m['img_s']:.1f} | {m['peak_rss_mib']} "
                f"| {m['peak_pss_mib']} | {m['pss_before_mib']} | {m['peak_driver_rss_mib']} | {m['processes']} |"
            )
        first, last = memory[0], memory[-1]
        print()
        for key in ("peak_rss_mib", "peak_pss_mib", "peak_driver_rss_mib"):
            ratio = last[key] / first[key]
            verdict = "met" if ratio <= 1.25 else "NOT met"
            print(f"- {key}: {last['images']} vs {first['images']} images = {ratio:.2f}x (target <= 1.25: {verdict})")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.memory_run:  # the child process of measure_memory
        print(json.dumps(memory_run(*args.memory_run)))
        return 0
    if args.pool_run:  # the child process of measure_cold
        print(pool_run(args.pool_run[0], int(args.pool_run[1])))
        return 0
    if args.pool_step_run:  # the child process of measure_cold
        source, dest, workers = args.pool_step_run
        with multiprocessing.get_context("fork").Pool(int(workers)) as pool:
            print(pool_step(source, dest, pool, []))
        return 0
    sets = args.sets or [
        parse_set("0.2MP:300:516x388"),
        parse_set("3MP:60:2000x1500"),
        parse_set("12MP:20:4000x3000"),
    ]
    import PIL.features
    import ray
    from ray.data import DataContext

    env = {
        "machine": describe(),
        "cpus_available": available_cpus(),
        "workers": args.workers,
        "ray": ray.__version__,
        "pillow": Image.__version__,
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "loadavg_start": os.getloadavg(),
    }
    print(f"environment: {env}", file=sys.stderr, flush=True)
    photos = {s.label: photo_set(s.count, s.width, s.height, seed=args.seed) for s in sets}
    per_image = {}
    if args.per_image:
        for s in sets:
            per_image[s.label] = per_image_cpu(photos[s.label][: args.per_image])
            print(f"per-image {s.label}: {per_image[s.label]}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    if not args.per_image_only:
        with tempfile.TemporaryDirectory(prefix="imgpipe-bench-resize-") as tmp:
            root = Path(tmp)
            ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
            DataContext.get_current().enable_progress_bars = False
            ctx = multiprocessing.get_context("spawn")
            try:
                with ctx.Pool(args.workers) as mp_pool:
                    for s in sets:
                        results.append(measure_set(ray, root, s, photos[s.label], args, mp_pool))
            finally:
                ray.shutdown()
            env["loadavg_after_throughput"] = os.getloadavg()
            if args.cold:
                cold = [measure_cold(root, r, args.workers, args.cold_repeats) for r in results]
            if args.memory_counts:
                w, h = (int(v) for v in args.memory_size.lower().split("x"))
                memory = measure_memory(root, args.memory_counts, w, h, distinct=200, seed=args.seed)
    env["loadavg_end"] = os.getloadavg()
    checks = summarize(results, args.workers, not args.no_read_images)
    print(f"environment: {env}", file=sys.stderr)
    if per_image:
        print_per_image(per_image, args.per_image)
    if results:
        print_tables(env, results, checks, memory, args.repeats)
    if cold:
        print_cold(cold)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "per_image_cpu_ms": per_image,
                    "sets": results,
                    "checks": checks,
                    "memory": memory,
                    "cold": cold,
                },
                indent=2,
                default=float,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
