"""Classification models by name, and loading their weights from object storage.

Models are torchvision's classification builders, always with ``weights=None``: this
module makes no hub downloads. Earlier weights come from a URI
(``s3://bucket/resnet50.pt``, ``file:///...``) through :mod:`imgpipe.storage`, as a
plain state dict, a ``model.pt`` written by the train step, or a ``checkpoint.pt``;
torchvision's pretrained weights come through :mod:`imgpipe.train.pretrained`, which caches
them in object storage and fits them with :func:`fit_state_dict` too.

Fine-tuning splits a model in two: the **head**, the classifier layer whose output is the
class scores (:func:`head_parameter_names`; replaced when the weights have another class
count), and the **backbone**, everything else. :func:`set_backbone_frozen` freezes the
backbone for the first epochs; :func:`imgpipe.train.optim.build_optimizer` gives it its own
learning rate.

``tiny_cnn`` is a four-layer network for smoke tests and CI, where a ResNet step on a
shared CPU costs more than the test can afford.

One-channel (grayscale) data gets a model whose first convolution takes one channel;
3-channel weights loaded into it have their first-layer filters summed over RGB, which
gives the same response to a grey image replicated to three channels.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from imgpipe import storage

__all__ = [
    "resolve_weights",
    "error_line",
    "backbone_blocks",
    "set_trainable",
    "TINY_CNN",
    "available_models",
    "build_model",
    "extract_state_dict",
    "read_state_dict",
    "fit_state_dict",
    "load_weights",
    "head_parameter_names",
    "set_backbone_frozen",
]

log = logging.getLogger(__name__)

TINY_CNN = "tiny_cnn"
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def available_models() -> list[str]:
    """Names :func:`build_model` accepts: torchvision's classification models and ``tiny_cnn``."""
    return sorted([*torchvision.models.list_models(module=torchvision.models), TINY_CNN])


def resolve_weights(model: str, name: str) -> WeightsEnum:
    """The member ``name`` of ``model``'s torchvision weights enum.

    Accepts a member name (``IMAGENET1K_V1``, the alias ``DEFAULT``) or its qualified
    form (``ResNet18_Weights.IMAGENET1K_V1``), nothing else: the name becomes part of a
    storage path only through the member it selects.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: For ``tiny_cnn``, a name the enum does not have (the message lists
            the valid ones), or weights without a usable classifier.
    """
    if not isinstance(name, str):
        raise TypeError(f"pretrained must be the name of a torchvision weights enum member, got {name!r}")
    if model == TINY_CNN:
        raise ValueError(f"{TINY_CNN} has no pretrained weights; pick a torchvision model (resnet18, ...) or give weights=URI")
    try:
        enum = torchvision.models.get_model_weights(model)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"model {model!r} has no torchvision weights enum ({exc})") from None
    member = enum.__members__.get(name.removeprefix(f"{enum.__name__}."))
    if member is None:
        raise ValueError(
            f"pretrained={name!r} is not a weights name of {model}; choose one of: {', '.join(enum.__members__)} (torchvision's {enum.__name__})"
        )
    if member.meta.get("categories") is None:
        # torchvision 0.29 torchvision/models/vgg.py, VGG16_Weights.IMAGENET1K_FEATURES: "can't be
        # used for classification because they are missing values in the `classifier` module".
        raise ValueError(f"{member!r} holds feature-extraction weights without a usable classifier; pick another")
    return member


