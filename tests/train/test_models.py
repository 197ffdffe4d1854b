"""The head/backbone split of the models, freezing the backbone, and the optimizer's groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgpipe.train.models import (
    backbone_blocks,
    build_model,
    head_parameter_names,
    set_backbone_frozen,
)
from imgpipe.train.optim import build_optimizer, build_scheduler, clip_gradients, param_groups
from imgpipe.train.schedule import UnfreezePlan, lr_factor, unfreeze_plan


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
    blocks = backbone_blocks(model, head)
    groups = param_groups(head, blocks, UnfreezePlan(()), [5, 5], backbone_lr_mult=0.1)
    optimizer = build_optimizer(model, 1e-2, 0.05, groups)
    got = [(g["name"], g["weight_decay"], g["lr"]) for g in optimizer.param_groups]
    assert got == [("head", 0.05, 1e-2), ("head", 0.0, 1e-2), ("backbone-0", 0.05, 1e-3), ("backbone-0", 0.0, 1e-3)]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    for step in range(6):
        factor = lr_factor(step, 2, 10)
        assert scheduler.get_last_lr() == pytest.approx([1e-2 * factor] * 2 + [1e-3 * factor] * 2)
        optimizer.step()
        scheduler.step()


def test_on_the_cpu_adamw_is_fused_and_steps_as_torchs_own_loop_does():
    import copy

    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    head = head_parameter_names(model, 3)
    groups = param_groups(head, backbone_blocks(model, head), UnfreezePlan(()), [5], backbone_lr_mult=0.1)
    twin = copy.deepcopy(model)
    fused = build_optimizer(model, 1e-3, 0.05, groups)
    assert all(g["fused"] for g in fused.param_groups)
    twins = dict(twin.named_parameters())
    # torch's per-parameter AdamW over the same groups: what imgpipe's fused one must match.
    settings = [{k: v for k, v in g.items() if k != "params"} for g in fused.param_groups]
    groups_of_twin = [[twins[n] for n in _names(model, g["params"])] for g in fused.param_groups]
    loop = torch.optim.AdamW([{**kept, "fused": None, "params": ps} for kept, ps in zip(settings, groups_of_twin, strict=True)])
    for step in range(5):  # the same gradients into both: the optimizers alone are compared
        torch.manual_seed(step)
        for name, p in model.named_parameters():
            p.grad = torch.randn_like(p)
            twins[name].grad = p.grad.clone()
        fused.step()
        loop.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, twins[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])  # clipped, and left as they are
def test_clipping_gradients_with_the_multi_tensor_kernels_matches_torchs_own_loop(max_norm):
    import copy

    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    norm = clip_gradients(model, max_norm)
    torch_norm = nn.utils.clip_grad_norm_(twin.parameters(), max_norm, foreach=False)  # the per-tensor loop
    torch.testing.assert_close(norm, torch_norm)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def _names(model: nn.Module, params: list) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_a_block_that_unfreezes_later_starts_its_own_warmup_there():
    model = build_model("resnet18", 4)
    head = head_parameter_names(model, 4)
    blocks = backbone_blocks(model, head)
    assert len(blocks) >= 3 and all(n.startswith("layer4.1.") for n in blocks[-1])  # the last residual block
    plan = unfreeze_plan(epochs=5, freeze_fraction=0.2, stages=2)  # head; + last block; all
    groups = param_groups(head, blocks, plan, [10] * 5, backbone_lr_mult=0.1)
    assert [(g.name, g.start_step) for g in groups] == [("head", 0), ("backbone-1", 10), ("backbone-2", 20)]
    assert groups[1].names == blocks[-1]
    optimizer = build_optimizer(model, 1e-2, 0.05, groups)
    scheduler = build_scheduler(optimizer, warmup_steps=5, total_steps=50)
    lrs = []
    for _ in range(30):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert lrs[9]["backbone-1"] == 0 and lrs[10]["backbone-1"] == pytest.approx(1e-3 * lr_factor(10, 5, 50) / 5)
    assert lrs[14]["backbone-1"] == pytest.approx(1e-3 * lr_factor(14, 5, 50))  # warmed up after 5 steps of its own
    assert lrs[19]["backbone-2"] == 0 < lrs[20]["backbone-2"] < lrs[24]["backbone-2"]
