"""Near-duplicate peers: imgpipe's download + clean against cleanvision's ``near_duplicates`` check, on the same files.

The files are photo-like JPEGs in class folders (bench/scale/scale.py's set) with planted
near-copies: each of ``planted`` originals re-encoded at JPEG quality 60 (``q60``), resized
to 90% (``s90``) and mirrored left-right (``flip``). imgpipe runs as a pod does, each step a
fresh process (``imgpipe download FOLDER`` then ``imgpipe clean --label-source folder``), and
its finds are read from the clean output's ``rejects.parquet`` (reason ``near_duplicate``,
the kept image named in the detail); cleanvision runs
``Imagelab(data_path=FOLDER).find_issues({"near_duplicates": {}})`` in a fresh process, its
finds being ``info["near_duplicates"]["sets"]``. A planted copy counts as found when it ends
up in one group with its original; a false positive is any other file put in a group.

    folder, planted = prepare(root, files=4240, planted=60)
    results = measure(root, folder, planted, repeats=3)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

# Every group of bench/ on the path: the scripts import each other by name (bench/README.md).
sys.path[:0] = [str(d) for d in sorted(Path(__file__).resolve().parents[1].iterdir()) if d.is_dir() and d.name.isidentifier()]

from peers_common import fmt_spread, markdown, rotated, spread, timed_child

__all__ = ["KINDS", "prepare", "score", "measure", "summarize", "tables"]

KINDS = ("q60", "s90", "flip")
IMGPIPE, CLEANVISION = "imgpipe download + clean", "cleanvision Imagelab"
_KEPT = re.compile(r"bits from (.+) \(pHash\), which is kept")


def prepare(root: Path, files: int, planted: int, seed: int = 0) -> tuple[Path, dict[str, list[str]]]:
    """``files`` JPEGs in class folders, ``3 * planted`` of them near-copies; returns the folder and ``{copy: [original, kind]}``."""
    import numpy as np
    from PIL import Image, ImageOps
    from scale import generate_archive

    base = files - len(KINDS) * planted
    if base < planted:
        raise ValueError(f"{files} files cannot hold {planted} originals and {len(KINDS) * planted} copies")
    archive = root / f"images-{base}.tar"
    generate_archive(archive, base, seed)
    folder = root / "files"
    shutil.rmtree(folder, ignore_errors=True)
    names = []
    with tarfile.open(archive) as tar:
        for member in tar:
            name = Path(member.name).name
            path = folder / name.rsplit("_", 1)[0] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
            names.append(name)
    copies: dict[str, list[str]] = {}
    for name in sorted(np.random.default_rng(seed).choice(names, planted, replace=False).tolist()):
        path = folder / name.rsplit("_", 1)[0] / name
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = img.size
        made = {
            "q60": (img, 60),
            "s90": (img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.LANCZOS), 90),
            "flip": (ImageOps.mirror(img), 90),
        }
        for kind, (copy, quality) in made.items():
            copy_name = f"{path.stem}_{kind}.jpg"
            copy.save(path.parent / copy_name, "JPEG", quality=quality)
            copies[copy_name] = [name, kind]
    return folder, copies


def score(groups: list[list[str]], planted: dict[str, list[str]]) -> dict[str, Any]:
    """Planted copies grouped with their original, by kind, and the other files grouped with anything."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups:
        for other in group[1:]:
            parent[find(other)] = find(group[0])
    found = {kind: 0 for kind in KINDS}
    for copy, (original, kind) in planted.items():
        found[kind] += copy in parent and original in parent and find(copy) == find(original)
    family = set(planted) | {original for original, _ in planted.values()}
    grouped = {name for group in groups if len(group) > 1 for name in group}
    return {"found": found, "found_total": sum(found.values()), "planted": len(planted), "false_positives": len(grouped - family)}


def imgpipe_groups(clean_dest: str) -> list[list[str]]:
    """clean's near-duplicate pairs (``[rejected, kept]`` file names), from its rejects."""
    from imgpipe import contract

    rejects = contract.read_rejects(clean_dest).to_pylist()
    pairs = []
    for r in rejects:
        if r["reason"] == "near_duplicate" and (m := _KEPT.search(r["detail"] or "")):
            pairs.append([Path(r["path"]).name, Path(m.group(1)).name])
    return pairs


def cleanvision_main(folder: str) -> int:
    """The cleanvision child: its near-duplicate sets (file names) as the last line of stdout."""
    from cleanvision import Imagelab

    lab = Imagelab(data_path=folder)
    lab.find_issues({"near_duplicates": {}})
    sets = [[Path(p).name for p in group] for group in lab.info["near_duplicates"]["sets"]]
    print(json.dumps({"sets": sets}))
    return 0


