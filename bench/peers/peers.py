"""Benchmark: imgpipe against the tools a user would pick instead: training loader, resize, near-duplicates.

Every comparison in one run, on the same files and cores. Each contender runs **cold** (a
fresh process timed from outside, as a pod runs it: interpreter start, imports, one epoch
or the step) and **warm** (steady state in a process that has already run it),
``--repeats`` times with the contenders taking turns; the tables give the median and the
min–max, and speed ratios of imgpipe to the peers (>1: imgpipe faster). A peer that cannot
be installed or fails says so in its row. The comparisons are bench/peers/peers_loader.py,
bench/peers/peers_resize.py and bench/peers/peers_clean.py. FFCV and MosaicML Streaming run in their
own venv, ``.venv/peers`` (``$IMGPIPE_PEERS_PYTHON``); ``make bench-peers`` builds it. Run
inside ``scripts/in-loopback-netns`` (Ray)::

    scripts/in-loopback-netns .venv/bin/python bench/peers/peers.py [--only loader,resize,clean] [--repeats 3] \\
        [--json bench/results/peers.json] [--plot docs/img/peers.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

import peers_clean  # noqa: E402
import peers_loader  # noqa: E402
import peers_resize  # noqa: E402
from host import describe  # noqa: E402
from peers_common import peers_python  # noqa: E402

from imgpipe.resources import available_cpus  # noqa: E402

COMPARISONS = ("loader", "resize", "clean")
PEER_PACKAGES = ("ffcv", "mosaicml-streaming", "numpy", "torch", "numba")
_PEER_VERSIONS = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {PEER_PACKAGES!r}}}))"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--only", default=",".join(COMPARISONS), help="comparisons to run, comma separated (loader, resize, clean)")
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm runs per contender (median, min–max)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers, pool processes and Ray CPUs")
    parser.add_argument("--loader-images", type=int, default=3072)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warm-epochs", type=int, default=2, help="timed epochs after the first in each warm process")
    parser.add_argument("--resize-images", type=int, default=4000)
    parser.add_argument("--clean-files", type=int, default=4240, help="files in the near-duplicate set, planted copies included")
    parser.add_argument("--planted", type=int, default=60, help="originals that get three near-copies each")
    parser.add_argument("--root", type=Path, help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="draw the figures here (PNG)")
    return parser


def environment(workers: int) -> dict[str, Any]:
    """The machine, versions of every contender's libraries (the peers' venv asked in a child), cores and load."""
    main = {}
    for package in ("numpy", "torch", "torchvision", "ray", "pillow", "pyarrow", "datasets", "webdataset", "cleanvision", "albumentations"):
        try:
            main[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            main[package] = "not installed"
    try:
        done = subprocess.run([peers_python(), "-c", _PEER_VERSIONS], capture_output=True, text=True, timeout=120)
        peers = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip().splitlines()[-1:]}
    except (OSError, json.JSONDecodeError, subprocess.TimeoutExpired) as exc:
        peers = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "machine": describe(),
        "cpus_available": available_cpus(),
        "workers": workers,
        "loadavg_start": os.getloadavg(),
        "main_venv": main,
        "peers_venv": peers,
    }


def run(args: argparse.Namespace, only: list[str], root: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Every chosen comparison on data under ``root``; returns the results and the markdown sections (each also to stderr when done)."""
    out: dict[str, Any] = {}
    sections = []
    if "loader" in only:
        where = root / "loader"
        failed = peers_loader.prepare(where, args.loader_images, args.workers)
        res = peers_loader.measure(where, peers_loader.CONTENDERS, args.repeats, args.warm_epochs, args.batch_size, args.workers, failed)
        ratios = peers_loader.summarize(res)
        out["loader"] = {"images": args.loader_images, "batch_size": args.batch_size, "results": res, "ratios": ratios}
        title = f"Training loader: {args.loader_images} whole images (short side 256), RRC 224 + flip, batch {args.batch_size}"
        title += f", {args.workers} workers"
        sections.append((title, peers_loader.tables(res, ratios, args.repeats)))
        print(f"\n## {title}\n\n{sections[-1][1]}", file=sys.stderr, flush=True)
    if "resize" in only:
        where = root / "resize"
        source = peers_resize.prepare(where, args.resize_images)
        res = peers_resize.measure(where, source, args.resize_images, args.repeats, args.workers)
        ratios = peers_resize.summarize(res)
        out["resize"] = {"images": args.resize_images, "results": res, "ratios": ratios}
        title = f"Resize: {args.resize_images} photos of 0.2 MP to 224 (short side 256, centre crop), JPEG out, {args.workers} CPUs"
        sections.append((title, peers_resize.tables(res, ratios, args.resize_images, args.repeats)))
        print(f"\n## {title}\n\n{sections[-1][1]}", file=sys.stderr, flush=True)
    if "clean" in only:
        where = root / "clean"
        folder, planted = peers_clean.prepare(where, args.clean_files, args.planted)
        res = peers_clean.measure(where, folder, planted, args.repeats)
        ratios = peers_clean.summarize(res)
        out["clean"] = {"files": args.clean_files, "planted_copies": len(planted), "results": res, "ratios": ratios}
        title = f"Near-duplicates: {args.clean_files} files, {args.planted} × 3 planted copies (q60, 90% size, mirrored)"
        sections.append((title, peers_clean.tables(res, ratios, args.clean_files, args.repeats)))
        print(f"\n## {title}\n\n{sections[-1][1]}", file=sys.stderr, flush=True)
    return out, sections


