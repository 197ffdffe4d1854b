"""Generated test images, good and bad, as encoded bytes (shared by several test modules)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, features


def photo(width: int = 96, height: int = 64, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=90)


def truncated_jpeg(seed: int = 0) -> bytes:
    data = jpeg(160, 120, seed)
    return data[: int(len(data) * 0.6)]


def cmyk_jpeg(seed: int = 0) -> bytes:
    return encode(photo(96, 64, seed).convert("CMYK"), "JPEG", quality=90)


def grayscale_jpeg(seed: int = 0) -> bytes:
    return encode(photo(96, 64, seed).convert("L"), "JPEG", quality=90)


def png16(seed: int = 0) -> bytes:
    """A 16-bit grayscale PNG whose values use the full 16-bit range."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((64, 96)) * 65535).astype(np.uint16)
    arr[:, :48] = 60000  # bright half: clipping to 255 would not be visible as a range bug
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16"), img.mode
    return encode(img, "PNG")


def palette_png_with_transparency(seed: int = 0) -> bytes:
    img = photo(96, 64, seed).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def rgba_png(seed: int = 0) -> bytes:
    img = photo(96, 64, seed).convert("RGBA")
    alpha = Image.new("L", img.size, 0)
    alpha.paste(255, (0, 0, 48, 64))
    img.putalpha(alpha)
    return encode(img, "PNG")


def exif_rotated_jpeg(orientation: int = 6, seed: int = 0) -> bytes:
    """A 96x64 stored image whose EXIF says 'rotate': upright it is 64x96."""
    img = photo(96, 64, seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def html_as_jpg() -> bytes:
    return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>"


def corrupt_jpeg(seed: int = 0) -> bytes:
    """Valid headers, garbage entropy-coded data (the decoder fails mid-stream)."""
    data = bytearray(jpeg(160, 120, seed))
    sos = data.find(b"\xff\xda")
    for i in range(sos + 20, len(data) - 2):
        data[i] = 0xFF if i % 7 == 0 else data[i]
    return bytes(data)


def tiny_jpeg() -> bytes:
    return encode(photo(16, 12), "JPEG")


def png_in_jpg(seed: int = 0) -> bytes:
    return encode(photo(96, 64, seed), "PNG")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bomb(side: int = 30000) -> bytes:
    """A real, valid PNG of side x side black pixels (900 MP at 30000) in under a megabyte."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one byte per grayscale pixel
    chunks = []
    block = row * 64
    for _ in range(side // 64):
        chunks.append(comp.compress(block))
    chunks.append(comp.compress(row * (side % 64)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(chunks)) + _chunk(b"IEND", b"")


# Real files in formats clean does not decode by default (CleanConfig.formats).

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"


def jpeg2000(width: int = 96, height: int = 64, seed: int = 0, codestream: bool = False) -> bytes:
    """A JP2 file (or a raw J2K codestream) by Pillow's OpenJPEG encoder, when it has one.

    Without the codec, the JP2 signature and file-type boxes (ISO/IEC 15444-1 I.5.1, I.5.2)
    and an image header box: enough for a signature, not for a decode.
    """
    if features.check("jpg_2000"):
        return encode(photo(width, height, seed), "JPEG2000", no_jp2=codestream)
    signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    ftyp = b"\x00\x00\x00\x14ftypjp2 \x00\x00\x00\x00jp2 "
    ihdr = struct.pack(">I4sIIHBBBB", 22, b"ihdr", height, width, 3, 7, 7, 0, 0)
    return signature + ftyp + struct.pack(">I4s", 8 + len(ihdr), b"jp2h") + ihdr


def icns(seed: int = 0) -> bytes:
    """An Apple icon family, as Pillow writes it (PNG-coded icons inside)."""
    return encode(photo(64, 64, seed), "ICNS")


def heic_header() -> bytes:
    """The start of an iPhone HEIC (an ISO base media ftyp box, brand heic); Pillow has no decoder."""
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


SHAPES = ("circle", "square", "triangle")


def shape_image(kind: str, rng: np.random.Generator, min_side: int = 128, max_side: int = 200) -> Image.Image:
    """One filled circle, square or triangle of random size and colour on a smooth random background.

    The shape lies inside the centred square of the short side (what a centre crop keeps), at a
    random place there.
    """
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    grid = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    background = Image.fromarray(grid, "RGB").resize((width, height), Image.BILINEAR)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    r = int(rng.uniform(0.18, 0.4) * side)  # half the shape's extent
    cx, cy = left + int(rng.integers(r, side - r + 1)), top + int(rng.integers(r, side - r + 1))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw = ImageDraw.Draw(background)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(0, 0, 0), width=2)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(0, 0, 0), width=2)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour, outline=(0, 0, 0), width=2)
    else:
        raise ValueError(f"unknown shape {kind!r}; one of {', '.join(SHAPES)}")
    return background


def shapes_folder(root: str | os.PathLike, per_class: int = 100, seed: int = 0, classes: tuple[str, ...] = SHAPES) -> Path:
    """An easy own-data set as a user has one: ``root/{circle,square,triangle}/NNNN.jpg``.

    Each image is one filled shape (random position, size and colour, black outline) on a smooth
    random background, 128-200 px a side, JPEG quality 90; the same seed gives the same files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{i:04d}.jpg").write_bytes(encode(shape_image(kind, rng), "JPEG", quality=90))
    return root
