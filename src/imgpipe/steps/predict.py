"""Batch prediction: an exported model over a dataset on Ray Data, one model per actor.

``predict(model, data, dest)`` runs a train output's ``model.onnx`` (onnxruntime) over a
committed download, clean or resize output, or a folder or archive of images (first
made a download output in a temporary local prefix by :func:`imgpipe.steps.download.download`,
with every member checked as usual). It preprocesses from ``model.json`` alone
(:mod:`imgpipe.train.card`, :mod:`imgpipe.serving.prepare`) exactly as the train step's evaluation does: images cut at the
model's size by resize are used as stored (their evaluation view is the identity); whole
pictures (resize mode ``whole``, clean and download outputs, folders) get the shorter
side scaled to ``input.resize_short_side`` and the centre crop (``input.view`` says which). Raw images (download
outputs, folders, archives) first get clean's own decode
(:func:`imgpipe.data.images.validate_and_normalize`: EXIF orientation, grey, CMYK,
palette, 16-bit and alpha made the model's mode), as the model's training images did.

Work: one Ray task per input row group on an actor pool (``actors``, default one per
cluster CPU; each actor holds one onnxruntime session with ``threads`` intra-op threads).
Actors return prediction rows (no pixels; about 200 bytes an image), which the driver
streams into one committed ``predictions.parquet`` in input order (the contract of every
step: an image that does not decode is a reject with its reason, and the counts
reconcile). Where the input carries labels, the manifest has accuracy and macro-F1 per
split: on a resize output's test split they reproduce the model's own test metrics.

Memory: the driver holds one row group's predictions at a time, the actors one row
group's decoded images and its input batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import commit, contract, parquet, storage
from imgpipe.config import check_numbers, check_range
from imgpipe.contract import Reject, StepReport
from imgpipe.data.images import ImageRejected
from imgpipe.raysession import ray_session
from imgpipe.serving.prepare import decode, prepare_encoded, softmax
from imgpipe.train.card import (
    check_view,
    eval_view,
    preprocessing_mismatch,
    preprocessing_of,
    preprocessing_spec,
    read_card,
    to_input,
)
from imgpipe.train.recipes import tta_flip_dims
from imgpipe.train.scores import confusion_scores, top_k_columns
from imgpipe.writer import OutputWriter

__all__ = ["PREDICT_SCHEMA", "PredictConfig", "predict"]

log = logging.getLogger(__name__)

PREDICT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int32()),  # the input's label, when it has one
        pa.field("predicted", pa.int32(), nullable=False),
        pa.field("predicted_name", pa.string(), nullable=False),
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("top_classes", pa.list_(pa.string()), nullable=False),
        pa.field("top_probs", pa.list_(pa.float32()), nullable=False),
    ]
)
_IMAGE_KINDS = ("download", "clean", "resize")


@dataclass(frozen=True)
class PredictConfig:
    """Settings of batch prediction.

    Attributes:
        batch_size: Images per onnxruntime call.
        actors: Model actors on the Ray cluster; 0 means one per cluster CPU.
        threads: onnxruntime intra-op threads per actor.
        top_k: Classes kept per image, most likely first.
        splits: Only these splits of a clean or resize output (empty: all).
        ray_address: A Ray cluster to run on; empty starts a local Ray.
        tta: Average the softmax of each image and its flips, only the flips the model
            trained with (its domain's: none for text and medical); recorded in the manifest.
    """

    batch_size: int = 64
    actors: int = 0
    threads: int = 1
    top_k: int = 5
    splits: tuple[str, ...] = ()
    ray_address: str = ""
    tta: bool = False

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range("batch_size", self.batch_size, 1, 1 << 16, integer=True)
        check_range("threads", self.threads, 1, 256, integer=True)
        check_range("top_k", self.top_k, 1, 1000, integer=True)
        check_range("actors", self.actors, 0, 4096, integer=True, note="0: one per CPU")
        unknown = set(self.splits) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"splits must be among train, val, test; got {sorted(unknown)}")


# ----------------------------------------------------------------------------------------
# The input: what it is, and what each row needs.


@dataclass(frozen=True)
class _Input:
    """A committed image dataset as predict reads it."""

    kind: str  # download, clean or resize
    files: list[str]
    classes: list[str] | None
    whole_splits: frozenset[str]  # resize splits stored as whole pictures
    preprocessing: str  # how the pixels are prepared, for the manifest


def _describe(data: str, card: Mapping[str, Any], cfg: PredictConfig) -> _Input:
    """The input's kind, data files and classes; refuses data the model cannot take.

    Raises:
        ValueError: If ``data`` is not a download, clean or resize output, its classes or
            channels are not the model's.
    """
    manifest = contract.read_manifest(data)
    kind = manifest.get("step")
    if kind not in _IMAGE_KINDS:
        raise ValueError(f"{data} is a {kind} output; predict reads download, clean or resize outputs, folders and archives")
    extra = manifest.get("extra") or {}
    classes = extra.get("classes") if kind != "download" else None
    if classes is not None and list(classes) != list(card["classes"]):
        raise ValueError(
            f"{data} has classes {', '.join(classes[:5])}... ({len(classes)}); the model predicts"
            f" {', '.join(card['classes'][:5])}... ({len(card['classes'])}): another class set"
        )
    files = contract.data_files(data, manifest)
    how = _check_preprocessing(data, kind, manifest, card, files)
    channels, stored = int(card["input"]["channels"]), _stored_channels(kind, files)
    if stored is not None and stored != channels:
        raise ValueError(f"{data} holds {stored}-channel images; the model takes {channels}-channel ones")
    if cfg.splits:
        if kind == "download":
            raise ValueError("splits apply to clean and resize outputs; a download output has none")
        if kind == "resize":  # its files are SPLIT/part-...; clean's shards mix splits (the actors filter rows)
            files = [f for f in files if any(f"/{split}/" in f for split in cfg.splits)]
    modes = extra.get("split_modes") or {}
    whole = frozenset(s for s, m in modes.items() if m == "whole") if kind == "resize" else frozenset()
    return _Input(kind, files, list(classes) if classes else None, whole, how)


def _check_preprocessing(data: str, kind: str, manifest: Mapping[str, Any], card: Mapping[str, Any], files: Sequence[str]) -> str:
    """How the rows' pixels will be prepared; refuses data whose preprocessing is not the model's.

    A resize output must have been made with the model's resize settings; raw images
    (download or clean outputs, folders, archives) get the card's preprocessing from the
    resize step's own code, which needs a card that records it, and boxes for ``roi_crop``.

    Raises:
        ValueError: Naming what differs, or why the card's preprocessing cannot be repeated.
    """
    recorded = card.get("preprocessing")
    if kind == "resize":
        if recorded is None:
            return "as stored (the card predates recorded preprocessing: not checked)"
        mismatch = preprocessing_mismatch(recorded, preprocessing_of(manifest))
        if mismatch:
            raise ValueError(
                f"{data} was resized otherwise than the data the model trained on ({mismatch}); "
                "predict on the raw images (a clean or download output) or resize them with the model's settings"
            )
        return "as stored (the model's resize settings)"
    spec = preprocessing_spec(card)
    if spec is None:
        raise ValueError(
            "the model card records no preprocessing (it predates it): predict cannot repeat what resize did to its training "
            "images; predict on a resize output made with the model's settings, or train the model again"
        )
    if spec.roi_crop and (kind == "download" or not _has_column(files, "bbox")):
        raise ValueError(
            "the model was trained on images cropped to their annotated box (roi_crop); "
            f"{data} has no boxes: give predict a clean output made with the annotations"
        )
    return f"resize {spec.mode} {spec.size}{' + ' + ', '.join(spec.ops) if spec.ops else ''} (the card's, by the resize step's code)"


def _has_column(files: Sequence[str], name: str) -> bool:
    if not files:
        return False
    fs, path = storage.arrow_filesystem(files[0])
    with fs.open_input_file(path) as fh:
        return name in pq.ParquetFile(fh).schema_arrow.names


def _stored_channels(kind: str, files: Sequence[str]) -> int | None:
    """The channels of a clean or resize output's images (its first row; every row has the same)."""
    if kind == "download" or not files:
        return None
    column = "channels" if kind == "resize" else "mode"
    fs, path = storage.arrow_filesystem(files[0])
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        if pf.metadata.num_rows == 0:
            return None
        value = pf.read_row_group(0, columns=[column]).column(column)[0].as_py()
    return int(value) if kind == "resize" else (1 if value == "L" else 3)


def _row_groups(files: Sequence[str]) -> list[dict[str, Any]]:
    items = []
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
        items += [{"file": uri, "row_group": rg} for rg in range(meta.num_row_groups)]
    return items


# ----------------------------------------------------------------------------------------
# The actors' side.


class _Predictor:
    """A Ray Data actor: one onnxruntime session, fed one input row group per call."""

    def __init__(self, model: str, kind: str, splits: Sequence[str], whole: Sequence[str], cfg: Mapping[str, Any]) -> None:  # noqa: PLR0913
        import onnxruntime as ort

        self.card = read_card(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(cfg["threads"])
        options.inter_op_num_threads = 1
        onnx = storage.read_bytes(storage.join(model, self.card["files"]["onnx"]))
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.kind, self.splits, self.whole = kind, set(splits), set(whole)
        self.batch_size, self.top_k = int(cfg["batch_size"]), int(cfg["top_k"])
        spec = self.card["input"]
        # A card says resize_short_side only where the evaluation resized (older cards always did).
        self.size, self.channels = int(spec["size"]), int(spec["channels"])
        self.short = int(spec.get("resize_short_side", self.size))
        self.prepare = preprocessing_spec(self.card) if kind != "resize" else None
        recipe = self.card.get("recipe") or {}
        self.flips = tta_flip_dims(bool(recipe.get("hflip")), bool(recipe.get("vflip"))) if cfg.get("tta") else ()

    def _columns(self) -> list[str]:
        base = ["path", "sha256"]
        if self.kind == "download":
            return [*base, "bytes"]
        if self.kind == "clean":
            return [*base, "image", "label", "split"] + (["bbox"] if self.prepare is not None and self.prepare.roi_crop else [])
        return [*base, "label", "split", "height", "width", "channels"]

    def _image(self, row: Mapping[str, Any], table_kind: str) -> np.ndarray:
        """A row's evaluation view (see the module docstring), checked against the card; else ImageRejected."""
        if self.kind in ("download", "clean"):
            view = self._prepared(row["bytes"] if self.kind == "download" else row["image"]["bytes"], row.get("bbox"))
        else:
            if table_kind == "raw":
                img = np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], row["channels"])
            else:
                img = decode(row["image"]["bytes"], self.channels)
            # Stored at the model's size (short-side-crop, fixed, pad): used as stored; whole: the view.
            view = eval_view(img, self.size, self.short if row["split"] in self.whole else self.size)
        try:
            return check_view(view, self.card)
        except ValueError as exc:  # caught here, so one such image never reaches the batch
            raise ImageRejected("wrong_shape", str(exc)) from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (item,) = (json.loads(x) for x in batch["item"])
        fs, path = storage.arrow_filesystem(item["file"])
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            table_kind = "raw" if "pixels" in names else "jpeg"
            columns = self._columns() + (["pixels"] if self.kind == "resize" and table_kind == "raw" else [])
            columns += ["image"] if self.kind == "resize" and table_kind == "jpeg" else []
            rows = pf.read_row_group(item["row_group"], columns=columns).to_pylist()
        if self.splits and self.kind != "download":
            rows = [r for r in rows if r["split"] in self.splits]
        good, views, rejects = [], [], []
        for row in rows:
            try:
                views.append(self._image(row, table_kind))
                good.append(row)
            except ImageRejected as exc:  # the gate's reason: not_an_image, unsupported_format, too_large...
                rejects.append({"path": row["path"], "reason": exc.reason, "detail": exc.detail[:300]})
            except Exception as exc:  # noqa: BLE001 - one image, not the run: a reject with its reason
                rejects.append({"path": row["path"], "reason": "undecodable", "detail": f"{type(exc).__name__}: {exc}"[:300]})
        probs = [self._run(views[i : i + self.batch_size]) for i in range(0, len(views), self.batch_size)]
        result = self._table(good, np.concatenate(probs) if probs else np.zeros((0, len(self.card["classes"])), np.float32))
        return {
            "result": np.array([json.dumps({"rows": len(rows), "rejects": rejects})]),
            "table": np.array([parquet.table_to_parquet_bytes(result)], dtype=object),
        }

    def _prepared(self, data: bytes, bbox: Sequence[float] | None) -> np.ndarray:
        """Raw image bytes as the model's evaluation data was (:func:`prepare_encoded`)."""
        assert self.prepare is not None  # _check_preprocessing refused the input otherwise
        return prepare_encoded(data, self.card, self.prepare, bbox, cleaned=self.kind == "clean")

    def _run(self, views: Sequence[np.ndarray]) -> np.ndarray:
        """Softmax over the model's classes; with TTA, the mean over each image and its flips."""
        probs = self._softmax(views)
        for axis in self.flips:  # -1: horizontal, -2: vertical, of N x C x H x W; here H x W x C views
            probs = probs + self._softmax([np.ascontiguousarray(np.flip(v, axis=1 if axis == -1 else 0)) for v in views])
        return (probs / (1 + len(self.flips))).astype(np.float32)

    def _softmax(self, views: Sequence[np.ndarray]) -> np.ndarray:
        return softmax(self.session.run(None, {self.card["input"]["name"]: to_input(views, self.card)})[0])

    def _table(self, rows: Sequence[Mapping[str, Any]], probs: np.ndarray) -> pa.Table:
        columns = {
            "path": [r["path"] for r in rows],
            "sha256": [r.get("sha256") for r in rows],
            "split": [r.get("split") for r in rows],
            "label": [r.get("label") for r in rows],
            **top_k_columns(probs, self.card["classes"], self.top_k),
        }
        return pa.table(columns, schema=PREDICT_SCHEMA)


