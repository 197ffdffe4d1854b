"""Resizing and standardization of single images: the pure functions behind the resize step.

    pixels = resize_image(jpeg_bytes, spec)   # decoded, resized to the spec's size and mode, its ops applied: H x W x C uint8

How it works in detail: docs/internals/resize.md, "imgpipe.resize.ops".
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from imgpipe.data.images import ImageRejected, open_image
from imgpipe.data.jpeg_region import scaled_size
from imgpipe.resize import jpeg_window

# The declarations (modes, presets, op names, per-image settings, geometry) are OpenCV-free,
# so configs and the pipeline compile without it; they are re-exported here for callers.
from imgpipe.resize.spec import DRAFT_MARGIN, RESAMPLE, Geometry, Op, ResizeError, ResizeSpec, plan_geometry
from imgpipe.resize.warp import ANTIALIAS_K, warp_margin, warp_resize, within_warp
from imgpipe.resize.warp import hwc as _hwc

__all__ = [
    "OP_FUNCTIONS",
    "PASSTHROUGH",
    "resize_image",
    "warp_resize",
    "ANTIALIAS_K",
    "resize_image_reference",
    "apply_ops",
    "encode_jpeg",
    "resize_batch",
    "gaussian_blur",
    "median_blur",
    "equalize",
    "clahe",
    "to_ycbcr",
    "to_lab",
    "binarize",
    "sobel",
    "canny",
]


# ----------------------------------------------------------------------------------------
# Standardization ops: HWC uint8 in, HWC uint8 out.


def _gray(img: np.ndarray) -> np.ndarray:
    return img[:, :, 0] if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def gaussian_blur(img: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian denoising; the kernel size follows from ``sigma`` (OpenCV's rule)."""
    return _hwc(cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma)))


def median_blur(img: np.ndarray, ksize: int = 3) -> np.ndarray:
    """Median denoising (removes salt-and-pepper noise, keeps edges)."""
    return _hwc(cv2.medianBlur(np.ascontiguousarray(img), int(ksize)))


def equalize(img: np.ndarray) -> np.ndarray:
    """Histogram equalization; colour images equalize luma only, so hues do not shift."""
    if img.shape[2] == 1:
        return _hwc(cv2.equalizeHist(img[:, :, 0]))
    ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)
    ycc[:, :, 0] = cv2.equalizeHist(ycc[:, :, 0])
    return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)


