"""Resize peers: imgpipe's resize step against the canonical Ray Data pipeline, ``ray.data.read_images`` and a process pool.

All resize the same photo-like JPEGs (bench/common/photos.py, about 0.2 MP) to short side 256 +
centre crop 224 and write JPEG: imgpipe from clean's layout, the canonical pipeline of Ray's
docs (``read_parquet`` → ``map_batches`` → ``write_parquet``) with the torchvision recipe a
user writes (:func:`recipe_batch`) and with imgpipe's own per-image function
(:func:`resize_jpeg`), the pool with imgpipe's function, ``read_images`` from the same JPEGs
as files with the torchvision recipe. **Cold**: a fresh process each, timed from outside (imports, Ray or
the pool, reads, the work, the writes). **Warm**: again in one process (Ray up, the pool
started, every contender run once untimed first). Run inside ``scripts/in-loopback-netns``.

    source = prepare(root, images=4000)
    results = measure(root, source, repeats=3, workers=2)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]
from peers_common import fmt_spread, markdown, rotated, spread, timed_child
from resize_cold import pool_map, read_blobs
from resize_common import SPEC, write_clean_output, write_files

from imgpipe import contract, storage
from imgpipe.resize.ops import encode_jpeg, resize_image

__all__ = ["CONTENDERS", "IMGPIPE", "RAY_PARQUET", "POOL", "resize_jpeg", "prepare", "measure", "summarize", "tables"]

IMGPIPE = "imgpipe resize step"
# The canonical pipeline twice: with the recipe a user writes from Ray's docs (PIL, torchvision),
# and with imgpipe's own per-image function (what is left is Ray Data's own cost).
RAY_PARQUET_RECIPE = "Ray Data: read_parquet → map_batches (torchvision recipe) → write_parquet"
RAY_PARQUET = "Ray Data: read_parquet → map_batches (imgpipe's function) → write_parquet"
RAY_IMAGES = "Ray Data: read_images → map → write_parquet"
POOL = "multiprocessing.Pool"
CONTENDERS = [IMGPIPE, RAY_PARQUET_RECIPE, RAY_PARQUET, RAY_IMAGES, POOL]
CHILD = {RAY_PARQUET_RECIPE: "ray-parquet-recipe", RAY_PARQUET: "ray-parquet", RAY_IMAGES: "ray-images", POOL: "pool"}


def resize_jpeg(data: bytes) -> bytes:
    """The per-image work of imgpipe's step (short side 256, centre 224), JPEG out at the step's quality."""
    return encode_jpeg(resize_image(data, SPEC), SPEC.jpeg_quality)


def resize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`resize_jpeg` over a ``read_parquet`` batch of clean's rows (``image`` structs)."""
    return {"image": np.array([resize_jpeg(image["bytes"]) for image in batch["image"]], dtype=object), "label": batch["label"]}


def recipe_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A ``read_parquet`` batch of clean's rows through the torchvision recipe of bench/steps/resize_warm.py (PIL decode), JPEG out."""
    import io

    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    out = []
    for image in batch["image"]:
        with Image.open(io.BytesIO(image["bytes"])) as img:
            out.append(encode_jpeg(np.asarray(transform(img.convert("RGB"))), SPEC.jpeg_quality))
    return {"image": np.array(out, dtype=object), "label": batch["label"]}


def images_row(row: dict[str, Any]) -> dict[str, Any]:
    """``read_images``' rows (already decoded) through the torchvision recipe of bench/steps/resize_warm.py, JPEG out."""
    from resize_warm import baseline_row

    return {"image": encode_jpeg(baseline_row(row)["image"], SPEC.jpeg_quality)}


def prepare(root: Path, images: int) -> str:
    """The photos as clean's output (its default layout) and as files; returns the clean output's URI."""
    from photos import photo_set

    photos = photo_set(images, 516, 388)
    write_files(root / "files", photos)
    return write_clean_output(root / "clean", photos, 128, 2048)


def run_ray_parquet(ray: Any, source: str, dest: Path, fn: Callable = resize_batch) -> None:
    files = [storage.arrow_path(uri) for uri in contract.data_files(source)]
    ray.data.read_parquet(files, columns=["image", "label"]).map_batches(fn, batch_format="numpy").write_parquet(str(dest))


def run_ray_images(ray: Any, folder: Path, dest: Path) -> None:
    ray.data.read_images(str(folder), mode="RGB").map(images_row).write_parquet(str(dest))


def run_pool(pool: Any, source: str, dest: Path, workers: int) -> None:
    """Reads the clean output, resizes in ``pool``, writes one Parquet file of the JPEGs."""
    out = pool_map(pool, resize_jpeg, read_blobs(source), workers)
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(out, pa.binary())}), dest / "part-00000.parquet")


def outputs(dest: Path) -> int:
    """Rows written under ``dest`` (every contender writes Parquet)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in dest.rglob("*.parquet"))


def child_main(args: argparse.Namespace) -> int:
    """One contender in this fresh process (``--child``); imgpipe's own cold run is ``imgpipe resize``."""
    root, dest = args.root, Path(args.dest)
    if args.child == "pool":
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            run_pool(pool, args.source, dest, args.workers)
    else:
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        if args.child == "ray-parquet":
            run_ray_parquet(ray, args.source, dest)
        elif args.child == "ray-parquet-recipe":
            run_ray_parquet(ray, args.source, dest, recipe_batch)
        else:
            run_ray_images(ray, root / "files", dest)
    print(json.dumps({"outputs": outputs(dest)}))
    return 0


