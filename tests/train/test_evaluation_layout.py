"""The evaluations' memory layout on a CPU (TrainingRun.evaluation_layout): channels-last weights inside, the training's after."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from imgpipe.train.config import TrainConfig
from imgpipe.train.run import TrainingRun


def _run(channels_last: bool = True, ema: bool = True) -> TrainingRun:
    with torch.random.fork_rng():  # the test process's generator left as it was
        torch.manual_seed(0)
        module = torchvision.models.resnet18(num_classes=3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    unused = ("data", "out", "ctx", "labels", "train_info", "val_info", "test_info", "gpu_augment", "scheduler", "mixer")
    fields = dict.fromkeys((*unused, "train_loader", "val_loader"))
    return TrainingRun(
        **fields,
        cfg=TrainConfig(channels_last=channels_last),
        device=torch.device("cpu"),
        image_size=32,
        channels=3,
        model=module,
        module=module,
        optimizer=optimizer,
        steps_per_epoch=[1],
        ema=torch.optim.swa_utils.AveragedModel(module, use_buffers=True) if ema else None,
    )


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4]


def _train_step(run: TrainingRun, x: torch.Tensor) -> None:
    run.module.train()
    run.optimizer.zero_grad()
    nn.functional.cross_entropy(run.module(x), torch.tensor([0, 1, 2, 0])).backward()
    run.optimizer.step()


def test_a_cpu_evaluates_with_channels_last_weights_and_trains_in_its_own_layout_after():
    run = _run()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _train_step(run, x)  # momentum buffers exist, in the training's layout
    params = [id(p) for p in run.module.parameters()]
    run.module.eval()
    with torch.no_grad():
        before = run.module(x)
    with run.evaluation_layout():
        for module in (run.module, run.ema.module):
            assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _weights(module))
        assert not run.module.conv1.weight.is_contiguous()  # a 7 x 7 kernel's two layouts differ (a 1 x 1's do not)
        with torch.no_grad():
            inside = run.module(x)
    # The same values in another order in memory: the same logits up to the sums' rounding.
    torch.testing.assert_close(inside, before, rtol=1e-4, atol=1e-5)
    for module in (run.module, run.ema.module):
        assert all(w.is_contiguous() for w in _weights(module))
    # The optimizer's parameters are the module's still, and it trains on.
    assert [id(p) for p in run.module.parameters()] == params
    _train_step(run, x)
    assert all(p.grad is None or p.grad.is_contiguous() for p in run.module.parameters())


def test_the_training_layout_comes_back_when_an_evaluation_raises():
    run = _run(ema=False)
    with pytest.raises(RuntimeError, match="an evaluation failed"), run.evaluation_layout():
        assert _weights(run.module)[0].is_contiguous(memory_format=torch.channels_last)
        raise RuntimeError("an evaluation failed")
    assert all(w.is_contiguous() for w in _weights(run.module))


def test_with_channels_last_off_the_evaluations_keep_the_training_layout():
    run = _run(channels_last=False)
    with run.evaluation_layout():
        assert all(w.is_contiguous() for m in (run.module, run.ema.module) for w in _weights(m))
