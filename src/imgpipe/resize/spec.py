"""What a resize is, without the pixels: modes, presets, ops, per-image settings, geometry.

What the resize step's settings (:class:`imgpipe.resize.config.ResizeConfig`) are checked
against lives here, apart from the pixel work in :mod:`imgpipe.resize.ops`, so that
reading a config or compiling the pipeline (``imgpipe compile`` in the ``cpu`` image)
needs neither OpenCV nor Ray. :mod:`imgpipe.resize.ops` documents the modes and ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from imgpipe.config import check_numbers, check_range
from imgpipe.data.images import MAX_PIXELS, MAX_PIXELS_LIMIT

__all__ = [
    "PRESETS",
    "MODES",
    "RESAMPLE",
    "OPS",
    "CROP_FRACTION",
    "DRAFT_MARGIN",
    "MAX_ASPECT_LIMIT",
    "ResizeMode",
    "Resample",
    "OutputFormat",
    "OpSignature",
    "Op",
    "MODEL_COLOR_SPACES",
    "color_space",
    "ResizeSpec",
    "ResizeError",
    "Geometry",
    "parse_op",
    "plan_geometry",
]

ResizeMode = Literal["short-side-crop", "fixed", "pad", "whole"]
Resample = Literal["bilinear", "bicubic", "lanczos", "box"]
OutputFormat = Literal["raw", "jpeg"]

MODES: tuple[str, ...] = ("short-side-crop", "fixed", "pad", "whole")
RESAMPLE: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

# Resize 256 / crop 224: torchvision references/classification (--val-resize-size 256,
# --val-crop-size 224) and timm's default crop_pct.
CROP_FRACTION = 0.875

# Input side of common model families (timm pretrained_cfg ``input_size``; CLIP ViT-L/14@336).
PRESETS: dict[str, int] = {
    "224": 224,
    "256": 256,
    "384": 384,
    "448": 448,
    "512": 512,
    "resnet": 224,  # torchvision/timm ResNets, ImageNet 224
    "vit": 224,  # ViT-B/16 at 224
    "convnext": 224,
    "efficientnet-b0": 224,
    "inception": 299,  # Inception-v3, Xception
    "efficientnet-b3": 300,
    "clip": 336,  # CLIP ViT-L/14@336px
    "vit-384": 384,  # ViT-B/16 fine-tuned at 384
    "convnext-384": 384,
    "efficientnet-b7": 600,
}

# A JPEG is decoded at the smallest DCT-scaled size still >= DRAFT_MARGIN times the
# resize output, so the final antialiased resize still shrinks by at least this much
# and its filter, not only libjpeg's box-like DCT scaling, shapes the result. Pillow's
# Image.thumbnail uses 2.0; 1.25 lets 3 MP and 12 MP photos decode one scale lower
# (1/4 and 1/8 instead of 1/2 and 1/4 for a 256 px short side), about 1.3x faster per
# image, for a mean absolute difference to the full decode of ~1 grey level on real
# photos (bench/steps/resize.py) and 1.94 at worst on a synthetic high-frequency texture
# (tests/resize/test_geometry.py). A margin of 1 reached 4.3 there.
DRAFT_MARGIN = 1.25

# The largest ``max_aspect`` a config may ask for: a ``whole`` row then holds at most this
# many times the pixels of its short side squared, whatever the source's proportions.
MAX_ASPECT_LIMIT = 8.0


class ResizeError(Exception):
    """A row that cannot be resized.

    Attributes:
        reason: Stable reject code (``missing_image``, ``undecodable``, ``too_large``,
            ``not_as_recorded`` (the header's size is not clean's), ``bad_bbox``,
            ``op_failed``, ``resize_failed``).
        detail: Specifics for the rejects table.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------
# Standardization ops: names and parameters.


@dataclass(frozen=True)
class OpSignature:
    """What an op takes, and what it makes of the colours.

    Attributes:
        params: Its numeric parameter types.
        check: A check of their values: a message, or ``None`` when they are fine.
        color_space: The colour space of its output (``YCbCr``, ``Lab``, ``grey``); ``None``
            when the output keeps the input's.
    """

    params: tuple[type, ...] = ()
    check: Callable[[tuple[Any, ...]], str | None] = lambda p: None
    color_space: str | None = None


def _positive(p: tuple[Any, ...]) -> str | None:
    return None if all(v > 0 for v in p) else "parameters must be > 0"


def _odd_ksize(p: tuple[Any, ...]) -> str | None:
    return None if not p or (p[0] >= 3 and p[0] % 2 == 1) else "ksize must be odd and >= 3"


def _thresholds(p: tuple[Any, ...]) -> str | None:
    if len(p) == 1:
        return "give both thresholds, canny:LOW:HIGH"
    return None if not p or 0 <= p[0] <= p[1] else "need 0 <= low <= high"


