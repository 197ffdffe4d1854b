"""Which image formats imgpipe decodes, and which format a file's first bytes announce, before any decoder sees it.

    sniff_format(data)                    # 'jpeg', 'png', ..., 'eps', 'heif', or None
    check_formats(['JPEG', 'png'])        # ('jpeg', 'png'): a config's formats, checked against this Pillow

:mod:`imgpipe.data.images` decodes only what this module named and the config accepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import features

__all__ = ["DEFAULT_FORMATS", "DECODABLE_FORMATS", "NEVER_DECODED", "sniff_format", "check_formats"]

# The formats clean decodes unless told otherwise (CleanConfig.formats), by Pillow's format
# names in lowercase: what scraped photo sets hold.
DEFAULT_FORMATS = ("jpeg", "png", "gif", "bmp", "tiff", "webp")


# The formats clean may be told to decode: Pillow decodes each in-process, and sniff_format
# knows its signature, so a file that has one and does not parse is "corrupt", as with the
# defaults. TGA is left out: it has no signature, and its plugin takes almost any bytes.
DECODABLE_FORMATS = (*DEFAULT_FORMATS, "jpeg2000", "avif", "ico", "icns", "psd", "pcx", "sgi", "dds", "qoi", "ppm", "blp", "fits")


# Formats sniff_format recognizes that clean never decodes, and what to do instead.
NEVER_DECODED = {
    "eps": "Pillow decodes EPS and PostScript by running Ghostscript on the file, which clean never does; convert it to PNG first",
    "heif": "Pillow has no HEIF/HEIC decoder; convert it to JPEG or PNG first",
    "jxl": "Pillow has no JPEG XL decoder; convert it to PNG first",
    "dicom": "Pillow does not read DICOM; export its pixels to PNG (pydicom, dcmtk) first",
}


# Codecs a format needs besides Pillow's plugin (PIL.features names): Pillow's wheels
# bundle them, some distribution builds do not (python3-pil without OpenJPEG).
_CODECS = {"jpeg2000": "jpg_2000", "avif": "avif"}


# Signatures of image formats, accepted or not, by Pillow's format name. clean names a file's
# format from its first bytes, before Pillow sees it: a format outside the accepted set is
# rejected ``unsupported_format`` without its plugin ever parsing the file. Pillow's own
# identification would be the alternative, but it identifies by running each plugin's
# parser on the bytes (that is how ``Image.open`` reached EPS, and Ghostscript), and some
# plugins (TGA) take almost anything; a table costs a few comparisons and names the same
# format on every Pillow version. A file that starts like an image but cannot be parsed is
# "corrupt"; one without any signature is "not_an_image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),  # JP2 signature box (ISO/IEC 15444-1 I.5.1)
    (b"\xffO\xffQ", "jpeg2000"),  # raw J2K codestream: SOC then SIZ marker
    (b"%!PS", "eps"),
    (b"\xc5\xd0\xd3\xc6", "eps"),  # DOS EPS binary header
    (b"icns", "icns"),
    (b"\x00\x00\x01\x00", "ico"),  # CUR (00 00 02 00) is left out: a plain TGA starts the same
    (b"8BPS", "psd"),
    (b"\x01\xda", "sgi"),
    (b"DDS ", "dds"),
    (b"qoif", "qoi"),
    (b"BLP1", "blp"),
    (b"BLP2", "blp"),
    (b"SIMPLE  =", "fits"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),
    (b"\xff\x0a", "jxl"),  # JPEG XL codestream
)


# Netpbm's header as Pillow's PPM plugin reads it (netpbm.sourceforge.net/doc/ppm.html).
_NETPBM = re.compile(rb"P[1-6f][ \t\r\n]+[0-9#]")


# ISO base media file brands (the ftyp box) of still-image formats; MP4 video has others.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})


def sniff_format(data: bytes) -> str | None:
    """The image format ``data``'s signature announces, by Pillow's name in lowercase, if any.

    Knows the formats of :data:`DECODABLE_FORMATS` and a few that clean never decodes
    (``eps``, ``heif``, ``jxl``, ``dicom``); reads at most the first 132 bytes.
    """
    iso = _iso_image_brand(data)
    if iso is not None:
        return iso
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if _is_pcx(data):
        return "pcx"
    if _is_netpbm(data):
        return "ppm"
    if data[128:132] == b"DICM":  # after the 128-byte preamble (DICOM PS3.10 section 7.1)
        return "dicom"
    return None


def _iso_image_brand(data: bytes) -> str | None:
    """``avif`` or ``heif`` from an ISO base media ``ftyp`` box's major and compatible brands."""
    if data[4:8] != b"ftyp":
        return None
    end = min(int.from_bytes(data[:4], "big"), len(data), 64)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heif"
    return None


def _is_pcx(data: bytes) -> bool:
    # One magic byte (0x0A) is too weak alone: also the versions Pillow reads, RLE encoding
    # and a valid bit depth, so a text file that starts with a newline is not a PCX.
    return len(data) >= 4 and data[0] == 0x0A and data[1] in (0, 2, 3, 5) and data[2] == 1 and data[3] in (1, 2, 4, 8)


def _is_netpbm(data: bytes) -> bool:
    # P1..P6 (PBM, PGM, PPM) or Pf (float), whitespace, then the width or a comment: two
    # letters alone would take a text file that starts "P6 is" for an image.
    return _NETPBM.match(data) is not None


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Validates the formats clean is to decode; returns them lowercase, without repeats.

    Args:
        formats: Names of :data:`DECODABLE_FORMATS` (any case).

    Raises:
        TypeError: If ``formats`` is a string or holds something else than strings.
        ValueError: If it is empty, names a format clean cannot decode, or one whose codec
            this Pillow lacks.
    """
    if isinstance(formats, (str, bytes)) or not all(isinstance(f, str) for f in formats):
        raise TypeError(f"formats must be a list of format names such as {list(DEFAULT_FORMATS)}, got {formats!r}")
    names = tuple(dict.fromkeys(f.strip().lower() for f in formats))
    if not names:
        raise ValueError(f"formats must name at least one format; the default is {','.join(DEFAULT_FORMATS)}")
    for name in names:
        _check_format(name)
    return names


def _check_format(name: str) -> None:
    if name in NEVER_DECODED:
        raise ValueError(f"formats: clean cannot accept {name!r}: {NEVER_DECODED[name]}")
    if name not in DECODABLE_FORMATS:
        raise ValueError(f"formats: unknown format {name!r}; valid formats are {', '.join(DECODABLE_FORMATS)}")
    codec = _CODECS.get(name)
    if codec is not None and not features.check(codec):
        raise ValueError(
            f"formats: {name!r} needs Pillow built with its {codec} codec, and this one has none "
            f"(PIL.features.check({codec!r}) is False); install Pillow's wheel, which bundles it"
        )