def _imgpipe_cold(root: Path, folder: Path) -> dict[str, Any]:
    """``imgpipe download`` then ``imgpipe clean``, each a fresh process."""
    from imgpipe import storage

    download, clean = (storage.normalize_uri(str(root / f"imgpipe-{step}")) for step in ("download", "clean"))
    for step in ("download", "clean"):
        shutil.rmtree(root / f"imgpipe-{step}", ignore_errors=True)
    cli = [sys.executable, "-m", "imgpipe.cli"]
    dl = timed_child([*cli, "download", str(folder), download], result=False)
    if dl.error:
        return {"error": f"download: {dl.error}"}
    cl = timed_child([*cli, "clean", download, clean, "--label-source", "folder"], result=False)
    if cl.error:
        return {"error": f"clean: {cl.error}"}
    return {"seconds": dl.seconds + cl.seconds, "download_s": dl.seconds, "clean_s": cl.seconds, "groups": imgpipe_groups(clean)}


def _cleanvision_cold(folder: Path) -> dict[str, Any]:
    run = timed_child([sys.executable, __file__, "--cleanvision", str(folder)])
    return {"error": run.error} if run.error else {"seconds": run.seconds, "groups": run.result["sets"]}


def measure(root: Path, folder: Path, planted: dict[str, list[str]], repeats: int) -> dict[str, dict[str, Any]]:
    """Each tool cold, ``repeats`` times, taking turns; what it found is scored on its last successful run."""
    runs: dict[str, list[dict[str, Any]]] = {IMGPIPE: [], CLEANVISION: []}
    for repeat in range(repeats):
        for name in rotated(list(runs), repeat):
            run = _imgpipe_cold(root, folder) if name == IMGPIPE else _cleanvision_cold(folder)
            runs[name].append(run)
            status = run.get("error") or f"{run['seconds']:.1f} s"
            print(f"clean {repeat}: {name}: {status}", file=sys.stderr, flush=True)
    results = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        errors = [r["error"] for r in rs if "error" in r]
        results[name] = {
            "error": errors[0] if errors else None,
            "failed_runs": len(errors),
            "cold_s": spread(r["seconds"] for r in ok),
            "download_s": spread(r["download_s"] for r in ok if "download_s" in r),
            "clean_s": spread(r["clean_s"] for r in ok if "clean_s" in r),
            "score": score(ok[-1]["groups"], planted) if ok else None,
            "groups": len(ok[-1]["groups"]) if ok else None,
        }
    return results


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Planted copies found and cold seconds, imgpipe against cleanvision (speed, >1 = imgpipe faster)."""
    ours, theirs = results[IMGPIPE], results[CLEANVISION]
    rows = []
    if ours["score"] and theirs["score"]:
        rows.append({"figure": "planted copies found", "ours": ours["score"]["found_total"], "peer": theirs["score"]["found_total"]})
        rows.append({"figure": "false positives", "ours": ours["score"]["false_positives"], "peer": theirs["score"]["false_positives"]})
    speed = theirs["cold_s"]["median"] / ours["cold_s"]["median"] if ours["cold_s"] and theirs["cold_s"] else None
    rows.append({"figure": "cold speed ratio (>1: imgpipe faster)", "ours": None, "peer": None, "speedup": speed})
    return rows


def tables(results: dict[str, dict[str, Any]], ratios: list[dict[str, Any]], files: int, repeats: int) -> str:
    rows = []
    for name, r in results.items():
        s = r["score"]
        if s is None:
            rows.append([name, f"**failed**: {r['error']}", "—", "—", "—", "—", "—", "—"])
            continue
        found = [f"{s['found'][k]}/{s['planted'] // len(KINDS)}" for k in KINDS]
        seconds = fmt_spread(r["cold_s"])
        if r["download_s"]:
            seconds += f" (download {r['download_s']['median']:.2f} + clean {r['clean_s']['median']:.2f})"
        if r["error"]:
            seconds += f"; {r['failed_runs']} run(s) failed: {r['error']}"
        rows.append([name, seconds, *found, f"**{s['found_total']}/{s['planted']}**", s["false_positives"], r["groups"]])
    head = [
        "tool",
        f"cold s, {files} files (median of {repeats}, min–max)",
        *(f"found {k}" for k in KINDS),
        "found, all",
        "false positives (files)",
        "groups / pairs",
    ]
    ratio = next((r["speedup"] for r in ratios if "speedup" in r), None)
    out = [markdown(head, rows, [False, True, True, True, True, True, True, True])]
    out.append(f"\nimgpipe / cleanvision cold speed ratio (>1: imgpipe faster): {'—' if ratio is None else f'{ratio:.2f}×'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cleanvision", metavar="FOLDER", required=True, help="run cleanvision on FOLDER in this process")
    return cleanvision_main(parser.parse_args(argv).cleanvision)


if __name__ == "__main__":
    sys.exit(main())
