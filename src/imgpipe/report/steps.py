"""What a committed step output holds, for people: the Kubeflow UI's Metrics and HTML, and ``imgpipe show``.

:func:`build_report` reads any step's committed prefix and returns an
:class:`OutputReport`: scalar metrics (the kfp ``Metrics`` artifact), headline facts,
tables, class histograms and thumbnail galleries, rendered as one self-contained HTML
page (:meth:`OutputReport.html`, the kfp ``HTML`` artifact and ``imgpipe show --html``),
as aligned plain text (:meth:`OutputReport.text`, ``imgpipe show``) or as a PNG grid
(:meth:`OutputReport.grid_png`, ``imgpipe show --grid``). The component and the command
line share it, so the UI and the terminal say the same thing.

Bounded whatever the dataset size: a report reads the manifest, the rejects table and a
sample of row groups (at most :attr:`ReportLimits.row_groups` per gallery, all reads
within :attr:`ReportLimits.read_bytes`, footers of at most :attr:`ReportLimits.files`
files), shows small JPEG thumbnails and caps every table and chart, so a step's report
costs about the same on 700 images or 7 million and stays far below 2 MB.

Text from the data (paths, class names, reject details) is escaped by
:mod:`imgpipe.report.html` in the page and stripped of control characters in the terminal.
Pillow draws and encodes the pictures and charts are inline SVG: the cpu image
(download, clean) has no matplotlib. Train writes its own ``report.html``; its report
here is that page plus a summary of its metrics.
"""

from __future__ import annotations

import io
import json
import math
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from imgpipe import contract, resources, storage
from imgpipe.data.images import ImageRejected, thumbnail
from imgpipe.report import html as htmlpage

__all__ = [
    "TRAIN_METRICS",
    "ReportLimits",
    "Table",
    "Chart",
    "Tile",
    "Gallery",
    "OutputReport",
    "build_report",
    "text_table",
    "train_metrics",
]

# The final scalars of a train manifest that the UI shows (manifest["metrics"]).
TRAIN_METRICS = ("val_accuracy", "val_macro_f1", "val_pr_auc", "val_loss", "test_accuracy", "test_tta_accuracy", "train_loss")
SPLITS = ("train", "val", "test")
# Rejects never decoded again for a thumbnail: a decompression bomb, or an image whose
# decode hung or killed its process in clean, would do the same here; clean's own decoder
# (the same Pillow, imgpipe.data.images) already failed on the others, or refused their format
# (unsupported_format: no decoder of that format may see the file).
_NEVER_DECODE = frozenset({"too_large", "decode_timeout", "decoder_killed", "not_an_image", "unsupported_format", "corrupt", "truncated"})
# Thumbnails clean's grid may always show, whatever thumb_share allows (tiny outputs).
_MIN_THUMBS = 12
# Threads that decode thumbnails: Pillow releases the GIL while it decodes and resizes.
_THUMB_THREADS = 4


@dataclass(frozen=True)
class ReportLimits:
    """How much a report reads and shows; the bounds that keep it small and cheap.

    Attributes:
        thumb_side: Longest side of a thumbnail, in pixels.
        thumb_quality: JPEG quality of the inlined thumbnails.
        per_class: Thumbnails per class in clean's grid.
        classes: Classes in clean's grid.
        thumb_share: Images of an output per thumbnail of clean's grid, at most (a
            thumbnail costs a part of what cleaning that image did).
        chart_classes: Classes in a histogram; past it, the largest and smallest half each.
        samples: Thumbnails of download's sample and resize's before/after pairs.
        rejects_shown: Thumbnails of rejected images.
        table_rows: Rows of a listing (rejected paths, sample rows).
        text_width: Characters of a path, class name or detail shown.
        row_groups: Row groups one gallery reads at most.
        files: Data files whose footers one report opens at most.
        read_bytes: Compressed bytes of row groups one report reads at most.
        max_pixels: Largest image (width*height) decoded for a thumbnail.
    """

    thumb_side: int = 80
    thumb_quality: int = 70
    per_class: int = 4
    classes: int = 40
    thumb_share: int = 10
    chart_classes: int = 60
    samples: int = 12
    rejects_shown: int = 12
    table_rows: int = 50
    text_width: int = 80
    row_groups: int = 3
    files: int = 32
    read_bytes: int = 64 << 20
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReportLimits.{name} must be an integer >= 1, got {value!r}")
        if self.thumb_quality > 95:
            raise ValueError(f"ReportLimits.thumb_quality must be within 1..95, got {self.thumb_quality}")


