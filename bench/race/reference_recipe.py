"""torchvision's reference classification recipe, written against torchvision's own API, on class folders.

The recipe is the one torchvision publishes for its "v2" ImageNet weights (the ResNet-50
``IMAGENET1K_V2`` entry of its model docs: TrivialAugmentWide, RandomErasing 0.1, MixUp 0.2 /
CutMix 1.0, label smoothing 0.1, SGD with momentum 0.9, weight decay 2e-5 and none on norm
layers, a linear warmup then cosine annealing by epoch, an EMA of the weights), at its
per-epoch scheduling, its ``ExponentialMovingAverage`` rule (decay adjusted for the batch,
``ema_steps`` and epochs; the average restarts during warmup) and its preset transforms
(train: ``RandomResizedCrop``, horizontal flip, the policy, ``RandomErasing``; evaluation:
resize to ``crop / 0.875`` then the centre crop). Nothing here is copied from torchvision's
``references/`` folder: the transforms, MixUp/CutMix and the EMA are ``torchvision.transforms.v2``
and ``torch.optim.swa_utils``; the sizes and learning rate follow the data and batch
(``--lr`` defaults to the script's 0.1 for a batch of 256, scaled linearly).

``--recipe simple`` is instead the recipe most users start from: the classification reference's
defaults as its README's ResNet command runs them (``RandomResizedCrop`` and a flip, no
TrivialAugment, RandomErasing, MixUp/CutMix, label smoothing or EMA; SGD with momentum 0.9 and
weight decay 1e-4 on every parameter; its step schedule, lr x 0.1 every 30 epochs, which is a
constant lr for a run shorter than that), at the same lr scaled to the batch.

One process per run, as a pod runs it. It prints one JSON line per epoch (unix time at
the epoch's end, validation top-1, macro-F1 and loss for the model and its EMA) and one for
the end (test top-1 and macro-F1 of the last epoch's weights, and of the weights of the best
validation epoch, model or EMA, as imgpipe keeps them). Metrics are scikit-learn's.

    python bench/race/reference_recipe.py DATA_DIR --epochs 10 --batch-size 64 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import v2

# torchvision's presets normalize with ImageNet's statistics.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The evaluation resize of the presets: 256 for a 224 crop.
CROP_FRACTION = 224 / 256
# What each recipe sets (the flags' defaults are v2's). simple: train.py's own defaults.
RECIPES = {
    "v2": {},
    "simple": {
        "weight_decay": 1e-4,
        "norm_weight_decay": None,
        "label_smoothing": 0.0,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "random_erase": 0.0,
        "warmup_epochs": 0,
        "ema_decay": 0.0,
        "auto_augment": False,
        "lr_step_size": 30,
    },
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    p.add_argument("data", type=Path, help="a folder with train/, val/ and test/ class folders")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v2", help="v2: the IMAGENET1K_V2 recipe (default); simple: the script's defaults")
    p.add_argument("--exclude", type=Path, help="a JSON list of paths (relative to data) to leave out")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 x batch / 256 (the script's default lr for its batch)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=2e-5)
    p.add_argument("--norm-weight-decay", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup-alpha", type=float, default=0.2)
    p.add_argument("--cutmix-alpha", type=float, default=1.0)
    p.add_argument("--random-erase", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=int, default=1, help="linear warmup from lr x --warmup-decay, by epoch")
    p.add_argument("--warmup-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.99998, help="0 disables the EMA")
    p.add_argument("--ema-steps", type=int, default=32)
    p.add_argument("--crop", type=int, default=None, help="train and evaluation crop; default: the images' side")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    p.add_argument("--seed", type=int, default=0)
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def datasets(args: argparse.Namespace, crop: int) -> dict[str, torchvision.datasets.ImageFolder]:
    """ImageFolder per split with the presets' transforms, minus the excluded files."""
    train_tf = v2.Compose(
        [
            v2.RandomResizedCrop(crop, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            *([v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)] if args.auto_augment else []),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
            *([v2.RandomErasing(args.random_erase)] if args.random_erase > 0 else []),
            v2.ToPureTensor(),
        ]
    )
    eval_tf = v2.Compose(
        [
            v2.Resize(round(crop / CROP_FRACTION), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(crop),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
            v2.ToPureTensor(),
        ]
    )
    excluded = set(json.loads(args.exclude.read_text())) if args.exclude else set()
    out = {}
    for split in ("train", "val", "test"):
        ds = torchvision.datasets.ImageFolder(str(args.data / split), transform=train_tf if split == "train" else eval_tf)
        ds.samples = [s for s in ds.samples if str(Path(s[0]).relative_to(args.data)) not in excluded]
        ds.targets = [t for _, t in ds.samples]
        out[split] = ds
    return out


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict]:
    """The norm layers' parameters apart (their own weight decay), as the reference's ``--norm-weight-decay`` (``None``: the same)."""
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
    norm, other = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(module, norm_types) else other).extend(params)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    model.eval()
    losses, preds, labels = [], [], []
    for x, y in loader:
        logits = model(x)
        losses.append(nn.functional.cross_entropy(logits, y, reduction="sum").item())
        preds.append(logits.argmax(1).numpy())
        labels.append(y.numpy())
    p, t = np.concatenate(preds), np.concatenate(labels)
    return {"top1": float(accuracy_score(t, p)), "macro_f1": float(f1_score(t, p, average="macro")), "loss": sum(losses) / len(t)}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    args.auto_augment, args.lr_step_size = True, 0
    for name, value in RECIPES[args.recipe].items():
        setattr(args, name, value)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = torchvision.datasets.ImageFolder(str(args.data / "train"))
    crop = args.crop or min(probe[0][0].size)
    data = datasets(args, crop)
    num_classes = len(data["train"].classes)
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size / 256
    mix = [v2.MixUp(alpha=args.mixup_alpha, num_classes=num_classes)] if args.mixup_alpha > 0 else []
    mix += [v2.CutMix(alpha=args.cutmix_alpha, num_classes=num_classes)] if args.cutmix_alpha > 0 else []
    mixer = v2.RandomChoice(mix) if mix else None

    def collate(batch: list) -> tuple:
        return mixer(*default_collate(batch)) if mixer else default_collate(batch)

    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        data["train"], batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate, generator=g,
        persistent_workers=args.workers > 0, drop_last=False,
    )  # fmt: skip
    eval_loaders = {s: DataLoader(data[s], batch_size=args.batch_size, num_workers=args.workers) for s in ("val", "test")}

    model = torchvision.models.get_model(args.model, weights=None, num_classes=num_classes)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay, args.norm_weight_decay), lr=lr, momentum=args.momentum)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    warmup = min(args.warmup_epochs, args.epochs - 1)
    if args.lr_step_size:
        cosine = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=0.1)
    else:
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs - warmup)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=args.warmup_decay, total_iters=warmup)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    else:
        scheduler = cosine
    ema = None
    if args.ema_decay > 0:
        # The reference's adjustment: the decay is meant for its ImageNet run; scale it to this one.
        alpha = min(1.0, (1.0 - args.ema_decay) * args.batch_size * args.ema_steps / args.epochs)
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True)

    best = (-1.0, None, -1, "")
    for epoch in range(args.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for i, (x, y) in enumerate(train_loader):
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(x)
            seen += len(x)
            if ema is not None and i % args.ema_steps == 0:
                ema.update_parameters(model)
                if epoch < warmup:
                    ema.n_averaged.fill_(0)
        scheduler.step()
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "lr": optimizer.param_groups[0]["lr"]}
        val = evaluate(model, eval_loaders["val"])
        record.update({f"val_{k}": v for k, v in val.items()})
        if val["macro_f1"] > best[0]:
            best = (val["macro_f1"], copy.deepcopy(model.state_dict()), epoch, "model")
        if ema is not None:
            ema_val = evaluate(ema.module, eval_loaders["val"])
            record.update({f"ema_val_{k}": v for k, v in ema_val.items()})
            if ema_val["macro_f1"] > best[0]:
                best = (ema_val["macro_f1"], copy.deepcopy(ema.module.state_dict()), epoch, "ema")
        record["time"] = time.time()
        print(json.dumps(record), flush=True)
    last = evaluate(model, eval_loaders["test"])
    model.load_state_dict(best[1])
    kept = evaluate(model, eval_loaders["test"])
    final = {
        "final": True,
        "recipe": args.recipe,
        "lr": lr,
        "test_top1": last["top1"],
        "test_macro_f1": last["macro_f1"],
        "best_epoch": best[2],
        "best_weights": best[3],
        "best_test_top1": kept["top1"],
        "best_test_macro_f1": kept["macro_f1"],
        "images": {s: len(d) for s, d in data.items()},
        "started": started,
        "time": time.time(),
    }
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
