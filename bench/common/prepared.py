"""A synth set taken through download, clean and resize in this process, for the benchmarks that train on it."""

from __future__ import annotations

from typing import Any


def download_synth(root: str, *, per_class: int, seed: int) -> str:
    """Generates 12 synth breeds under ``root`` and downloads them; returns the download prefix."""
    from imgpipe import storage
    from imgpipe.data.synth import SynthConfig, generate
    from imgpipe.steps.download import DownloadConfig, download

    generate(storage.join(root, "synth"), SynthConfig(classes=12, per_class=per_class, seed=seed), progress=False)
    download(storage.join(root, "synth", "images.tar.gz"), storage.join(root, "download"), DownloadConfig())
    return storage.join(root, "download")


def clean_and_resize(root: str, *, size: int, clean_cfg: Any = None) -> str:
    """Cleans ``{root}/download`` (with ``clean_cfg``) and resizes it to ``size``; returns the resize prefix.

    Resize starts Ray: run inside the loopback-only namespace.
    """
    from imgpipe import storage
    from imgpipe.clean.config import CleanConfig
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.steps.clean import clean
    from imgpipe.steps.resize import resize

    clean(storage.join(root, "download"), storage.join(root, "clean"), clean_cfg or CleanConfig())
    resize(storage.join(root, "clean"), storage.join(root, "resize"), ResizeConfig(size=size, progress_bars=False))
    return storage.join(root, "resize")


def prepare(root: str, *, per_class: int, seed: int, size: int, clean_cfg: Any = None) -> str:
    """:func:`download_synth` then :func:`clean_and_resize`; returns the resize prefix."""
    download_synth(root, per_class=per_class, seed=seed)
    return clean_and_resize(root, size=size, clean_cfg=clean_cfg)


def plain_recipe(model: str, epochs: int, *, lr: float = 2e-3, **overrides: Any) -> Any:
    """The probes' plain CPU training: batch 32, short warmup, basic augmentation, no MixUp, CutMix or erasing.

    What the label and class-balance probes train with, so what they measure is the labels, not the recipe.
    """
    from imgpipe.train.config import TrainConfig

    plain = dict(batch_size=32, warmup_fraction=0.05, num_workers=0, device="cpu", aug_policy="basic", mixup=0.0, cutmix=0.0, random_erasing=0.0)
    return TrainConfig(model=model, epochs=epochs, lr=lr, **{**plain, **overrides})
