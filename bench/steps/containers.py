"""Container figures: image sizes, build times, per-step start overhead, pipeline wall time.

Run inside the loopback-only namespace with an engine (``make bench-containers``)::

    python bench/steps/containers.py [--kinds cpu ray gpu] [--cold] [--runs]

* sizes of the three images (uncompressed);
* build time per kind: ``--cold`` (no layer cache), after a source change (a copy of the
  repository with one line added under ``src/``), and with nothing changed;
* per-step start overhead: a container that runs ``true``, and the start of a step's
  Python (``import kfp.dsl.executor_main, imgpipe.steps.<step>``) in its image against the
  same imports in a fresh process of this machine's venv (the baseline, same run);
* ``--runs``: wall time of ``imgpipe run`` with ``--runner subprocess`` and ``docker``,
  same settings, same session (the ratio is what ``make run-containers`` costs over
  ``make run``).

Builds need the host network (pip): with ``--cold`` or builds run this outside the
namespace, or pass ``--no-build``.
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

from imgpipe.containers import build
from imgpipe.containers.catalog import KINDS, image
from imgpipe.containers.engine import connect, describe, image_size

STEP_MODULE = {"cpu": "imgpipe.steps.clean", "ray": "imgpipe.steps.resize", "gpu": "imgpipe.steps.train"}


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _source_changed_copy(tmp: Path) -> Path:
    repo = build.copy_context(tmp / "repo")
    init = repo / "src" / "imgpipe" / "__init__.py"
    init.write_text(init.read_text() + f"# source change {time.time()}\n")
    return repo


def bench_builds(client, kinds, cold: bool) -> dict:
    conf, ca, _ = build.host_pip_settings()
    base = build.resolve_base(client)
    out: dict = {}
    quiet = lambda _line: None  # noqa: E731
    for kind in kinds:
        row = {}
        if cold:
            row["cold_s"] = build.build_image(
                client, kind, base, context=build.build_context(build.ROOT, (conf, ca)), no_cache=True, log=quiet
            ).seconds
        row["unchanged_s"] = build.build_image(client, kind, base, context=build.build_context(build.ROOT, (conf, ca)), log=quiet).seconds
        with tempfile.TemporaryDirectory() as tmp:
            repo = _source_changed_copy(Path(tmp))
            changed = build.build_image(
                client, kind, base, context=build.build_context(repo, (conf, ca)), tag=f"localhost/imgpipe-bench-{kind}:changed", log=quiet
            )
        row["source_change_s"] = changed.seconds
        row["source_change_cached_steps"] = f"{changed.cached_steps}/{changed.steps}"
        client.images.remove(changed.image, force=True)
        out[kind] = row
        print(kind, row, flush=True)
    return out


def bench_starts(client, kinds, repeats: int) -> dict:
    out: dict = {}
    for kind in kinds:
        name = image(kind)
        code = f"import kfp.dsl.executor_main, {STEP_MODULE[kind]}"
        bare = _timed(lambda n=name: client.containers.run(n, ["true"], remove=True, network_mode="none"), repeats)
        boxed = _timed(lambda n=name, c=code: client.containers.run(n, ["python", "-c", c], remove=True, network_mode="none"), repeats)
        host = _timed(lambda c=code: subprocess.run([sys.executable, "-c", c], check=True), repeats)
        row = {
            "container_true_s": statistics.median(bare),
            "step_start_in_container_s": statistics.median(boxed),
            "step_start_on_host_s": statistics.median(host),
        }
        row["overhead_s"] = row["step_start_in_container_s"] - row["step_start_on_host_s"]
        row["ratio"] = row["step_start_in_container_s"] / row["step_start_on_host_s"]
        out[kind] = {k: round(v, 2) for k, v in row.items()}
        print(kind, out[kind], flush=True)
    return out


def bench_runs(tmp: Path) -> dict:
    out = {}
    for runner in ("subprocess", "docker"):
        cmd = [sys.executable, "-m", "imgpipe.cli", "run", "--runner", runner, "--config", "configs/local.yaml", "--workdir", str(tmp / runner)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=build.ROOT, stdout=subprocess.DEVNULL)
        out[f"{runner}_s"] = round(time.perf_counter() - t, 1)
        print(runner, out[f"{runner}_s"], flush=True)
    out["ratio"] = round(out["docker_s"] / out["subprocess_s"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="*", default=list(KINDS))
    parser.add_argument("--cold", action="store_true", help="also build every layer anew (slow: downloads everything)")
    parser.add_argument("--no-build", action="store_true", help="skip the build timings (inside the loopback namespace)")
    parser.add_argument("--runs", action="store_true", help="time imgpipe run with both runners")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/containers.json")
    args = parser.parse_args()
    client = connect()
    results: dict = {"engine": describe(client)}
    results["sizes_mb"] = {k: round(image_size(client, image(k)) / 1e6) for k in args.kinds}
    print("sizes", results["sizes_mb"], flush=True)
    if not args.no_build:
        results["builds"] = bench_builds(client, args.kinds, args.cold)
    results["starts"] = bench_starts(client, args.kinds, args.repeats)
    if args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            results["runs"] = bench_runs(Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
