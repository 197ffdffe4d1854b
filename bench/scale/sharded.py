"""Benchmark: the sharded download + clean (``PipelineOptions.shards``) at three sizes, each pod a fresh process.

The images are ``bench/scale/scale.py``'s (photo-like JPEGs shaped like the Oxford-IIIT Pet release),
unpacked into a directory so that every shard has objects of its own. Each size runs
``size / --per-shard`` shards: each shard's download + clean in a fresh process, as its
``prepare-shard`` pod runs it, then the merge in a fresh process, as ``merge-shards`` runs it.
For each it records the per-pod peak RSS (the largest over the shards), CPU seconds per
image, and the merge's own. Targets (issue 37): the per-pod peak RSS and the CPU per image at
the largest size within 1.2x and 1.15x of the smallest; the merge's memory grows by its
~60 bytes an image only.

    python bench/scale/sharded.py --sizes 4000,32000,128000 --root /var/tmp/imgpipe-scale \\
        --json bench/results/sharded.json

Outputs are removed after each size; the unpacked images are kept under ``--root``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

from imgpipe import contract

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from scale import generate_archive, run_step  # noqa: E402


def unpacked(root: Path, count: int) -> Path:
    """The ``count`` images as loose files (unpacked once from ``bench/scale/scale.py``'s archive)."""
    folder = root / str(count) / "loose"
    done = folder.with_suffix(".done")
    if not done.exists():
        archive = root / str(count) / "images.tar"
        generate_archive(archive, count)
        if folder.exists():
            shutil.rmtree(folder)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        done.write_text("ok")
    return folder


def pod(source: str, work: str, index: int, count: int) -> None:
    """One ``prepare-shard`` pod: this shard's download, then its clean."""
    from imgpipe.clean.config import CleanConfig
    from imgpipe.data.sharding import Shard
    from imgpipe.steps.clean import clean
    from imgpipe.steps.download import DownloadConfig, download

    shard = Shard(index, count)
    dl = download(source, f"file://{work}/{shard.name}/download", DownloadConfig(), shard=shard)
    clean(dl.dest, f"file://{work}/{shard.name}/clean", CleanConfig())


def merge_pod(work: str, count: int) -> None:
    """The ``merge-shards`` pod."""
    from imgpipe.clean.config import CleanConfig
    from imgpipe.data.sharding import Shard
    from imgpipe.steps.merge import merge

    merge([f"file://{work}/{Shard(i, count).name}/clean" for i in range(count)], f"file://{work}/clean", CleanConfig())


def measure(root: Path, size: int, per_shard: int) -> dict[str, Any]:
    source = unpacked(root, size)
    shards = max(1, size // per_shard)
    work = root / str(size) / "sharded"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    pods = [
        run_step(f"shard-{i}", [*me, "pod", str(source), str(work), str(i), str(shards)], size // shards, work / f"shard-{i}.log")
        for i in range(shards)
    ]
    merged = run_step("merge", [*me, "merge", str(work), str(shards)], size, work / "merge.log")
    manifest = json.loads((work / "clean" / contract.MANIFEST).read_text())
    shutil.rmtree(work)
    cpu = sum(p["cpu_s"] for p in pods)
    return {
        "images": size,
        "shards": shards,
        "pod_peak_rss_mb": max(p["peak_rss_mb"] for p in pods),
        "pod_tree_peak_rss_mb": max(p["tree_peak_rss_mb"] for p in pods),
        "pods_cpu_ms_per_image": round(1000 * cpu / size, 3),
        "pods_wall_s": round(sum(p["wall_s"] for p in pods), 1),
        "merge_peak_rss_mb": merged["peak_rss_mb"],
        "merge_cpu_ms_per_image": merged["cpu_ms_per_image"],
        "merge_wall_s": merged["wall_s"],
        "outputs": manifest["outputs"],
        "rejected": manifest["rejected"],
        "inputs": manifest["inputs"],
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "pod":
        pod(args[1], args[2], int(args[3]), int(args[4]))
        return 0
    if args and args[0] == "merge":
        merge_pod(args[1], int(args[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4000,32000,128000")
    p.add_argument("--per-shard", type=int, default=4000, help="images per shard (default %(default)s)")
    p.add_argument("--root", type=Path, default=Path("/var/tmp/imgpipe-scale"))
    p.add_argument("--json", type=Path)
    a = p.parse_args(args)
    rows = [measure(a.root, int(s), a.per_shard) for s in a.sizes.split(",")]
    for r in rows:
        print(json.dumps(r))
    small, large = rows[0], rows[-1]
    print(
        f"pod peak RSS {large['pod_peak_rss_mb'] / small['pod_peak_rss_mb']:.2f}x, pod CPU/image "
        f"{large['pods_cpu_ms_per_image'] / small['pods_cpu_ms_per_image']:.2f}x from {small['images']} to {large['images']}"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"sizes": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
