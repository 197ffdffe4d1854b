"""Label audit, step 4 of the notes' tuning procedure: find the training images whose label is likely wrong.

Three parts, each a plain function (the ``imgpipe-audit`` pipeline runs them as tasks,
the K trainings in a ``ParallelFor``; ``bench/probes/audit.py`` calls them in one process):

1. :func:`make_folds` splits the ``train`` split of a resize output into ``k`` stratified
   folds (by class, seeded), keeping each near-duplicate group (clean's pHashes) in one
   fold, and writes per fold a resize-shaped output: ``test`` is the fold, held out;
   ``val`` is an inner validation split carved from the other folds (for the best epoch,
   EMA and early stopping); ``train`` is the rest. Nothing is selected on the held-out
   images. Memory: one input row group and ``3k`` open Parquet writers.
2. Each fold trains with the run's recipe (:func:`imgpipe.steps.train.train`) and
   ``predictions_probs`` on, so its ``predictions.parquet`` holds the full probability
   vector of every held-out (``test``) image: together, out-of-fold probabilities for
   every train image.
3. :func:`rank_label_issues` gathers them and asks cleanlab (``cleanlab.filter.find_label_issues``,
   confident learning, ranked by self-confidence; ``cleanlab.rank.get_label_quality_scores``)
   which labels are suspect. It commits ``label_issues.parquet`` (every train image with its
   given and suggested label and its label-quality score), ``label_overrides.csv`` (the
   suspects, best first, with the suggested label in the ``label`` column: a person checks
   each, edits or deletes the row, and hands the file to clean as ``label_overrides``), and
   ``label_issues.html`` (a gallery of the most suspect images).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgpipe import commit, contract, parquet, storage, writer
from imgpipe.config import check_numbers
from imgpipe.contract import StepReport
from imgpipe.data.labels import escape_csv_cell
from imgpipe.report import html as htmlpage
from imgpipe.writer import OutputWriter

__all__ = [
    "AUDIT_PIPELINE_NAME",
    "LABEL_ISSUES",
    "LABEL_OVERRIDES",
    "LABEL_ISSUES_HTML",
    "AuditConfig",
    "fold_of_rows",
    "fold_of_groups",
    "make_folds",
    "plan_folds",
    "fold_name",
    "rank_label_issues",
    "held_out_pictures",
]

log = logging.getLogger(__name__)

# The audit pipeline's name on Kubeflow (pipelines/imgpipe_audit.py); here so that naming it needs no kfp.
AUDIT_PIPELINE_NAME = "imgpipe-audit"
LABEL_ISSUES = "label_issues.parquet"
LABEL_OVERRIDES = "label_overrides.csv"
LABEL_ISSUES_HTML = "label_issues.html"
_GALLERY = 40
# Suggestions kept per image (``top_labels``, ``top_probs``).
TOP_K = 3


@dataclass(frozen=True)
class AuditConfig:
    """Settings of a label audit.

    Attributes:
        folds: Cross-validation folds K: each train image is predicted by a model trained
            on the other K-1 folds.
        seed: Seed of the fold assignment.
        filter_by: cleanlab's ``filter_by`` (``prune_by_noise_rate``, ``prune_by_class``,
            ``both``, ``confident_learning``, ``predicted_neq_given``).
    """

    folds: int = 5
    seed: int = 0
    filter_by: str = "prune_by_noise_rate"

    def __post_init__(self) -> None:
        check_numbers(self)
        if not 2 <= self.folds <= 20:
            raise ValueError(f"folds must be between 2 and 20, got {self.folds}")
        allowed = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
        if self.filter_by not in allowed:
            raise ValueError(f"filter_by must be one of {', '.join(allowed)}; got {self.filter_by!r}")


# The inner validation split: about one in INNER_FOLDS of a fold's training rows (at least 1/5).
INNER_FOLDS = 5


def fold_of_groups(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A stratified fold per row in which every group (``groups``: a group id per row) stays whole.

    Groups are dealt as :func:`fold_of_rows` deals rows, by the label of their first row.
    """
    ids, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return fold_of_rows(labels[first], folds, seed)[inverse.reshape(-1)]


