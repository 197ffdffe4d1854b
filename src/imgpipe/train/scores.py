"""Classification scores without torch: shared by the train step's evaluation and batch prediction.

:func:`confusion_scores` turns a confusion matrix into accuracy, macro-F1 and per-class
recall; :func:`top_k_columns` turns probabilities into the predicted class and the top-k
classes and probabilities as Arrow columns. Both run where torch is not installed (the ray
image runs :mod:`imgpipe.steps.predict`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["confusion_scores", "top_k_columns"]


def confusion_scores(confusion: np.ndarray | Sequence[Sequence[int]]) -> tuple[float, float, list[float | None]]:
    """``(accuracy, macro_f1, per_class_recall)`` of ``confusion[true][predicted]`` counts.

    Macro-F1 averages over the classes that occur (true or predicted); a class without
    images has recall ``None``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    total = cm.sum()
    recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    present = (support + predicted) > 0
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    per_class = [float(r) if s > 0 else None for r, s in zip(recall.tolist(), support.tolist())]
    return (float(tp.sum() / total) if total else 0.0), macro_f1, per_class


def top_k_columns(probs: np.ndarray, names: Sequence[str], k: int) -> dict[str, pa.Array]:
    """``predicted``, ``predicted_name``, ``confidence``, ``top_classes`` and ``top_probs`` of ``N x C`` probabilities."""
    n, k = len(probs), min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_probs = np.take_along_axis(probs, top, axis=1).astype(np.float32)
    labels = np.asarray(names, dtype=object)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return {
        "predicted": pa.array(top[:, 0].astype(np.int32), pa.int32()),
        "predicted_name": pa.array(labels[top[:, 0]].tolist(), pa.string()),
        "confidence": pa.array(top_probs[:, 0], pa.float32()),
        "top_classes": pa.ListArray.from_arrays(offsets, pa.array(labels[top.reshape(-1)].tolist(), pa.string())),
        "top_probs": pa.ListArray.from_arrays(offsets, pa.array(top_probs.reshape(-1), pa.float32())),
    }
