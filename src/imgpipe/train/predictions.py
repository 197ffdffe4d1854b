"""Per-image predictions of an evaluation: the table behind error review and label audits.

:func:`predictions_table` joins an evaluation's per-image rows
(:class:`imgpipe.train.evaluation.EvalRows`, indexed by the row's position in its split)
with the split's ``path`` and ``sha256`` columns into ``predictions.parquet``: plain
columns and lists, which pandas, Arrow and Hugging Face ``datasets`` read as they are.
:func:`worst_per_class` and :func:`confused_pairs` pick what the report shows.

Memory: the split's ``path`` and ``sha256`` columns and ``images x classes`` probabilities
(50,000 validation images of 1,000 classes: 200 MB of float32); the table keeps the top-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from imgpipe.train.evaluation import EvalRows
from imgpipe.train.partition import SplitInfo, read_split_columns
from imgpipe.train.scores import top_k_columns

__all__ = ["TOP_K", "PREDICTION_SCHEMA", "predictions_table", "worst_per_class", "confused_pairs"]

TOP_K = 5

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),  # the row's position in its split (file order)
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("predicted", pa.int32(), nullable=False),
        pa.field("predicted_name", pa.string(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("top_classes", pa.list_(pa.string()), nullable=False),
        pa.field("top_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("loss", pa.float32(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
    ]
)


def predictions_table(split: str, info: SplitInfo, rows: EvalRows, labels: Sequence[str], probs: bool = False) -> pa.Table:
    """The per-image predictions of one split, in file order; with ``probs``, every class's probability too.

    Raises:
        ValueError: If the rows name indexes outside the split, or one twice.
    """
    index = rows.index.astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= info.num_samples or len(np.unique(index)) != len(index)):
        raise ValueError(f"evaluation rows of {split} do not name distinct rows of its {info.num_samples} images")
    order = np.argsort(index, kind="stable")
    index, label, probs_all, loss = index[order], rows.label[order], rows.probs[order], rows.loss[order]
    ids = read_split_columns(info, ["path", "sha256"]).take(pa.array(index))
    names = np.asarray(labels, dtype=object)
    top = top_k_columns(probs_all, labels, TOP_K)
    predicted = top["predicted"].to_numpy()
    n = len(index)
    columns = {
        "split": pa.array([split] * n, pa.string()),
        "index": pa.array(index, pa.int64()),
        "path": ids.column("path").combine_chunks(),
        "sha256": ids.column("sha256").combine_chunks(),
        "label": pa.array(label.astype(np.int32)),
        "label_name": pa.array(names[label].tolist(), pa.string()),
        **top,
        "loss": pa.array(loss.astype(np.float32)),
        "correct": pa.array(predicted == label),
    }
    table = pa.table(columns, schema=PREDICTION_SCHEMA)
    if probs:
        width = probs_all.shape[1]
        flat = pa.array(probs_all.astype(np.float32).reshape(-1))
        table = table.append_column("probs", pa.FixedSizeListArray.from_arrays(flat, width) if n else pa.array([], pa.list_(pa.float32(), width)))
    return table


def worst_per_class(table: pa.Table, per_class: int = 2, classes: int = 12) -> list[dict]:
    """The highest-loss images of the classes with the most loss, ``per_class`` each: what a reviewer looks at first.

    Returns:
        Rows (as dicts) grouped by class, worst class first.
    """
    rows = table.select(["index", "path", "label", "label_name", "predicted_name", "confidence", "loss"]).to_pylist()
    by_class: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: -r["loss"]):
        by_class.setdefault(row["label"], []).append(row)
    ranked = sorted(by_class.values(), key=lambda group: -sum(r["loss"] for r in group) / len(group))
    return [r for group in ranked[:classes] for r in group[:per_class]]


def confused_pairs(table: pa.Table, top: int = 5, examples: int = 3) -> list[dict]:
    """The (true, predicted) class pairs mistaken most often, with their highest-loss examples."""
    wrong = [r for r in table.select(["index", "path", "label_name", "predicted_name", "loss", "correct"]).to_pylist() if not r["correct"]]
    pairs: dict[tuple[str, str], list[dict]] = {}
    for row in sorted(wrong, key=lambda r: -r["loss"]):
        pairs.setdefault((row["label_name"], row["predicted_name"]), []).append(row)
    ranked = sorted(pairs.items(), key=lambda item: (-len(item[1]), item[0]))[:top]
    return [{"true": t, "predicted": p, "count": len(rows), "examples": rows[:examples]} for (t, p), rows in ranked]