def clahe(img: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization (of L* for colour images)."""
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles), int(tiles)))
    if img.shape[2] == 1:
        return _hwc(op.apply(img[:, :, 0]))
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = op.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def to_ycbcr(img: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr in Y, Cb, Cr order (PIL's and JPEG's; OpenCV's is Y, Cr, Cb)."""
    return np.ascontiguousarray(cv2.cvtColor(_rgb(img), cv2.COLOR_RGB2YCrCb)[:, :, [0, 2, 1]])


def to_lab(img: np.ndarray) -> np.ndarray:
    """CIE L*a*b* for uint8 as OpenCV scales it: L*255/100, a+128, b+128."""
    return cv2.cvtColor(_rgb(img), cv2.COLOR_RGB2LAB)


def binarize(img: np.ndarray) -> np.ndarray:
    """Otsu's threshold of the grey image: one channel of 0 and 255."""
    _, out = cv2.threshold(_gray(img), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return _hwc(out)


def sobel(img: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the grey image, one channel.

    Divided by the 3x3 kernel's gain of 4, so a full 0-to-255 step edge maps to 255
    with a fixed scale for every image (no per-image normalization).
    """
    gray = _gray(img).astype(np.float32)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    return _hwc(np.clip(np.sqrt(gx * gx + gy * gy) / 4.0, 0, 255).round().astype(np.uint8))


def canny(img: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Canny edges of the grey image: one channel of 0 and 255."""
    return _hwc(cv2.Canny(_gray(img), float(low), float(high)))


# What each op of imgpipe.resize.spec.OPS does (roi_crop is the geometry's, before the resize).
OP_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_blur": gaussian_blur,
    "median_blur": median_blur,
    "equalize": equalize,
    "clahe": clahe,
    "to_ycbcr": to_ycbcr,
    "to_lab": to_lab,
    "binarize": binarize,
    "sobel": sobel,
    "canny": canny,
}


def apply_ops(img: np.ndarray, ops: Sequence[Op]) -> np.ndarray:
    """Applies the post-resize ops in order (``roi_crop`` is skipped: it ran before)."""
    for op in ops:
        if op.name == "roi_crop":
            continue
        try:
            img = OP_FUNCTIONS[op.name](img, *op.params)
        except Exception as exc:  # noqa: BLE001 - one image's failure becomes its reject row
            raise ResizeError("op_failed", f"{op.name}: {type(exc).__name__}: {exc}") from exc
    return img


# ----------------------------------------------------------------------------------------
# Geometry and decoding.


# Pillow's reducing_gap: shrink by an integer factor with reduce() first, leaving at
# least 3x for the filtered resize; "almost indistinguishable" from one resize (Pillow docs).
_GAP_FOR_REDUCE = 3.0

STORED_FORMATS = ("jpeg", "png")


def _open(data: bytes | None, max_pixels: int, recorded: tuple[int, int] | None = None) -> Image.Image:
    """The header of a clean row's bytes, through the one decode gate (:func:`imgpipe.data.images.open_image`).

    clean stores JPEG and PNG only, so no other decoder is ever tried; the pixel count is
    checked from the header against ``max_pixels`` with Pillow's bomb check on, because a
    clean output read back from storage is untrusted. ``recorded`` is the ``(width,
    height)`` clean wrote beside the bytes: a header that says otherwise is refused.
    """
    if not data:
        raise ResizeError("missing_image", "no image bytes")
    try:
        img = open_image(data, formats=STORED_FORMATS, max_pixels=max_pixels)
    except ImageRejected as exc:
        raise ResizeError("too_large" if exc.reason == "too_large" else "undecodable", exc.detail) from None
    if recorded is not None and tuple(img.size) != recorded:
        raise ResizeError("not_as_recorded", f"the image is {img.width}x{img.height}, clean recorded {recorded[0]}x{recorded[1]}")
    return img


def _draft(img: Image.Image, geometry: Geometry, fast: bool, margin: float) -> float:
    """Asks Pillow's ``draft`` for a reduced JPEG scale where allowed (nothing is decoded yet); returns the scale (1.0: none)."""
    if not (fast and img.format == "JPEG" and img.mode in ("RGB", "L") and geometry.scale * margin <= 0.5):
        return 1.0
    # Ask for the strongest power-of-two reduction that still leaves DRAFT_MARGIN
    # times what the resize needs (only worth it when 1/2 or more is possible).
    full_width, need = img.width, geometry.scale * margin
    request = (max(1, math.ceil(img.width * need)), max(1, math.ceil(img.height * need)))
    try:
        drafted = img.draft(img.mode, request)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ResizeError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    # draft() returns the original image's extent in reduced pixels.
    return drafted[1][2] / full_width if drafted is not None else 1.0


def _load(img: Image.Image) -> Image.Image:
    """Decodes the pixels (at the scale a :func:`_draft` set), as RGB or L."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ResizeError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    if img.mode not in ("RGB", "L"):
        # clean emits RGB or L; anything else (an input that skipped clean) becomes RGB.
        img = img.convert("RGB")
    return img


def _decode(img: Image.Image, geometry: Geometry, fast: bool, margin: float) -> tuple[Image.Image, float]:
    """Loads the pixels, at a reduced JPEG scale if allowed; returns the image and its scale."""
    scale = _draft(img, geometry, fast, margin)
    return _load(img), scale


def _region_and_box(
    geometry: Geometry, scale: float, size: tuple[int, int]
) -> tuple[tuple[int, int, int, int] | None, tuple[float, float, float, float]]:
    """The integer roi_crop region (if any) and the resize box in its pixels, at ``scale``.

    ``size`` is the (width, height) of the decoded image the region is cut from.
    """
    x0, y0, x1, y1 = (v * scale for v in geometry.box)
    width, height = size
    crop = None
    if geometry.region is not None:
        rx0, ry0, rx1, ry1 = (v * scale for v in geometry.region)
        crop = (math.floor(rx0), math.floor(ry0), math.ceil(rx1), math.ceil(ry1))
        x0, y0, x1, y1 = x0 - crop[0], y0 - crop[1], x1 - crop[0], y1 - crop[1]
        width, height = crop[2] - crop[0], crop[3] - crop[1]
    # Float round-off must not push the box past the (reduced) image: PIL refuses that.
    return crop, (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))


# OpenCV's JPEG decode straight into an array, for the modes clean emits; EXIF orientation
# ignored, as Pillow does (clean already stored the picture upright). Same libjpeg-turbo,
# same pixels as Pillow's (tests/resize/test_geometry.py); it saves Pillow's copy out of its
# own buffer. OpenCV returns None for a truncated JPEG where Pillow raises ("image file is
# truncated"), and both decode a JPEG with corrupt data but an end marker. IMREAD_COLOR_RGB
# is OpenCV >= 4.11; older builds keep Pillow's decode.
_CV_JPEG_FLAGS: dict[str, int] = (
    {
        "RGB": cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION,
        "L": cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION,
    }
    if hasattr(cv2, "IMREAD_COLOR_RGB")
    else {}
)


def _decode_array(data: bytes, img: Image.Image, geometry: Geometry) -> np.ndarray:
    """Full-resolution ``H x W x C`` pixels: OpenCV for RGB/L JPEG, Pillow otherwise."""
    flag = _CV_JPEG_FLAGS.get(img.mode) if img.format == "JPEG" else None
    if flag is None:
        img, _ = _decode(img, geometry, fast=False, margin=DRAFT_MARGIN)
        return _hwc(np.asarray(img))
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None or arr.shape[:2] != (img.height, img.width):
        raise ResizeError("undecodable", "OpenCV could not decode the JPEG (truncated or corrupt)")
    return _hwc(arr)


def _pad(out: np.ndarray, spec: ResizeSpec, offset: tuple[int, int]) -> np.ndarray:
    canvas = np.full((spec.size, spec.size, out.shape[2]), spec.pad_value, dtype=np.uint8)
    x, y = offset
    canvas[y : y + out.shape[0], x : x + out.shape[1]] = out
    return canvas


def _warp_path(data: bytes, img: Image.Image, geometry: Geometry) -> np.ndarray | None:
    """The OpenCV path, where the box is within :data:`WARP_MAX_SCALE` (no draft would help)."""
    crop, box = _region_and_box(geometry, 1.0, img.size)
    if not within_warp(box, geometry.out_size):
        return None
    if jpeg_window.applies(img, geometry):  # only what the warp reads: the same output
        left, top, right, bottom = jpeg_window.window_around(box, img.size, warp_margin(box, geometry.out_size))
        arr = jpeg_window.decode_window(data, img.mode, img.size, (left, top, right, bottom), 8)
        return warp_resize(arr, (box[0] - left, box[1] - top, box[2] - left, box[3] - top), geometry.out_size)
    arr = _decode_array(data, img, geometry)
    if crop is not None:
        arr = arr[crop[1] : crop[3], crop[0] : crop[2]]
    return warp_resize(arr, box, geometry.out_size)


# Source pixels beyond the box that PIL's widest filter (Lanczos, support 3) reads, per source
# pixel per output pixel: the window a JPEG decodes for the PIL path reaches that far and 2 more.
_PIL_REACH = 3.0


def _pil_window_path(data: bytes, img: Image.Image, full: tuple[int, int], geometry: Geometry, resample: str, scale: float) -> np.ndarray:
    """:func:`_pil_path` after a draft to ``scale``, decoding only the window PIL's resize reads (:mod:`imgpipe.resize.jpeg_window`).

    ``full`` is the picture's (width, height) before the draft (``img.size`` is the draft's).
    """
    num = round(8 * scale)  # Pillow's draft scales are 1/2, 1/4 and 1/8
    height, width = scaled_size(full[1], full[0], num)
    _, box = _region_and_box(geometry, scale, (width, height))
    reach = max((box[2] - box[0]) / geometry.out_size[0], (box[3] - box[1]) / geometry.out_size[1])
    left, top, right, bottom = jpeg_window.window_around(box, (width, height), math.ceil(_PIL_REACH * reach) + 2)
    arr = jpeg_window.decode_window(data, img.mode, full, (left, top, right, bottom), num)
    window = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    shifted = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    return _hwc(np.asarray(window.resize(geometry.out_size, RESAMPLE[resample], box=shifted, reducing_gap=_GAP_FOR_REDUCE)))


def _pil_path(data: bytes, img: Image.Image, geometry: Geometry, resample: str, fast: bool) -> np.ndarray:
    full = img.size
    scale = _draft(img, geometry, fast, DRAFT_MARGIN)
    if scale < 1.0 and jpeg_window.applies(img, geometry):
        return _pil_window_path(data, img, full, geometry, resample, scale)
    img = _load(img)
    crop, box = _region_and_box(geometry, scale, img.size)
    if crop is not None:
        img = img.crop(crop)
    gap = _GAP_FOR_REDUCE if fast else None
    return _hwc(np.asarray(img.resize(geometry.out_size, RESAMPLE[resample], box=box, reducing_gap=gap)))


def _resize(data: bytes | None, spec: ResizeSpec, bbox: Sequence[float] | None, fast: bool, recorded: tuple[int, int] | None = None) -> np.ndarray:
    img = _open(data, spec.max_pixels, recorded)
    geometry = plan_geometry(img.width, img.height, spec, bbox)
    try:
        out = _warp_path(data, img, geometry) if fast and spec.resample == "bilinear" else None
        if out is None:
            out = _pil_path(data, img, geometry, spec.resample, fast)
    except (OSError, ValueError, cv2.error) as exc:
        raise ResizeError("resize_failed", f"{type(exc).__name__}: {exc}") from exc
    if spec.mode == "pad":
        out = _pad(out, spec, geometry.offset)
    return apply_ops(out, spec.parsed_ops)


def resize_image(data: bytes, spec: ResizeSpec, bbox: Sequence[float] | None = None, recorded: tuple[int, int] | None = None) -> np.ndarray:
    """Decodes, resizes and standardizes one image.

    Args:
        data: Encoded image (clean's output: upright RGB or L, JPEG or PNG).
        spec: The resize settings.
        bbox: Normalized region for ``roi_crop``; ignored without that op.
        recorded: ``(width, height)`` clean recorded for it, checked against the header.

    Returns:
        ``S x S x C`` uint8 (``whole`` mode: ``H x W x C``, see :func:`plan_geometry`),
        C = 3 or 1 (grey inputs and one-channel ops).

    Raises:
        ResizeError: With a stable reason for the rejects table.
    """
    return _resize(data, spec, bbox, fast=spec.fast_decode, recorded=recorded)


def resize_image_reference(data: bytes, spec: ResizeSpec, bbox: Sequence[float] | None = None) -> np.ndarray:
    """:func:`resize_image` with a full decode and an exact resize: the quality yardstick."""
    return _resize(data, spec, bbox, fast=False)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """Encodes an HWC uint8 image with 1 or 3 channels as JPEG (4:4:4 at quality >= 90)."""
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got shape {img.shape}")
    pil = Image.fromarray(img[:, :, 0], "L") if img.shape[2] == 1 else Image.fromarray(img, "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------
# The Ray batch function.

PASSTHROUGH = ("path", "label", "label_name", "split", "order", "sha256")


def _image_bytes(value: Any) -> bytes | None:
    """The encoded bytes of a clean ``image`` cell: a {bytes, path} struct, or bare bytes."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if value is None:
        return None
    return bytes(value)


def _row_specs(batch: Mapping[str, np.ndarray], spec: ResizeSpec, split_specs: Mapping[str, ResizeSpec] | None, n: int) -> list[ResizeSpec]:
    """Each row's settings: its split's entry of ``split_specs``, else ``spec``."""
    if not split_specs:
        return [spec] * n
    for name, other in split_specs.items():
        if (other.format, other.jpeg_quality) != (spec.format, spec.jpeg_quality):
            raise ValueError(f"split {name!r}: every split must share the output format, got {other.format} vs {spec.format}")
    splits = batch.get("split")
    if splits is None:
        return [spec] * n
    return [split_specs.get(str(splits[i]), spec) for i in range(n)]


def resize_batch(
    batch: Mapping[str, np.ndarray],
    spec: ResizeSpec,
    split_specs: Mapping[str, ResizeSpec] | None = None,
    observe: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Resizes one batch of clean rows; a row that fails becomes an error row.

    Args:
        batch: Clean's columns as arrays: ``path`` and ``image`` ({bytes, path} dicts, as
            Ray Data hands a struct column to a numpy batch) are required; ``label``,
            ``label_name``, ``split``, ``order``, ``sha256`` are passed through if present;
            an optional ``bbox`` column feeds ``roi_crop``.
        spec: The resize settings.
        split_specs: Other settings for the rows of some splits, by the ``split`` column
            (``ResizeConfig.split_specs``: ``{"train": <whole spec>}``); they must share
            ``spec``'s output format. Rows of other splits, or a batch without ``split``,
            use ``spec``.
        observe: Called as ``observe(i, pixels)`` for every row ``i`` that succeeds, with
            the ``H x W x C`` uint8 pixels it stores (before JPEG encoding): how a resize
            task gathers its statistics (:mod:`imgpipe.resize.statistics`) without a second
            decode.

    Returns:
        The pass-through columns plus ``height``, ``width``, ``channels`` (int32),
        ``pixels`` (raw HWC uint8 bytes; ``format='raw'``) or ``image`` ({bytes, path}
        JPEG; ``format='jpeg'``), and ``error_reason`` / ``error_detail`` (empty
        strings on good rows). Error rows have zero sizes and empty bytes. Sizes are per
        row: ``whole`` rows differ from one another.

    Raises:
        ValueError: If a split's settings change the output format.
    """
    # Each resize task (or pool process) is sized to one CPU: OpenCV's own threads inside
    # it would only compete with the neighbouring tasks.
    cv2.setNumThreads(1)
    paths = batch["path"]
    images = batch["image"]
    n = len(paths)
    specs = _row_specs(batch, spec, split_specs, n)
    bboxes = batch.get("bbox")
    widths, heights = batch.get("width"), batch.get("height")
    height = np.zeros(n, np.int32)
    width = np.zeros(n, np.int32)
    channels = np.zeros(n, np.int32)
    encoded = np.empty(n, dtype=object)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            row_spec = specs[i]
            bbox = None if bboxes is None or not row_spec.roi_crop else bboxes[i]
            recorded = None if widths is None or heights is None else (int(widths[i]), int(heights[i]))
            arr = resize_image(_image_bytes(images[i]), row_spec, None if bbox is None else list(bbox), recorded)
            height[i], width[i], channels[i] = arr.shape
            encoded[i] = arr.tobytes() if spec.format == "raw" else encode_jpeg(arr, spec.jpeg_quality)
        except ResizeError as exc:
            reason[i], detail[i] = exc.reason, exc.detail[:500]
            encoded[i] = b""
        except Exception as exc:  # noqa: BLE001 - a bug on one image must cost that image only
            reason[i], detail[i] = "resize_failed", f"{type(exc).__name__}: {exc}"[:500]
            encoded[i] = b""
        else:
            # Outside the try: a failing observer is a bug of the caller, not a reject of this row.
            if observe is not None:
                observe(i, arr)
    out: dict[str, np.ndarray] = {k: batch[k] for k in PASSTHROUGH if k in batch}
    out.update(height=height, width=width, channels=channels)
    if spec.format == "raw":
        out["pixels"] = encoded
    else:
        image = np.empty(n, dtype=object)
        for i in range(n):
            image[i] = {"bytes": encoded[i], "path": str(paths[i])}
        out["image"] = image
    out["error_reason"] = reason
    out["error_detail"] = detail
    return out
