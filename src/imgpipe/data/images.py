"""Image validation: the one gate before any decoder, and the full decode that classifies what cannot be used.

Opening a header is not validation: :func:`validate_and_normalize` decodes every
pixel, and classifies failures into the stable reject codes the clean step writes; the
mode normalization it applies after the decode is :mod:`imgpipe.data.modes`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgpipe.data.formats import (
    DEFAULT_FORMATS,
    NEVER_DECODED,
    check_formats,
    sniff_format,
)
from imgpipe.data.jpeg_region import scale_for, scaled_size
from imgpipe.data.modes import HIGH_BIT_MODES, decode_bytes, flatten_alpha, normalize_mode, target_mode, to_8bit

__all__ = [
    "load_decoders",
    "ImageRejected",
    "NormalizedImage",
    "MAX_PIXELS",
    "MAX_PIXELS_LIMIT",
    "open_image",
    "decode_bytes",
    "validate_and_normalize",
    "thumbnail",
    "to_8bit",
    "flatten_alpha",
    "NORMALIZATION",
]

# The largest image (width x height) decoded unless told otherwise: PIL's own default
# MAX_IMAGE_PIXELS, a 1024 MiB 24-bit image (CleanConfig.max_pixels, ResizeSpec.max_pixels).
MAX_PIXELS = 89_478_485
# The most a config may raise max_pixels to: a 2-gigapixel image, 6 GiB as RGB, already more
# than a decode worker's memory holds; past it a setting would only defer the failure.
MAX_PIXELS_LIMIT = 1 << 31


# What validate_and_normalize makes of every image, as a model card's `input` records it
# (imgpipe.train.export): what a caller must do to a picture before the card's resize and crop.
NORMALIZATION = {
    "exif_orientation": "applied",
    "mode_normalization": {
        "alpha": "composited on white (LA, RGBA, palette with transparency)",
        "high_bit_depth": "16/32-bit scaled to 8-bit by the container's range, not clipped",
        "other_modes": "CMYK, palette, 1-bit, YCbCr and the rest converted to the input's mode",
    },
}


class ImageRejected(Exception):
    """An input that cannot become a training image.

    Attributes:
        reason: Stable reject code (``not_an_image``, ``unsupported_format``, ``truncated``,
            ``corrupt``, ``too_large`` (pixel count or memory budget), ``too_small``).
        detail: What exactly was wrong, for the rejects table.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormalizedImage:
    """A fully decoded, normalized image.

    Attributes:
        data: Encoded bytes to store: the original bytes when nothing had to change
            (no generational JPEG loss), otherwise a re-encode.
        width: Width after orientation.
        height: Height after orientation.
        mode: ``RGB`` or ``L``.
        format: Encoding of ``data`` (``jpeg`` or ``png``).
        changes: What normalization did (``exif_rotate``, ``CMYK->RGB``, ...); empty
            when the original bytes are kept.
        pixels: The normalized image itself, ``height x width x C`` uint8 (C = 1 for
            ``L``, 3 for ``RGB``), for measures taken while it is decoded (clean's
            quality metrics and perceptual hash), so nothing decodes it twice; a JPEG
            decoded for measures only (``reduce_to``) gives its reduced grey picture.
        scale: The scale of ``pixels`` (``n/8`` for a reduced decode, else 1): the image
            covers ``width * scale`` of their columns and ``height * scale`` of their rows,
            the last of each perhaps only in part (libjpeg rounds each side up).
    """

    data: bytes
    width: int
    height: int
    mode: str
    format: str
    changes: tuple[str, ...]
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    scale: float = 1.0


def load_decoders() -> None:
    """Imports Pillow's format plugins now, so that processes forked afterwards share them.

    Pillow imports them on the first ``Image.open``; done in each decode worker that is
    one more start-up cost per worker, paid while the CPUs should be decoding.
    """
    Image.init()


def _unsupported(fmt: str, formats: Sequence[str]) -> ImageRejected:
    """The ``unsupported_format`` reject of a file in format ``fmt``, saying how to accept it."""
    accepted = ", ".join(formats)
    how = NEVER_DECODED[fmt] if fmt in NEVER_DECODED else f"add it with --set formats={','.join((*formats, fmt))}"
    return ImageRejected("unsupported_format", f"{fmt.upper()} is not an accepted format (accepted: {accepted}); {how}")


