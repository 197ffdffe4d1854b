"""What a train run writes: the model, its exports and card, metrics, figures, predictions and the report, committed last.

    start_output(out, cfg, ctx)                  # checks the destination, keeps a resumable checkpoint
    files = write_outputs(run, metrics, last_val, with_rows)
    commit(run, report, upstream)                # manifest, then _SUCCESS

The output is a model, not a dataset, so :class:`imgpipe.writer.OutputWriter` does not fit (its
``begin`` would delete the checkpoint a resume needs): the same protocol is kept by hand.
Only rank 0 calls these.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from imgpipe import contract, parquet, writer
from imgpipe.commit import claim, manifest_body, publish
from imgpipe.config import config_record, config_to_yaml
from imgpipe.contract import FileEntry, StepReport
from imgpipe.train.assembly import (
    eval_transform,
    train_transform,
)
from imgpipe.train.augment import (
    Normalization,
    channel_stats,
    step_seed,
)
from imgpipe.train.checkpoint import CHECKPOINT
from imgpipe.train.config import TrainConfig
from imgpipe.train.distributed import (
    DistInfo,
    barrier,
)
from imgpipe.train.evaluation import EvalResult
from imgpipe.train.export import export_onnx, export_torchscript, model_card
from imgpipe.train.partition import (
    sample_seeds,
)
from imgpipe.train.predictions import confused_pairs, predictions_table, worst_per_class
from imgpipe.train.rows import read_rows, read_samples
from imgpipe.train.run import TrainingRun

__all__ = ["write_outputs", "commit", "start_output", "check_locations"]

log = logging.getLogger(__name__)


def _report() -> ModuleType:
    """:mod:`imgpipe.report.training`, imported once the outputs are written: it brings matplotlib, a
    third of a second of a cold step's start that would otherwise come before the first epoch."""
    from imgpipe.report import training

    return training


# The augmentation grid: samples of the train split, each in this many augmented versions.
_AUG_SAMPLES, _AUG_VERSIONS = 6, 4


def _to_display(images: torch.Tensor, channels: int, norm: Normalization) -> list[np.ndarray]:
    """Normalized (by ``norm``) or uint8 ``B x C x H x W`` to ``H x W x C`` uint8 arrays."""
    if images.dtype != torch.uint8:
        mean, std = channel_stats(channels, norm)
        x = images.float().cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return [img.permute(1, 2, 0).contiguous().cpu().numpy() for img in images]


def _augmentation_grid(run: TrainingRun) -> bytes:
    """Samples of the training split, as evaluated and as the training recipe augments them."""
    samples = read_samples(run.train_info, _AUG_SAMPLES)
    eval_tf = eval_transform(run.train_info, run.image_size)
    originals = [eval_tf(s, 0) for s in samples]
    cpu_tf = train_transform(run.cfg, run.train_info, run.image_size, run.gpu_augment is not None, run.norm)
    versions: list[list[np.ndarray]] = [[] for _ in samples]
    for v in range(_AUG_VERSIONS):
        # As the loader does in epoch v, with the sample's position as its index.
        seeds = sample_seeds(run.cfg.seed, v, range(len(samples))).tolist()
        if run.gpu_augment is not None:
            cropped = [cpu_tf(s, seed) for s, seed in zip(samples, seeds)] if cpu_tf is not None else samples
            batch = torch.from_numpy(np.stack(cropped)).permute(0, 3, 1, 2).to(run.device)
            augmented = _to_display(run.gpu_augment(batch, step_seed(run.cfg.seed, v, 0, 0)), run.channels, run.norm)
        else:
            assert cpu_tf is not None
            augmented = [cpu_tf(s, seed) for s, seed in zip(samples, seeds)]
        for i, img in enumerate(augmented):
            versions[i].append(img)
    return _report().augmentations_png(originals, versions)


def _write(run: TrainingRun, name: str, data: bytes | str, files: list[FileEntry]) -> None:
    files.append(writer.write_entry(run.out, name, data))


def _predictions(run: TrainingRun, with_rows: Mapping[str, EvalResult]) -> pa.Table | None:
    """``predictions.parquet``: every val and test image's prediction (:mod:`imgpipe.train.predictions`)."""
    infos = {"val": run.val_info, "test": run.test_info}
    tables = [
        predictions_table(split, infos[split], result.rows, run.labels, probs=run.cfg.predictions_probs)  # type: ignore[arg-type]
        for split, result in with_rows.items()
        if result.rows is not None and infos.get(split) is not None
    ]
    return pa.concat_tables(tables) if tables else None


def _review_figures(run: TrainingRun, table: pa.Table, metrics: dict[str, Any]) -> dict[str, bytes]:
    """The worst-loss images per class and the most-confused class pairs (test, else val), for people to look at."""
    split = "test" if "test" in table.column("split").to_pylist() else "val"
    info = run.test_info if split == "test" else run.val_info
    rows = table.filter(pc.equal(table.column("split"), split))
    if info is None or rows.num_rows == 0:
        return {}
    view = eval_transform(info, run.image_size)
    worst = worst_per_class(rows)
    pairs = confused_pairs(rows)
    metrics["confused_pairs"] = [{**p, "split": split, "examples": [e["path"] for e in p["examples"]]} for p in pairs]
    wanted = [r["index"] for r in worst] + [e["index"] for p in pairs for e in p["examples"]]
    images = dict(zip(wanted, (view(img, 0) for img in read_rows(info, wanted))))
    figures = {}
    by_class: dict[str, list[tuple[np.ndarray, str]]] = {}
    for r in worst:
        caption = f"predicted {r['predicted_name']}\np={r['confidence']:.2f}, loss {r['loss']:.2f}"
        by_class.setdefault(r["label_name"], []).append((images[r["index"]], caption))
    if by_class:
        figures["worst_loss.png"] = _report().gallery_png([(f"true {name}", imgs) for name, imgs in by_class.items()])
    if pairs:
        figures["confused_pairs.png"] = _report().gallery_png(
            [
                (f"{p['true']} as {p['predicted']} ({p['count']})", [(images[e["index"]], f"loss {e['loss']:.2f}") for e in p["examples"]])
                for p in pairs
            ]
        )
    return figures


