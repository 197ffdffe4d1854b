"""A synth set taken through download, clean and resize in this process, for the benchmarks that train on it."""

from __future__ import annotations

from typing import Any


def prepare(root: str, *, per_class: int, seed: int, size: int, clean_cfg: Any = None) -> str:
    """Generates 12 synth breeds under ``root`` and runs download, clean (``clean_cfg``) and resize to ``size``.

    Returns:
        The resize output's prefix (``{root}/resize``). Resize starts Ray: run inside the
        loopback-only namespace.
    """
    from imgpipe import storage
    from imgpipe.clean.config import CleanConfig
    from imgpipe.data.synth import SynthConfig, generate
    from imgpipe.resize.spec import ResizeConfig
    from imgpipe.steps.clean import clean
    from imgpipe.steps.download import DownloadConfig, download
    from imgpipe.steps.resize import resize

    generate(storage.join(root, "synth"), SynthConfig(classes=12, per_class=per_class, seed=seed), progress=False)
    download(storage.join(root, "synth", "images.tar.gz"), storage.join(root, "download"), DownloadConfig())
    clean(storage.join(root, "download"), storage.join(root, "clean"), clean_cfg or CleanConfig())
    resize(storage.join(root, "clean"), storage.join(root, "resize"), ResizeConfig(size=size, progress_bars=False))
    return storage.join(root, "resize")
