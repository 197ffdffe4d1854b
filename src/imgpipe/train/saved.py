"""A committed train output as a model to load and score again, for the promotion gate and the audit.

module, card = load_saved_model(prefix, classes)
result = evaluate_saved(prefix, data, split="test")   # as the run evaluated: fp32, no TTA
batches = saved_batches(data, "train", card)          # the same view, for your own loop
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from imgpipe import contract, storage
from imgpipe.train.assembly import (
    eval_loader,
)
from imgpipe.train.augment import (
    Normalization,
    build_batch_eval_transform,
    normalize,
)
from imgpipe.train.card import read_card
from imgpipe.train.config import TrainConfig
from imgpipe.train.distributed import (
    DistInfo,
    resolve_device,
)
from imgpipe.train.evaluation import EvalResult, evaluate
from imgpipe.train.models import (
    build_model,
)
from imgpipe.train.partition import (
    describe_split,
    read_labels,
    split_names,
)

__all__ = ["load_saved_model", "saved_batches", "evaluate_saved"]


def load_saved_model(prefix: str, classes: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The kept weights of a train output as a module in evaluation mode, with its card.

    Raises:
        ValueError: If ``prefix`` has no ``model.json`` or was trained on other ``classes``.
    """
    card = read_card(prefix, classes)
    payload = torch.load(io.BytesIO(storage.read_bytes(storage.join(prefix, contract.MODEL))), map_location="cpu", weights_only=True)
    module = build_model(card["architecture"], card["num_classes"], card["input"]["channels"])
    module.load_state_dict(payload["model"])
    return module.eval(), card


def saved_batches(
    data: str, split: str, card: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 64, who: str = "the model"
) -> Callable[[], Iterator[tuple[torch.Tensor, ...]]]:
    """``split`` of a resize output as a saved model takes it: its evaluation view at the model's own
    input size and its own normalization (from its ``model.json`` ``card``).

    Returns:
        A callable giving the batches anew each call: normalized images, labels and row indexes on ``device``.

    Raises:
        ValueError: If ``data`` has no such split, or its images have other channels than the
            model (``who``) takes; checked here, before any batch.
    """
    manifest = contract.read_manifest(data, expect_step="resize")
    if split not in split_names(data, manifest):
        raise ValueError(f"{data} has no {split} split")
    info = describe_split(data, split, manifest)
    channels, size = int(card["input"]["channels"]), int(card["input"]["size"])
    if info.channels != channels:
        raise ValueError(f"{who} takes {channels}-channel images; the {split} split of {data} has {info.channels}")
    target = torch.device(device)
    norm = Normalization(tuple(card["input"]["mean"] * (3 // channels)), tuple(card["input"]["std"] * (3 // channels)))  # type: ignore[arg-type]
    cfg = TrainConfig(model=card["architecture"], batch_size=batch_size, num_workers=0, device=str(target.type), persistent_workers=False)
    loader = eval_loader(cfg, info, size, "cpu", DistInfo(), persistent=False)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        loader.set_epoch(0)
        for batch in loader:
            images = batch["image"].to(target)
            if images.shape[-2:] != (size, size):
                images = build_batch_eval_transform(size)(images)
            yield normalize(images, channels, False, norm), batch["label"].to(target), batch["index"]

    return batches


def evaluate_saved(prefix: str, data: str, split: str = "test", device: str = "auto", batch_size: int = 64) -> EvalResult:
    """Evaluates the model of a train output on ``split`` of a resize output, as its own run evaluated.

    The images get the evaluation view at the model's own input size and the model's own
    normalization (from its ``model.json``), whatever size the data was made for.

    Raises:
        ValueError: If the model was trained on other classes or channels than ``data`` has,
            or ``data`` has no such split.
    """
    labels = read_labels(data, contract.read_manifest(data, expect_step="resize"))
    module, card = load_saved_model(prefix, labels)
    target = resolve_device(device, 0)
    batches = saved_batches(data, split, card, target, batch_size, who=prefix)
    module.to(target)
    return evaluate(module, batches, len(labels), target, ctx=DistInfo())
