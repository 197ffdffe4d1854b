"""What a committed step output holds, for people: the Kubeflow UI's Metrics and HTML, and ``imgpipe show``.

    report = build_report(prefix)        # any committed download, clean, resize or train output
    report.html(); report.text(); report.grid_png()

One builder per step, named by its :mod:`imgpipe.step_table` entry (download and train here, clean and resize in
:mod:`imgpipe.report.clean` and :mod:`imgpipe.report.resize`) makes an
:class:`~imgpipe.report.output.OutputReport`; the component and the command line share it, so
the UI and the terminal say the same thing. Every read is bounded
(:class:`~imgpipe.report.output.ReportLimits`, :class:`~imgpipe.report.parts.RowGroups`): a
report costs about the same on 700 images or 7 million and stays far below 2 MB.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imgpipe import contract, resources, storage
from imgpipe.report.output import (
    Gallery,
    OutputReport,
    ReportLimits,
    Section,
    Table,
)
from imgpipe.report.parts import (
    RowGroups,
    data_files,
    rejects_tables,
    rows_and_blobs,
    sample_table,
    step_facts,
    step_metrics,
    thumb_tiles,
)
from imgpipe.step_table import STEPS

__all__ = ["TRAIN_METRICS", "build_report", "train_metrics"]

# The final scalars of a train manifest that the UI shows (manifest["metrics"]).
TRAIN_METRICS = ("val_accuracy", "val_macro_f1", "val_pr_auc", "val_loss", "test_accuracy", "test_macro_f1", "test_tta_accuracy", "train_loss")


def build_report(prefix: str, limits: ReportLimits | None = None) -> OutputReport:
    """Builds the report of the committed output at ``prefix`` (download, clean, resize, train, predict or promote).

    Raises:
        UncommittedOutputError: If ``prefix`` holds no committed output (no ``_SUCCESS``).
        ValueError: If it is another kind of output, or damaged.
        TypeError: If ``limits`` is not a :class:`ReportLimits`.
    """
    # Reports read row groups of images; with pyarrow's mimalloc the clean report's peak grew
    # 1.42x from 4k to 128k images, with the C library's 1.18x (docs/benchmarks.md, "Scale").
    resources.use_system_allocator()
    limits = ReportLimits() if limits is None else limits
    if not isinstance(limits, ReportLimits):
        raise TypeError(f"limits must be a ReportLimits, got {type(limits).__name__}")
    prefix = storage.normalize_uri(prefix)
    manifest = contract.read_manifest(prefix)
    kind = manifest.get("step")
    entry = STEPS.get(kind)
    if entry is not None:
        builder = entry.report_builder()
    else:
        from imgpipe.report.results import RESULT_REPORTS  # predictions and promotion decisions

        builder = RESULT_REPORTS.get(kind)
        if builder is None:
            raise ValueError(f"{prefix} holds a {kind!r} output; reports exist for {', '.join([*STEPS, *RESULT_REPORTS])} outputs")
    with RowGroups(limits) as reader:
        return builder(prefix, manifest, limits, reader)


def train_metrics(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of a train manifest the UI shows: the final metrics that are set, and ``epochs_run``."""
    final = manifest.get("metrics") or {}
    found = {k: float(final[k]) for k in TRAIN_METRICS if final.get(k) is not None}
    return {**found, "epochs_run": float(manifest.get("epochs_run") or 0)}


# ---------------------------------------------------------------------------- download


def download_report(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> OutputReport:
    extra = manifest.get("extra") or {}
    sources = list(extra.get("sources") or [])
    source_rows = tuple((s.get("uri"), s.get("format"), s.get("sha256") or "", s.get("bytes")) for s in sources)
    reject_tables, _ = rejects_tables(prefix, manifest, limits)
    sample: list[dict] = []
    pictures: list[tuple[bytes, str]] = []
    for k, (uri, rg) in enumerate(reader.groups(data_files(prefix, manifest))):
        table = reader.read(uri, rg, ("path", "bytes", "size", "sha256")) if k < limits.row_groups else None
        if table is None:
            break
        rows, blob = rows_and_blobs(table, "bytes")
        for i, row in enumerate(rows):
            sample.append({**row, "sha256": row["sha256"][:16]})
            if len(pictures) < limits.samples:
                pictures.append((blob(i), row["path"].rsplit("/", 1)[-1]))
        if len(pictures) >= limits.samples or len(sample) >= limits.table_rows:
            break
    tiles = thumb_tiles(pictures, limits)
    archive_bytes = sum(int(s.get("bytes") or 0) for s in sources)
    facts = step_facts(manifest) + [
        ("bytes extracted", int(extra.get("bytes_extracted") or 0)),
        ("archive bytes", archive_bytes),
        *((f"sha256 of {s.get('uri')}", s.get("sha256") or "(directory)") for s in sources),
    ]
    sections: list[Section] = [
        Table("Sources", ("uri", "format", "sha256", "bytes"), source_rows),
        *reject_tables,
        sample_table("Sample members", sample, ("path", "size", "sha256"), limits),
        Gallery("Sample members", (("members", tuple(tiles)),) if tiles else (), note="the first members of the output"),
    ]
    metrics = step_metrics(manifest, bytes_extracted=float(extra.get("bytes_extracted") or 0), archive_bytes=archive_bytes, sources=len(sources))
    return OutputReport("download", prefix, tuple(facts), metrics, tuple(sections), limits)


# ---------------------------------------------------------------------------- clean


# ---------------------------------------------------------------------------- resize


# ---------------------------------------------------------------------------- train


def _read_optional(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return None


def train_report(prefix: str, manifest: Mapping[str, Any], limits: ReportLimits, reader: RowGroups) -> OutputReport:
    extra = manifest.get("extra") or {}
    metrics = train_metrics(manifest)
    history = json.loads(_read_optional(storage.join(prefix, contract.METRICS)) or b"{}")
    columns = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds")
    epochs = tuple(tuple(int(e["epoch"]) + 1 if c == "epoch" else e.get(c) for c in columns) for e in history.get("epochs") or [])
    facts = step_facts(manifest) + [
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
