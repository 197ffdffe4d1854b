"""A model's card (``model.json``) read back and applied, without torch: what predict and serving need.

:func:`read_card` is the edge check for a model prefix; :func:`eval_view` and
:func:`to_input` turn ``H x W x C`` uint8 images into the model's input exactly as the
train step's evaluation does (:func:`imgpipe.train.augment_cpu.build_eval_transform`:
albumentations' ``SmallestMaxSize`` with INTER_AREA when shrinking, then the centre
crop; then scaling, mean and std), with OpenCV and NumPy alone, so that the ``ray``
image (no torch) can run an exported model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imgpipe import contract, storage
from imgpipe.config import config_from_dict
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.spec import CROP_FRACTION, ResizeSpec, color_space

__all__ = [
    "CARD_FORMAT",
    "VIEW_INTERPOLATION",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "read_card",
    "view_of",
    "eval_view",
    "check_view",
    "to_input",
    "preprocessing_of",
    "preprocessing_spec",
    "preprocessing_mismatch",
]

CARD_FORMAT = 1
# How eval_view resizes (albumentations' SmallestMaxSize as the train step's evaluation runs it), as a card says it.
VIEW_INTERPOLATION = "area when shrinking, bilinear when enlarging (OpenCV)"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def read_card(prefix: str, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``model.json`` of a model prefix, checked.

    Args:
        prefix: A committed train output (or a copy of its files).
        classes: When given, the classes the caller expects, in order.

    Raises:
        ValueError: If there is no ``model.json``, it is not one imgpipe wrote, it names a
            file outside the prefix, or its classes differ.
    """
    uri = storage.join(prefix, contract.MODEL_CARD)
    if not storage.exists(uri):
        raise ValueError(f"{prefix} has no {contract.MODEL_CARD}: not a model exported by imgpipe train (or an older one)")
    try:
        card = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise ValueError(f"{uri} is not JSON: {exc}") from None
    missing = [k for k in ("format", "classes", "input", "files") if k not in card]
    if missing or card.get("format") != CARD_FORMAT:
        raise ValueError(f"{uri} is not an imgpipe model card of format {CARD_FORMAT} (missing {missing or 'nothing'})")
    if not isinstance(card["files"], dict):
        raise ValueError(f"{uri}: 'files' must map artifact kinds to file names")
    for name in card["files"].values():
        if name is not None:  # an artifact the card names is a file of this prefix, never another's
            contract.check_name(name, uri)
    if classes is not None and list(classes) != list(card["classes"]):
        raise ValueError(
            f"{prefix} was trained on other classes ({len(card['classes'])}: {', '.join(card['classes'][:5])}...)"
            f" than expected ({len(classes)}: {', '.join(list(classes)[:5])}...)"
        )
    return card


def view_of(size: int, *, whole: bool, stored_size: int | None = None) -> dict[str, Any]:
    """The card's account of the evaluation view: the keys :func:`eval_view` needs, only those that act.

    Whole pictures (resize mode ``whole``) get their shorter side scaled to
    ``round(size / 0.875)`` and the centre ``size x size`` (``resize_short_side``,
    ``center_crop``). Images stored square at ``size`` (``short-side-crop``, ``fixed``,
    ``pad``) are the input as they are: no key. Stored square at another side, they are
    scaled to ``size`` (``resize_short_side`` alone: a square needs no crop). ``view`` says
    it in words.
    """
    if whole:
        short = round(size / CROP_FRACTION)
        return {
            "view": f"shorter side to {short}, then the centre {size} x {size}",
            "resize_short_side": short,
            "interpolation": VIEW_INTERPOLATION,
            "center_crop": size,
        }
    if stored_size is not None and stored_size != size:
        return {
            "view": f"the stored {stored_size} x {stored_size} image scaled to {size} x {size}",
            "resize_short_side": size,
            "interpolation": VIEW_INTERPOLATION,
        }
    return {"view": f"as stored: the resize step's {size} x {size} image, no further resize or crop"}