def fold_of_rows(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A stratified fold per row: each class's rows dealt round-robin in a seeded order.

    Every fold gets each class's rows within one of each other; a class with fewer rows than
    folds leaves some folds without it (its models then never see it held out, which cleanlab
    tolerates).
    """
    rng = np.random.default_rng([seed, 0xF01D])
    out = np.empty(len(labels), dtype=np.int32)
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        out[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return out


def _split_files(data: str, manifest: Mapping[str, Any], split: str) -> list[str]:
    return [u for u in contract.data_files(data, manifest) if f"/{split}/" in u]


def make_folds(data: str, dest_root: str, cfg: AuditConfig | None = None) -> list[str]:
    """Writes one resize-shaped output per fold (``{dest_root}/fold-{i}``); returns their prefixes.

    Raises:
        ValueError: If ``data`` is not a resize output with a train split of at least ``folds`` images.
    """
    cfg = cfg or AuditConfig()
    data, dest_root = storage.normalize_uri(data), storage.normalize_uri(dest_root)
    manifest = contract.read_manifest(data, expect_step="resize")
    files = _split_files(data, manifest, "train")
    columns = [pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["label", "sha256"]) for u in files]
    labels = np.concatenate([t.column("label").to_numpy() for t in columns] or [np.zeros(0, np.int64)])
    hashes = [str(h) for t in columns for h in t.column("sha256").to_pylist()]
    if len(labels) < cfg.folds:
        raise ValueError(f"{data} has {len(labels)} train images: too few for {cfg.folds} folds")
    groups, grouping = _near_duplicate_groups(manifest, hashes)
    fold = fold_of_groups(labels, groups, cfg.folds, cfg.seed)
    inner = fold_of_groups(labels, groups, max(cfg.folds, INNER_FOLDS), cfg.seed + 1)
    prefixes = [storage.join(dest_root, f"fold-{i}") for i in range(cfg.folds)]
    writers = [OutputWriter(p, "resize") for p in prefixes]
    for w in writers:
        w.begin()
    start = 0
    with contextlib.ExitStack() as stack:
        schema = None
        sinks: list[dict[str, Any]] = []
        for uri in files:
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
            if schema is None:
                schema = table.schema
                sinks = [
                    {s: stack.enter_context(w.parquet_file(f"{s}/part-00000.parquet", schema)) for s in ("train", "val", "test")} for w in writers
                ]
            here, inner_here = fold[start : start + table.num_rows], inner[start : start + table.num_rows]
            start += table.num_rows
            for i in range(cfg.folds):
                held = here == i
                # The inner validation rows: one inner fold of the rows this fold trains on.
                validate = ~held & (inner_here == i % max(cfg.folds, INNER_FOLDS))
                sinks[i]["test"].write(_as_split(table.filter(pa.array(held)), "test"))
                sinks[i]["val"].write(_as_split(table.filter(pa.array(validate)), "val"))
                sinks[i]["train"].write(table.filter(pa.array(~held & ~validate)))
    extra = dict(manifest.get("extra") or {})
    modes = dict(extra.get("split_modes") or {})
    for split in ("val", "test"):
        modes[split] = modes.get("train", extra.get("mode"))  # the rows are stored as train stored them
    extra.update(split_modes=modes, splits=["train", "val", "test"], audit={"source": data, "folds": cfg.folds, "seed": cfg.seed, "groups": grouping})
    labels_json = contract.side_file(data, contract.LABELS)
    for i, w in enumerate(writers):
        held = int((fold == i).sum())
        if labels_json is not None:
            storage.write_bytes(w.uri(contract.LABELS), storage.read_bytes(labels_json))
        w.commit(
            inputs=len(labels), rejects=[], config=cfg, extra={**extra, "fold": i, "held_out": held}, upstream={"source": data, "step": "resize"}
        )
    log.info("audit: %d train images in %d folds -> %s", len(labels), cfg.folds, dest_root)
    return prefixes


def _near_duplicate_groups(manifest: Mapping[str, Any], hashes: Sequence[str]) -> tuple[np.ndarray, str]:
    """A group id per train row: near-duplicates (clean's pHashes, at clean's distance) share one.

    Read from the clean output the resize output was made from; where it has no hashes (an
    older output) or cannot be read, every row is its own group, and the second value says why.
    """
    singles = np.arange(len(hashes))
    clean_prefix = (manifest.get("upstream") or {}).get("source")
    try:
        clean_manifest = contract.read_manifest(clean_prefix, expect_step="clean")
        distance = int((clean_manifest.get("config") or {}).get("near_duplicate_distance", 2))
        tables = [
            pq.read_table(io.BytesIO(storage.read_bytes(u)), columns=["sha256", "phash", "phash_mirror"])
            for u in contract.data_files(clean_prefix, clean_manifest)
        ]
    except Exception as exc:  # noqa: BLE001 - no groups is a weaker audit, not a failed one; the manifest says so
        return singles, f"none: the clean output {clean_prefix} could not be read ({type(exc).__name__})"
    table = pa.concat_tables(tables).filter(pc.is_valid(pa.concat_tables(tables).column("phash")))
    if not table.num_rows:
        return singles, "none: the clean output has no pHashes"
    from imgpipe.clean.neardup import group_representatives

    reps = group_representatives(table.column("phash").to_numpy(), table.column("phash_mirror").to_numpy(), distance)
    shas = table.column("sha256").to_pylist()
    group_of = {sha: shas[int(r)] for sha, r in zip(shas, reps)}
    by_sha = {h: i for i, h in enumerate(hashes)}
    ids = np.array([by_sha.get(group_of.get(h, h), i) for i, h in enumerate(hashes)], np.int64)
    merged = int(len(hashes) - len(np.unique(ids)))
    return ids, f"near-duplicate groups of {clean_prefix} at distance {distance} ({merged} images joined a group)"


def fold_name(i: int) -> str:
    """The branch name of fold ``i`` (its train output is the run's ``train-fold-{i}``)."""
    return f"fold-{i}"


def plan_folds(data: str, dest_root: str, cfg: AuditConfig, step_config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Writes the folds (:func:`make_folds`) and returns one item per fold for the pipeline's ``ParallelFor``.

    Each item carries the fold's data (``resized``), its branch name and the run's
    ``step_config`` with ``train.predictions_probs`` on: the recipe is the run's own.
    """
    sections = {k: dict(v) for k, v in (step_config or {}).items()}
    sections["train"] = {**sections.get("train", {}), "predictions_probs": True}
    return [{"branch": fold_name(i), "resized": prefix, "step_config": sections} for i, prefix in enumerate(make_folds(data, dest_root, cfg))]


def _as_split(table: pa.Table, split: str) -> pa.Table:
    """``table`` with its ``split`` column set to ``split`` (the held-out rows become the fold's val)."""
    at = table.schema.get_field_index("split")
    return table.set_column(at, table.schema.field(at), pa.array([split] * table.num_rows, pa.string()))


# ----------------------------------------------------------------------------------------
# Ranking.


def _out_of_fold(fold_models: Sequence[str]) -> pa.Table:
    """Every held-out image's prediction across the folds (``predictions.parquet`` test rows with ``probs``)."""
    tables = []
    for prefix in fold_models:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(prefix, contract.PREDICTIONS))))
        if "probs" not in table.column_names:
            raise ValueError(f"{prefix}/predictions.parquet has no probs: train the folds with predictions_probs on")
        tables.append(table.filter(pc.equal(table.column("split"), "test")))
    table = pa.concat_tables(tables)
    paths = table.column("path").to_pylist()
    if len(set(paths)) != len(paths):
        raise ValueError("the folds' held-out images overlap: they are not folds of one train split")
    return table


def rank_label_issues(fold_models: Sequence[str], dest: str, cfg: AuditConfig | None = None) -> StepReport:
    """Ranks the train images by how likely their label is wrong (cleanlab) and commits the review files.

    Args:
        fold_models: The folds' committed train outputs.
        dest: Output prefix; replaced.
        cfg: The audit settings (``filter_by``).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    cfg = cfg or AuditConfig()
    started = time.monotonic()
    dest = storage.normalize_uri(dest)
    commit.check_disjoint(dest, fold_models, "audit")
    table = _out_of_fold(fold_models)
    classes = json.loads(storage.read_bytes(storage.join(fold_models[0], contract.MODEL_CARD)))["classes"]
    labels = table.column("label").to_numpy().astype(np.int64)
    probs = np.stack(table.column("probs").to_numpy(zero_copy_only=False)).astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    # n_jobs=1: cleanlab's default forks a multiprocessing.Pool per call, and a fork from this
    # process (torch's threads, storage clients' threads) can leave the pool's children waiting on
    # a lock no thread will release: the step then hangs. The pruning is O(images) per class.
    issues = find_label_issues(labels, probs, filter_by=cfg.filter_by, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    rank = np.full(len(labels), -1, np.int64)
    rank[issues] = np.arange(len(issues))
    suggested = probs.argmax(axis=1)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    names = np.asarray(classes, dtype=object)
    out_table = pa.table(
        {
            "path": table.column("path"),
            "sha256": table.column("sha256"),
            "given_label": names[labels].tolist(),
            "suggested_label": names[suggested].tolist(),
            "label_quality": pa.array(quality.astype(np.float32)),
            "suggested_prob": pa.array(probs.max(axis=1).astype(np.float32)),
            "given_prob": pa.array(probs[np.arange(len(labels)), labels].astype(np.float32)),
            # The out-of-fold models' top-k, most probable first: a reviewer's pre-annotations (imgpipe.review).
            "top_labels": pa.array([names[r].tolist() for r in top], pa.list_(pa.string())),
            "top_probs": pa.array([probs[i, r].astype(np.float32) for i, r in enumerate(top)], pa.list_(pa.float32())),
            "is_issue": pa.array(rank >= 0),
            "issue_rank": pa.array(np.where(rank >= 0, rank, None), pa.int64()),
        }
    )
    order = np.argsort(np.where(rank >= 0, rank, len(labels) + np.argsort(np.argsort(quality))), kind="stable")
    out_table = out_table.take(pa.array(order))
    attempt = commit.claim(dest, "audit")
    suspects = out_table.slice(0, len(issues)).to_pylist()
    outputs = {
        LABEL_ISSUES: parquet.table_to_parquet_bytes(out_table),
        LABEL_OVERRIDES: _overrides_csv(suspects).encode(),  # at rest: data (paths and labels, as the dataset has them)
        LABEL_ISSUES_HTML: _gallery(suspects[:_GALLERY], fold_models, len(labels)),
    }
    files = sorted((writer.write_entry(dest, name, data) for name, data in outputs.items()), key=lambda f: f.name)
    extra = {
        "images": len(labels),
        "issues": len(issues),
        "filter_by": cfg.filter_by,
        "folds": len(fold_models),
        "by_class": dict(
            sorted(((c, int(n)) for c, n in zip(*np.unique(names[labels[issues]].astype(str), return_counts=True))), key=lambda kv: -kv[1])
        )
        if len(issues)
        else {},
    }
    body = StepReport(
        step="audit",
        dest=dest,
        inputs=len(labels),
        outputs=len(labels),
        rejected=0,
        files=files,
        seconds=round(time.monotonic() - started, 3),
        extra=extra,
    )
    commit.publish(dest, "audit", attempt, commit.manifest_body(body, cfg, {"step": "train", "folds": list(fold_models)}))
    log.info("audit: %d of %d train images have a suspect label -> %s", len(issues), len(labels), dest)
    return body


def _overrides_csv(suspects: Sequence[Mapping[str, Any]]) -> str:
    """The review file: ``path,label`` (the suggestion: edit or delete each row), then context columns clean ignores."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "given_label", "label_quality", "suggested_prob"])
    for s in suspects:
        cells = [s["path"], s["suggested_label"], s["given_label"], f"{s['label_quality']:.4f}", f"{s['suggested_prob']:.4f}"]
        writer.writerow([escape_csv_cell(str(c)) for c in cells])  # a person opens it in a spreadsheet
    return buf.getvalue()


def held_out_pictures(fold_models: Sequence[str], wanted: set[str]) -> dict[str, np.ndarray]:
    """The pictures at ``wanted`` paths as the folds' models saw them held out (``H x W x C`` uint8), by path.

    Each train image is in exactly one fold's held-out split; a path no fold holds is left out.
    """
    from imgpipe.train.partition import describe_split, read_split_columns
    from imgpipe.train.rows import read_rows

    images: dict[str, np.ndarray] = {}
    for prefix in fold_models:
        data = json.loads(storage.read_bytes(storage.join(prefix, contract.MODEL_CARD)))["data"]["uri"]
        info = describe_split(data, "test", contract.read_manifest(data))
        paths = read_split_columns(info, ["path"]).column("path").to_pylist()
        at = [i for i, p in enumerate(paths) if p in wanted]
        images.update(zip((paths[i] for i in at), read_rows(info, at)))
    return images


def _gallery(suspects: Sequence[Mapping[str, Any]], fold_models: Sequence[str], total: int) -> str:
    """The most suspect images with their given and suggested labels, as one page."""
    from imgpipe.report.training import gallery_png

    parts = [
        htmlpage.section(
            "Suspected label errors",
            note=(
                f"{len(suspects)} most suspect of {total} train images, ranked by cleanlab's self-confidence "
                f"(out-of-fold predictions of {len(fold_models)} models). Review label_overrides.csv and give it to "
                "clean as label_overrides."
            ),
        )
    ]
    if suspects:
        images = held_out_pictures(fold_models, {s["path"] for s in suspects})
        rows = [
            (f"#{i + 1}", [(images[s["path"]], f"given {s['given_label']}\nsuggested {s['suggested_label']}\nquality {s['label_quality']:.2f}")])
            for i, s in enumerate(suspects)
            if s["path"] in images
        ]
        per_row = 8
        grid = [
            (f"#{k + 1}-{min(k + per_row, len(rows))}", [img for _, imgs in rows[k : k + per_row] for img in imgs])
            for k in range(0, len(rows), per_row)
        ]
        parts.append(htmlpage.image("suspects", gallery_png(grid, cols=per_row)))
        table_rows = [{k: s[k] for k in ("path", "given_label", "suggested_label", "label_quality")} for s in suspects]
        parts.append(htmlpage.table(table_rows, ["path", "given_label", "suggested_label", "label_quality"]))
    return htmlpage.page("imgpipe label audit", parts)
