"""A step's report as data, and its three renderings: an HTML page, aligned text, a PNG grid.

    report = OutputReport(step, prefix, facts, metrics, sections)   # imgpipe.report.steps.build_report makes them
    report.html(); report.text(); report.grid_png()

Sections are :class:`Table`, :class:`Chart` and :class:`Gallery`; every bound (thumbnail
size, rows shown, text width) is a :class:`ReportLimits` field. Text from the data is escaped
(:mod:`imgpipe.report.html`) in the page and made printable in the terminal.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from imgpipe.config import check_range
from imgpipe.report import html as htmlpage

__all__ = ["ReportLimits", "Table", "Chart", "Tile", "Gallery", "Section", "OutputReport", "text_table", "printable", "jpeg"]


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
            check_range(f"ReportLimits.{name}", value, 1, 95 if name == "thumb_quality" else None, integer=True)


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
        check_range("max_rows", max_rows, 1, integer=True)
        width = self.limits.text_width
        lines = [f"{self.title}: {printable(self.prefix, 400)}", ""]
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


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int = 60, header: bool = True) -> list[str]:
    """Aligned plain-text lines of a table: numbers right-aligned, text left, each cell cut to ``width``.

    Cells are made printable first (control characters escaped), so a hostile name cannot
    move the cursor or recolour the terminal.
    """
    cells = [[printable(_fmt(v), width) for v in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(columns))]
    shown = [[printable(c, width) for c in columns], *cells] if header else cells
    widths = [max((len(r[i]) for r in shown), default=0) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(shown[0]), "  ".join("-" * w for w in widths)] if header else []
    return out + [line(r) for r in cells]


def jpeg(picture: Image.Image, quality: int) -> bytes:
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
    return htmlpage.image(tile.caption, jpeg(tile.picture, limits.thumb_quality), "image/jpeg") + caption


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


def printable(value: Any, width: int = 60) -> str:
    """``value`` for a terminal: control and format characters escaped, cut to ``width``."""
    chars = (c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii") for c in str(value))
    return htmlpage.clip("".join(chars), width)


def _ascii(value: Any, width: int) -> str:
    """``value`` for Pillow's default font, which may lack most glyphs: printable ASCII, cut."""
    return htmlpage.clip(printable(value, 10 * width).encode("ascii", "replace").decode("ascii"), width)
