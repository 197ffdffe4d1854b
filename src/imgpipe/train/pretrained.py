"""torchvision's pretrained weights, downloaded once into object storage and read from there.

``TrainConfig.pretrained`` names a member of the model's torchvision weights enum
(``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``DEFAULT``, ...; :func:`imgpipe.train.models.resolve_weights`). The
first run that asks for it downloads the file with torchvision's own mechanism
(``WeightsEnum.get_state_dict``, i.e. ``torch.hub.load_state_dict_from_url`` with its
SHA-256 check) and stores the file as downloaded at::

    {weights_cache}/{model}/{enum member}-{file name}
    e.g. s3://bucket/imgpipe/weights/resnet18/IMAGENET1K_V1-resnet18-f37072fd.pth

Later runs, and every rank of a DDP run, read that object: rank 0 downloads while the
other ranks wait at a barrier (:func:`fetch`). The write is atomic
(:func:`imgpipe.storage.open_write`), so a download killed half-way leaves no object and
the next run downloads again. Every read checks the file's SHA-256 against the prefix
its torchvision file name carries (``resnet18-f37072fd.pth``), as torch.hub does after a
download (:func:`read_cached`). An alias (``DEFAULT``) is stored under the member it
stands for, so both names share one object.

Where pods cannot reach download.pytorch.org, copy the file to the cache object once
(the download error names both); no download is then attempted.

The weights also decide the input: :func:`normalization` is their mean and std (most are
ImageNet's, EfficientNet-V2-L's are 0.5), and :func:`size_advice` says when the training
size is not the one they were trained at. Weights from object storage (``TrainConfig.weights``)
keep the mean and std an imgpipe ``model.pt`` records (:func:`recorded_normalization`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch.hub import HASH_REGEX
from torchvision.models import WeightsEnum

from imgpipe import storage
from imgpipe.resize.spec import PRESETS
from imgpipe.train.augment import Normalization
from imgpipe.train.distributed import DistInfo, barrier
from imgpipe.train.models import error_line, fit_state_dict, read_state_dict

__all__ = [
    "file_name",
    "cache_uri",
    "normalization",
    "recorded_normalization",
    "size_advice",
    "fetch",
    "read_cached",
    "load_pretrained",
]

log = logging.getLogger(__name__)

# One path segment: what a model name and a torchvision file name may be in a cache URI.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def file_name(weights: WeightsEnum) -> str:
    """The weights' file name in torchvision's URL (``resnet18-f37072fd.pth``).

    Raises:
        ValueError: If it is not one plain path segment.
    """
    name = posixpath.basename(urlparse(weights.url).path)
    if not _SEGMENT.fullmatch(name):
        raise ValueError(f"{weights!r}: file name {name!r} of {weights.url} cannot name a cache object")
    return name


def cache_uri(cache: str, model: str, weights: WeightsEnum) -> str:
    """Where ``weights`` for ``model`` are cached: ``{cache}/{model}/{member}-{file name}``.

    Raises:
        ValueError: If ``cache`` is not a storage URI, or ``model`` is not one path segment.
    """
    if not _SEGMENT.fullmatch(model):
        raise ValueError(f"model name {model!r} cannot name a cache folder")
    return storage.join(storage.normalize_uri(cache), model, f"{weights.name}-{file_name(weights)}")


def normalization(weights: WeightsEnum) -> Normalization:
    """The mean and std the weights were trained with (their ``transforms()``, torchvision's ``ImageClassification``)."""
    preset = weights.transforms()
    return Normalization(tuple(preset.mean), tuple(preset.std))


def recorded_normalization(uri: str) -> Normalization | None:
    """The mean and std a weights file at ``uri`` was trained with, when it records them.

    An imgpipe ``model.pt`` does (``mean``/``std``, one value per input channel); a bare
    state dict or a ``checkpoint.pt`` does not: ``None``.

    Raises:
        FileNotFoundError: If nothing is stored at ``uri``.
        ValueError: If the file is not a loadable PyTorch file.
    """
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"no weights at {uri}") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{uri} is not a loadable PyTorch weights file: {error_line(exc)}") from None
    if not isinstance(payload, dict) or not payload.get("mean") or not payload.get("std"):
        return None
    return Normalization.of_channels(payload["mean"], payload["std"])


