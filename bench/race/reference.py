"""The model race: imgpipe's train step with its defaults against torchvision's reference recipe, on real sets.

For each set of bench/race/real_sets.py (scikit-learn's digits, scikit-image's LFW subset), the
fixed split is written once as class folders; imgpipe's download, clean and resize make
its resize output once (resize: ``--size`` in ``fixed`` mode; everything else the
defaults). Then, per seed, two cold processes, one after the other:

* ``imgpipe train RESIZE OUT --model M --epochs E --batch-size B --seed S --device cpu``:
  everything else is the step's default (``recipe: auto``);
* ``python bench/race/reference_recipe.py SET_DIR ...``: torchvision's reference recipe on the
  same files, less those clean rejected (its near-duplicate rejects), so both train,
  validate and test on the same images;
* ``python bench/race/reference_recipe.py SET_DIR --recipe simple ...`` (side ``simple``): the
  script's own defaults (crop and flip, constant-lr SGD at the lr scaled to the batch), the
  recipe a user starts from.

Both print when each epoch ended; time counts from the moment this script started the
process. Each reference recipe sets a threshold, its best mean validation macro-F1 (the mean over
seeds, per epoch, of the better of its model and its EMA; the best epoch); a run's time to
accuracy is the wall-clock until its validation macro-F1 first reaches it. Test top-1 and
macro-F1 are scikit-learn's, from each side's predictions (imgpipe's ``predictions.parquet``,
whose test paths must be the reference's test files). The reference is scored on its last
epoch's weights (what its script keeps) and on its best validation epoch's (what imgpipe keeps).

Seeds: ``--seeds`` for every set, ``--set-seeds NAME=SEEDS`` for one (``make bench-race``
gives LFW six: its test split is 39 images, each worth 2.6 points of macro-F1, and a run
takes 20 s).

    scripts/in-loopback-netns .venv/bin/python bench/race/reference.py --seeds 0,1,2 --set-seeds lfw=0,1,2,3,4,5 \\
        --epochs 10 --json bench/results/reference.json --plot docs/img/reference.png
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from real_sets import load_set, write_set  # noqa: E402

HERE = Path(__file__).resolve().parent
# The side of the reference script's own defaults (reference_recipe.py --recipe simple).
SIMPLE = "simple"
IMGPIPE = Path(sys.executable).with_name("imgpipe")


def prepare(name: str, root: Path, size: int) -> dict[str, Any]:
    """Writes the set's split and makes imgpipe's resize output of it; returns where they are and what clean rejected."""
    import pyarrow.parquet as pq

    from imgpipe import contract, storage
    from imgpipe.clean.config import CleanConfig
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.steps.clean import clean
    from imgpipe.steps.download import DownloadConfig, download
    from imgpipe.steps.resize import resize

    folder = root / "sets" / name
    split = write_set(load_set(name), folder, size=size)
    started = time.perf_counter()
    prefix = "file://" + str(root / "imgpipe" / name)
    download(str(folder), f"{prefix}/download", DownloadConfig())
    cleaned = clean(f"{prefix}/download", f"{prefix}/clean", CleanConfig())
    resize(f"{prefix}/clean", f"{prefix}/resize", ResizeConfig(size=size, mode="fixed"))
    rejects = pq.read_table(io.BytesIO(storage.read_bytes(contract.dest_uri(f"{prefix}/clean", contract.REJECTS)))).to_pylist()
    excluded = sorted(r["path"] for r in rejects)
    (root / f"{name}.exclude.json").write_text(json.dumps(excluded))
    (root / "runs").mkdir(exist_ok=True)
    return {
        "name": name,
        "folder": folder,
        "resize": f"{prefix}/resize",
        "exclude": root / f"{name}.exclude.json",
        "excluded": excluded,
        "split": split["counts"],
        "clean_rejects": cleaned.rejects_by_reason,
        "prep_seconds": round(time.perf_counter() - started, 1),
    }


def _run(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Runs ``cmd`` cold; returns its start time (unix), its wall seconds and its stdout."""
    started = time.time()
    with log.open("w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    seconds = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited {done.returncode}; its log: {log}")
    return started, seconds, done.stdout