@contextlib.contextmanager
def _bomb_limit(max_pixels: int) -> Iterator[None]:
    """Makes PIL's own decompression-bomb check follow ``max_pixels`` while it is open.

    ``Image.open`` raises by itself above twice ``Image.MAX_IMAGE_PIXELS``, a process-wide
    setting; without this a ``max_pixels`` above PIL's default would be overruled, and
    only in processes that had not changed the global. Not thread-safe: clean calls
    this from one thread per process.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_image(data: bytes, *, formats: Sequence[str] = DEFAULT_FORMATS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The one gate before any decoder: the header of ``data``, opened only if it may be decoded.

    Every decode of bytes read from storage goes through here (clean, its carried rows,
    resize, predict, the reports' thumbnails). In order: the signature must name one of
    ``formats`` (:func:`sniff_format`; a format outside them is never parsed, so EPS never
    reaches Ghostscript), Pillow opens the header with only those plugins, and the header's
    ``width x height`` must be at most ``max_pixels`` (PIL's own bomb check follows it
    while it opens). Nothing is decoded yet: the caller calls ``load()``.

    Raises:
        ImageRejected: ``not_an_image``, ``unsupported_format``, ``corrupt``, ``truncated``
            or ``too_large``, with the detail.
    """
    img = _open(data, max_pixels, tuple(f.lower() for f in formats))
    if img.width * img.height > max_pixels:
        raise ImageRejected("too_large", f"{img.width}x{img.height} = {img.width * img.height} pixels > max_pixels {max_pixels}")
    return img


def _open(data: bytes, max_pixels: int, formats: Sequence[str]) -> Image.Image:
    """Opens ``data`` with only the plugins of ``formats`` (checked by :func:`check_formats`).

    ``formats=`` keeps Pillow from trying every registered plugin, which reaches EPS (it
    starts Ghostscript), SPIDER, IM, TGA and more; an archive member must never get there.
    """
    if not data:
        raise ImageRejected("not_an_image", "empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is not None and fmt not in formats:
        raise _unsupported(fmt, formats)
    try:
        with warnings.catch_warnings(), _bomb_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=[f.upper() for f in formats])
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if fmt is None:
            head = data[:16].decode("latin-1").encode("unicode_escape").decode()
            raise ImageRejected("not_an_image", f"no image signature (starts with {head!r})") from exc
        raise ImageRejected("corrupt", f"{fmt} signature but unreadable header") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("truncated" if _is_truncation(exc) else "corrupt", str(exc)) from exc