def size_advice(model: str, weights: WeightsEnum, size: int) -> str | None:
    """A warning when ``size`` is not the side ``model``'s ``weights`` were trained and evaluated at; else ``None``.

    Convolutional networks fine-tune at other sizes, usually a little less well; a
    ViT's positional embeddings need its own size (the model refuses another one). The
    advice names the resize preset of the model's family when one has that size.
    """
    preset = weights.transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    if size == crop:
        return None
    family = model.replace("_", "-")
    presets = [name for name, side in PRESETS.items() if side == crop and family.startswith(name)]
    hint = f"resize with --size {crop}" + (f" (or --preset {presets[0]})" if presets else "")
    return (
        f"{weights!r} was trained at {crop} px (torchvision's evaluation transform: resize {resize}, centre crop "
        f"{crop}); this run trains at {size} px. For the weights' own size, {hint} or set image_size {crop}."
    )


def _download(weights: WeightsEnum, uri: str) -> None:
    """Downloads ``weights`` through torch.hub and stores the file, unchanged, at ``uri`` (atomically)."""
    log.info("pretrained: downloading %r from %s into %s", weights, weights.url, uri)
    with tempfile.TemporaryDirectory(prefix="imgpipe-weights-") as tmp:
        try:
            # torchvision 0.29 torchvision/models/_api.py: get_state_dict is
            # torch.hub.load_state_dict_from_url(url, ...). With check_hash it compares the file's
            # SHA-256 with the hex prefix in its name and refuses a mismatch; an empty model_dir
            # means a download, never a file left by an earlier process.
            weights.get_state_dict(model_dir=tmp, progress=False, check_hash=True, weights_only=True, map_location="cpu")
        except Exception as exc:
            # RuntimeError: the CLI reports it in one line, as it does a failed remote run.
            raise RuntimeError(
                f"could not download {weights!r} from {weights.url}: {exc}. Where the network is closed, "
                f"copy that file to {uri} once; runs then read it from there"
            ) from exc
        with open(Path(tmp) / file_name(weights), "rb") as src, storage.open_write(uri) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def fetch(model: str, weights: WeightsEnum, cache: str, ctx: DistInfo | None = None) -> str:
    """The cache object of ``weights``, downloaded first if it is not there; every rank must call it.

    Rank 0 downloads (:func:`_download`) while the others wait at a barrier; then every
    rank reads the same committed object.

    Returns:
        The object's URI (:func:`cache_uri`).

    Raises:
        RuntimeError: If the weights are not cached and cannot be downloaded (no network,
            a file that fails its hash check).
    """
    ctx = ctx or DistInfo()
    uri = cache_uri(cache, model, weights)
    if ctx.is_main and not storage.exists(uri):
        _download(weights, uri)
    barrier(ctx)
    return uri


def read_cached(uri: str, name: str) -> bytes:
    """The bytes of a cached weights file, checked against the SHA-256 prefix in its file ``name``.

    Raises:
        FileNotFoundError: If nothing is cached at ``uri``.
        ValueError: If the bytes do not match the hash (a corrupt or replaced object).
    """
    data = storage.read_bytes(uri)
    # torch 2.x torch/hub.py: HASH_REGEX finds the "-<hex>." prefix of "name-<sha256 prefix>.ext";
    # a name without one is not checked there either.
    found = HASH_REGEX.search(name)
    digest = hashlib.sha256(data).hexdigest()
    if found and not digest.startswith(found.group(1)):
        raise ValueError(
            f"cached weights at {uri} have SHA-256 {digest[:16]}..., not the {found.group(1)}... their name "
            "promises: the object is corrupt or was replaced; delete it and the next run downloads it again"
        )
    return data


def load_pretrained(model: nn.Module, model_name: str, weights: WeightsEnum, cache: str, ctx: DistInfo | None = None) -> list[str]:
    """Loads ``weights`` into ``model`` through the cache; every rank must call it.

    The classifier head is left at its initialization when the data has another class
    count (:func:`imgpipe.train.models.fit_state_dict`).

    Args:
        model: The freshly built ``model_name``.
        model_name: Its torchvision name (the cache folder).
        weights: From :func:`imgpipe.train.models.resolve_weights`.
        cache: The cache prefix (``TrainConfig.weights_cache``).
        ctx: This process's rank; single-process when omitted.

    Returns:
        Names of the tensors left at their initialization (the replaced head).
    """
    uri = fetch(model_name, weights, cache, ctx)
    return fit_state_dict(model, read_state_dict(read_cached(uri, file_name(weights)), uri), uri)
