"""The resize step's report: before and after pairs, the preset and modes, the recorded statistics.

report = resize_report(prefix, manifest, limits, reader)   # through imgpipe.report.steps.build_report
"""

from __future__ import annotations

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
    Tile,
)
from imgpipe.report.parts import (
    RowGroups,
    data_files,
    pixels_tile,
    rejects_tables,
    rows_and_blobs,
    sample_table,
    step_facts,
    step_metrics,
    thumb_tiles,
    upstream,
)

__all__ = ["resize_report"]


def _resize_sample(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> list[dict]:
    """Rows from the first row group of each split's first file, spread over the splits."""
    firsts: dict[str, str] = {}
    for uri in data_files(prefix, manifest):
        firsts.setdefault(uri[len(prefix) + 1 :].split("/", 1)[0], uri)
    ordered = sorted(firsts, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    per_split = max(1, -(-limits.samples // max(1, len(firsts))))
    sample: list[dict] = []
    for uri in [firsts[s] for s in ordered][: limits.row_groups]:
        if reader.file(uri) is None:
            break
        table = reader.read(uri, 0, ("path", "label_name", "split", "order", "height", "width", "channels", "pixels", "image"))
        if table is None:
            break
        sample += table.slice(0, per_split).to_pylist()
    return sample[: limits.samples]


def _sources_by_order(manifest: Mapping[str, Any], orders: set[int], limits: ReportLimits, reader: RowGroups) -> tuple[dict[int, dict], str]:
    """Clean's rows of the given ``order`` values, found through the row groups' order statistics."""
    source, why = upstream(manifest, "clean")
    if source is None:
        return {}, why
    found: dict[int, dict] = {}
    read = 0
    for uri, rg in reader.groups(data_files(source, contract.read_manifest(source))):
        low_high = reader.range_of(uri, rg, "order")
        if low_high and not any(low_high[0] <= o <= low_high[1] for o in orders - set(found)):
            continue
        if read >= limits.row_groups:
            break
        table = reader.read(uri, rg, ("order", "image", "width", "height"))
        if table is None:
            break
        read += 1
        rows, image = rows_and_blobs(table, "image", "bytes")
        found.update((r["order"], {**r, "image": image(i)}) for i, r in enumerate(rows) if r["order"] in orders)
        if len(found) == len(orders):
            break
    return found, "" if found else "its rows were not found in the row groups read"


def _bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    """``lo-hi`` per bin of ``edges`` (each a lower bound), the last one open: ``lo+``."""
    shown = [f"{e:g}" for e in edges]
    return tuple(f"{lo}-{hi}" for lo, hi in zip(shown, shown[1:])) + (f"{shown[-1]}+",)


def _statistics_sections(stats: Mapping[str, Any] | None) -> list[Section]:
    """The data's statistics (``extra.statistics``): channel moments, source sizes and aspect ratios per split."""
    if not stats or not stats.get("splits"):
        return []
    splits = stats["splits"]
    moments = tuple(
        (name, s.get("images"), ", ".join(f"{m:.3f}" for m in s.get("mean") or []), ", ".join(f"{v:.3f}" for v in s.get("std") or []))
        for name, s in splits.items()
    )
    space = stats.get("color_space", "")
    charts: list[Section] = [Table(f"Channel mean and std ({space}, 0-1)", ("split", "images", "mean", "std"), moments)]
    for key, edges, title in (
        ("width", "size_edges", "Source widths (px)"),
        ("height", "size_edges", "Source heights (px)"),
        ("aspect", "aspect_edges", "Source aspect ratios (width / height)"),
    ):
        series = {name: tuple(int(c) for c in s.get(key) or []) for name, s in splits.items() if s.get(key)}
        if series and stats.get(edges):
            charts.append(Chart(title, _bin_labels(stats[edges]), series))
    return charts


def resize_report(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> OutputReport:
    extra, config = manifest.get("extra") or {}, manifest.get("config") or {}
    split_modes = extra.get("split_modes") or {}
    ops = list(extra.get("ops") or [])
    reject_tables, _ = rejects_tables(prefix, manifest, limits)
    sample = _resize_sample(prefix, manifest, limits, reader)
    sources, why = _sources_by_order(manifest, {int(r["order"]) for r in sample}, limits, reader)
    applied = f" +{'+'.join(ops)}" if ops else ""
    found = [sources.get(int(r["order"])) for r in sample]
    befores = iter(thumb_tiles([(s["image"], f"{s['width']}x{s['height']}") for s in found if s], limits))
    rows = []
    for r, src in zip(sample, found):
        out = pixels_tile(r, f"{r['width']}x{r['height']} {split_modes.get(r['split'], extra.get('mode'))}{applied}", limits)
        rows.append((f"{r['label_name']} ({r['split']})", (next(befores) if src else Tile(None, "source not read"), out)))
    settings = (
        ("preset", config.get("preset") or ""),
        ("size", extra.get("size")),
        ("mode", extra.get("mode")),
        ("train_mode", extra.get("train_mode")),
        ("format", extra.get("format")),
        ("ops", ", ".join(ops) or "none"),
        ("max_aspect", extra.get("max_aspect")),
    )
    written = extra.get("splits") or {}
    splits = {s: int(written[s]) for s in sorted(written, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))}
    split_rows = tuple((s, split_modes.get(s, extra.get("mode")), n) for s, n in splits.items())
    note = "source (clean) -> output" + (f"; no sources: {why}" if why else "")
    sections: list[Section] = [
        Table("Settings", ("setting", "value"), settings),
        Table("Splits", ("split", "mode", "rows"), split_rows),
        *reject_tables,
        *_statistics_sections(extra.get("statistics")),
        Gallery("Before and after", tuple(rows), note=note),
        sample_table("Sample rows", sample, ("path", "label_name", "split", "width", "height", "channels"), limits),
    ]
    facts = step_facts(manifest) + [("classes", int(extra.get("num_classes") or 0))]
    metrics = step_metrics(manifest, size=float(extra.get("size") or 0), **{f"{s}_rows": n for s, n in splits.items()})
    return OutputReport("resize", prefix, tuple(facts), metrics, tuple(sections), limits)
