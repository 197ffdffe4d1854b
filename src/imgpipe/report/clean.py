"""The clean step's report: classes per split, thumbnails per class, quality flags and near-duplicates, rejected images with their reason.

report = clean_report(prefix, manifest, limits, reader)   # through imgpipe.report.steps.build_report
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from imgpipe import contract
from imgpipe.clean.config import SPLITS
from imgpipe.report.output import (
    Chart,
    Gallery,
    OutputReport,
    ReportLimits,
    Section,
    Table,
)
from imgpipe.report.parts import (
    MIN_THUMBS,
    NEVER_DECODE,
    RejectSample,
    RowGroups,
    data_files,
    rejects_tables,
    rows_and_blobs,
    sample_table,
    step_facts,
    step_metrics,
    thumb_tiles,
    upstream,
)

__all__ = ["source_images", "clean_report"]

# Rejects looked up per thumbnail shown (some are not in the download output, or do not decode).
_REJECTS_TRIED = 4


def _class_chart(extra: Mapping[str, Any], limits: ReportLimits) -> Chart:
    """Images per class and split; past ``chart_classes`` classes the largest and smallest halves."""
    classes = list(extra.get("classes") or [])
    per_split = extra.get("per_split_class")
    if per_split:
        series = {s: [int((per_split.get(s) or {}).get(c, 0)) for c in classes] for s in SPLITS if per_split.get(s)}
        note = ""
    else:
        series = {"all splits": [int((extra.get("per_class") or {}).get(c, 0)) for c in classes]}
        note = "this output predates per-split counts: all splits together"
    if len(classes) > limits.chart_classes:
        totals = [sum(v[i] for v in series.values()) for i in range(len(classes))]
        ranked = sorted(range(len(classes)), key=lambda i: (-totals[i], classes[i]))
        half = limits.chart_classes // 2
        keep = sorted(ranked[:half] + ranked[-(limits.chart_classes - half) :])
        classes, series = [classes[i] for i in keep], {s: [v[i] for i in keep] for s, v in series.items()}
        note = (note + "; " if note else "") + f"the {half} largest and {len(keep) - half} smallest of {len(totals)} classes"
    return Chart("Images per class and split", tuple(classes), {s: tuple(v) for s, v in series.items()}, note=note)


def _class_gallery(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> tuple[Gallery, list[dict]]:
    """Thumbnails for the classes the first row groups hold (rows are shuffled), within the thumbnail budget.

    A thumbnail costs a sizeable part of clean's own work on that image (the entropy
    decoding of a JPEG is not scaled down), so an output gets at most one per
    ``thumb_share`` images (at least :data:`MIN_THUMBS`): few classes get up to
    ``per_class`` each, many classes fewer.
    """
    picked: dict[str, list[tuple[bytes, str]]] = defaultdict(list)
    sample: list[dict] = []
    read = 0
    order = {c: i for i, c in enumerate((manifest.get("extra") or {}).get("classes") or [])}
    budget = max(MIN_THUMBS, int(manifest["outputs"]) // limits.thumb_share)
    wanted = min(limits.classes, len(order) or limits.classes, budget)
    per_class = max(1, min(limits.per_class, budget // wanted))
    for uri, rg in reader.groups(data_files(prefix, manifest)):
        if read >= limits.row_groups:
            break
        table = reader.read(uri, rg, ("path", "image", "label_name", "split", "width", "height", "mode", "format"))
        if table is None:
            break
        read += 1
        rows, image = rows_and_blobs(table, "image", "bytes")
        for i, row in enumerate(rows):
            if len(sample) < limits.table_rows:
                sample.append(row)
            name = row["label_name"]
            if (name in picked or len(picked) < wanted) and len(picked[name]) < per_class:
                picked[name].append((image(i), row["split"]))
        if len(picked) >= wanted and all(len(t) >= per_class for t in picked.values()):
            break
    classes = sorted(picked, key=lambda c: (order.get(c, len(order)), c))
    tiles = iter(thumb_tiles([item for c in classes for item in picked[c]], limits))
    rows = tuple((c, tuple(next(tiles) for _ in picked[c])) for c in classes)
    note = f"{len(rows)} of {len(order)} classes, from the first {read} row group(s); captions: split"
    return Gallery("Images per class", rows, note=note), sample


def _pick_rejects(rejects: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """Rejects that may be decoded, reason by reason in turn, so every reason shows early."""
    by_reason: dict[str, list] = defaultdict(list)
    for r in rejects:
        if r["reason"] not in NEVER_DECODE:
            by_reason[r["reason"]].append(r)
    picked: list[Mapping[str, Any]] = []
    while len(picked) < count and any(by_reason.values()):
        for reason in sorted(by_reason):
            if by_reason[reason] and len(picked) < count:
                picked.append(by_reason[reason].pop(0))
    return picked


def source_images(source: str, wanted: set[str], limits: ReportLimits, reader: RowGroups) -> dict[str, bytes]:
    """The encoded images of ``wanted`` paths in the download output ``source``, from the row groups holding most of them."""
    located: dict[tuple[str, int], list[str]] = defaultdict(list)
    for uri, rg in reader.groups(data_files(source, contract.read_manifest(source))):
        low_high = reader.range_of(uri, rg, "path")
        if low_high and not any(low_high[0] <= p <= low_high[1] for p in wanted):
            continue
        paths = reader.read(uri, rg, ("path",))
        if paths is None:
            break
        for p in paths.column("path").to_pylist():
            if p in wanted:
                located[(uri, rg)].append(p)
    chosen = sorted(located, key=lambda k: -len(located[k]))[: limits.row_groups]
    found: dict[str, bytes] = {}
    for uri, rg in chosen:
        table = reader.read(uri, rg, ("path", "bytes"))
        if table is None:
            break
        rows, blob = rows_and_blobs(table, "bytes")
        found.update((r["path"], blob(i)) for i, r in enumerate(rows) if r["path"] in wanted)
    return found


def _quality_charts(extra: Mapping[str, Any]) -> list[Chart]:
    """One histogram per quality measure, from the manifest (clean measured every image)."""
    charts = []
    for name, stats in ((extra.get("quality") or {}).get("metrics") or {}).items():
        hist = stats.get("histogram") or {}
        edges, counts = hist.get("edges") or [], hist.get("counts") or []
        if not counts:
            continue
        axis = "log10 " if hist.get("log10") else ""
        labels = tuple(f"{edges[i]:.3g}..{edges[i + 1]:.3g}" for i in range(len(counts)))
        note = f"images per bin of {axis}{name}; median {stats.get('median')}"
        charts.append(Chart(f"Quality: {name}", labels, {"images": tuple(int(c) for c in counts)}, note=note))
    return charts


def _quality_tables(extra: Mapping[str, Any], limits: ReportLimits) -> list[Table]:
    """Outlier flags (kept images) and near-duplicate pairs, capped."""
    quality, near = extra.get("quality") or {}, extra.get("near_duplicates") or {}
    tables = []
    flagged = quality.get("flagged") or {}
    if any(f.get("count") for f in flagged.values()):
        rows = tuple(
            (reason, int(f.get("count") or 0), ", ".join(p.rsplit("/", 1)[-1] for p in (f.get("paths") or [])[:5]))
            for reason, f in flagged.items()
            if f.get("count")
        )[: limits.table_rows]
        note = f"robust z past {quality.get('outlier_z')}; kept unless a reject_* threshold is set"
        tables.append(Table("Flagged outliers (kept)", ("flag", "images", "most extreme"), rows, note=note))
    if near.get("groups"):
        pairs = tuple((a, b, bits) for a, b, bits in (near.get("pairs") or [])[: limits.table_rows])
        kept = "kept" if near.get("mode") == "reject" else "first of group"
        note = f"mode {near.get('mode')}, distance {near.get('distance')}: {near.get('groups', 0)} groups, {near.get('images_in_groups', 0)} images"
        tables.append(Table("Near-duplicates", (kept, "near-duplicate", "bits"), pairs, note=note))
    return tables


def _quality_gallery(manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> Gallery:
    """Near-duplicate pairs side by side (kept, other), then flagged images, from the download output."""
    title = "Near-duplicates and flagged images"
    extra = manifest.get("extra") or {}
    pairs = ((extra.get("near_duplicates") or {}).get("pairs") or [])[: limits.samples]
    flagged = [(reason, p) for reason, f in ((extra.get("quality") or {}).get("flagged") or {}).items() for p in (f.get("paths") or [])[:2]]
    flagged = flagged[: limits.samples]
    if not pairs and not flagged:
        return Gallery(title, ())
    source, why = upstream(manifest, "download")
    if source is None:
        return Gallery(title, (), note=f"no thumbnails: {why}")
    found = source_images(source, {p for pair in pairs for p in pair[:2]} | {p for _, p in flagged}, limits, reader)
    shown = [pair for pair in pairs if pair[0] in found and pair[1] in found]
    items = [(found[p], p.rsplit("/", 1)[-1]) for a, b, _ in shown for p in (a, b)]
    items += [(found[p], f"{reason}: {p.rsplit('/', 1)[-1]}") for reason, p in flagged if p in found]
    tiles = thumb_tiles(items, limits)
    rows = [(f"{bits} bits: kept | other", tuple(tiles[2 * k : 2 * k + 2])) for k, (_, _, bits) in enumerate(shown)]
    rest = tiles[2 * len(shown) :]
    if rest:
        rows.append(("flagged, kept", tuple(rest)))
    return Gallery(title, tuple(rows), note=f"{len(shown)} of {len(pairs)} pairs shown; flagged images kept")


def _reject_gallery(manifest: Mapping[str, Any], rejects: RejectSample, limits: ReportLimits, reader: RowGroups) -> Gallery:
    """Thumbnails of rejected images, from the download output they came from, where they decode at all."""
    title = "Rejected images"
    if not rejects.total:
        return Gallery(title, ())
    wanted = {r["path"]: r for r in _pick_rejects(rejects.rows, _REJECTS_TRIED * limits.rejects_shown)}
    skipped = sorted(rejects.reasons & NEVER_DECODE)
    never = f"; not decoded again: {', '.join(skipped)} (clean could not decode them, or it is unsafe)" if skipped else ""
    source, why = upstream(manifest, "download")
    if source is None:
        return Gallery(title, (), note=f"no thumbnails: {why}")
    found = source_images(source, set(wanted), limits, reader)
    shown = [r for r in wanted.values() if r["path"] in found][: limits.rejects_shown]
    tiles = tuple(thumb_tiles([(found[r["path"]], f"{r['reason']}: {r['path'].rsplit('/', 1)[-1]}") for r in shown], limits))
    note = f"{len(tiles)} of {rejects.total} rejects{never}"
    return Gallery(title, (("rejected", tiles),) if tiles else (), note=note)


def clean_report(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> OutputReport:
    extra = manifest.get("extra") or {}
    splits = {s: int((extra.get("splits") or {}).get(s, 0)) for s in SPLITS}
    reject_tables, rejects = rejects_tables(prefix, manifest, limits, per_reason=_REJECTS_TRIED * limits.rejects_shown)
    gallery, sample = _class_gallery(prefix, manifest, limits, reader)
    facts = step_facts(manifest) + [
        ("label source", extra.get("label_source")),
        ("classes", int(extra.get("num_classes") or 0)),
        *((f"{s} images", n) for s, n in splits.items()),
        ("carried from a previous run", int(extra.get("carried") or 0)),
    ]
    columns = ("path", "label_name", "split", "width", "height", "mode", "format")
    sections: list[Section] = [
        *reject_tables,
        _class_chart(extra, limits),
        gallery,
        _reject_gallery(manifest, rejects, limits, reader),
        *_quality_tables(extra, limits),
        *_quality_charts(extra),
        _quality_gallery(manifest, limits, reader),
        sample_table("Sample rows", sample, columns, limits),
    ]
    near = extra.get("near_duplicates") or {}
    flagged = (extra.get("quality") or {}).get("flagged") or {}
    more = {
        "classes": int(extra.get("num_classes") or 0),
        "carried": int(extra.get("carried") or 0),
        "near_duplicate_groups": int(near.get("groups") or 0),
        **{f"flagged_{reason}": int(f.get("count") or 0) for reason, f in flagged.items()},
    }
    metrics = step_metrics(manifest, **more, **{f"{s}_images": n for s, n in splits.items()})
    return OutputReport("clean", prefix, tuple(facts), metrics, tuple(sections), limits)