def _is_truncation(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or "truncated" in text or "premature end" in text


def _decode(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            # libjpeg reports a missing EOI marker only as a warning in some builds.
            warnings.simplefilter("error", UserWarning)
            img.load()
    except (OSError, EOFError, SyntaxError, ValueError, UserWarning, Image.DecompressionBombError) as exc:
        raise ImageRejected("truncated" if _is_truncation(exc) else "corrupt", str(exc) or type(exc).__name__) from exc


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def validate_and_normalize(
    data: bytes,
    *,
    grayscale: bool = False,
    max_pixels: int = MAX_PIXELS,
    min_side: int = 32,
    jpeg_quality: int = 95,
    max_decode_bytes: int | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    reduce_to: int = 0,
) -> NormalizedImage:
    """Fully decodes an image, rejects what cannot be used, and normalizes the rest.

    Checks run in this order, and the first failure is the reject reason:
    ``not_an_image`` / ``unsupported_format`` (signature) / ``corrupt`` (header), ``too_large`` (pixel count, then the memory
    estimate of :func:`decode_bytes` against ``max_decode_bytes``; both checked before any
    pixel is decoded, so decompression bombs cost nothing), ``too_small``, ``truncated`` /
    ``corrupt`` (full decode).

    Normalization: EXIF orientation applied; CMYK, palette, LA/RGBA (composited on
    white), 1-bit and 16/32-bit images become 8-bit RGB, or L with ``grayscale``.

    Args:
        data: The encoded file.
        grayscale: Produce single-channel ``L`` images.
        max_pixels: Largest accepted width*height.
        min_side: Smallest accepted width or height.
        jpeg_quality: Quality for re-encoding images that came in as JPEG.
        max_decode_bytes: Memory one image may take to decode and normalize, as estimated
            from its header by :func:`decode_bytes`; ``None`` for no limit.
        formats: The formats to decode (:func:`check_formats`); a file whose signature
            names another is ``unsupported_format``, without being parsed.
        reduce_to: For a caller that only measures the pixels' grey (clean): a JPEG kept as
            it is may be decoded to its luma alone, at the smallest DCT scale (``n/8``)
            that keeps both sides at least this long, and ``pixels`` is then that reduced
            ``H x W x 1`` grey picture, whatever ``mode`` says. The verdict is the
            same: every scale entropy-decodes every coefficient, where corruption shows
            (``tests/data/test_plain_jpeg.py`` checks it against Pillow's full decode). 0
            decodes at full size.

    Returns:
        The normalized image, with the original bytes when nothing changed.

    Raises:
        ImageRejected: With the reject reason and detail.
        ValueError: If ``max_decode_bytes`` is negative, or ``formats`` is not valid.
        TypeError: If ``formats`` is not a list of names.
    """
    if max_decode_bytes is not None and max_decode_bytes < 0:
        raise ValueError(f"max_decode_bytes must be >= 0 or None (no limit), got {max_decode_bytes}")
    img = _open(data, max_pixels, check_formats(formats))
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if max_decode_bytes is not None and (need := decode_bytes(img, grayscale)) > max_decode_bytes:
        raise ImageRejected(
            "too_large",
            f"{width}x{height} {img.mode}: decoding and normalizing need ~{_mib(need)}"
            f" ({need} bytes) > the per-image memory budget {_mib(max_decode_bytes)}"
            f" ({max_decode_bytes} bytes); give the step more memory or fewer workers",
        )
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}: a side is below min_side {min_side}")
    source_format = (img.format or sniff_format(data) or "unknown").lower()
    if source_format == "jpeg" and img.mode == target_mode(grayscale) and img.getexif().get(0x0112, 1) in (1, None):
        num = scale_for(height, width, reduce_to, reduce_to) if reduce_to > 0 else 8
        pixels = _decode_plain_jpeg(data, img, num)
        if pixels is not None:
            return NormalizedImage(data, width, height, img.mode, "jpeg", (), pixels, num / 8)
    _decode(img)
    changes: list[str] = []
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        try:
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected("corrupt", f"unusable EXIF orientation {orientation}: {exc}") from exc
        changes.append(f"exif_rotate:{orientation}")
    img, mode_changes = normalize_mode(img, grayscale)
    changes.extend(mode_changes)
    if not changes and source_format in ("jpeg", "png"):
        # Keep the original bytes: no generational loss and no encode cost.
        return NormalizedImage(data, img.width, img.height, img.mode, source_format, (), _array(img))
    buf = io.BytesIO()
    if source_format == "jpeg":
        # Already lossy: a high-quality re-encode adds little loss and stays compact.
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
        fmt = "jpeg"
    else:
        # Other sources (PNG, GIF, BMP, TIFF, WebP, and JPEG 2000 and the rest when accepted)
        # are stored losslessly, whatever their own coding; level 3 trades a
        # little size for a much faster encode than the default 6.
        img.save(buf, format="PNG", compress_level=3)
        fmt = "png"
        if not changes:
            changes.append(f"{source_format}->png")
    return NormalizedImage(buf.getvalue(), img.width, img.height, img.mode, fmt, tuple(changes), _array(img))


def _array(img: Image.Image) -> np.ndarray:
    """``H x W x C`` uint8 pixels of an ``RGB`` or ``L`` image."""
    return np.asarray(img).reshape(img.height, img.width, len(img.getbands()))


def _decode_plain_jpeg(data: bytes, img: Image.Image, num: int = 8) -> np.ndarray | None:
    """The pixels of a JPEG that needs no normalization, decoded by libjpeg-turbo straight into an array.

    ``img`` is its opened header (``RGB`` or ``L``, upright). simplejpeg runs the same
    libjpeg-turbo decode as Pillow (the same pixels, ``tests/data/test_plain_jpeg.py``) without
    Pillow's copy out of its own 32-bit-per-pixel store: about a quarter less time per image,
    which is most of clean's work. At a reduced scale (``num/8``, for measures only) it
    decodes the luma alone (the JPEG's own Y channel: no chroma transform, upsampling or
    colour conversion): 0.54 ms against 0.8-1.0 ms whole on 0.2-megapixel photos. It is
    strict: on any warning of the decoder (truncation, corrupt data, an odd sampling layout)
    this returns ``None`` and the caller decodes with Pillow, so what is accepted or
    rejected, and why, stays Pillow's verdict.
    """
    import simplejpeg

    want = scaled_size(img.height, img.width, num)
    grey = img.mode == "L" or num < 8
    try:
        # simplejpeg picks the smallest n/8 scale that keeps both sides at least this long: num's.
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB", strict=True, min_height=want[0], min_width=want[1])
    except ValueError:
        return None
    return pixels if pixels.shape[:2] == want else None


def thumbnail(data: bytes, side: int, max_pixels: int) -> Image.Image:
    """A picture of an encoded image that fits in ``side x side``, in ``RGB`` or ``L``, for reports.

    Opens as :func:`validate_and_normalize` does (only the decoders of
    :data:`DEFAULT_FORMATS`: clean's outputs are JPEG or PNG; the pixel
    count checked before any pixel is decoded), so a hostile file costs no more here than
    in clean. A JPEG is decoded at a reduced DCT scale (libjpeg draft mode): a thumbnail
    of a photo costs a fraction of its full decode.

    Args:
        data: The encoded file.
        side: Longest side of the result, in pixels.
        max_pixels: Largest width*height decoded at all.

    Raises:
        ImageRejected: If it does not decode, with the reason clean would give.
        ValueError: If ``side`` or ``max_pixels`` is below 1.
    """
    if side < 1 or max_pixels < 1:
        raise ValueError(f"side and max_pixels must be >= 1, got {side} and {max_pixels}")
    img = open_image(data, formats=DEFAULT_FORMATS, max_pixels=max_pixels)
    img.draft(None, (side, side))
    _decode(img)
    img, _ = normalize_mode(img, grayscale=img.mode in ("L", "1", *HIGH_BIT_MODES))
    # After the draft the reduction left is under 2x, where bilinear looks like bicubic, faster.
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    return img
