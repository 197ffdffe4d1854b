"""The head/backbone split of the models, freezing the backbone, and the optimizer's groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgpipe.train.config import TrainConfig
from imgpipe.train.models import build_model, head_parameter_names, set_backbone_frozen
from imgpipe.train.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("tiny_cnn", {"13.weight", "13.bias"}),
        ("resnet18", {"fc.weight", "fc.bias"}),
        ("mobilenet_v3_small", {"classifier.3.weight", "classifier.3.bias"}),
        ("squeezenet1_0", {"classifier.1.weight", "classifier.1.bias"}),  # a 1x1 convolution
        ("vit_b_16", {"heads.head.weight", "heads.head.bias"}),
        ("convnext_tiny", {"classifier.2.weight", "classifier.2.bias"}),
    ],
)
def test_the_head_is_what_depends_on_the_class_count(name, head):
    # Built on the meta device: shapes only, no memory or initialization time.
    with torch.device("meta"):
        model, other = build_model(name, 7), dict(build_model(name, 8).named_parameters())
    assert head_parameter_names(model, 7) == head
    assert {k for k, p in model.named_parameters() if p.shape != other[k].shape} == head


def test_a_model_whose_last_layer_is_no_classifier_is_refused():
    with pytest.raises(ValueError, match="cannot tell this model's classifier head"):
        head_parameter_names(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), 3)


def test_freezing_stops_backbone_gradients_and_statistics_until_unfrozen():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4)
    head = head_parameter_names(model, 4)
    x = torch.randn(8, 3, 16, 16)
    stats = model[1].running_mean.clone()

    model.train()
    set_backbone_frozen(model, head, frozen=True)
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == head
    assert not model[1].training and model[13].training
    assert torch.equal(model[1].running_mean, stats)  # eval-mode BatchNorm: statistics kept

    model.zero_grad(set_to_none=True)
    model.train()  # what each epoch does before deciding
    set_backbone_frozen(model, head, frozen=False)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model[1].training and not torch.equal(model[1].running_mean, stats)


def test_the_backbone_gets_its_own_groups_and_the_schedule_scales_every_group():
    model = build_model("tiny_cnn", 4)
    head = head_parameter_names(model, 4)
    cfg = TrainConfig(model="tiny_cnn", lr=1e-2, backbone_lr_mult=0.1, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg, head)
    groups = [(g["name"], g["weight_decay"], g["lr"], len(g["params"])) for g in optimizer.param_groups]
    assert groups == [("head", 0.05, 1e-2, 1), ("head", 0.0, 1e-2, 1), ("backbone", 0.05, 1e-3, 3), ("backbone", 0.0, 1e-3, 6)]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    for step in range(6):
        factor = lr_factor(step, 2, 10)
        assert scheduler.get_last_lr() == pytest.approx([1e-2 * factor] * 2 + [1e-3 * factor] * 2)
        optimizer.step()
        scheduler.step()
    # Without a head, as before: one LR for all, decay and no-decay groups.
    plain = build_optimizer(model, cfg)
    assert [(g["name"], g["lr"]) for g in plain.param_groups] == [("head", 1e-2), ("head", 1e-2)]
