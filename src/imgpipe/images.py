"""Image validation and mode normalization: the low-level image operations of clean.

Opening a header is not validation: :func:`validate_and_normalize` decodes every
pixel, and classifies failures into the stable reject codes the clean step writes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "ImageRejected",
    "NormalizedImage",
    "sniff_format",
    "validate_and_normalize",
    "to_8bit",
    "flatten_alpha",
]

# Magic numbers of the formats PIL decodes that show up in scraped image sets. A file that
# starts like an image but cannot be parsed is "corrupt"; anything else is "not_an_image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


# The only decoders clean lets Pillow use: the formats above and WebP. Image.open without
# `formats=` tries every registered plugin, which reaches EPS (it starts Ghostscript),
# SPIDER, IM, TGA and more; an archive member must never get there.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")


class ImageRejected(Exception):
    """An input that cannot become a training image.

    Attributes:
        reason: Stable reject code (``not_an_image``, ``truncated``, ``corrupt``,
            ``too_large``, ``too_small``).
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
    """

    data: bytes
    width: int
    height: int
    mode: str
    format: str
    changes: tuple[str, ...]


def sniff_format(data: bytes) -> str | None:
    """Returns the image format that ``data``'s magic number announces, if any."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def to_8bit(img: Image.Image) -> Image.Image:
    """Maps 16/32-bit integer and float images to 8-bit ``L`` without clipping.

    PIL's own ``convert('L')`` on ``I;16`` clips values above 255 to white, which turns
    most 16-bit photographs into a blank image; scale by the container's range instead.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(scaled).round().astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    peak = int(arr.max()) if arr.size else 0
    if img.mode.startswith("I;16") or peak > 255:
        full = 65535 if peak <= 65535 else peak
        return Image.fromarray((arr * 255 // max(full, 1)).astype(np.uint8), "L")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def flatten_alpha(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composites an image with transparency onto a solid background, returning RGB.

    Dropping the alpha channel instead would expose whatever colour the encoder left in
    fully transparent pixels (often black), which is noise for a classifier.
    """
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


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


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("not_an_image", "empty file (0 bytes)")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings(), _bomb_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
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


def _normalize_mode(img: Image.Image, grayscale: bool) -> tuple[Image.Image, list[str]]:
    changes: list[str] = []
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = to_8bit(img)
        changes.append(f"{mode}->L")
    elif mode == "P" and ("transparency" in img.info):
        img = flatten_alpha(img)
        changes.append("P+alpha->RGB")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = flatten_alpha(img)
        changes.append(f"{mode}->RGB")
    elif mode == "1":
        img = img.convert("L")
        changes.append("1->L")
    target = "L" if grayscale else "RGB"
    if img.mode != target:
        # CMYK, P, YCbCr, LAB, HSV, RGBX, and L->RGB for colour datasets.
        changes.append(f"{img.mode}->{target}")
        img = img.convert(target)
    return img, changes


def validate_and_normalize(
    data: bytes,
    *,
    grayscale: bool = False,
    max_pixels: int = 89_478_485,
    min_side: int = 32,
    jpeg_quality: int = 95,
) -> NormalizedImage:
    """Fully decodes an image, rejects what cannot be used, and normalizes the rest.

    Checks run in this order, and the first failure is the reject reason:
    ``not_an_image`` / ``corrupt`` (header), ``too_large`` (pixel count, checked before
    any pixel is decoded, so decompression bombs cost nothing), ``too_small``,
    ``truncated`` / ``corrupt`` (full decode).

    Normalization: EXIF orientation applied; CMYK, palette, LA/RGBA (composited on
    white), 1-bit and 16/32-bit images become 8-bit RGB, or L with ``grayscale``.

    Args:
        data: The encoded file.
        grayscale: Produce single-channel ``L`` images.
        max_pixels: Largest accepted width*height.
        min_side: Smallest accepted width or height.
        jpeg_quality: Quality for re-encoding images that came in as JPEG.

    Returns:
        The normalized image, with the original bytes when nothing changed.

    Raises:
        ImageRejected: With the reject reason and detail.
    """
    img = _open(data, max_pixels)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}: a side is below min_side {min_side}")
    source_format = (img.format or sniff_format(data) or "unknown").lower()
    _decode(img)
    changes: list[str] = []
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        try:
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected("corrupt", f"unusable EXIF orientation {orientation}: {exc}") from exc
        changes.append(f"exif_rotate:{orientation}")
    img, mode_changes = _normalize_mode(img, grayscale)
    changes.extend(mode_changes)
    if not changes and source_format in ("jpeg", "png"):
        # Keep the original bytes: no generational loss and no encode cost.
        return NormalizedImage(data, img.width, img.height, img.mode, source_format, ())
    buf = io.BytesIO()
    if source_format == "jpeg":
        # Already lossy: a high-quality re-encode adds little loss and stays compact.
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
        fmt = "jpeg"
    else:
        # Lossless sources (PNG, GIF, BMP, TIFF, WebP) stay lossless; level 3 trades a
        # little size for a much faster encode than the default 6.
        img.save(buf, format="PNG", compress_level=3)
        fmt = "png"
        if not changes:
            changes.append(f"{source_format}->png")
    return NormalizedImage(buf.getvalue(), img.width, img.height, img.mode, fmt, tuple(changes))
