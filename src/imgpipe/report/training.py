"""Figures and the HTML report of a training run.

Plots use matplotlib's object-oriented API on Agg canvases (no ``pyplot``, no global
figure state, no display needed) and come back as PNG bytes for
:func:`imgpipe.storage.write_bytes`. :func:`html_report` builds one self-contained page
(PNGs embedded as base64, metrics as tables) that the Kubeflow component emits as an
HTML artifact.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgpipe.report import html as htmlpage
from imgpipe.train.recipes import BASE, without_effect

__all__ = ["curves_png", "sweep_curves_png", "confusion_matrix_png", "augmentations_png", "gallery_png", "result_line", "html_report"]

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
        if ax.get_lines():  # no validation (none, or a run that diverged first): no legend to draw
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


def gallery_png(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], cols: int | None = None) -> bytes:
    """Captioned images in titled rows (the worst-loss images, the most-confused pairs).

    The images are laid out as one mosaic drawn once, with each caption above its image and each
    row's title at its left: a figure of one axes per image took about 2 s for ten classes' rows,
    most of the train step's end.

    Args:
        rows: ``(row title, [(H x W x C uint8 image, caption), ...])`` per row.
        cols: Images per row; the longest row's length when omitted.
    """
    if not rows:
        raise ValueError("a gallery needs at least one row")
    cols = cols or max(1, max(len(images) for _, images in rows))
    shown = [[(_rgb(img), caption) for img, caption in images[:cols]] for _, images in rows]
    tiles = [img for row in shown for img, _ in row]
    h = max((t.shape[0] for t in tiles), default=1)
    w = max((t.shape[1] for t in tiles), default=1)
    # Each cell: the image, a band above it for the caption, a gap at its right.
    band, gap = max(4, round(0.22 * h)), max(2, w // 16)
    cell_h, cell_w = h + band, w + gap
    canvas = np.full((len(rows) * cell_h, cols * cell_w, 3), 255, np.uint8)
    for r, row in enumerate(shown):
        for c, (img, _) in enumerate(row):
            y = r * cell_h + band + (h - img.shape[0]) // 2
            x = c * cell_w + (w - img.shape[1]) // 2
            canvas[y : y + img.shape[0], x : x + img.shape[1]] = img
    width = 2.1 * cols
    fig = Figure(figsize=(width, width * canvas.shape[0] / canvas.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas)
    ax.axis("off")
    for r, ((title, _), row) in enumerate(zip(rows, shown, strict=True)):
        for c, (_, caption) in enumerate(row):
            # Class names come from whoever made the archive: plain text, never mathtext.
            ax.text(c * cell_w + w / 2, r * cell_h + band - 1, caption, ha="center", va="bottom", fontsize=7, parse_math=False)
        ax.text(-gap, r * cell_h + band + h / 2, title, ha="right", va="center", rotation=90, fontsize=8, parse_math=False)
    return _png(fig)


def _rgb(img: np.ndarray) -> np.ndarray:
    """An H x W x 3 uint8 view of a gray (H x W, H x W x 1) or RGB image."""
    img = np.asarray(img, dtype=np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]


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


def result_line(metrics: Mapping[str, Any]) -> str:
    """A training's result in one sentence: its test macro-F1 (else the kept weights' validation), and whether it diverged."""
    test, kept = metrics.get("test") or {}, metrics.get("kept") or {}
    if test.get("macro_f1") is not None:
        line = f"test macro-F1 {test['macro_f1']:.3f}, accuracy {test['accuracy']:.3f} on {test['images']} test images"
        tta = metrics.get("test_tta") or {}
        if tta.get("macro_f1") is not None:
            line += f" (with flipped views: macro-F1 {tta['macro_f1']:.3f})"
    elif kept.get("val_macro_f1") is not None:
        line = f"no test split; validation macro-F1 {kept['val_macro_f1']:.3f}, accuracy {kept['val_accuracy']:.3f}"
    else:
        line = "not scored: no test or validation split"
    if metrics.get("diverged"):
        line += "; the run diverged, so it is not to be promoted"
    return line


def html_report(metrics: Mapping[str, Any], images: Mapping[str, bytes], title: str = "imgpipe training report") -> str:
    """A self-contained HTML page: metric tables and the PNG figures embedded as base64.

    Args:
        metrics: The contents of ``metrics.json`` (``epochs``, optional ``test``,
            ``test_tta``, ``labels``, ``config``).
        images: Figure name -> PNG bytes, shown in order.
        title: Page title.
    """
    parts = [htmlpage.section("Result", note=result_line(metrics)) + htmlpage.HEADLINE_END]
    epochs = list(metrics.get("epochs", []))
    divergence = metrics.get("divergence") or {}
    if divergence.get("events"):
        rows = [{**e, "epoch": int(e["epoch"]) + 1, "step": int(e["step"]) + 1} for e in divergence["events"]]
        title = "Diverged: not to be promoted" if divergence.get("diverged") else "Recovered from divergence"
        note = (
            "the run stopped when its loss diverged; the weights kept are the best validated before it, if any"
            if divergence.get("diverged")
            else f"restarted from the last checkpoint, every learning rate x {divergence.get('lr_scale')}"
        )
        parts.append(htmlpage.section(title, htmlpage.table(rows, ["epoch", "step", "lr", "loss", "reason", "action", "detail"]), note=note))
    recipe = metrics.get("recipe")
    if recipe:
        set_by = {**{k: f"{v} (recipe)" for k, v in recipe["from_recipe"].items()}, **{k: f"{v} (domain)" for k, v in recipe["from_domain"].items()}}
        resolved = {**recipe["from_recipe"], **recipe["from_domain"], **{k: v for k, v in (metrics.get("config") or {}).items() if k in BASE}}
        inert = without_effect(resolved)
        rows = [{"setting": k, "value": v} for k, v in set_by.items() if k not in inert]
        note = f"{recipe['recipe']} recipe: {recipe['reason']}; {recipe['domain']} domain" + (
            f"; set explicitly, so kept: {', '.join(recipe['explicit'])}" if recipe["explicit"] else ""
        )
        parts.append(htmlpage.section("Recipe", htmlpage.table(rows, ["setting", "value"]) if rows else "", note=note))
    selection = metrics.get("selection")
    if selection:
        parts.append(htmlpage.section("Kept weights", note=selection["reason"]))
    if epochs:
        shown = [{**e, "epoch": int(e["epoch"]) + 1} for e in epochs]
        used = metrics.get("epoch_images")
        note = f"each epoch trains on {used['per_epoch']} of the {used['split']} train images ({used['why']})" if used else ""
        parts.append(htmlpage.section("Epochs", htmlpage.table(shown, [c for c in _EPOCH_COLUMNS if c in epochs[-1]]), note=note))
    evaluations = [(name, metrics[name]) for name in ("test", "test_tta") if metrics.get(name)]
    if evaluations:
        rows = [{"split": n, **{k: v for k, v in m.items() if not isinstance(v, (Mapping, list))}} for n, m in evaluations]
        parts.append(htmlpage.section("Test", htmlpage.table(rows, ["split", "loss", "accuracy", "macro_f1", "images"])))
    kept_epoch = selection.get("epoch") if selection else None
    at = [e for e in epochs if e.get("epoch") == kept_epoch] or epochs[-1:]
    recall = at[0].get("val_per_class_recall") if at else None
    if recall:
        rows = [{"class": k, "recall": v} for k, v in recall.items()]
        which = "kept epoch" if kept_epoch is not None else "last epoch"
        parts.append(htmlpage.section(f"Per-class recall (validation, {which})", htmlpage.table(rows, ["class", "recall"])))
    pairs = metrics.get("confused_pairs")
    if pairs:
        rows = [{"true": p["true"], "predicted": p["predicted"], "images": p["count"]} for p in pairs]
        parts.append(htmlpage.section("Most-confused classes (test)", htmlpage.table(rows, ["true", "predicted", "images"])))
    parts += [htmlpage.section(name, htmlpage.image(name, png)) for name, png in images.items()]
    return htmlpage.page(title, parts)


def sweep_curves_png(histories: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str]) -> bytes:
    """One panel per key, one line per branch: a sweep's curves overlaid (:mod:`imgpipe.steps.compare`).

    Args:
        histories: Branch name -> its per-epoch records (``epoch`` and the keys; missing values skipped).
        keys: The per-epoch keys to plot (``val_macro_f1``, ``val_accuracy``, ``train_loss``, ...).
    """
    fig = Figure(figsize=(5 * len(keys), 4))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys):
        for name, history in histories.items():
            points = [(int(h["epoch"]) + 1, h[key]) for h in history if h.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not key.endswith("loss"):
            ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    return _png(fig)
