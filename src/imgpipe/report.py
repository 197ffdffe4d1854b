"""Figures and the HTML report of a training run.

Plots use matplotlib's object-oriented API on Agg canvases (no ``pyplot``, no global
figure state, no display needed) and come back as PNG bytes for
:func:`imgpipe.storage.write_bytes`. :func:`html_report` builds one self-contained page
(PNGs embedded as base64, metrics as tables) that the Kubeflow component emits as an
HTML artifact.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["curves_png", "confusion_matrix_png", "augmentations_png", "html_report"]

_ANNOTATE_MAX_CLASSES = 20


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def curves_png(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Loss (train, val) and quality (val accuracy, macro-F1) per epoch, side by side.

    Args:
        history: One mapping per epoch with ``epoch``, ``train_loss``, ``val_loss``,
            ``val_accuracy`` and ``val_macro_f1`` (missing values are skipped).
    """
    fig = Figure(figsize=(10, 4))
    loss_ax, quality_ax = fig.subplots(1, 2)
    epochs = [int(h["epoch"]) + 1 for h in history]
    for ax, keys in ((loss_ax, ("train_loss", "val_loss")), (quality_ax, ("val_accuracy", "val_macro_f1"))):
        for key in keys:
            points = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_title("loss")
    quality_ax.set_title("validation")
    quality_ax.set_ylim(0, 1.02)
    return _png(fig)


def confusion_matrix_png(matrix: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str]) -> bytes:
    """Row-normalized confusion matrix (rows: true class, columns: predicted), with counts when small."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {len(labels)} labels")
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(24.0, 2.5 + 0.45 * len(labels))
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(len(labels))
    # Class names come from folder and file names, i.e. from whoever made the archive:
    # plain text, never mathtext ("$\\foo$" would otherwise crash after every epoch ran).
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8, parse_math=False)
    ax.set_yticks(ticks, labels, fontsize=8, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= _ANNOTATE_MAX_CLASSES:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    return _png(fig)


def augmentations_png(originals: Sequence[np.ndarray], augmented: Sequence[Sequence[np.ndarray]]) -> bytes:
    """A grid: one row per sample, the original first, then its augmented versions.

    Args:
        originals: ``H x W x C`` uint8 images (C is 1 or 3).
        augmented: For each original, its augmented ``H x W x C`` images.
    """
    if len(originals) != len(augmented) or not originals:
        raise ValueError("need one list of augmented images per original, and at least one original")
    cols = 1 + max(len(a) for a in augmented)
    fig = Figure(figsize=(1.6 * cols, 1.6 * len(originals)))
    axes = np.atleast_2d(fig.subplots(len(originals), cols, squeeze=False))
    for r, (orig, augs) in enumerate(zip(originals, augmented)):
        for c, img in enumerate([orig, *augs]):
            ax = axes[r, c]
            ax.axis("off")
            gray = img.ndim == 2 or img.shape[-1] == 1
            ax.imshow(img.squeeze(-1) if gray and img.ndim == 3 else img, cmap="gray" if gray else None, vmin=0, vmax=255)
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    return _png(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_EPOCH_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "images_per_s",
    "data_wait_fraction",
    "lr",
    "seconds",
)
_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1100px}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
)


def html_report(metrics: Mapping[str, Any], images: Mapping[str, bytes], title: str = "imgpipe training report") -> str:
    """A self-contained HTML page: metric tables and the PNG figures embedded as base64.

    Args:
        metrics: The contents of ``metrics.json`` (``epochs``, optional ``test``,
            ``test_tta``, ``labels``, ``config``).
        images: Figure name -> PNG bytes, shown in order.
        title: Page title.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    epochs = list(metrics.get("epochs", []))
    if epochs:
        shown = [{**e, "epoch": int(e["epoch"]) + 1} for e in epochs]
        parts += ["<h2>Epochs</h2>", _table(shown, [c for c in _EPOCH_COLUMNS if c in epochs[-1]])]
    evaluations = [(name, metrics[name]) for name in ("test", "test_tta") if metrics.get(name)]
    if evaluations:
        rows = [{"split": n, **{k: v for k, v in m.items() if not isinstance(v, (Mapping, list))}} for n, m in evaluations]
        parts += ["<h2>Test</h2>", _table(rows, ["split", "loss", "accuracy", "macro_f1", "images"])]
    recall = epochs[-1].get("val_per_class_recall") if epochs else None
    if recall:
        rows = [{"class": k, "recall": v} for k, v in recall.items()]
        parts += ["<h2>Per-class recall (validation, last epoch)</h2>", _table(rows, ["class", "recall"])]
    for name, png in images.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