def _cold(name: str, root: Path, source: str, dest: Path, workers: int) -> Any:
    shutil.rmtree(dest, ignore_errors=True)
    if name == IMGPIPE:
        cmd = [sys.executable, "-m", "imgpipe.cli", "resize", source, storage.normalize_uri(str(dest)), "--format", "jpeg"]
    else:
        cmd = [sys.executable, __file__, "--child", CHILD[name], "--root", str(root), "--source", source, "--dest", str(dest)]
        cmd += ["--workers", str(workers)]
    return timed_child(cmd, result=name != IMGPIPE)


def measure(root: Path, source: str, images: int, repeats: int, workers: int) -> dict[str, dict[str, Any]]:
    """Cold rounds (fresh processes), then warm rounds in this process (round 0 untimed), contenders rotated."""
    import ray

    from imgpipe.resize.config import ResizeConfig
    from imgpipe.steps.resize import resize

    runs: dict[str, dict[str, list]] = {n: {"cold": [], "warm": [], "errors": [], "outputs": set()} for n in CONTENDERS}
    for repeat in range(repeats):
        for name in rotated(CONTENDERS, repeat):
            dest = root / "out-cold"
            run = _cold(name, root, source, dest, workers)
            if run.error:
                runs[name]["errors"].append(run.error)
            else:
                runs[name]["cold"].append(run.seconds)
                runs[name]["outputs"].add(outputs(dest))
            print(f"resize cold {repeat}: {name}: {run.error or f'{run.seconds:.1f} s'}", file=sys.stderr, flush=True)

    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            warm: dict[str, Callable[[Path], Any]] = {
                IMGPIPE: lambda d: resize(source, storage.normalize_uri(str(d)), ResizeConfig(format="jpeg")),
                RAY_PARQUET_RECIPE: lambda d: run_ray_parquet(ray, source, d, recipe_batch),
                RAY_PARQUET: lambda d: run_ray_parquet(ray, source, d),
                RAY_IMAGES: lambda d: run_ray_images(ray, root / "files", d),
                POOL: lambda d: run_pool(pool, source, d, workers),
            }
            for repeat in range(repeats + 1):
                for name in rotated(CONTENDERS, repeat):
                    dest = root / "out-warm"
                    shutil.rmtree(dest, ignore_errors=True)
                    t0 = time.perf_counter()
                    try:
                        warm[name](dest)
                    except Exception as exc:  # noqa: BLE001 - a peer's failure is a row of the table, not the end of the run
                        runs[name]["errors"].append(f"{type(exc).__name__}: {exc}"[:160])
                        continue
                    seconds = time.perf_counter() - t0
                    runs[name]["outputs"].add(outputs(dest))
                    if repeat:
                        runs[name]["warm"].append(images / seconds)
                print(f"resize warm round {repeat} done", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return {
        name: {
            "error": r["errors"][0] if r["errors"] else None,
            "failed_runs": len(r["errors"]),
            "outputs": sorted(r["outputs"]),
            "cold_s": spread(r["cold"]),
            "warm_img_s": spread(r["warm"]),
        }
        for name, r in runs.items()
    }


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """imgpipe cold against the pool and the best peer; warm against canonical Ray Data and the best peer (speed, >1 = imgpipe faster)."""
    ours = results[IMGPIPE]
    peers = {n: r for n, r in results.items() if n != IMGPIPE}
    best_cold = min((n for n in peers if peers[n]["cold_s"]), key=lambda n: peers[n]["cold_s"]["median"], default=None)
    best_warm = max((n for n in peers if peers[n]["warm_img_s"]), key=lambda n: peers[n]["warm_img_s"]["median"], default=None)
    rows = []
    named = ((POOL, "cold_s"), (best_cold, "cold_s"), (RAY_PARQUET_RECIPE, "warm_img_s"), (RAY_PARQUET, "warm_img_s"), (best_warm, "warm_img_s"))
    for peer, key in named:
        theirs = results.get(peer) if peer else None
        ratio = None
        if ours[key] and theirs and theirs[key]:
            a, b = ours[key]["median"], theirs[key]["median"]
            ratio = a / b if key == "warm_img_s" else b / a
        row = {"ours": IMGPIPE, "peer": peer, "figure": "cold" if key == "cold_s" else "warm", "speedup": ratio}
        if row not in rows:  # the best peer may be the named one
            rows.append(row)
    return rows


def tables(results: dict[str, dict[str, Any]], ratios: list[dict[str, Any]], images: int, repeats: int) -> str:
    rows = []
    for name, r in results.items():
        if r["cold_s"] is None and r["warm_img_s"] is None:
            rows.append([name, "—", f"**failed**: {r['error']}", "—", "—"])
            continue
        note = f" ({r['failed_runs']} run(s) failed: {r['error']})" if r["error"] else ""
        cold_rate = f"{images / r['cold_s']['median']:.0f}" if r["cold_s"] else "—"
        rows.append([name, ", ".join(map(str, r["outputs"])), fmt_spread(r["cold_s"]), cold_rate, fmt_spread(r["warm_img_s"], 0) + note])
    head = ["contender", "images out", f"cold s (median of {repeats}, min–max)", "cold img/s", "warm img/s (median, min–max)"]
    ratio_rows = [[r["ours"], r["peer"] or "—", r["figure"], "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"] for r in ratios]
    return "\n".join(
        [
            markdown(head, rows, [False, True, True, True, True]),
            "",
            markdown(["imgpipe", "peer", "figure", "speed ratio (>1: imgpipe faster)"], ratio_rows, [False, False, False, True]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(CHILD.values()), required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--workers", type=int, default=2)
    return child_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
