"""Self-contained HTML pages: the one place where imgpipe's reports escape text.

Train's report (:mod:`imgpipe.report.training`) and every data step's (:mod:`imgpipe.report.steps`)
are built from these pieces, so text that comes from the data (class names and paths
are folder and file names: whoever made the archive chose them) goes through one
escaping: plain text, never markup, in element content and in attributes alike.
Pictures are inlined as ``data:`` URIs and charts are inline SVG, so a page is one file
that the Kubeflow UI shows as it is. Standard library only: the cpu image (download,
clean) has no matplotlib.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["STYLE", "HEADLINE_END", "text", "cell", "clip", "table", "image", "section", "page", "at_top", "bar_chart_svg"]

# Tables fit the page they are shown in (KFP's UI shows a step's HTML in a side panel about 500 px
# wide): long values (URIs, digests) wrap anywhere instead of pushing the table past the edge.
STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1100px}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em;max-width:100%}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;overflow-wrap:anywhere}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
    "table.grid td{text-align:center;vertical-align:top;font-size:11px}"
    "table.grid img{display:inline;margin:0}"
    "p.note{color:#555}"
)
# Ends a page's headline (its result, first thing under the title): what comes later to the top goes after it.
HEADLINE_END = "<!-- headline -->"
# C0 controls but tab and newlines, and DEL: invalid in HTML text, so shown as escapes.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Series colours of the bar charts (train, val, test, then the rest).
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def text(value: Any) -> str:
    """``value`` as HTML text, safe in element content and in quoted attributes; control characters shown as ``\\xNN``."""
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)), quote=True)


def cell(value: Any) -> str:
    """A table cell's content: floats to 4 significant digits, everything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return text(value)


def clip(value: Any, width: int) -> str:
    """``str(value)`` cut to ``width`` characters (an ellipsis marks the cut); not escaped."""
    shown = str(value)
    return shown if len(shown) <= width else shown[: max(1, width - 1)] + "\u2026"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """An HTML table of ``rows`` (one mapping each), with ``columns`` in order; missing cells empty."""
    head = "".join(f"<th>{text(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(name: str, data: bytes, mime: str = "image/png", *, title: str = "") -> str:
    """An ``<img>`` with ``data`` inlined as base64; ``name`` is its alt text, ``title`` its tooltip."""
    encoded = base64.b64encode(data).decode("ascii")
    tip = f" title='{text(title)}'" if title else ""
    return f"<img alt='{text(name)}'{tip} src='data:{text(mime)};base64,{encoded}'>"


def section(title: str, *parts: str, note: str = "") -> str:
    """A titled part of a page: the heading (escaped), an optional note (escaped), ``parts`` (markup)."""
    shown = f"<p class='note'>{text(note)}</p>" if note else ""
    return f"<h2>{text(title)}</h2>{shown}" + "".join(parts)


def page(title: str, parts: Iterable[str]) -> str:
    """A whole HTML document: the escaped title, the shared style, then ``parts`` (markup)."""
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{text(title)}</title>"
    return "\n".join([head + f"<style>{STYLE}</style></head><body><h1>{text(title)}</h1>", *parts, "</body></html>"])


def at_top(page_html: str, markup: str) -> str:
    """``page_html`` with ``markup`` at its top: after its headline (:data:`HEADLINE_END`), else right under its title."""
    for mark in (HEADLINE_END, "</h1>", "<body>"):
        if mark in page_html:
            return page_html.replace(mark, mark + markup, 1)
    return markup + page_html


def bar_chart_svg(categories: Sequence[str], series: Mapping[str, Sequence[int]], *, label_width: int = 28) -> str:
    """Horizontal bar charts as inline SVG: one row per category, one panel per series.

    Each panel is scaled to its own largest value (a split's histogram reads on its own,
    whatever the split sizes) and ends its bars with the count.

    Args:
        categories: Row labels (class names), shown escaped and cut to ``label_width``.
        series: Panel title -> one count per category.
        label_width: Characters of a label shown.

    Raises:
        ValueError: If a series does not have one value per category.
    """
    for name, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(categories)} categories")
    row, top, panel, label_px = 14, 20, 200, 7 * label_width
    width, height = label_px + panel * max(1, len(series)), top + row * len(categories) + 4
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>"]
    for i, label in enumerate(categories):
        y = top + row * i + row - 3
        parts.append(f"<text x='{label_px - 4}' y='{y}' text-anchor='end'>{text(clip(label, label_width))}</text>")
    for k, (name, values) in enumerate(series.items()):
        x0, colour = label_px + panel * k, _PALETTE[k % len(_PALETTE)]
        scale = (panel - 40) / max(1, max(values, default=0))
        parts.append(f"<text x='{x0}' y='12' font-weight='bold'>{text(name)} ({sum(values)})</text>")
        for i, value in enumerate(values):
            y, bar = top + row * i, int(value) * scale
            parts.append(f"<rect x='{x0}' y='{y + 2}' width='{bar:.1f}' height='{row - 4}' fill='{colour}'/>")
            parts.append(f"<text x='{x0 + bar + 3:.1f}' y='{y + row - 3}'>{int(value)}</text>")
    parts.append("</svg>")
    return "".join(parts)
