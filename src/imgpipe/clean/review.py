"""After the decode pass, before the write pass: quality rejects, outlier flags and near-duplicate groups.

Why here: the split and the shuffled ``order`` are drawn in the plan, from metadata, before
any image is decoded (:mod:`imgpipe.clean.plan`), and the decode workers already write each
usable row into its output shard's bucket file, split included. Whether an image is an
outlier or a near-duplicate of another is known only once every image is measured. So
the decode pass measures (:func:`imgpipe.clean.quality.measure`, per-row arrays in
:class:`imgpipe.clean.tasks.TaskResult`), and :func:`review` decides over the whole set, as
arrays: which written rows to drop and which to move to another split. The write pass
(:func:`imgpipe.steps.clean._write_shards`) already re-reads every bucket in ``order`` and
renumbers the rows; it now also leaves out the dropped rows and takes each row's split
from :attr:`Review.split_by_order`, both looked up by the row's planned ``order``. Nothing
is decoded or written twice, and the step holds two bytes per image more (no Python object
per image but the rejects, as before).

**No group spans splits.** With ``near_duplicates: reject`` a group keeps one image, so it
is in one split by construction. With ``group`` every member takes the split of the
group's first image (a carried image first: it keeps its split across runs, and so do
the new images of its group), so the whole group lands in one split.

Precedence of the reject reasons: decode failures, then the plan's (``no_label``,
``duplicate``), then ``blank`` and the configured outliers (:data:`imgpipe.clean.quality.OUTLIERS`),
then ``near_duplicate``, among the images still kept: a kept image never names a
rejected one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from imgpipe.clean.config import CleanConfig
from imgpipe.clean.neardup import group_representatives, hamming
from imgpipe.clean.plan import Index, Plan
from imgpipe.clean.quality import BLANK, MEASURES_VERSION, METRICS, OUTLIERS, assess, histogram
from imgpipe.clean.tasks import TaskResult
from imgpipe.contract import Reject

__all__ = ["NEAR_DUPLICATE", "REPORTED", "Review", "measures_current", "review"]

# Reject code of an image within near_duplicate_distance of an image that is kept.
NEAR_DUPLICATE = "near_duplicate"

# Paths (flagged images of one kind, near-duplicate pairs) the manifest lists at most.
REPORTED = 50

# Measures whose histogram is drawn on a log10 axis (heavy-tailed).
_LOG_HISTOGRAM = ("blur", "aspect_ratio")


@dataclass(frozen=True)
class Review:
    """What :func:`review` decided, for the tally, the write pass and the manifest.

    Attributes:
        settled: The decode results with ``shard`` -1 for the rows rejected here.
        rejects: Those rows' rejects.
        split_by_order: The split code of each planned ``order`` (moved rows included).
        dropped_by_order: Whether each planned ``order``'s row was rejected here.
        summary: The manifest's ``quality`` and ``near_duplicates`` sections.
    """

    settled: TaskResult
    rejects: list[Reject]
    split_by_order: np.ndarray
    dropped_by_order: np.ndarray
    summary: dict[str, Any]


def measures_current(extra: dict[str, Any] | None) -> bool:
    """Whether a clean output's manifest ``extra`` (its :attr:`Review.summary` among it) holds measures of :data:`MEASURES_VERSION`."""
    return ((extra or {}).get("quality") or {}).get("version") == MEASURES_VERSION


def _outlier_detail(k: int, value: float, z: float, limit: float, median: float) -> str:
    o = OUTLIERS[k]
    return f"{o.metric} {value:.4g} (dataset median {median:.4g}): robust z {z:.1f} past reject_{o.reason} {limit:g}"