# The ops' names and parameters; imgpipe.resize.ops.OP_FUNCTIONS holds what each one does.
OPS: dict[str, OpSignature] = {
    "roi_crop": OpSignature(),  # handled by the geometry, before the resize
    "gaussian_blur": OpSignature((float,), _positive),
    "median_blur": OpSignature((int,), _odd_ksize),
    "equalize": OpSignature(),
    "clahe": OpSignature((float, int), _positive),
    "to_ycbcr": OpSignature(color_space="YCbCr"),
    "to_lab": OpSignature(color_space="Lab"),
    "binarize": OpSignature(color_space="grey"),
    "sobel": OpSignature(color_space="grey"),
    "canny": OpSignature((float, float), _thresholds, color_space="grey"),
}

# What a model's input can be when its weights were trained on RGB photos: RGB itself, or
# grey (imgpipe.train.models.fit_state_dict sums a first convolution's RGB filters for it).
MODEL_COLOR_SPACES = ("RGB", "grey")


@dataclass(frozen=True)
class Op:
    """One parsed standardization op: its name and numeric parameters."""

    name: str
    params: tuple[float | int, ...] = ()


def parse_op(text: str) -> Op:
    """Parses ``name[:p1[:p2]]`` into an :class:`Op`.

    Raises:
        ValueError: For an unknown op, too many or non-numeric parameters, or values
            out of range.
    """
    name, *raw = text.strip().split(":")
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(OPS)}")
    spec = OPS[name]
    if len(raw) > len(spec.params):
        raise ValueError(f"op {name!r} takes at most {len(spec.params)} parameter(s), got {text!r}")
    params: list[float | int] = []
    for kind, value in zip(spec.params, raw):
        try:
            number = float(value)
            if kind is int:
                if not number.is_integer():
                    raise ValueError
                number = int(number)
        except ValueError:
            raise ValueError(f"op {text!r}: {value!r} is not a valid {kind.__name__}") from None
        params.append(number)
    problem = spec.check(tuple(params))
    if problem:
        raise ValueError(f"op {text!r}: {problem}")
    return Op(name, tuple(params))


def color_space(ops: Sequence[str], source: str = "RGB") -> str:
    """The colour space of the pixels the resize ``ops`` store: the last op's that sets one, else ``source``.

    Args:
        ops: The resize ops as configured (``name[:params]``), e.g. a manifest's ``extra.ops``.
        source: The colour space of clean's images: ``RGB``, or ``grey`` for 1-channel ones.

    Raises:
        ValueError: For an op that :func:`parse_op` refuses.
    """
    space = source
    for op in ops:
        space = OPS[parse_op(op).name].color_space or space
    return space


# ----------------------------------------------------------------------------------------
# Per-image settings and geometry.