# ----------------------------------------------------------------------------------------
# The driver.


def _scores(tally: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy and macro-F1 per split, from ``split -> confusion matrix`` (as evaluation computes them)."""
    out = {}
    for split, cm in tally.items():
        accuracy, macro_f1, _ = confusion_scores(cm)
        out[split] = {"images": int(cm.sum()), "accuracy": accuracy, "macro_f1": macro_f1}
    return out


def _image_source(data: str, stack: Any) -> str:
    """``data`` as a committed output: a folder or archive is downloaded into a temporary local prefix first."""
    if contract.is_committed(data):
        return data
    from imgpipe.steps.download import DownloadConfig, download

    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="imgpipe-predict-"))
    prefix = storage.normalize_uri(tmp) + "/images"
    log.info("predict: %s is no committed output; reading it as a folder or archive of images", data)
    download(data, prefix, DownloadConfig())
    return prefix


def _results(ds: Any) -> Iterator[tuple[dict[str, Any], pa.Table]]:
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for meta, table in zip(batch["result"], batch["table"]):
            yield json.loads(meta), pq.read_table(io.BytesIO(table))


def predict(model: str, data: str, dest: str, cfg: PredictConfig | None = None) -> StepReport:
    """Runs ``model``'s ONNX export over ``data`` on Ray Data; commits ``predictions.parquet`` to ``dest``.

    Args:
        model: A train output prefix (``model.json``, ``model.onnx``).
        data: A committed download, clean or resize output, or a folder or archive of images.
        dest: Output prefix; replaced.
        cfg: Settings.

    Raises:
        ValueError: If the model has no card or no ONNX export, or ``data`` has another class
            set or channel count than the model.
    """
    cfg = cfg or PredictConfig()
    started = time.monotonic()
    model, dest = storage.normalize_uri(model), storage.normalize_uri(dest)
    card = read_card(model)
    if not card["files"].get("onnx"):
        raise ValueError(f"{model} has no ONNX export ({card.get('export_failures', {}).get('model.onnx', 'not written')})")
    commit.check_disjoint(dest, [model, data], "predict")
    with contextlib.ExitStack() as stack:
        source = _image_source(storage.normalize_uri(data), stack)
        spec = _describe(source, card, cfg)
        items = _row_groups(spec.files)
        out = OutputWriter(dest, "predict")
        out.begin()
        n_classes = len(card["classes"])
        confusion: dict[str, np.ndarray] = {}
        rejects: list[Reject] = []
        inputs = 0
        with ray_session(cfg.ray_address) as ray:
            from ray.data import ActorPoolStrategy, DataContext

            DataContext.get_current().execution_options.preserve_order = True  # the output in input order
            actors = cfg.actors or max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.threads))
            ds = ray.data.from_items([{"item": json.dumps(i)} for i in items], override_num_blocks=max(1, len(items)))
            ds = ds.map_batches(
                _Predictor,
                fn_constructor_kwargs={
                    "model": model,
                    "kind": spec.kind,
                    "splits": list(cfg.splits),
                    "whole": sorted(spec.whole_splits),
                    "cfg": {"batch_size": cfg.batch_size, "threads": cfg.threads, "top_k": cfg.top_k, "tta": cfg.tta},
                },
                batch_size=1,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=min(actors, max(1, len(items)))),
                num_cpus=cfg.threads,
            )
            with out.parquet_file(contract.PREDICTIONS, PREDICT_SCHEMA) as sink:
                for meta, table in _results(ds):
                    inputs += meta["rows"]
                    rejects += [Reject(r["path"], r["reason"], r["detail"]) for r in meta["rejects"]]
                    if table.num_rows:
                        sink.write(table)
                    _count(confusion, table, n_classes)
        report = out.commit(
            inputs=inputs,
            rejects=rejects,
            config=cfg,
            extra={
                "model": model,
                "architecture": card["architecture"],
                "classes": card["classes"],
                "input_kind": spec.kind,
                "preprocessing": spec.preprocessing,
                "tta": _tta_views(card, cfg.tta),
                "scores": _scores(confusion),
                "seconds": round(time.monotonic() - started, 3),
            },
            upstream={"source": source, "step": spec.kind},
        )
    log.info("predict: %d images -> %d predictions, %d rejected -> %s", inputs, report.outputs, report.rejected, dest)
    return report


def _tta_views(card: Mapping[str, Any], tta: bool) -> dict[str, Any]:
    """The views each prediction averages: the image, and with ``tta`` the flips the model trained with."""
    recipe = card.get("recipe") or {}
    flips = tta_flip_dims(bool(recipe.get("hflip")), bool(recipe.get("vflip"))) if tta else ()
    names = ["identity"] + [{-1: "horizontal flip", -2: "vertical flip"}[d] for d in flips]
    return {"requested": tta, "views": names, "domain": recipe.get("domain")}


def _count(confusion: dict[str, np.ndarray], table: pa.Table, classes: int) -> None:
    """Adds a batch's labelled rows to the per-split confusion matrices."""
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if not len(labels) or table.column("label").null_count == len(labels):
        return
    predicted = table.column("predicted").to_numpy()
    splits = table.column("split").to_pylist()
    for split in set(splits):
        at = np.array([s == split for s in splits]) & ~np.isnan(labels.astype(float))
        cm = confusion.setdefault(split or "all", np.zeros((classes, classes), np.int64))
        np.add.at(cm, (labels[at].astype(np.int64), predicted[at]), 1)