def _tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    return None


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    found = _first_conv(model)
    if found is None:
        raise ValueError("this model has no Conv2d to adapt to one-channel input; use 3-channel data")
    parent, attr, conv = found
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise ValueError("this model's first convolution is grouped; use 3-channel data")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        # Keeps the architecture's own initialization: summed over RGB, the filters see a
        # grey image as the original filters see it replicated to three channels.
        new.weight.copy_(conv.weight.sum(1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


def build_model(name: str, num_classes: int, in_channels: int = 3, drop_path: float | None = None) -> nn.Module:
    """A freshly initialized classifier.

    Args:
        name: A torchvision classification model (``resnet18``, ``efficientnet_b0``,
            ``vit_b_16``, ...) or ``tiny_cnn``.
        num_classes: Output classes.
        in_channels: 3, or 1 for grayscale data (the first convolution is adapted).
        drop_path: Stochastic depth rate for the models that take one (torchvision's
            ``stochastic_depth_prob``: ConvNeXt, EfficientNet, Swin, MaxViT); ``None`` keeps
            the model's own. A model without stochastic depth ignores it (logged).

    Raises:
        ValueError: For an unknown name, fewer than 1 class, or another channel count.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if name == TINY_CNN:
        return _tiny_cnn(num_classes, in_channels)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")
    model = _torchvision_model(name, num_classes, drop_path)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _torchvision_model(name: str, num_classes: int, drop_path: float | None) -> nn.Module:
    if drop_path is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, stochastic_depth_prob=drop_path)
    except TypeError as e:  # the model's constructor has no such argument: it has no stochastic depth
        if "stochastic_depth_prob" not in str(e):
            raise
        log.info("model %s has no stochastic depth; drop_path %g is not used", name, drop_path)
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded file: a bare state dict, or ``{"model": ...}``.

    Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) are
    removed.

    Raises:
        ValueError: If the object holds no tensor mapping.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (name -> tensor), or a file with one under 'model'")
    out = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def error_line(exc: BaseException) -> str:
    """The first line of an error from ``torch.load``: its refusals of non-weights pickles run to pages."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def read_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The state dict in a weights file's bytes (tensors and plain data only: ``weights_only``).

    Args:
        data: A state dict, ``model.pt`` or ``checkpoint.pt`` as stored.
        source: Where the bytes came from, for error messages.

    Raises:
        ValueError: If the bytes are not a loadable PyTorch file holding a state dict.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{source} is not a loadable PyTorch weights file: {error_line(exc)}") from None
    return extract_state_dict(obj)


def load_weights(model: nn.Module, uri: str) -> list[str]:
    """Loads weights from object storage into ``model`` (:func:`fit_state_dict`).

    Args:
        model: The freshly built model.
        uri: ``file://``, ``s3://`` or a path; a state dict, ``model.pt`` or ``checkpoint.pt``.

    Returns:
        Names of the parameters left at their initialization (skipped or absent).

    Raises:
        FileNotFoundError: If nothing is stored at ``uri``.
        ValueError: If the file is not a state dict or does not fit the model's architecture.
    """
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"no weights at {uri}") from None
    return fit_state_dict(model, read_state_dict(data, uri), uri)


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Loads ``state`` into ``model`` where it fits: how weights are fine-tuned on other classes.

    Tensors whose shape does not fit are skipped (a classifier head with another class
    count); a 3-channel first convolution is summed into a 1-channel one. Everything
    else must match.

    Args:
        model: The freshly built model.
        state: Its architecture's state dict (wrapper prefixes removed).
        source: Where the weights came from, for messages.

    Returns:
        Names of the tensors left at their initialization (skipped or absent).

    Raises:
        ValueError: If the weights do not fit the model's architecture.
    """
    own = model.state_dict()
    fitted: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in state.items():
        target = own.get(key)
        if target is None:
            continue
        if value.shape != target.shape and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            value = value.sum(1, keepdim=True)
        if value.shape != target.shape:
            skipped.append(key)
            continue
        fitted[key] = value
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(fitted))
    if unexpected or len(fitted) < len(own) // 2:
        raise ValueError(
            f"weights at {source} do not fit this model: {len(unexpected)} unknown tensors "
            f"(e.g. {unexpected[:3]}), {len(missing)} of {len(own)} left unloaded; is it the same architecture?"
        )
    model.load_state_dict(fitted, strict=False)
    if missing:
        log.warning("weights from %s: %d tensors kept their initialization: %s", source, len(missing), ", ".join(missing[:8]))
    return missing


def _head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The last module holding parameters of its own: the classifier layer of every torchvision model."""
    found = [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    if not found:
        raise ValueError("this model has no parameters")
    return found[-1]


def head_parameter_names(model: nn.Module, num_classes: int) -> frozenset[str]:
    """Names (as in ``named_parameters``) of the classifier head: the layer producing the class scores.

    Every torchvision classification model and ``tiny_cnn`` define that layer last
    (``fc``, ``classifier.3``, ``heads.head``, ...); its parameters are the ones whose
    shapes depend on the class count, the ones :func:`fit_state_dict` leaves out when
    the weights have other classes. Auxiliary heads (GoogLeNet, Inception v3) count
    as backbone.

    Args:
        model: The bare model (not a DDP wrapper).
        num_classes: The classes it was built for.

    Raises:
        ValueError: If the last parameterized layer does not output ``num_classes`` values.
    """
    name, module = _head_module(model)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or weight.shape[0] != num_classes:
        raise ValueError(
            f"cannot tell this model's classifier head: its last layer ({name or 'the model'}, "
            f"{type(module).__name__}) does not output {num_classes} classes"
        )
    return frozenset(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))


def backbone_blocks(model: nn.Module, head: frozenset[str]) -> list[frozenset[str]]:
    """The backbone's parameter names in blocks, input first: what gradual unfreezing unfreezes from the end.

    The model's top-level parameterized children outside the head; a block holding more than
    half of the backbone's parameters is split into its own children while it has two or
    more (ResNet's ``layer4`` into its two residual blocks, EfficientNet's ``features``
    into its stages, a ViT's encoder into its layers), so the last block is a modest part;
    a block under 1% of the backbone joins the one before it.
    """

    def own(prefix: str, module: nn.Module) -> frozenset[str]:
        return frozenset(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()) - head

    def count(names: frozenset[str]) -> int:
        return sum(params[n].numel() for n in names)

    params = dict(model.named_parameters())
    blocks = [(name, child) for name, child in model.named_children() if own(name, child)]
    total = sum(count(own(n, c)) for n, c in blocks) or 1
    changed = True
    while changed:
        changed = False
        for i, (name, child) in enumerate(blocks):
            inner = [(f"{name}.{n}", c) for n, c in child.named_children() if own(f"{name}.{n}", c)]
            if count(own(name, child)) * 2 > total and len(inner) >= 2:
                blocks[i : i + 1] = inner
                changed = True
                break
    grouped = [own(n, c) for n, c in blocks]
    loose = frozenset(params) - head - frozenset().union(*grouped)  # parameters of the model itself
    merged: list[frozenset[str]] = []
    for block in ([loose] if loose else []) + grouped:
        # A sliver (a final norm layer, a lone bias) joins the block before it: a stage of its own would train nothing.
        if merged and count(block) * 100 < total:
            merged[-1] = merged[-1] | block
        else:
            merged.append(block)
    return merged


def set_trainable(model: nn.Module, trainable: frozenset[str]) -> None:
    """Trains exactly the parameters named in ``trainable``; call after ``model.train()``.

    The others are frozen as :func:`set_backbone_frozen` freezes the backbone: no gradients,
    and their BatchNorm layers in eval mode (their running statistics stay the weights').
    """
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    for name, module in model.named_modules():
        mine = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and mine and not set(mine) & trainable:
            module.eval()


def set_backbone_frozen(model: nn.Module, head: frozenset[str], frozen: bool) -> None:
    """Freezes (or unfreezes) every parameter outside ``head``; call after ``model.train()``.

    Frozen means ``requires_grad`` off (no gradients, no optimizer updates: AdamW skips
    parameters without one) and the backbone's normalization layers in eval mode, so
    their running statistics stay those of the weights and the head learns on the
    features it will see at evaluation. (Keras's transfer-learning guide keeps frozen
    BatchNorm layers in inference mode for the same reason; timm's ``freeze`` turns them
    into ``FrozenBatchNorm2d``.) Unfrozen, everything trains again; the caller's
    ``model.train()`` already put those layers back in training mode.

    Args:
        model: The bare model (not a DDP wrapper), in training mode.
        head: :func:`head_parameter_names`.
        frozen: Freeze, or unfreeze.
    """
    for name, param in model.named_parameters():
        if name not in head:
            param.requires_grad_(not frozen)
    if not frozen:
        return
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not set(own) & head:
            module.eval()
