"""Benchmark: what each step's UI report (kfp Metrics + HTML) costs against the step itself.

The components build the report in the step's own process right after the step
(:func:`imgpipe.stepio.publish.publish_step_report`), once per pod. This runs each repeat
in a fresh process, as a pod does: each step on a generated sample (``imgpipe synth``,
the dataset of ``make run``), then its report as the component builds it
(:func:`imgpipe.report.steps.build_report` and the page, first use of everything it
needs included), and reports the report's time as a fraction of the step's wall time,
and the page's size. Resize needs Ray: run with ``--resize`` inside
``scripts/in-loopback-netns``.

    python bench/steps/step_report.py [--classes 12 --per-class 60 --repeats 3 --resize] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgpipe.clean.config import CleanConfig
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.report import steps as step_report
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download


def _timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def _report(prefix: str) -> tuple[float, int]:
    """Seconds to build the report and its page (what the component does), and the page's bytes."""
    started = time.perf_counter()
    built = step_report.build_report(prefix)
    page = built.html().encode("utf-8")
    return time.perf_counter() - started, len(page)


def run_once(root: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    store = "file://" + str(root)
    archive = f"{store}/synth/images.tar.gz"
    steps: dict[str, tuple[object, tuple, dict]] = {
        "download": (download, ([archive], f"{store}/download", DownloadConfig()), {}),
        "clean": (clean, (f"{store}/download", f"{store}/clean", CleanConfig()), {}),
    }
    if args.resize:
        from imgpipe.resize.config import ResizeConfig
        from imgpipe.steps.resize import resize

        steps["resize"] = (resize, (f"{store}/clean", f"{store}/resize", ResizeConfig(size=96, train_mode="whole")), {})
    results = {}
    for name, (fn, fn_args, kwargs) in steps.items():
        done, step_s = _timed(fn, *fn_args, **kwargs)
        report_s, page = _report(done.dest)
        results[name] = {"step_s": step_s, "report_s": report_s, "fraction": report_s / step_s, "page_bytes": page}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resize", action="store_true", help="also resize (starts a local Ray)")
    parser.add_argument("--keep", type=Path, help="work in this (new or empty) directory and keep it")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one repeat, in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_once(args.child, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-report-") as tmp:
        base = args.keep or Path(tmp)
        runs = []
        for k in range(args.repeats):
            root = base / f"r{k}"
            generate("file://" + str(root / "synth"), SynthConfig(classes=args.classes, per_class=args.per_class, seed=0), progress=False)
            child = [sys.executable, __file__, "--child", str(root)] + (["--resize"] if args.resize else [])
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {step: {key: statistics.median(r[step][key] for r in runs) for key in runs[0][step]} for step in runs[0]}
    print(f"{'step':10} {'step s':>8} {'report s':>9} {'fraction':>9} {'page KiB':>9}   (median of {args.repeats})")
    for step, s in summary.items():
        print(f"{step:10} {s['step_s']:8.2f} {s['report_s']:9.3f} {100 * s['fraction']:8.1f}% {s['page_bytes'] / 1024:9.0f}")
    if args.json:
        args.json.write_text(json.dumps({"classes": args.classes, "per_class": args.per_class, "runs": runs, "median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