def review(settled: TaskResult, index: Index, plan: Plan, cfg: CleanConfig) -> Review:
    """Rejects blank images and the configured outliers, and settles near-duplicate groups.

    Args:
        settled: Every decoded (and carried) row's results, with hashes and metrics.
        index: The input rows (for paths).
        plan: The plan; in ``group`` mode its ``split`` is updated for the moved rows.
        cfg: The clean config.
    """
    written = np.flatnonzero(settled.shard >= 0)
    rows = settled.rows[written]
    metrics = settled.metrics[written]
    quality = assess(metrics, cfg.blank_std, cfg.outlier_z, cfg.reject_z())
    medians = {name: float(np.median(metrics[:, k])) if len(metrics) else 0.0 for k, name in enumerate(METRICS)}
    rejects: list[Reject] = []
    for at in np.flatnonzero(quality.reason >= 0).tolist():
        reason = quality.reasons[quality.reason[at]]
        if reason == BLANK:
            detail = f"grey std {metrics[at, METRICS.index('contrast')]:.3g} < blank_std {cfg.blank_std:g}: no contrast"
        else:
            k = quality.reason[at] - 1
            value = float(metrics[at, METRICS.index(OUTLIERS[k].metric)])
            limit = cfg.reject_z()[OUTLIERS[k].reason]
            detail = _outlier_detail(k, value, float(quality.z[at, k]), limit, medians[OUTLIERS[k].metric])
        rejects.append(Reject(index.path(rows[at]), reason, detail))
    dropped = quality.reason >= 0

    near = _near_duplicates(settled, written, dropped, plan, cfg)
    members, leads, bits = near["members"], near["leads"], near["bits"]
    moved = int((plan.split[rows[members]] != plan.split[rows[leads]]).sum())
    if cfg.near_duplicates == "reject":
        for at, kept_at, distance in zip(members.tolist(), leads.tolist(), bits.tolist()):
            kept = index.path(rows[kept_at])
            rejects.append(Reject(index.path(rows[at]), NEAR_DUPLICATE, f"{distance} bits from {kept} (pHash), which is kept"))
        dropped[members] = True
    else:  # group (or off: no members): the group's split is its first image's
        plan.split[rows[members]] = plan.split[rows[leads]]

    shard = settled.shard.copy()
    shard[written[dropped]] = -1
    split_by_order = np.full(plan.planned, -1, np.int8)
    placed = plan.order >= 0
    split_by_order[plan.order[placed]] = plan.split[placed]
    dropped_by_order = np.zeros(plan.planned, bool)
    dropped_by_order[plan.order[rows[dropped]]] = True

    kept_flags = quality.flagged & ~dropped[:, None]
    flagged: dict[str, dict[str, Any]] = {}
    for k, outlier in enumerate(OUTLIERS):
        hits = np.flatnonzero(kept_flags[:, k])
        worst = hits[np.argsort(-quality.z[hits, k], kind="stable")][:REPORTED]
        flagged[outlier.reason] = {
            "count": int(len(hits)),
            "paths": [index.path(rows[at]) for at in worst.tolist()],
            "z": [round(float(quality.z[at, k]), 2) for at in worst.tolist()],
        }
    summary = {
        "quality": {
            "version": MEASURES_VERSION,
            "outlier_z": cfg.outlier_z,
            "blank_std": cfg.blank_std,
            "reject_z": cfg.reject_z(),
            "measured": int(len(written)),
            "flagged": flagged,
            "metrics": {
                name: {
                    "median": round(medians[name], 4),
                    "histogram": histogram(metrics[:, k], log=name in _LOG_HISTOGRAM),
                }
                for k, name in enumerate(METRICS)
            },
        },
        "near_duplicates": {
            "mode": cfg.near_duplicates,
            "distance": cfg.near_duplicate_distance,
            "groups": int(len(np.unique(leads))),
            "images_in_groups": int(len(members) + len(np.unique(leads))),
            "moved_split": moved if cfg.near_duplicates == "group" else 0,
            # (kept or first, other, bits): the report shows them side by side.
            "pairs": [
                [index.path(rows[kept_at]), index.path(rows[at]), distance]
                for at, kept_at, distance in zip(members[:REPORTED].tolist(), leads[:REPORTED].tolist(), bits[:REPORTED].tolist())
            ],
        },
    }
    return Review(replace(settled, shard=shard), rejects, split_by_order, dropped_by_order, summary)


def _near_duplicates(settled: TaskResult, written: np.ndarray, dropped: np.ndarray, plan: Plan, cfg: CleanConfig) -> dict[str, np.ndarray]:
    """Near-duplicates among the written rows not ``dropped``: each non-first member, its group's first, and their distance.

    Positions are into ``written``. A group's first image is a carried one if any (it keeps
    its split across runs), then the first in the shuffled ``order``.
    """
    empty = np.zeros(0, np.int64)
    if cfg.near_duplicates == "off":
        return {"members": empty, "leads": empty, "bits": empty}
    alive = np.flatnonzero(~dropped)
    rows = settled.rows[written[alive]]
    ranked = alive[np.lexsort((plan.order[rows], ~plan.carried[rows]))]
    h, m = settled.phash[written[ranked]], settled.phash_mirror[written[ranked]]
    first = group_representatives(h, m, cfg.near_duplicate_distance)
    others = np.flatnonzero(first != np.arange(len(ranked)))
    bits = np.minimum(hamming(h[others], h[first[others]]), hamming(h[others], m[first[others]]))
    return {"members": ranked[others], "leads": ranked[first[others]], "bits": bits}