def run_imgpipe(prep: dict, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from imgpipe import contract, storage

    out = work / "runs" / f"{prep['name']}-imgpipe-{seed}"
    cmd = [str(IMGPIPE), "train", prep["resize"], str(out), "--model", args.model, "--epochs", str(args.epochs)]
    cmd += ["--batch-size", str(args.batch_size), "--seed", str(seed), "--device", "cpu"]
    started, seconds, _ = _run(cmd, out.with_suffix(".log"))
    metrics = json.loads((out / contract.METRICS).read_text())
    curve = [
        {"epoch": e["epoch"], "t": e["ended_at"] - started, "val_macro_f1": max(e["val_macro_f1"], e.get("ema_val_macro_f1") or 0.0)}
        for e in metrics["epochs"]
    ]
    test = _scores(storage.read_bytes(storage.join("file://" + str(out), contract.PREDICTIONS)))
    return {
        "seed": seed,
        "seconds": round(seconds, 1),
        "curve": curve,
        **test,
        "recipe": (metrics.get("recipe") or {}).get("recipe"),
        "diverged": metrics.get("diverged"),
        "epoch_images": metrics.get("epoch_images"),
        # Where its time went, by phase (the step's manifest; validation includes precise BN).
        "phase_s": contract.read_manifest("file://" + str(out), expect_step="train").get("extra", {}).get("phase_s"),
    }


def _scores(predictions: bytes) -> dict[str, Any]:
    """Test top-1 and macro-F1 (scikit-learn) from a predictions.parquet, and the test paths."""
    import pyarrow.parquet as pq
    from sklearn.metrics import accuracy_score, f1_score

    t = pq.read_table(io.BytesIO(predictions)).to_pandas()
    t = t[t["split"] == "test"]
    return {
        "test_top1": float(accuracy_score(t["label_name"], t["predicted_name"])),
        "test_macro_f1": float(f1_score(t["label_name"], t["predicted_name"], average="macro")),
        "test_paths": sorted(t["path"]),
    }


def run_reference(prep: dict, seed: int, args: argparse.Namespace, work: Path, lr: float | None, recipe: str = "v2") -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "reference_recipe.py"), str(prep["folder"]), "--exclude", str(prep["exclude"]), "--recipe", recipe]
    cmd += ["--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(seed)]
    cmd += ["--workers", str(args.ref_workers)] + (["--lr", str(lr)] if lr is not None else [])
    started, seconds, stdout = _run(cmd, work / "runs" / f"{prep['name']}-reference-{recipe}-{seed}-{lr}.log")
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    final = lines[-1]
    curve = [
        {"epoch": r["epoch"], "t": r["time"] - started, "val_macro_f1": max(r["val_macro_f1"], r.get("ema_val_macro_f1", 0.0))} for r in lines[:-1]
    ]
    scores = {k: v for k, v in final.items() if k.startswith(("test", "best"))}
    return {"seed": seed, "seconds": round(seconds, 1), "curve": curve, "lr": final["lr"], "ref_recipe": recipe, **scores}


def _seeds(listed: str) -> list[int]:
    return [int(s) for s in listed.split(",") if s.strip()]


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def time_to(curve: list[dict], threshold: float) -> float | None:
    """Seconds from the process start to the first epoch whose validation macro-F1 reaches ``threshold``."""
    return next((p["t"] for p in curve if p["val_macro_f1"] >= threshold - 1e-12), None)


def epoch_seconds(curve: list[dict]) -> float | None:
    """A run's seconds per epoch: the median time between successive epochs' ends (the first's start-up left out)."""
    gaps = [b["t"] - a["t"] for a, b in zip(curve, curve[1:])]
    return statistics.median(gaps) if gaps else None


def epoch_phases(rs: list[dict]) -> str:
    """Where an imgpipe epoch's seconds went, over ``rs`` (their manifests' ``phase_s`` per epoch run)."""
    epochs = sum(len(r["curve"]) for r in rs)
    total: dict[str, float] = {}
    for r in rs:
        for phase, seconds in (r.get("phase_s") or {}).items():
            total[phase] = total.get(phase, 0.0) + seconds
    bn = total.get("precise_bn", 0.0)
    parts = {"training steps": total.get("steps", 0.0), "precise BN": bn, "validation": total.get("validation", 0.0) - bn}
    parts["checkpoints"] = total.get("checkpoints", 0.0)
    return "an imgpipe epoch, mean s: " + ", ".join(f"{k} {v / max(epochs, 1):.2f}" for k, v in parts.items())


def _best_mean(rs: list[dict]) -> tuple[float, int]:
    """A side's best mean validation macro-F1 over seeds, by epoch, and that epoch."""
    epochs = min(len(r["curve"]) for r in rs)
    per_epoch = [statistics.fmean(r["curve"][e]["val_macro_f1"] for r in rs) for e in range(epochs)]
    return max(per_epoch), per_epoch.index(max(per_epoch))


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Each reference recipe's threshold (its best mean validation macro-F1) and every side's time to each."""
    thresholds = {side: _best_mean(rs) for side, rs in runs.items() if side == "reference" or side == SIMPLE}
    threshold, threshold_epoch = thresholds["reference"]
    out: dict[str, Any] = {"threshold": threshold, "threshold_epoch": threshold_epoch, "thresholds": {k: v[0] for k, v in thresholds.items()}}
    for side, rs in runs.items():
        entry: dict[str, Any] = {
            "test_top1": _mean_std([r["test_top1"] for r in rs]),
            "test_macro_f1": _mean_std([r["test_macro_f1"] for r in rs]),
            "seconds": _mean_std([r["seconds"] for r in rs]),
        }
        per_epoch = [e for e in (epoch_seconds(r["curve"]) for r in rs) if e is not None]
        if per_epoch:
            entry["epoch_seconds"] = _mean_std(per_epoch)
        entry["epochs_run"] = _mean_std([float(len(r["curve"])) for r in rs])
        for ref, (level, _) in thresholds.items():
            times = [time_to(r["curve"], level) for r in rs]
            key = "seconds_to_threshold" if ref == "reference" else f"seconds_to_{ref}"
            for r, t in zip(rs, times):
                r[key] = None if t is None else round(t, 1)
            reached = [t for t in times if t is not None]
            # A run that never reached it counts with its whole run time (a lower bound on its time).
            entry[key] = _mean_std([t if t is not None else r["seconds"] for r, t in zip(rs, times)])
            entry["reached" if ref == "reference" else f"reached_{ref}"] = f"{len(reached)}/{len(rs)}"
        if side.startswith("reference") or side == SIMPLE:
            entry["best_test_macro_f1"] = _mean_std([r["best_test_macro_f1"] for r in rs])
            entry["best_test_top1"] = _mean_std([r["best_test_top1"] for r in rs])
        out[side] = entry
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sets = list(results["sets"])
    fig = Figure(figsize=(6 * len(sets), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(sets)))
    colours = {"imgpipe": "tab:blue", "reference": "tab:orange", SIMPLE: "tab:green"}
    for ax, name in zip(axes, sets):
        entry = results["sets"][name]
        for side, rs in entry["runs"].items():
            colour = colours.get(side, "tab:red")
            for i, r in enumerate(rs):
                xs = [0.0] + [p["t"] for p in r["curve"]]
                ys = [0.0] + [p["val_macro_f1"] for p in r["curve"]]
                ax.plot(xs, ys, marker="o", ms=3, color=colour, alpha=0.8, label=side if i == 0 else None)
        for ref, level in entry["summary"]["thresholds"].items():
            ax.axhline(level, color=colours[ref], ls="--", lw=1, label=f"{ref}'s best mean")
        ax.set_title(f"{name}: validation macro-F1 against wall-clock (cold, {results['args']['model']})")
        ax.set_xlabel("seconds since the process started")
        ax.set_ylabel("validation macro-F1")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)


def table(results: dict[str, Any]) -> str:
    """The markdown table of docs/benchmarks.md: one row per system, recipe and seed, then the means."""
    lines = [
        "| set | system | recipe | seed | test top-1 | test macro-F1 | s to the v2 recipe's best | s to the simple recipe's best | run s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in results["sets"].items():
        s = entry["summary"]
        for side, rs in entry["runs"].items():
            for r in rs:
                kind = "torchvision reference's defaults" if r.get("ref_recipe") == SIMPLE else "torchvision IMAGENET1K_V2 recipe"
                recipe = r.get("recipe") or f"{kind}, lr {r.get('lr'):.3g}"
                reach = ["not reached" if r.get(k) is None else f"{r[k]:.1f}" for k in ("seconds_to_threshold", f"seconds_to_{SIMPLE}")]
                lines.append(
                    f"| {name} | {side} | {recipe} | {r['seed']} | {r['test_top1']:.3f} | {r['test_macro_f1']:.3f} | {reach[0]} | {reach[1]} | "
                    f"{r['seconds']:.0f} |"
                )
            m = s[side]
            to_simple = f"{m[f'seconds_to_{SIMPLE}']['mean']:.1f} ({m[f'reached_{SIMPLE}']} reached)" if f"seconds_to_{SIMPLE}" in m else ""
            lines.append(
                f"| {name} | **{side}, mean ± std** | | | {m['test_top1']['mean']:.3f} ± {m['test_top1']['std']:.3f} | "
                f"{m['test_macro_f1']['mean']:.3f} ± {m['test_macro_f1']['std']:.3f} | "
                f"{m['seconds_to_threshold']['mean']:.1f} ({m['reached']} reached) | {to_simple} | {m['seconds']['mean']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="digits,lfw")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set-seeds", action="append", default=[], metavar="NAME=SEEDS", help="one set's seeds instead of --seeds (repeatable)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="the side every image is written at")
    parser.add_argument("--set-sizes", action="append", default=[], metavar="NAME=PX", help="one set's side instead of --size (repeatable)")
    parser.add_argument("--ref-lrs", default="", help="the reference's learning rates, comma separated; empty: its default (0.1 x batch / 256)")
    parser.add_argument("--ref-workers", type=int, default=2, help="the reference's DataLoader workers (the machine's cores)")
    parser.add_argument("--workdir", type=Path, help="keep the sets and outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    seeds = {name: _seeds(args.seeds) for name in args.sets.split(",")}
    for item in args.set_seeds:
        name, _, listed = item.partition("=")
        if name not in seeds or not _seeds(listed):
            parser.error(f"--set-seeds {item!r}: expected NAME=S1,S2,... with NAME one of --sets ({args.sets})")
        seeds[name] = _seeds(listed)
    sizes = {name: args.size for name in seeds}
    for item in args.set_sizes:
        name, _, px = item.partition("=")
        if name not in sizes or not px.isdigit() or int(px) < 16:
            parser.error(f"--set-sizes {item!r}: expected NAME=PX with NAME one of --sets ({args.sets}) and PX >= 16")
        sizes[name] = int(px)
    ref_lrs = [float(x) for x in args.ref_lrs.split(",") if x] or [None]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="imgpipe-race-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "sets": {}}
        for name in args.sets.split(","):
            prep = prepare(name, work, sizes[name])
            print(f"{name}: split {prep['split']}, clean rejected {prep['clean_rejects']} in {prep['prep_seconds']} s", file=sys.stderr, flush=True)
            runs: dict[str, list[dict]] = {"imgpipe": [], SIMPLE: []}
            for lr in ref_lrs:
                runs["reference" if lr == ref_lrs[0] else f"reference lr {lr:g}"] = []
            for seed in seeds[name]:  # interleaved, so that a drift of the machine falls on both sides
                runs["imgpipe"].append(run_imgpipe(prep, seed, args, work))
                print(f"{name} imgpipe seed {seed}: {runs['imgpipe'][-1]['test_macro_f1']:.3f}", file=sys.stderr, flush=True)
                for lr in ref_lrs:
                    side = "reference" if lr == ref_lrs[0] else f"reference lr {lr:g}"
                    runs[side].append(run_reference(prep, seed, args, work, lr))
                    print(f"{name} {side} seed {seed}: {runs[side][-1]['test_macro_f1']:.3f}", file=sys.stderr, flush=True)
                runs[SIMPLE].append(run_reference(prep, seed, args, work, None, recipe=SIMPLE))
                print(f"{name} {SIMPLE} seed {seed}: {runs[SIMPLE][-1]['test_macro_f1']:.3f}", file=sys.stderr, flush=True)
            paths = {tuple(r.pop("test_paths")) for r in runs["imgpipe"]}
            assert len(paths) == 1, "every imgpipe run tests on the same images"
            (test_paths,) = paths
            written = (str(q.relative_to(prep["folder"])) for q in (prep["folder"] / "test").rglob("*.png"))
            ref_test = sorted(p for p in written if p not in prep["excluded"])
            assert list(test_paths) == ref_test, "imgpipe and the reference test on the same files"
            results["sets"][name] = {
                "size": sizes[name],
                "split": prep["split"],
                "clean_rejects": prep["clean_rejects"],
                "prep_seconds": prep["prep_seconds"],
                "test_images": len(ref_test),
                "runs": runs,
                "summary": summarize(runs),
            }
        results["seconds"] = round(time.time() - started, 1)
    print(table(results))
    for name, entry in results["sets"].items():
        s = entry["summary"]
        ratio = s["imgpipe"]["seconds_to_threshold"]["mean"] / s["reference"]["seconds_to_threshold"]["mean"]
        print(f"{name}: threshold {s['threshold']:.3f} (epoch {s['threshold_epoch'] + 1}); time to it, imgpipe / reference: {ratio:.2f}")
        key = f"seconds_to_{SIMPLE}"
        to_simple = {side: s[side][key]["mean"] for side in ("imgpipe", "reference", SIMPLE)}
        print(
            f"{name}: the simple recipe's best {s['thresholds'][SIMPLE]:.3f}; time to it, imgpipe / simple: "
            f"{to_simple['imgpipe'] / to_simple[SIMPLE]:.2f}, imgpipe / the v2 recipe: {to_simple['imgpipe'] / to_simple['reference']:.2f}"
        )
        per_epoch = {side: s[side]["epoch_seconds"]["mean"] for side in ("imgpipe", "reference", SIMPLE) if "epoch_seconds" in s[side]}
        if len(per_epoch) == 3:
            print(
                f"{name}: seconds per epoch, imgpipe {per_epoch['imgpipe']:.1f} ({s['imgpipe']['epochs_run']['mean']:.1f} epochs run), "
                f"simple {per_epoch[SIMPLE]:.1f}, v2 {per_epoch['reference']:.1f}: imgpipe / simple {per_epoch['imgpipe'] / per_epoch[SIMPLE]:.2f}, "
                f"imgpipe / v2 {per_epoch['imgpipe'] / per_epoch['reference']:.2f}"
            )
        print(f"{name}: {epoch_phases(entry['runs']['imgpipe'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