def _exports(run: TrainingRun) -> tuple[dict[str, bytes], dict[str, str]]:
    """The kept weights as ONNX and TorchScript; an export that fails is reported, not fatal.

    Training is the expensive part: a model whose ops one exporter does not support still
    commits, with the reason in ``model.json`` (``export_failures``) and the log.
    """
    exported, failures = {}, {}
    for name, export in ((contract.MODEL_ONNX, export_onnx), (contract.MODEL_TORCHSCRIPT, export_torchscript)):
        try:
            exported[name] = export(run.module, run.image_size, run.channels)
        except Exception as exc:  # noqa: BLE001 - reported in model.json; the weights are in model.pt
            failures[name] = f"{type(exc).__name__}: {exc}"[:1000]
            log.warning("train: exporting %s failed: %s", name, failures[name])
    return exported, failures


def _present(name: str, exported: Mapping[str, bytes]) -> str | None:
    return name if name in exported else None


def _card_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The kept weights' validation and the test metrics, as scalars (model.json)."""
    out: dict[str, Any] = {"val": dict(metrics.get("kept") or {})}
    for split in ("test", "test_tta"):
        if metrics.get(split):
            out[split] = {k: v for k, v in metrics[split].items() if not isinstance(v, (Mapping, list))}
    return out


def write_outputs(run: TrainingRun, metrics: dict[str, Any], last_val: EvalResult | None, with_rows: Mapping[str, EvalResult]) -> list[FileEntry]:
    files: list[FileEntry] = []
    predictions = _predictions(run, with_rows)
    review = _review_figures(run, predictions, metrics) if predictions is not None else {}
    if predictions is not None:
        _write(run, contract.PREDICTIONS, parquet.table_to_parquet_bytes(predictions), files)
    model_state = {k: v.detach().cpu() for k, v in run.module.state_dict().items()}
    mean, std = channel_stats(run.channels, run.norm)
    evaluated = run.test_info or run.val_info or run.train_info  # what the card's evaluation view describes
    payload = {
        "model": model_state,
        "model_name": run.cfg.model,
        "labels": run.labels,
        "image_size": run.image_size,
        "channels": run.channels,
        "mean": list(mean),
        "std": list(std),
        "config": config_record(run.cfg),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    _write(run, contract.MODEL, buf.getvalue(), files)
    exported, failures = _exports(run)
    for name, data in exported.items():
        _write(run, name, data, files)
    card = model_card(
        architecture=run.cfg.model,
        classes=run.labels,
        size=run.image_size,
        channels=run.channels,
        mean=mean,
        std=std,
        recipe=config_record(run.cfg),
        metrics=_card_metrics(metrics),
        selection=metrics["selection"],
        data=run.data,
        files={
            "onnx": _present(contract.MODEL_ONNX, exported),
            "torchscript": _present(contract.MODEL_TORCHSCRIPT, exported),
            "state_dict": contract.MODEL,
        },
        failures=failures,
        divergence=metrics.get("divergence"),
        whole=evaluated.whole,
        stored_size=evaluated.size,
    )
    _write(run, contract.MODEL_CARD, json.dumps(card, indent=2), files)
    _write(run, contract.METRICS, json.dumps(metrics, indent=2), files)
    figures = {"curves.png": _report().curves_png(metrics["epochs"])}
    if last_val is not None:
        figures["confusion_matrix.png"] = _report().confusion_matrix_png(last_val.confusion, run.labels)
    figures["augmentations.png"] = _augmentation_grid(run)
    figures.update(review)
    for name, png in figures.items():
        _write(run, name, png, files)
    _write(run, contract.REPORT, _report().html_report(metrics, figures), files)
    _write(run, contract.CONFIG, config_to_yaml(run.cfg), files)
    return sorted(files, key=lambda f: f.name)


def commit(run: TrainingRun, train_report: StepReport, upstream: Mapping[str, Any]) -> None:
    """Manifest, then ``_SUCCESS``: the same protocol (and keys) as every step's output."""
    manifest = manifest_body(train_report, run.cfg, upstream)
    publish(run.out, "train", run.attempt, manifest)


def start_output(out: str, cfg: TrainConfig, ctx: DistInfo) -> str:
    """Claims ``out`` for train (:func:`imgpipe.commit.claim`): ``_SUCCESS`` first; the rest unless resuming.

    Returns:
        The attempt id on the main rank (which commits), ``""`` on the others.
    """
    attempt = ""
    if ctx.is_main:
        attempt = claim(out, "train", keep=(CHECKPOINT,) if cfg.resume else ())
    barrier(ctx)
    return attempt


def check_locations(data: str, out: str) -> None:
    a, b = data.rstrip("/") + "/", out.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise ValueError(f"train: out ({out}) must not be, contain or lie inside data ({data}); it is replaced")
