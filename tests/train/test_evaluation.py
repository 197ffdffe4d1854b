"""Evaluation metrics on a fixed toy classifier: accuracy, macro-F1, recall, flip TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgpipe.steps import train as train_mod
from imgpipe.train import evaluation
from imgpipe.train.evaluation import evaluate


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
    tta = evaluate(Fixed(), lambda: iter([(x, y)]), 2, torch.device("cpu"), tta_flips=(-1,))
    assert tta.images == 4 and tta.loss == pytest.approx(np.log(2), rel=1e-4)  # a flip cancels every logit


def test_evaluate_and_eval_result_have_one_home():
    """The train step uses them; it does not re-export them (each public name has one home)."""
    assert train_mod.evaluate is evaluation.evaluate and train_mod.EvalResult is evaluation.EvalResult
    assert not {"evaluate", "EvalResult"} & set(train_mod.__all__)
    assert {"evaluate", "EvalResult"} <= set(evaluation.__all__)


# ------------------------------------------------------------------ PR-AUC


def test_average_precision_matches_scikit_learns_definition_by_hand():
    # scikit-learn's average_precision_score docstring example: y_true [0, 0, 1, 1],
    # scores [0.1, 0.4, 0.35, 0.8] -> 0.83. By hand, thresholds high to low:
    # 0.8 (R 0.5, P 1), 0.4 (R 0.5, P 1/2), 0.35 (R 1, P 2/3), 0.1 (R 1, P 1/2):
    # AP = 0.5 * 1 + 0 * 1/2 + 0.5 * 2/3 + 0 * 1/2 = 5/6.
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert evaluation.average_precision(scores, np.array([0, 0, 1, 1], bool)) == pytest.approx(5 / 6)
    # Tied scores are one threshold, whatever their order: 0.5 (R 0.5, P 1/2), 0.2 (R 1, P 2/3).
    for order in ([0, 1, 2], [1, 0, 2]):
        tied = np.array([0.5, 0.5, 0.2])[order]
        assert evaluation.average_precision(tied, np.array([1, 0, 1], bool)[order]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert evaluation.average_precision(scores, np.zeros(4, bool)) is None, "undefined without positives"
    assert evaluation.average_precision(scores, np.ones(4, bool)) == 1.0


def test_macro_average_precision_is_one_vs_rest_over_classes_with_samples():
    scores = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 1, 0])
    # class 0: scores 0.7 (+), 0.5 (-), 0.3 (-), 0.2 (+) -> 1 * 0.5 + 0.5 * 2/4 = 0.75
    # class 1: scores 0.6 (+), 0.4 (+), 0.3 (-), 0.2 (-) -> 1.0; class 2 has no sample: left out
    macro, per_class = evaluation.macro_average_precision(scores, labels)
    assert per_class == [pytest.approx(0.75), 1.0, None]
    assert macro == pytest.approx(0.875)


def test_evaluate_reports_pr_auc_from_softmax_scores():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.2, 0.1]])
    y = torch.tensor([0, 1, 1, 0])
    result = evaluate(torch.nn.Identity(), lambda: iter([(logits[:2], y[:2]), (logits[2:], y[2:])]), 2, torch.device("cpu"))
    probs = logits.softmax(-1).numpy()
    expected, per_class = evaluation.macro_average_precision(probs, y.numpy())
    assert result.pr_auc == pytest.approx(expected) and result.per_class_ap == pytest.approx(per_class)
    assert result.to_dict(["a", "b"])["per_class_ap"] == {"a": pytest.approx(per_class[0]), "b": pytest.approx(per_class[1])}


def _ddp_rank(rank: int, init: str, out: str) -> None:
    """One gloo rank of the gather test: ranks hold 3 and 5 of the 8 samples."""
    import json

    import torch.distributed as dist

    from imgpipe.train.distributed import DistInfo

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        logits, y = _GATHER_CASE
        part = slice(0, 3) if rank == 0 else slice(3, 8)
        ctx = DistInfo(rank=rank, world_size=2)
        result = evaluate(torch.nn.Identity(), lambda: iter([(logits[part], y[part])]), 3, torch.device("cpu"), ctx=ctx)
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump({"pr_auc": result.pr_auc, "images": result.images, "per_class_ap": result.per_class_ap}, fh)
    finally:
        dist.destroy_process_group()


_GATHER_CASE = (
    torch.tensor(
        [[2.0, 0.1, 0.0], [0.3, 1.5, 0.2], [0.1, 0.2, 0.9], [1.1, 1.0, 0.0], [0.0, 0.4, 0.5], [0.9, 0.1, 0.3], [0.2, 0.8, 0.7], [0.5, 0.5, 0.6]]
    ),
    torch.tensor([0, 1, 2, 1, 2, 0, 2, 0]),
)


def test_pr_auc_over_two_ranks_gathers_every_score(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    logits, y = _GATHER_CASE
    alone = evaluate(torch.nn.Identity(), lambda: iter([(logits, y)]), 3, torch.device("cpu"))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["images"] == 8, "every rank reports the whole split"
        assert got["pr_auc"] == pytest.approx(alone.pr_auc) and got["per_class_ap"] == pytest.approx(alone.per_class_ap)
    # Not a trivial case: the ranks' own halves would give other values.
    assert alone.pr_auc != pytest.approx(evaluate(torch.nn.Identity(), lambda: iter([(logits[:3], y[:3])]), 3, torch.device("cpu")).pr_auc)


def test_the_evaluations_take_twice_the_steps_batch_and_score_alike_in_any_batch(tmp_path):
    """``eval_batch_size`` 0: twice ``batch_size``; a validation's loss and a test's predictions do not depend on it.

    Precise BN measures in the training's batches whatever the evaluations' are, so its statistics do not either.
    """
    import json

    from imgpipe import contract, storage
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig
    from imgpipe.train.loader_config import MAX_BATCH
    from tests.train.test_loader import write_resize_output

    assert TrainConfig(batch_size=8).loader(shuffle=False).batch_size == 16
    assert TrainConfig(batch_size=8).loader(shuffle=True).batch_size == 8
    assert TrainConfig(batch_size=8, eval_batch_size=3).loader(shuffle=False).batch_size == 3
    assert TrainConfig(batch_size=MAX_BATCH).evaluation_batch == MAX_BATCH
    with pytest.raises(ValueError, match="eval_batch_size"):
        TrainConfig(eval_batch_size=-1)
    data = write_resize_output(str(tmp_path / "resize"))
    base = {"model": "tiny_cnn", "epochs": 1, "batch_size": 8, "num_workers": 0, "device": "cpu", "precise_bn": 16, "seed": 3}
    outs = {}
    for eval_batch in (0, 3):
        out = str(tmp_path / f"train-{eval_batch}")
        train(data, out, TrainConfig(**base, eval_batch_size=eval_batch))
        outs[eval_batch] = json.loads(storage.read_bytes(storage.join(out, contract.METRICS)))
    (a,), (b,) = outs[0]["epochs"], outs[3]["epochs"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5) and a["val_accuracy"] == b["val_accuracy"]
    ta, tb = outs[0]["test"], outs[3]["test"]
    assert ta["confusion"] == tb["confusion"] and ta["per_class_ap"] == pytest.approx(tb["per_class_ap"])
    assert ta["loss"] == pytest.approx(tb["loss"], rel=1e-5)