def eval_view(image: np.ndarray, size: int, resize_to: int) -> np.ndarray:
    """The evaluation view: shorter side to ``resize_to``, then the centre ``size x size``.

    As albumentations 2's ``SmallestMaxSize(max_size, INTER_LINEAR, area_for_downscale="image")``
    computes it (``int(side * scale)``, INTER_AREA below scale 1), then ``CenterCrop``
    (offsets ``(side - size) // 2``). A side the truncation leaves below ``size`` is made ``size``.
    """
    import cv2  # only where images are prepared (the ray and gpu images have OpenCV; the cpu image reads cards)

    h, w = image.shape[:2]
    scale = resize_to / min(h, w)
    new_h, new_w = max(size, int(h * scale)), max(size, int(w * scale))
    if (new_h, new_w) != (h, w):
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        image = resized.reshape(new_h, new_w, -1) if resized.ndim == 2 else resized
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def check_view(image: np.ndarray, card: Mapping[str, Any]) -> np.ndarray:
    """``image`` as a ``size x size x channels`` evaluation view of ``card``'s model (a 2-D grey view gets its axis).

    Raises:
        ValueError: If it has another size or channel count: the picture was not decoded
            to the card's ``input.mode`` (``imgpipe.data.images.validate_and_normalize`` does).
    """
    spec = card["input"]
    size, channels = int(spec["size"]), int(spec["channels"])
    view = np.asarray(image)
    view = view[:, :, None] if view.ndim == 2 else view
    if view.shape != (size, size, channels):
        raise ValueError(
            f"the evaluation view is {'x'.join(map(str, view.shape))}, the model takes {size}x{size}x{channels}"
            f" ({spec.get('mode', 'RGB' if channels == 3 else 'L')}): decode the picture to that mode first"
        )
    return view


def to_input(images: Sequence[np.ndarray], card: Mapping[str, Any]) -> np.ndarray:
    """``N x C x size x size`` float32, scaled and normalized as ``card`` says, from evaluation views.

    Raises:
        ValueError: If a view is not of the card's size and channels (:func:`check_view`).
    """
    spec = card["input"]
    x = np.stack([check_view(img, card) for img in images]).astype(np.float32)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, 1, 1, -1)
    std = np.asarray(spec["std"], np.float32).reshape(1, 1, 1, -1)
    return np.ascontiguousarray(((x * np.float32(spec["scale"]) - mean) / std).transpose(0, 3, 1, 2))


# ResizeSpec fields that are settings of safety, not of the pixels: left out of a card's preprocessing.
_NOT_PREPROCESSING = ("max_pixels",)


def preprocessing_of(resize_manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preprocessing a resize output applied, as a card records it; ``None`` for a manifest without its config.

    ``resize``: the settings of the evaluation splits (``ResizeSpec``: size, mode, resample,
    padding, aspect cap, the standardization ops in order with their parameters, output
    format and quality, reduced-DCT decoding); ``train_mode``: the train split's mode when it
    differs; ``roi_crop``: whether images were cropped to their box first; ``color_space``.
    """
    raw = resize_manifest.get("config")
    if resize_manifest.get("step") != "resize" or not isinstance(raw, Mapping) or "size" not in raw:
        return None  # not a resize output's manifest, or one that does not say how it resized
    known = {k: v for k, v in raw.items() if k in ResizeConfig.__dataclass_fields__}
    cfg = config_from_dict(ResizeConfig, known)
    spec = cfg.spec_for("test")
    resize = {f: getattr(spec, f) for f in ResizeSpec.__dataclass_fields__ if f not in ("parsed_ops", *_NOT_PREPROCESSING)}
    resize["ops"] = list(resize["ops"])
    return {"resize": resize, "train_mode": cfg.mode_for("train"), "roi_crop": spec.roi_crop, "color_space": color_space(spec.ops)}


def preprocessing_spec(card: Mapping[str, Any]) -> ResizeSpec | None:
    """The ``ResizeSpec`` that prepares raw images as the model's evaluation data was; ``None`` for an older card."""
    pre = card.get("preprocessing")
    if not isinstance(pre, Mapping) or not isinstance(pre.get("resize"), Mapping):
        return None
    values = dict(pre["resize"])
    values["ops"] = tuple(values.get("ops") or ())
    return ResizeSpec(**values)


def preprocessing_mismatch(ours: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None) -> str | None:
    """What differs between two recorded preprocessings (``None``: the same); unknown on either side is a difference."""
    if ours is None or theirs is None:
        return "the preprocessing is not recorded on one side (a card or manifest from before it was)"
    diffs = []
    for key in ("train_mode", "roi_crop", "color_space"):
        if ours.get(key) != theirs.get(key):
            diffs.append(f"{key} {ours.get(key)!r} vs {theirs.get(key)!r}")
    a, b = ours.get("resize") or {}, theirs.get("resize") or {}
    diffs += [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) or None