@dataclass(frozen=True)
class Table:
    """A titled table of plain values (escaped when rendered)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Chart:
    """Counts per category (class), one series per split: a histogram in the page, a table in text."""

    title: str
    categories: tuple[str, ...]
    series: dict[str, tuple[int, ...]]
    note: str = ""


@dataclass(frozen=True)
class Tile:
    """One picture of a gallery and its caption; ``picture`` is ``None`` when it does not decode."""

    picture: Image.Image | None
    caption: str


@dataclass(frozen=True)
class Gallery:
    """Rows of thumbnails, each row with a label (a class, a sampled row)."""

    title: str
    rows: tuple[tuple[str, tuple[Tile, ...]], ...]
    note: str = ""


Section = Table | Chart | Gallery


@dataclass(frozen=True)
class OutputReport:
    """What :func:`build_report` found in one committed output.

    Attributes:
        step: The step that wrote it.
        prefix: The output prefix.
        facts: Headline name -> value pairs (counts, settings, checksums).
        metrics: Scalars for the kfp ``Metrics`` artifact.
        sections: Tables, charts and galleries, in page order.
        limits: The bounds it was built with (thumbnail size and quality).
        page: A page the step wrote itself (train's ``report.html``), shown instead of
            the sections.
        picture: A PNG the step wrote itself (train's ``augmentations.png``), the grid
            when there is no gallery.
    """

    step: str
    prefix: str
    facts: tuple[tuple[str, Any], ...]
    metrics: dict[str, float]
    sections: tuple[Section, ...]
    limits: ReportLimits = field(default_factory=ReportLimits)
    page: str | None = None
    picture: bytes | None = None

    @property
    def title(self) -> str:
        """The page title."""
        return f"imgpipe {self.step} output"

    def html(self) -> str:
        """The self-contained page: the step's own (train) or facts, tables, charts and galleries."""
        if self.page is not None:
            return self.page
        facts = htmlpage.table([{"": k, "value": v} for k, v in self.facts], ["", "value"])
        parts = [htmlpage.section("Summary", facts)]
        parts += [_section_html(s, self.limits) for s in self.sections]
        return htmlpage.page(self.title, parts)

    def text(self, max_rows: int = 10) -> str:
        """The terminal summary: facts, then every table and chart as aligned text (galleries left out)."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        width = self.limits.text_width
        lines = [f"{self.title}: {_printable(self.prefix, 400)}", ""]
        lines += text_table(("", ""), self.facts, width=width, header=False)
        for section in self.sections:
            if isinstance(section, Gallery):
                continue
            columns, rows = _as_rows(section)
            lines += ["", section.title + (f" ({section.note})" if section.note else "")]
            lines += text_table(columns, rows[:max_rows], width=width) if rows else ["(none)"]
            if len(rows) > max_rows:
                lines.append(f"... {len(rows) - max_rows} more")
        return "\n".join(lines)

    def grid_png(self) -> bytes:
        """A PNG of the galleries (or the step's own picture).

        Raises:
            ValueError: If the output has no pictures to show.
        """
        galleries = [s for s in self.sections if isinstance(s, Gallery) and s.rows]
        if galleries:
            return _draw_grid(galleries, self.limits)
        if self.picture is not None:
            return self.picture
        raise ValueError(f"{self.prefix}: this {self.step} output has no pictures to show (no decodable sample)")


def build_report(prefix: str, limits: ReportLimits | None = None) -> OutputReport:
    """Builds the report of the committed output at ``prefix`` (download, clean, resize or train).

    Raises:
        UncommittedOutputError: If ``prefix`` holds no committed output (no ``_SUCCESS``).
        ValueError: If it is another kind of output, or damaged.
        TypeError: If ``limits`` is not a :class:`ReportLimits`.
    """
    limits = ReportLimits() if limits is None else limits
    if not isinstance(limits, ReportLimits):
        raise TypeError(f"limits must be a ReportLimits, got {type(limits).__name__}")
    prefix = storage.normalize_uri(prefix)
    manifest = contract.read_manifest(prefix)
    builder = _BUILDERS.get(manifest.get("step"))
    if builder is None:
        raise ValueError(f"{prefix} holds a {manifest.get('step')!r} output; reports exist for {', '.join(_BUILDERS)} outputs")
    with _RowGroups(limits) as reader:
        return builder(prefix, manifest, limits, reader)


def train_metrics(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of a train manifest the UI shows: the final metrics that are set, and ``epochs_run``."""
    final = manifest.get("metrics") or {}
    found = {k: float(final[k]) for k in TRAIN_METRICS if final.get(k) is not None}
    return {**found, "epochs_run": float(manifest.get("epochs_run") or 0)}


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int = 60, header: bool = True) -> list[str]:
    """Aligned plain-text lines of a table: numbers right-aligned, text left, each cell cut to ``width``.

    Cells are made printable first (control characters escaped), so a hostile name cannot
    move the cursor or recolour the terminal.
    """
    cells = [[_printable(_fmt(v), width) for v in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(columns))]
    shown = [[_printable(c, width) for c in columns], *cells] if header else cells
    widths = [max((len(r[i]) for r in shown), default=0) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(shown[0]), "  ".join("-" * w for w in widths)] if header else []
    return out + [line(r) for r in cells]


# ---------------------------------------------------------------------------- reading


class _RowGroups:
    """Reads a bounded sample of Parquet row groups: footers of few files, bytes within one budget."""

    def __init__(self, limits: ReportLimits) -> None:
        self.left = limits.read_bytes
        self._files_left = limits.files
        self._open: dict[str, pq.ParquetFile] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _RowGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.close()

    def file(self, uri: str) -> pq.ParquetFile | None:
        """The file's reader (its footer read once), or ``None`` past the file cap."""
        if uri not in self._open:
            if self._files_left < 1:
                return None
            self._files_left -= 1
            fs, path = storage.arrow_filesystem(uri)
            handle = fs.open_input_file(path)
            self._handles.append(handle)
            self._open[uri] = pq.ParquetFile(handle)
        return self._open[uri]

    def groups(self, uris: Sequence[str]) -> Iterator[tuple[str, int]]:
        """``(uri, row group)`` in file order, as far as the file cap reaches."""
        for uri in uris:
            pf = self.file(uri)
            if pf is None:
                return
            yield from ((uri, rg) for rg in range(pf.metadata.num_row_groups))

    def range_of(self, uri: str, rg: int, column: str) -> tuple[Any, Any] | None:
        """The min and max a row group's statistics record for ``column``, if they do."""
        meta = self._open[uri].metadata.row_group(rg)
        for j in range(meta.num_columns):
            chunk = meta.column(j)
            if chunk.path_in_schema == column and chunk.statistics is not None and chunk.statistics.has_min_max:
                return chunk.statistics.min, chunk.statistics.max
        return None

    def read(self, uri: str, rg: int, columns: Sequence[str]) -> pa.Table | None:
        """The row group's ``columns`` (those the file has), or ``None`` when over the byte budget."""
        pf = self._open[uri]
        present = [c for c in columns if c in pf.schema_arrow.names]
        meta = pf.metadata.row_group(rg)
        cost = sum(meta.column(j).total_compressed_size for j in range(meta.num_columns) if meta.column(j).path_in_schema.split(".")[0] in present)
        if cost > self.left:
            return None
        self.left -= cost
        return pf.read_row_group(rg, columns=present)


def _rows_and_blobs(table: pa.Table, column: str, field: str | None = None) -> tuple[list[dict], Callable[[int], Any]]:
    """``table``'s rows without ``column``, and a getter of row i's ``column`` (its ``field``).

    A row group holds up to 64 MiB of images: only the rows a report uses become Python bytes.
    """
    values = table.column(column).combine_chunks()
    values = values.field(field) if field else values
    return table.drop_columns([column]).to_pylist(), lambda i: values[i].as_py()


def _data_files(prefix: str, manifest: Mapping[str, Any]) -> list[str]:
    return [u for u in contract.data_files(prefix, manifest) if u.endswith(".parquet")]


def _upstream(manifest: Mapping[str, Any], step: str) -> tuple[str | None, str]:
    """The committed upstream output of ``step`` this one was made from, or ``None`` and why not."""
    source = (manifest.get("upstream") or {}).get("source")
    if not source:
        return None, f"the manifest names no {step} output it was made from"
    try:
        contract.read_manifest(source, expect_step=step)
    except (ValueError, FileNotFoundError) as exc:
        return None, f"its {step} output is not readable any more ({exc})"
    return source, ""


# ---------------------------------------------------------------------------- pictures


def _tile(data: bytes | None, caption: str, limits: ReportLimits) -> Tile:
    if data is None:
        return Tile(None, caption)
    try:
        return Tile(thumbnail(data, limits.thumb_side, limits.max_pixels), caption)
    except ImageRejected as exc:
        return Tile(None, f"{caption}: does not decode ({exc.reason})")


def _tiles(items: Sequence[tuple[bytes | None, str]], limits: ReportLimits) -> list[Tile]:
    """Thumbnails of encoded images (``(bytes, caption)`` each), in order, on the step's CPUs."""
    threads = min(_THUMB_THREADS, resources.available_cpus(), max(1, len(items)))
    if threads == 1:
        return [_tile(data, caption, limits) for data, caption in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="imgpipe-thumb") as pool:
        return list(pool.map(lambda item: _tile(*item, limits), items))


def _pixels_tile(row: Mapping[str, Any], caption: str, limits: ReportLimits) -> Tile:
    """A resize output row's picture: raw ``pixels`` (HWC uint8) or a JPEG ``image``."""
    if row.get("pixels") is None:
        return _tile((row.get("image") or {}).get("bytes"), caption, limits)
    shape = (int(row["height"]), int(row["width"]), int(row["channels"]))
    pixels = np.frombuffer(row["pixels"], dtype=np.uint8)
    if pixels.size != math.prod(shape) or shape[2] not in (1, 3):
        return Tile(None, f"{caption}: {pixels.size} bytes do not make {shape[0]}x{shape[1]}x{shape[2]}")
    array = pixels.reshape(shape)
    picture = Image.fromarray(array[:, :, 0] if shape[2] == 1 else array, "L" if shape[2] == 1 else "RGB")
    picture.thumbnail((limits.thumb_side, limits.thumb_side), Image.Resampling.BILINEAR)
    return Tile(picture, caption)


def _jpeg(picture: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _draw_grid(galleries: Sequence[Gallery], limits: ReportLimits) -> bytes:
    """The galleries as one PNG: a title bar each, then one row per labelled row of tiles."""
    cell, label_w, caption_h, title_h = limits.thumb_side + 8, 160, 14, 22
    columns = max(len(tiles) for g in galleries for _, tiles in g.rows)
    height = sum(title_h + len(g.rows) * (cell + caption_h) for g in galleries)
    canvas = Image.new("RGB", (label_w + columns * cell, height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    y = 0
    for gallery in galleries:
        draw.rectangle((0, y, canvas.width, y + title_h - 4), fill="#eeeeee")
        title = f"{gallery.title}: {gallery.note}" if gallery.note else gallery.title
        draw.text((4, y + 3), _ascii(title, canvas.width // 6), fill="black", font=font)
        y += title_h
        for label, tiles in gallery.rows:
            draw.text((4, y + cell // 2 - 6), _ascii(label, 24), fill="black", font=font)
            for k, tile in enumerate(tiles):
                x = label_w + k * cell
                if tile.picture is None:
                    draw.rectangle((x + 4, y + 4, x + cell - 4, y + cell - 4), outline="#999999")
                else:
                    canvas.paste(tile.picture.convert("RGB"), (x + 4, y + 4))
                draw.text((x + 4, y + cell), _ascii(tile.caption, cell // 6), fill="#333333", font=font)
            y += cell + caption_h
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- rendering


def _section_html(section: Section, limits: ReportLimits) -> str:
    if isinstance(section, Table):
        rows = [dict(zip(section.columns, (_clip(v, limits.text_width) for v in row))) for row in section.rows]
        return htmlpage.section(section.title, htmlpage.table(rows, section.columns), note=section.note)
    if isinstance(section, Chart):
        svg = htmlpage.bar_chart_svg(section.categories, section.series)
        return htmlpage.section(section.title, svg, note=section.note)
    body = []
    for label, tiles in section.rows:
        cells = "".join(f"<td>{_tile_html(t, limits)}</td>" for t in tiles)
        body.append(f"<tr><th>{htmlpage.text(htmlpage.clip(label, limits.text_width))}</th>{cells}</tr>")
    return htmlpage.section(section.title, f"<table class='grid'>{''.join(body)}</table>", note=section.note)


def _tile_html(tile: Tile, limits: ReportLimits) -> str:
    caption = htmlpage.text(htmlpage.clip(tile.caption, limits.text_width))
    if tile.picture is None:
        return caption
    return htmlpage.image(tile.caption, _jpeg(tile.picture, limits.thumb_quality), "image/jpeg") + caption


def _as_rows(section: Table | Chart) -> tuple[Sequence[str], list[tuple[Any, ...]]]:
    if isinstance(section, Table):
        return section.columns, list(section.rows)
    names = list(section.series)
    return ("class", *names), [(c, *(section.series[n][i] for n in names)) for i, c in enumerate(section.categories)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clip(value: Any, width: int) -> Any:
    return value if _is_number(value) else htmlpage.clip(_fmt(value), width)


def _printable(value: Any, width: int = 60) -> str:
    """``value`` for a terminal: control and format characters escaped, cut to ``width``."""
    chars = (c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii") for c in str(value))
    return htmlpage.clip("".join(chars), width)


def _ascii(value: Any, width: int) -> str:
    """``value`` for Pillow's default font, which may lack most glyphs: printable ASCII, cut."""
    return htmlpage.clip(_printable(value, 10 * width).encode("ascii", "replace").decode("ascii"), width)


# ---------------------------------------------------------------------------- shared parts


def _facts(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("step", manifest.get("step")),
        ("prefix", manifest.get("dest")),
        ("created", manifest.get("created_at", "")),
        ("inputs", int(manifest["inputs"])),
        ("outputs", int(manifest["outputs"])),
        ("rejected", int(manifest["rejected"])),
        ("seconds", float(manifest.get("seconds") or 0.0)),
    ]


def _metrics(manifest: Mapping[str, Any], **more: float) -> dict[str, float]:
    counts = {k: float(manifest[k]) for k in ("inputs", "outputs", "rejected")}
    counts["seconds"] = float(manifest.get("seconds") or 0.0)
    reasons = {f"rejected_{r}": float(n) for r, n in sorted((manifest.get("rejects_by_reason") or {}).items())}
    return {**counts, **{k: float(v) for k, v in more.items()}, **reasons}


def _reject_tables(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits) -> tuple[list[Table], list[dict]]:
    """Rejects by reason (from the manifest) and the first rejected rows; returns them and all reject rows."""
    by_reason = sorted((manifest.get("rejects_by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    tables = [Table("Rejects by reason", ("reason", "count"), tuple(by_reason))]
    rejects = contract.read_rejects(prefix).to_pylist() if manifest.get("rejected") else []
    if rejects:
        rows = tuple((r["path"], r["reason"], r["detail"] or "") for r in rejects[: limits.table_rows])
        note = f"first {len(rows)} of {len(rejects)}" if len(rejects) > len(rows) else ""
        tables.append(Table("Rejected", ("path", "reason", "detail"), rows, note=note))
    return tables, rejects


def _sample_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], limits: ReportLimits) -> Table:
    shown = tuple(tuple(r.get(c) for c in columns) for r in rows[: limits.table_rows])
    return Table(title, tuple(columns), shown, note="a sample of the first row groups")


# ---------------------------------------------------------------------------- download


def _download(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> OutputReport:
    extra = manifest.get("extra") or {}
    sources = list(extra.get("sources") or [])
    source_rows = tuple((s.get("uri"), s.get("format"), s.get("sha256") or "", s.get("bytes")) for s in sources)
    reject_tables, _ = _reject_tables(prefix, manifest, limits)
    sample: list[dict] = []
    pictures: list[tuple[bytes, str]] = []
    for k, (uri, rg) in enumerate(reader.groups(_data_files(prefix, manifest))):
        table = reader.read(uri, rg, ("path", "bytes", "size", "sha256")) if k < limits.row_groups else None
        if table is None:
            break
        rows, blob = _rows_and_blobs(table, "bytes")
        for i, row in enumerate(rows):
            sample.append({**row, "sha256": row["sha256"][:16]})
            if len(pictures) < limits.samples:
                pictures.append((blob(i), row["path"].rsplit("/", 1)[-1]))
        if len(pictures) >= limits.samples or len(sample) >= limits.table_rows:
            break
    tiles = _tiles(pictures, limits)
    archive_bytes = sum(int(s.get("bytes") or 0) for s in sources)
    facts = _facts(manifest) + [
        ("bytes extracted", int(extra.get("bytes_extracted") or 0)),
        ("archive bytes", archive_bytes),
        *((f"sha256 of {s.get('uri')}", s.get("sha256") or "(directory)") for s in sources),
    ]
    sections: list[Section] = [
        Table("Sources", ("uri", "format", "sha256", "bytes"), source_rows),
        *reject_tables,
        _sample_table("Sample members", sample, ("path", "size", "sha256"), limits),
        Gallery("Sample members", (("members", tuple(tiles)),) if tiles else (), note="the first members of the output"),
    ]
    metrics = _metrics(manifest, bytes_extracted=float(extra.get("bytes_extracted") or 0), archive_bytes=archive_bytes, sources=len(sources))
    return OutputReport("download", prefix, tuple(facts), metrics, tuple(sections), limits)


# ---------------------------------------------------------------------------- clean


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


def _class_gallery(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> tuple[Gallery, list[dict]]:
    """Thumbnails for the classes the first row groups hold (rows are shuffled), within the thumbnail budget.

    A thumbnail costs a sizeable part of clean's own work on that image (the entropy
    decoding of a JPEG is not scaled down), so an output gets at most one per
    ``thumb_share`` images (at least :data:`_MIN_THUMBS`): few classes get up to
    ``per_class`` each, many classes fewer.
    """
    picked: dict[str, list[tuple[bytes, str]]] = defaultdict(list)
    sample: list[dict] = []
    read = 0
    order = {c: i for i, c in enumerate((manifest.get("extra") or {}).get("classes") or [])}
    budget = max(_MIN_THUMBS, int(manifest["outputs"]) // limits.thumb_share)
    wanted = min(limits.classes, len(order) or limits.classes, budget)
    per_class = max(1, min(limits.per_class, budget // wanted))
    for uri, rg in reader.groups(_data_files(prefix, manifest)):
        if read >= limits.row_groups:
            break
        table = reader.read(uri, rg, ("path", "image", "label_name", "split", "width", "height", "mode", "format"))
        if table is None:
            break
        read += 1
        rows, image = _rows_and_blobs(table, "image", "bytes")
        for i, row in enumerate(rows):
            if len(sample) < limits.table_rows:
                sample.append(row)
            name = row["label_name"]
            if (name in picked or len(picked) < wanted) and len(picked[name]) < per_class:
                picked[name].append((image(i), row["split"]))
        if len(picked) >= wanted and all(len(t) >= per_class for t in picked.values()):
            break
    classes = sorted(picked, key=lambda c: (order.get(c, len(order)), c))
    tiles = iter(_tiles([item for c in classes for item in picked[c]], limits))
    rows = tuple((c, tuple(next(tiles) for _ in picked[c])) for c in classes)
    note = f"{len(rows)} of {len(order)} classes, from the first {read} row group(s); captions: split"
    return Gallery("Images per class", rows, note=note), sample


def _pick_rejects(rejects: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """Rejects that may be decoded, reason by reason in turn, so every reason shows early."""
    by_reason: dict[str, list] = defaultdict(list)
    for r in rejects:
        if r["reason"] not in _NEVER_DECODE:
            by_reason[r["reason"]].append(r)
    picked: list[Mapping[str, Any]] = []
    while len(picked) < count and any(by_reason.values()):
        for reason in sorted(by_reason):
            if by_reason[reason] and len(picked) < count:
                picked.append(by_reason[reason].pop(0))
    return picked


def _source_images(source: str, wanted: set[str], limits: ReportLimits, reader: _RowGroups) -> dict[str, bytes]:
    """The encoded images of ``wanted`` paths in the download output ``source``, from the row groups holding most of them."""
    located: dict[tuple[str, int], list[str]] = defaultdict(list)
    for uri, rg in reader.groups(_data_files(source, contract.read_manifest(source))):
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
        rows, blob = _rows_and_blobs(table, "bytes")
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


def _quality_gallery(manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> Gallery:
    """Near-duplicate pairs side by side (kept, other), then flagged images, from the download output."""
    title = "Near-duplicates and flagged images"
    extra = manifest.get("extra") or {}
    pairs = ((extra.get("near_duplicates") or {}).get("pairs") or [])[: limits.samples]
    flagged = [(reason, p) for reason, f in ((extra.get("quality") or {}).get("flagged") or {}).items() for p in (f.get("paths") or [])[:2]]
    flagged = flagged[: limits.samples]
    if not pairs and not flagged:
        return Gallery(title, ())
    source, why = _upstream(manifest, "download")
    if source is None:
        return Gallery(title, (), note=f"no thumbnails: {why}")
    found = _source_images(source, {p for pair in pairs for p in pair[:2]} | {p for _, p in flagged}, limits, reader)
    shown = [pair for pair in pairs if pair[0] in found and pair[1] in found]
    items = [(found[p], p.rsplit("/", 1)[-1]) for a, b, _ in shown for p in (a, b)]
    items += [(found[p], f"{reason}: {p.rsplit('/', 1)[-1]}") for reason, p in flagged if p in found]
    tiles = _tiles(items, limits)
    rows = [(f"{bits} bits: kept | other", tuple(tiles[2 * k : 2 * k + 2])) for k, (_, _, bits) in enumerate(shown)]
    rest = tiles[2 * len(shown) :]
    if rest:
        rows.append(("flagged, kept", tuple(rest)))
    return Gallery(title, tuple(rows), note=f"{len(shown)} of {len(pairs)} pairs shown; flagged images kept")


def _reject_gallery(manifest: Mapping[str, Any], rejects: Sequence[Mapping[str, Any]], limits: ReportLimits, reader: _RowGroups) -> Gallery:
    """Thumbnails of rejected images, from the download output they came from, where they decode at all."""
    title = "Rejected images"
    if not rejects:
        return Gallery(title, ())
    wanted = {r["path"]: r for r in _pick_rejects(rejects, 4 * limits.rejects_shown)}
    skipped = sorted({r["reason"] for r in rejects} & _NEVER_DECODE)
    never = f"; not decoded again: {', '.join(skipped)} (clean could not decode them, or it is unsafe)" if skipped else ""
    source, why = _upstream(manifest, "download")
    if source is None:
        return Gallery(title, (), note=f"no thumbnails: {why}")
    found = _source_images(source, set(wanted), limits, reader)
    shown = [r for r in wanted.values() if r["path"] in found][: limits.rejects_shown]
    tiles = tuple(_tiles([(found[r["path"]], f"{r['reason']}: {r['path'].rsplit('/', 1)[-1]}") for r in shown], limits))
    note = f"{len(tiles)} of {len(rejects)} rejects{never}"
    return Gallery(title, (("rejected", tiles),) if tiles else (), note=note)


def _clean(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> OutputReport:
    extra = manifest.get("extra") or {}
    splits = {s: int((extra.get("splits") or {}).get(s, 0)) for s in SPLITS}
    reject_tables, rejects = _reject_tables(prefix, manifest, limits)
    gallery, sample = _class_gallery(prefix, manifest, limits, reader)
    facts = _facts(manifest) + [
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
        _sample_table("Sample rows", sample, columns, limits),
    ]
    near = extra.get("near_duplicates") or {}
    flagged = (extra.get("quality") or {}).get("flagged") or {}
    more = {
        "classes": int(extra.get("num_classes") or 0),
        "carried": int(extra.get("carried") or 0),
        "near_duplicate_groups": int(near.get("groups") or 0),
        **{f"flagged_{reason}": int(f.get("count") or 0) for reason, f in flagged.items()},
    }
    metrics = _metrics(manifest, **more, **{f"{s}_images": n for s, n in splits.items()})
    return OutputReport("clean", prefix, tuple(facts), metrics, tuple(sections), limits)


# ---------------------------------------------------------------------------- resize


def _resize_sample(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> list[dict]:
    """Rows from the first row group of each split's first file, spread over the splits."""
    firsts: dict[str, str] = {}
    for uri in _data_files(prefix, manifest):
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


def _sources_by_order(manifest: Mapping[str, Any], orders: set[int], limits: ReportLimits, reader: _RowGroups) -> tuple[dict[int, dict], str]:
    """Clean's rows of the given ``order`` values, found through the row groups' order statistics."""
    source, why = _upstream(manifest, "clean")
    if source is None:
        return {}, why
    found: dict[int, dict] = {}
    read = 0
    for uri, rg in reader.groups(_data_files(source, contract.read_manifest(source))):
        low_high = reader.range_of(uri, rg, "order")
        if low_high and not any(low_high[0] <= o <= low_high[1] for o in orders - set(found)):
            continue
        if read >= limits.row_groups:
            break
        table = reader.read(uri, rg, ("order", "image", "width", "height"))
        if table is None:
            break
        read += 1
        rows, image = _rows_and_blobs(table, "image", "bytes")
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


def _resize(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> OutputReport:
    extra, config = manifest.get("extra") or {}, manifest.get("config") or {}
    split_modes = extra.get("split_modes") or {}
    ops = list(extra.get("ops") or [])
    reject_tables, _ = _reject_tables(prefix, manifest, limits)
    sample = _resize_sample(prefix, manifest, limits, reader)
    sources, why = _sources_by_order(manifest, {int(r["order"]) for r in sample}, limits, reader)
    applied = f" +{'+'.join(ops)}" if ops else ""
    found = [sources.get(int(r["order"])) for r in sample]
    befores = iter(_tiles([(s["image"], f"{s['width']}x{s['height']}") for s in found if s], limits))
    rows = []
    for r, src in zip(sample, found):
        out = _pixels_tile(r, f"{r['width']}x{r['height']} {split_modes.get(r['split'], extra.get('mode'))}{applied}", limits)
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
        _sample_table("Sample rows", sample, ("path", "label_name", "split", "width", "height", "channels"), limits),
    ]
    facts = _facts(manifest) + [("classes", int(extra.get("num_classes") or 0))]
    metrics = _metrics(manifest, size=float(extra.get("size") or 0), **{f"{s}_rows": n for s, n in splits.items()})
    return OutputReport("resize", prefix, tuple(facts), metrics, tuple(sections), limits)


# ---------------------------------------------------------------------------- train


def _read_optional(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return None


def _train(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: _RowGroups) -> OutputReport:
    extra = manifest.get("extra") or {}
    metrics = train_metrics(manifest)
    history = json.loads(_read_optional(storage.join(prefix, contract.METRICS)) or b"{}")
    columns = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds")
    epochs = tuple(tuple(int(e["epoch"]) + 1 if c == "epoch" else e.get(c) for c in columns) for e in history.get("epochs") or [])
    facts = _facts(manifest) + [
        ("model", extra.get("model")),
        ("classes", extra.get("num_classes")),
        ("image size", extra.get("image_size")),
        ("epochs run", int(manifest.get("epochs_run") or 0)),
    ]
    sections: list[Section] = [
        Table("Final metrics", ("metric", "value"), tuple(metrics.items())),
        Table("Epochs", columns, epochs),
    ]
    page = _read_optional(storage.join(prefix, contract.REPORT))
    picture = _read_optional(storage.join(prefix, "augmentations.png"))  # the name steps/train.py writes
    return OutputReport(
        "train",
        prefix,
        tuple(facts),
        metrics,
        tuple(sections),
        limits,
        page=page.decode("utf-8") if page is not None else None,
        picture=picture,
    )


_Builder = Callable[[str, Mapping[str, Any], ReportLimits, _RowGroups], OutputReport]
_BUILDERS: dict[str, _Builder] = {"download": _download, "clean": _clean, "resize": _resize, "train": _train}