def plot(results: dict[str, Any], path: Path) -> None:
    """Warm and cold figures per comparison, medians with min–max bars; a failed contender is an empty bar marked so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for key, label in (("loader", "training loader"), ("resize", "resize to 224")):
        if key in results:
            panels.append((f"{label}: warm img/s", results[key]["results"], "warm_img_s"))
            panels.append((f"{label}: cold s (fresh process)", results[key]["results"], "cold_s"))
    if "clean" in results:
        panels.append(("near-duplicates: cold s (fresh processes)", results["clean"]["results"], "cold_s"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 + 0.45 * sum(len(p[1]) for p in panels)), squeeze=False)
    for ax, (title, res, key) in zip(axes[:, 0], panels):
        names = list(res)
        medians = [res[n][key]["median"] if res[n][key] else 0 for n in names]
        lows = [m - res[n][key]["min"] if res[n][key] else 0 for n, m in zip(names, medians)]
        highs = [res[n][key]["max"] - m if res[n][key] else 0 for n, m in zip(names, medians)]
        colors = ["tab:blue" if n.startswith("imgpipe") else "tab:gray" for n in names]
        ax.barh(names, medians, xerr=[lows, highs], color=colors, capsize=3)
        for y, n in enumerate(names):
            if not res[n][key]:
                ax.text(0, y, " failed", va="center", color="tab:red")
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    if "clean" in results:
        found = {n: r["score"]["found_total"] if r["score"] else 0 for n, r in results["clean"]["results"].items()}
        planted = results["clean"]["planted_copies"]
        axes[-1, 0].set_xlabel("planted copies found: " + ", ".join(f"{n.split()[0]} {v}/{planted}" for n, v in found.items()))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    if unknown := sorted(set(only) - set(COMPARISONS)):
        parser.error(f"--only: unknown comparison(s) {', '.join(unknown)}; choose from {', '.join(COMPARISONS)}")
    env = environment(args.workers)
    print(f"environment: {json.dumps(env)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="imgpipe-peers-") as tmp:
        results, sections = run(args, only, args.root or Path(tmp))
    env["loadavg_end"] = os.getloadavg()
    print(f"\nenvironment: {json.dumps(env)}")
    for title, text in sections:
        print(f"\n## {title}\n\n{text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
