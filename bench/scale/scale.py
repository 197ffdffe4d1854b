"""Benchmark: every step at three dataset sizes, each a fresh process, for memory and per-image CPU.

For each size (default 4,000, 32,000 and 128,000 images) it generates an archive of
photo-like JPEGs shaped like the Oxford-IIIT Pet release (``images/<Breed>_<n>.jpg``,
37 classes, sides 250-640 px like the real set, cut from the photographs that
scikit-image, scikit-learn and matplotlib ship: see ``bench/common/photos.py``), then runs each
step as a pod runs it, ``imgpipe <step> ...`` in a fresh process, on ``file://`` prefixes:

* ``download`` the archive, ``clean`` it, ``resize`` it (64 px, a local Ray),
* ``train`` one epoch of ``tiny_cnn`` on the resized rows (CPU), with evaluation,
* ``report``: the clean output's HTML page and sample grid (``imgpipe show --html --grid``),
  as each step's component draws it for the Kubeflow UI.

For each it records wall time, CPU seconds per image (every process of the step: Ray's
workers and clean's pool too, counted by a ``cpuacct`` cgroup the step runs in), the step process's peak RSS (``VmHWM``, the
kernel's high-water mark, so no peak falls between samples) and the peak of the summed
RSS of its process tree (sampled every 0.1 s). Targets (issue 26): the step's peak RSS at
the largest size within 1.2x of the smallest, and CPU seconds per image within 1.15x.

    python bench/scale/scale.py --sizes 4000,32000,128000 --root /var/tmp/imgpipe-scale \\
        --json bench/results/scale.json --plot docs/img/scale.png

Generated archives are kept under ``--root`` (``N/images.tar``) and reused; step outputs
are removed after each size. Run it inside ``scripts/in-loopback-netns`` (resize starts Ray).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from host import describe  # noqa: E402
from photos import make_photo, source_photos  # noqa: E402
from proctree import process_tree  # noqa: E402

from imgpipe.data.synth_images import choose_breeds  # noqa: E402

CLASSES = 37
MIN_SIDE, MAX_SIDE = 250, 640
QUALITY = 80
CHUNK = 500
STEPS = ("download", "clean", "resize", "train", "report")
RSS_TARGET, CPU_TARGET = 1.2, 1.15
_SOURCES: dict[str, np.ndarray] = {}


# ----------------------------------------------------------------------------------------
# The archive.


def _chunk(args: tuple[int, int, int]) -> list[tuple[str, bytes]]:
    """Images ``start..stop`` of a set: each from its own seeded generator, so any chunking gives one set."""
    start, stop, seed = args
    if not _SOURCES:
        _SOURCES.update(source_photos())
    breeds = choose_breeds(CLASSES)
    out = []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        height = int(np.clip(width * rng.uniform(0.66, 1.0), MIN_SIDE, MAX_SIDE))
        _, _, data = make_photo(_SOURCES, width, height, rng, QUALITY)
        out.append((f"images/{breeds[i % CLASSES]}_{i // CLASSES + 1}.jpg", data))
    return out


def generate_archive(path: Path, count: int, seed: int = 0) -> dict[str, Any]:
    """Writes ``count`` photo-like JPEGs into the tar ``path`` (streamed, one chunk in memory at a time)."""
    done = path.with_suffix(".json")
    if path.exists() and done.exists():
        return json.loads(done.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    t0, total = time.perf_counter(), 0
    tmp = path.with_suffix(".tmp")
    chunks = [(a, min(a + CHUNK, count), seed) for a in range(0, count, CHUNK)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool, tarfile.open(tmp, "w") as tar:
        for images in pool.imap(_chunk, chunks):
            for name, data in images:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, _Bytes(data))
                total += len(data)
            print(f"generate: {images[-1][0]} ({total / 2**30:.2f} GiB)", file=sys.stderr, flush=True)
    tmp.rename(path)
    meta = {"images": count, "bytes": total, "mean_kb": round(total / count / 1000, 1), "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(meta))
    return meta


class _Bytes:
    """A file-like view of bytes for ``TarFile.addfile``."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        chunk = self._data[self._at : end]
        self._at += len(chunk)
        return bytes(chunk)


