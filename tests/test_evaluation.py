"""Evaluation metrics on a fixed toy classifier: accuracy, macro-F1, recall, flip TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgpipe import evaluation
from imgpipe.evaluation import evaluate
from imgpipe.steps import train as train_mod


def test_evaluate_computes_accuracy_macro_f1_recall_and_flip_tta():
    class Fixed(torch.nn.Module):
        """Predicts class 0 for a left-bright image, class 1 otherwise."""

        def forward(self, x):
            left = x[..., : x.shape[-1] // 2].mean((1, 2, 3))
            right = x[..., x.shape[-1] // 2 :].mean((1, 2, 3))
            return torch.stack([left - right, right - left], 1) * 10

    x = torch.zeros(4, 1, 2, 2)
    x[:2, ..., 0] = 1  # two left-bright images
    x[2:, ..., 1] = 1  # two right-bright images
    y = torch.tensor([0, 0, 0, 1])  # one of class 0 looks like class 1
    result = evaluate(Fixed(), lambda: iter([(x, y)]), 2, torch.device("cpu"))
    assert result.accuracy == 0.75 and result.confusion == [[2, 1], [0, 1]]
    assert result.per_class_recall == [pytest.approx(2 / 3), 1.0]
    assert result.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)  # F1(class 0)=0.8, F1(class 1)=2/3
    tta = evaluate(Fixed(), lambda: iter([(x, y)]), 2, torch.device("cpu"), tta_flip=True)
    assert tta.images == 4 and tta.loss == pytest.approx(np.log(2), rel=1e-4)  # a flip cancels every logit


def test_the_train_step_still_exports_evaluate_and_eval_result():
    assert train_mod.evaluate is evaluation.evaluate and train_mod.EvalResult is evaluation.EvalResult
    assert {"evaluate", "EvalResult"} <= set(train_mod.__all__)
