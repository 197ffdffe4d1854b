"""Evaluation of a classifier: loss, accuracy, macro-F1, per-class recall, confusion matrix.

:func:`evaluate` runs a model over batches of normalized images and labels (with
optional flip test-time augmentation) and sums its counts over all ranks; the train step
(:mod:`imgpipe.steps.train`) calls it on ``val`` after every epoch and on ``test`` at
the end, through a thin adapter that turns its loader's batches into such pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from imgpipe.distributed import DistInfo

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Classification metrics of one evaluation, reduced over all ranks.

    Attributes:
        loss: Mean cross-entropy.
        accuracy: Top-1 accuracy.
        macro_f1: F1 averaged over the classes that occur (true or predicted).
        per_class_recall: Recall per class index (``None`` for classes without samples).
        confusion: ``confusion[true][predicted]`` counts.
        images: Images evaluated.
    """

    loss: float
    accuracy: float
    macro_f1: float
    per_class_recall: list[float | None]
    confusion: list[list[int]]
    images: int

    def to_dict(self, labels: list[str]) -> dict[str, Any]:
        """JSON-safe form with class names."""
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class_recall": dict(zip(labels, self.per_class_recall)),
            "images": self.images,
            "confusion": self.confusion,
        }


def _confusion_metrics(confusion: torch.Tensor) -> tuple[float, float, list[float | None]]:
    cm = confusion.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    total = cm.sum().item()
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    present = (support + predicted) > 0
    macro_f1 = f1[present].mean().item() if present.any() else 0.0
    per_class = [r if s > 0 else None for r, s in zip(recall.tolist(), support.tolist())]
    return (tp.sum().item() / total if total else 0.0), macro_f1, per_class


def evaluate(
    model: nn.Module,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    num_classes: int,
    device: torch.device,
    *,
    amp: bool = False,
    tta_flip: bool = False,
    ctx: DistInfo | None = None,
) -> EvalResult:
    """Loss, accuracy, macro-F1, per-class recall and the confusion matrix of ``model``.

    Args:
        model: The classifier (the bare module, not its DDP wrapper).
        batches: Yields normalized ``(images, labels)`` on ``device``.
        num_classes: Classes of the confusion matrix.
        device: Where the model is.
        amp: bf16 autocast (CUDA).
        tta_flip: Average softmax probabilities of the images and their mirror images.
        ctx: Distributed context; counts are summed over ranks.
    """
    ctx = ctx or DistInfo()
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for x, y in batches():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x).float()
                if tta_flip:
                    probs = (logits.softmax(-1) + model(x.flip(-1)).float().softmax(-1)) / 2
                    logits = probs.clamp_min(1e-12).log()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            confusion.index_put_((y, logits.argmax(-1)), torch.ones_like(y), accumulate=True)
    if ctx.world_size > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    images = int(confusion.sum().item())
    accuracy, macro_f1, recall = _confusion_metrics(confusion)
    return EvalResult(
        loss=loss_sum.item() / max(images, 1),
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class_recall=recall,
        confusion=confusion.cpu().tolist(),
        images=images,
    )