@dataclass(frozen=True)
class ResizeSpec:
    """Everything needed to turn one encoded image into one output image.

    Attributes:
        size: Output side ``S``; every output is ``S x S``, except in ``whole`` mode (short
            side ``round(S / 0.875)``, aspect kept; see :func:`plan_geometry`).
        mode: ``short-side-crop``, ``fixed``, ``pad`` or ``whole``.
        resample: PIL filter of the (antialiased) resize.
        pad_value: Grey level of the letterbox border in ``pad`` mode.
        max_aspect: ``whole`` mode: the long side is at most ``max_aspect`` times the
            target short side; a more elongated image keeps its aspect and comes out
            with a shorter short side.
        ops: Standardization ops, as ``name[:params]`` strings.
        format: ``raw`` (HWC uint8 bytes) or ``jpeg`` in :func:`resize_batch`'s output.
        jpeg_quality: Quality of ``jpeg`` output.
        fast_decode: Decode JPEGs at a reduced DCT scale where that loses nothing the
            resize would keep.
        max_pixels: Largest ``width x height`` decoded (checked from the header, before any
            pixel): resize reads clean's rows as untrusted bytes. Raise it with clean's.
    """

    size: int = 224
    mode: ResizeMode = "short-side-crop"
    resample: Resample = "bilinear"
    pad_value: int = 0
    max_aspect: float = 2.0
    ops: tuple[str, ...] = ()
    format: OutputFormat = "raw"
    jpeg_quality: int = 95
    fast_decode: bool = True
    max_pixels: int = MAX_PIXELS
    parsed_ops: tuple[Op, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range("size", self.size, 1, 8192, integer=True)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {self.resample!r}")
        check_range("pad_value", self.pad_value, 0, 255, integer=True, note="a grey level")
        check_range("max_aspect", self.max_aspect, 1, MAX_ASPECT_LIMIT)
        if self.format not in ("raw", "jpeg"):
            raise ValueError(f"format must be raw or jpeg, got {self.format!r}")
        check_range("jpeg_quality", self.jpeg_quality, 1, 100, integer=True)
        check_range("max_pixels", self.max_pixels, 1, MAX_PIXELS_LIMIT, integer=True, note="width x height")
        parsed = tuple(parse_op(o) for o in self.ops)
        if any(op.name == "roi_crop" for op in parsed[1:]):
            raise ValueError("roi_crop selects the region before the resize, so it must be the first op")
        object.__setattr__(self, "parsed_ops", parsed)

    @property
    def roi_crop(self) -> bool:
        """Whether rows with a ``bbox`` are cropped to it before resizing."""
        return bool(self.parsed_ops) and self.parsed_ops[0].name == "roi_crop"


@dataclass(frozen=True)
class Geometry:
    """Where one source image goes in the output.

    Attributes:
        box: Source region (left, upper, right, lower) in source pixels, floats.
        out_size: (width, height) the box is resized to; ``S x S`` but in ``pad`` mode
            (the content, pasted on an ``S x S`` canvas) and ``whole`` mode (the output).
        offset: (x, y) where the resized box is pasted on the ``S x S`` canvas (``pad``).
        region: The ``roi_crop`` region (source pixels), or None. Pixels outside it must
            not reach the output, not even through the resize filter's support, so the
            image is cropped to it before resizing.
    """

    box: tuple[float, float, float, float]
    out_size: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    region: tuple[float, float, float, float] | None = None

    @property
    def scale(self) -> float:
        """The larger of the two axis scale factors (output pixels per source pixel)."""
        x0, y0, x1, y1 = self.box
        return max(self.out_size[0] / (x1 - x0), self.out_size[1] / (y1 - y0))


def _bbox_region(width: int, height: int, bbox: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise ResizeError("bad_bbox", f"bbox must be 4 numbers (xmin,ymin,xmax,ymax), got {bbox!r}") from exc
    if not (0.0 <= xmin < xmax <= 1.0 and 0.0 <= ymin < ymax <= 1.0):
        raise ResizeError("bad_bbox", f"bbox {bbox!r} is not a normalized box with min < max within 0..1")
    x0, y0, x1, y1 = xmin * width, ymin * height, xmax * width, ymax * height
    # At least one source pixel each way, so a degenerate box still resizes.
    if x1 - x0 < 1.0:
        x0 = min(x0, width - 1.0)
        x1 = x0 + 1.0
    if y1 - y0 < 1.0:
        y0 = min(y0, height - 1.0)
        y1 = y0 + 1.0
    return x0, y0, x1, y1


def _whole_size(w: float, h: float, size: int, max_aspect: float) -> tuple[int, int]:
    """``whole`` mode's (width, height) for a ``w x h`` source: see :func:`plan_geometry`."""
    short_target = round(size / CROP_FRACTION)
    long_cap = max(short_target, round(max_aspect * short_target))
    short_src, long_src = min(w, h), max(w, h)
    long_out = round(long_src * short_target / short_src)
    if long_out <= long_cap:
        short_out = short_target
    else:
        long_out, short_out = long_cap, max(1, round(short_src * long_cap / long_src))
    return (long_out, short_out) if w >= h else (short_out, long_out)


def plan_geometry(width: int, height: int, spec: ResizeSpec, bbox: Sequence[float] | None = None) -> Geometry:
    """Computes the source box and output placement of one image.

    ``whole`` keeps the entire source (or ``roi_crop`` region) with its aspect ratio:
    the short side becomes ``round(S / CROP_FRACTION)`` (256 for 224, so a centre crop
    of ``S`` is what ``short-side-crop`` stores, up to a sub-pixel shift) unless the
    long side would then exceed ``round(max_aspect * that)``; the long side is then
    capped there and the short side follows the aspect (``round``, at least 1). E.g.
    1000 x 400 at 224 with max_aspect 2: 512 x 205.

    Args:
        width: Source width in pixels.
        height: Source height in pixels.
        spec: The resize settings.
        bbox: Normalized (xmin, ymin, xmax, ymax) region; used only with ``roi_crop``.

    Raises:
        ResizeError: ``bad_bbox`` for a malformed box.
    """
    region = _bbox_region(width, height, bbox) if bbox is not None and spec.roi_crop else None
    x0, y0, x1, y1 = region or (0.0, 0.0, float(width), float(height))
    w, h, size = x1 - x0, y1 - y0, spec.size
    if spec.mode == "fixed":
        return Geometry((x0, y0, x1, y1), (size, size), region=region)
    if spec.mode == "pad":
        s = size / max(w, h)
        ow, oh = max(1, min(size, round(w * s))), max(1, min(size, round(h * s)))
        return Geometry((x0, y0, x1, y1), (ow, oh), ((size - ow) // 2, (size - oh) // 2), region)
    if spec.mode == "whole":
        return Geometry((x0, y0, x1, y1), _whole_size(w, h, size, spec.max_aspect), region=region)
    # short-side-crop: the short side becomes round(S / 0.875); the centre S x S of that,
    # expressed in source pixels, is a square of side S / s.
    s = round(size / CROP_FRACTION) / min(w, h)
    side = size / s
    cx, cy = x0 + (w - side) / 2.0, y0 + (h - side) / 2.0
    return Geometry((cx, cy, cx + side, cy + side), (size, size), region=region)


# ----------------------------------------------------------------------------------------
