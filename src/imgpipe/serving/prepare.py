"""A picture prepared as a model card says, for ``imgpipe predict`` and the serving runtime alike.

arr = prepare_encoded(jpeg_bytes, card, preprocessing_spec(card))  # size x size x channels uint8
probs = softmax(session.run(None, {card["input"]["name"]: to_input([arr], card)})[0])

Clean's decode (:func:`imgpipe.data.images.validate_and_normalize`), the resize step's own code
with the card's settings, the JPEG round trip where resize stored JPEG, and the evaluation view:
what the model's evaluation data went through (:mod:`imgpipe.train.card` reads the card).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imgpipe.clean.config import CleanConfig
from imgpipe.data.formats import DEFAULT_FORMATS
from imgpipe.data.images import MAX_PIXELS, ImageRejected, NormalizedImage, validate_and_normalize
from imgpipe.resize.spec import ResizeError, ResizeSpec
from imgpipe.train.card import eval_view

__all__ = ["decode", "prepare_encoded", "softmax"]


def _normalized(data: bytes, channels: int) -> NormalizedImage:
    """Encoded image bytes as clean stores them, in the model's mode (RGB or L); any side is accepted.

    Clean's own :func:`imgpipe.data.images.validate_and_normalize`, through the one decode gate.

    Raises:
        ImageRejected: With clean's reason, for an image that cannot be made valid.
    """
    return validate_and_normalize(
        data, grayscale=channels == 1, max_pixels=MAX_PIXELS, min_side=1, jpeg_quality=CleanConfig.jpeg_quality, formats=DEFAULT_FORMATS
    )


def decode(data: bytes, channels: int) -> np.ndarray:
    """Encoded image bytes as ``H x W x C`` uint8 in the model's mode (:func:`_normalized`)."""
    pixels = _normalized(data, channels).pixels
    assert pixels is not None  # validate_and_normalize always returns the decoded image
    return pixels


def prepare_encoded(
    data: bytes, card: Mapping[str, Any], spec: ResizeSpec, bbox: Sequence[float] | None = None, *, cleaned: bool = False
) -> np.ndarray:
    """Encoded image bytes as the model's evaluation data was: its evaluation view, ``size x size x channels`` uint8.

    Clean's decode first (:func:`_normalized`, unless ``cleaned``: a clean output's image
    already had it), then the resize step's own code with the card's settings (``spec``,
    :func:`imgpipe.train.card.preprocessing_spec`), the JPEG round trip where resize stored
    JPEG, and the evaluation view. ``imgpipe predict`` on raw images and the serving runtime
    (:mod:`imgpipe.serving.runtime`) both prepare pictures here.

    Raises:
        ImageRejected: With clean's or resize's reason, for an image that cannot be prepared.
    """
    from imgpipe.resize.ops import (  # OpenCV: where images are prepared only (the cpu image reads cards)
        encode_jpeg,
        resize_image,
    )

    size, channels = int(card["input"]["size"]), int(card["input"]["channels"])
    if not cleaned:  # raw bytes: what clean made of the training images first
        data = _normalized(data, channels).data
    try:
        arr = resize_image(data, spec, list(bbox) if bbox is not None else None)
    except ResizeError as exc:
        raise ImageRejected(exc.reason, exc.detail) from None
    if spec.format == "jpeg":  # stored as JPEG, trained on its decoded pixels: the same round trip
        arr = decode(encode_jpeg(arr, spec.jpeg_quality), arr.shape[2])
    short = int(card["input"].get("resize_short_side", size))
    return eval_view(arr, size, short if spec.mode == "whole" else size)


def softmax(logits: np.ndarray) -> np.ndarray:
    """``N x K`` float32 probabilities of ``N x K`` logits (computed in float64)."""
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