# ----------------------------------------------------------------------------------------
# Measuring one step process.


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watch(threading.Thread):
    """Samples one process tree: the root's VmHWM and the tree's summed RSS."""

    def __init__(self, root: int, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.root_hwm_kib = self.tree_peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            tree = 0
            for pid in process_tree(self.root):
                tree += _status_kib(pid, "VmRSS:")
            self.root_hwm_kib = max(self.root_hwm_kib, _status_kib(self.root, "VmHWM:"))
            self.tree_peak_kib = max(self.tree_peak_kib, tree)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


_CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuGroup:
    """A cgroup (v1 ``cpuacct``) that the step process joins before it runs, and its children with it.

    Its ``cpuacct.usage`` counts every process of the step, whoever reaps it: Ray's workers
    are children of the raylet, which a step's shutdown kills, so their time never reaches
    this process's ``RUSAGE_CHILDREN``. Where no such cgroup can be made (no root, cgroup
    v2 only), :attr:`path` is ``None`` and the CPU time is the waited children's.
    """

    def __init__(self, name: str) -> None:
        self.path: Path | None = _CPUACCT / name
        try:
            self.path.mkdir()
        except OSError:
            self.path = None

    def join(self) -> None:
        """Run in the child before exec (``preexec_fn``)."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage_s(self) -> float | None:
        return None if self.path is None else int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> list[int]:
        """Ends what the step left running (only processes it started are in the group) and removes it."""
        if self.path is None:
            return []
        left = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for _ in range(50):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        return left


def run_step(name: str, argv: Sequence[str], images: int, log: Path) -> dict[str, Any]:
    """Runs one step command in a fresh process and measures it."""
    group = CpuGroup(f"imgpipe-scale-{os.getpid()}-{name}-{images}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, preexec_fn=group.join)
        watch = Watch(proc.pid)
        watch.start()
        rc = proc.wait()
        watch.stop()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = group.usage_s()
    left = group.remove()
    if rc != 0:
        raise RuntimeError(f"{name} failed with exit code {rc}; see {log}:\n{log.read_text()[-3000:]}")
    if cpu is None:
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {
        "step": name,
        "images": images,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_image": round(1000 * cpu / images, 4),
        "peak_rss_mb": round(watch.root_hwm_kib * 1024 / 1e6, 1),
        "tree_peak_rss_mb": round(watch.tree_peak_kib * 1024 / 1e6, 1),
        "cpu_source": "cgroup" if group.path is not None else "rusage",
        "left_running": len(left),
    }
    print(f"scale: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def step_commands(archive: Path, work: Path) -> dict[str, list[str]]:
    """The command of each step, as a pod runs it (``imgpipe`` in a fresh Python)."""
    imgpipe = [sys.executable, "-m", "imgpipe.cli"]
    p = {s: f"file://{work / s}" for s in ("download", "clean", "resize", "train")}
    return {
        "download": [*imgpipe, "download", str(archive), p["download"]],
        "clean": [*imgpipe, "clean", p["download"], p["clean"]],
        "resize": [*imgpipe, "resize", p["clean"], p["resize"], "--size", "64", "--train-mode", "whole"],
        "train": [
            *imgpipe,
            "train",
            p["resize"],
            p["train"],
            "--set",
            "model=tiny_cnn",
            "--set",
            "epochs=1",
            "--set",
            "batch_size=256",
            "--set",
            "device=cpu",
        ],
        "report": [*imgpipe, "show", p["clean"], "--html", str(work / "clean.html"), "--grid", str(work / "clean.png")],
    }


def row_cache_mb(output: Path) -> float:
    """What the train step's row cache held after its last epoch (its ``metrics.json``), in MB.

    The cache keeps row groups up to its budget (a quarter of the memory the pod may use, by
    default), so it grows with the split until the budget is reached: memory the step was
    given to spend, not memory it leaks. The scale target applies to the rest of the peak.
    """
    epochs = json.loads((output / "metrics.json").read_text())["epochs"]
    held = epochs[-1].get("loader_cache_bytes")
    if held is None:
        raise RuntimeError("the train step reported no row cache bytes (worker processes hold it): run it with loader_engine=threads")
    return held / 1e6


def median_run(step: str, argv: Sequence[str], images: int, log: Path, repeats: int, output: Path | None = None) -> dict[str, Any]:
    """Runs a step ``repeats`` times (each replaces its output): the median of each figure, and the spread.

    A process's peak RSS varies from run to run by the allocators' timing (which thread
    freed what, when): ±40 MB on 250 MB was seen for download. The median of three keeps
    one lucky or unlucky run from deciding a ratio.
    """
    runs = []
    for _ in range(repeats):
        run = run_step(step, argv, images, log)
        if step == "train" and output is not None:
            run["row_cache_mb"] = round(row_cache_mb(output), 1)
            run["peak_rss_less_cache_mb"] = round(run["peak_rss_mb"] - run["row_cache_mb"], 1)
        runs.append(run)
    out = dict(runs[0])
    for key in ("wall_s", "cpu_s", "cpu_ms_per_image", "peak_rss_mb", "tree_peak_rss_mb", "row_cache_mb", "peak_rss_less_cache_mb"):
        if key not in out:
            continue
        out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = repeats
    out["peak_rss_mb_range"] = [min(r["peak_rss_mb"] for r in runs), max(r["peak_rss_mb"] for r in runs)]
    return out


def measure_size(root: Path, count: int, steps: Sequence[str], repeats: int = 1) -> dict[str, Any]:
    archive = root / str(count) / "images.tar"
    meta = generate_archive(archive, count)
    work = root / str(count) / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    commands = step_commands(archive, work)
    rows = [median_run(s, commands[s], count, work / f"{s}.log", repeats, work / s) for s in steps]
    shutil.rmtree(work)
    return {"images": count, "archive": meta, "steps": rows}


# ----------------------------------------------------------------------------------------
# Summary.


def verdicts(sizes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step: largest over smallest size, for peak RSS and CPU per image, against the targets."""
    small, large = sizes[0], sizes[-1]
    out = []
    for a, b in zip(small["steps"], large["steps"]):
        key = "peak_rss_less_cache_mb" if "peak_rss_less_cache_mb" in a else "peak_rss_mb"  # row_cache_mb
        rss = b[key] / a[key]
        cpu = b["cpu_ms_per_image"] / a["cpu_ms_per_image"]
        out.append(
            {
                "step": a["step"],
                "rss_measure": key,
                "rss_ratio": round(rss, 3),
                "cpu_ratio": round(cpu, 3),
                "rss_ok": rss <= RSS_TARGET,
                "cpu_ok": cpu <= CPU_TARGET,
            }
        )
    return out


def print_table(sizes: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> None:
    counts = [s["images"] for s in sizes]
    print(
        "| step | "
        + " | ".join(f"{n:,} peak RSS MB" for n in counts)
        + " | "
        + " | ".join(f"{n:,} CPU ms/img" for n in counts)
        + " | RSS ratio | CPU ratio |"
    )
    print("| --- |" + " ---: |" * (2 * len(counts) + 2))

    def peak(row: dict[str, Any]) -> str:
        if "row_cache_mb" not in row:
            return f"{row['peak_rss_mb']:,.0f}"
        return f"{row['peak_rss_mb']:,.0f} ({row['peak_rss_less_cache_mb']:,.0f} + {row['row_cache_mb']:,.0f} row cache)"

    for i, check in enumerate(checks):
        rss = " | ".join(peak(s["steps"][i]) for s in sizes)
        cpu = " | ".join(f"{s['steps'][i]['cpu_ms_per_image']:.3f}" for s in sizes)
        mark = {True: "", False: " (over)"}
        print(
            f"| {check['step']} | {rss} | {cpu} | {check['rss_ratio']:.2f}{mark[check['rss_ok']]} | {check['cpu_ratio']:.2f}{mark[check['cpu_ok']]} |"
        )
    if any(c["rss_measure"] != "peak_rss_mb" for c in checks):
        print("\nThe train step's RSS ratio leaves out what its row cache held (bounded by its budget; bench/scale/scale.py row_cache_mb).")


def plot(sizes: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [s["images"] for s in sizes]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, step in enumerate(s["step"] for s in sizes[0]["steps"]):
        rows = [s["steps"][i] for s in sizes]
        line = axes[0].plot(counts, [r["peak_rss_mb"] for r in rows], "o-", label=step)
        if "peak_rss_less_cache_mb" in rows[0]:
            axes[0].plot(counts, [r["peak_rss_less_cache_mb"] for r in rows], "o--", color=line[0].get_color(), label=f"{step} less its row cache")
        axes[1].plot(counts, [r["tree_peak_rss_mb"] for r in rows], "o-", label=step)
        axes[2].plot(counts, [r["cpu_ms_per_image"] for r in rows], "o-", label=step)
    titles = ("step process peak RSS (MB)", "process tree peak RSS (MB)", "CPU ms per image (all processes)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{n // 1000}k" for n in counts])
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("images (log scale)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--sizes", default="4000,32000,128000", help="image counts, comma separated, ascending")
    parser.add_argument("--root", default="/var/tmp/imgpipe-scale", help="archives and step outputs")
    parser.add_argument("--steps", default=",".join(STEPS), help="steps to run, in order (each needs the ones before)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each step per size (the median is reported)")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--plot", default="", help="write the plot (PNG) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; valid: {', '.join(STEPS)}")
    root = Path(args.root)
    results = [measure_size(root, n, steps, args.repeats) for n in sizes]
    checks = verdicts(results)
    print_table(results, checks)
    doc = {
        "machine": {**describe(), "platform": platform.platform()},
        "sizes": results,
        "verdicts": checks,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    return 0 if all(c["rss_ok"] and c["cpu_ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
