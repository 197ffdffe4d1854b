"""A deterministic, offline stand-in for the Oxford-IIIT Pet release.

    generate("file:///tmp/sample", SynthConfig(classes=12, per_class=60))   # images.tar.gz, annotations.tar.gz, synth.json

How it works in detail: docs/internals.md, "imgpipe.data.synth".
"""

from __future__ import annotations

import colorsys
import dataclasses
import gzip
import io
import json
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from imgpipe import resources, storage
from imgpipe.config import config_to_dict

__all__ = [
    "OXFORD_BREEDS",
    "CAT_BREEDS",
    "DOG_BREEDS",
    "SHAPES",
    "TEXTURES",
    "QUIRK_COUNTS",
    "EXPECTED_REJECT_REASONS",
    "SynthConfig",
    "SynthReport",
    "ClassStyle",
    "choose_breeds",
    "class_style",
    "image_rng",
    "sample_size",
    "sample_elongated_size",
    "render_image",
    "generate",
]

# Real spelling and case: cat breeds are capitalized, dog breeds lowercase; the
# release's own README says so, and label code relies on it.
CAT_BREEDS: tuple[str, ...] = (
    "Abyssinian",
    "Bengal",
    "Birman",
    "Bombay",
    "British_Shorthair",
    "Egyptian_Mau",
    "Maine_Coon",
    "Persian",
    "Ragdoll",
    "Russian_Blue",
    "Siamese",
    "Sphynx",
)
DOG_BREEDS: tuple[str, ...] = (
    "american_bulldog",
    "american_pit_bull_terrier",
    "basset_hound",
    "beagle",
    "boxer",
    "chihuahua",
    "english_cocker_spaniel",
    "english_setter",
    "german_shorthaired",
    "great_pyrenees",
    "havanese",
    "japanese_chin",
    "keeshond",
    "leonberger",
    "miniature_pinscher",
    "newfoundland",
    "pomeranian",
    "pug",
    "saint_bernard",
    "samoyed",
    "scottish_terrier",
    "shiba_inu",
    "staffordshire_bull_terrier",
    "wheaten_terrier",
    "yorkshire_terrier",
)
# Class-id order of the real list.txt: alphabetical, ignoring case.
OXFORD_BREEDS: tuple[str, ...] = tuple(sorted(CAT_BREEDS + DOG_BREEDS, key=str.lower))

SHAPES: tuple[str, ...] = (
    "ellipse",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "diamond",
    "hexagon",
)
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "gradient")

QUIRK_COUNTS: dict[str, int] = {
    "grayscale": 2,
    "cmyk": 2,
    "png_rgb": 1,
    "png_palette": 1,
    "exif_rotated": 1,
    "truncated": 2,
    "not_an_image": 2,
    "duplicate": 1,
}
# Quirks that the clean step must drop, with its reason codes; the rest are valid
# images it must decode and keep.
EXPECTED_REJECT_REASONS: dict[str, str] = {
    "truncated": "truncated",
    "not_an_image": "not_an_image",
    "duplicate": "duplicate",
}
_IN_PLACE_QUIRKS = (
    "grayscale",
    "grayscale",
    "cmyk",
    "cmyk",
    "png_rgb",
    "png_palette",
    "exif_rotated",
)
_EXTRA_QUIRKS = ("truncated", "truncated", "not_an_image", "not_an_image", "duplicate")
_MIN_IMAGES_FOR_QUIRKS = len(_IN_PLACE_QUIRKS) + 1  # + the duplicate's original

# Stream tags keep the per-image, quirk-placement and split RNGs independent.
# SeedSequence zero-pads short entropy, so [seed, a] and [seed, a, 0] would collide
# without a distinct second word.
_STREAM_IMAGE = 0x1A6E
_STREAM_QUIRKS = 0x0F1C
_STREAM_SPLIT = 0x5B17
_HUE_STEP = 0.153  # see class_style

# Fixed archive metadata, so equal content gives equal bytes (mtime is the
# 2012 release date of the real set; any constant works).
_TAR_MTIME = 1_340_000_000
_EXIF_ORIENTATION = 0x0112
_TRUNCATE_FRACTION = 0.6
_HEAD_FRACTION = 0.4
_XML_MISSING_FRACTION = 0.08
# off_centre: the aspect ratio range of the images, the object's side as a fraction of the
# short side, and how often its centre goes to an end band outside the central square.
_OFF_CENTRE_ASPECT = (1.6, 2.2)
_OFF_CENTRE_SIDE = (0.25, 0.45)
_OFF_CENTRE_END_BAND = 0.5
_SIDE = (0.3, 0.6)

LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`generate` writes.

    Attributes:
        classes: Number of breeds, 1..37; cats and dogs alternate so both naming
            conventions appear.
        per_class: Valid images per class (quirk extras come on top).
        seed: Seed of every random choice; equal seeds give byte-identical archives.
        min_side: Smallest allowed image side in pixels.
        max_side: Largest allowed image side in pixels.
        quirks: Add the fixed set of odd files (see the module docstring).
        jpeg_quality: JPEG quality, 1..95.
        off_centre: Harder images for crop tests: wide or tall (aspect 1.6-2.2, as far as
            min_side/max_side allow), a smaller object whose centre is, half the time, in
            an end band outside the central square, so a centre crop often loses it.
    """

    classes: int = 12
    per_class: int = 60
    seed: int = 0
    min_side: int = 200
    max_side: int = 800
    quirks: bool = True
    jpeg_quality: int = 90
    off_centre: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = bool if isinstance(f.default, bool) else int
            # bool is an int subclass; reject it where a number is meant.
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise TypeError(f"SynthConfig.{f.name} must be {want.__name__}, got {value!r}")
        if not 1 <= self.classes <= len(OXFORD_BREEDS):
            raise ValueError(f"SynthConfig.classes must be in 1..{len(OXFORD_BREEDS)}, got {self.classes}")
        if self.per_class < 1:
            raise ValueError(f"SynthConfig.per_class must be >= 1, got {self.per_class}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")
        if self.min_side < 32:
            raise ValueError(f"SynthConfig.min_side must be >= 32 so the object stays drawable, got {self.min_side}")
        if self.max_side > 4096:
            raise ValueError(f"SynthConfig.max_side must be <= 4096, got {self.max_side}")
        if self.min_side > self.max_side:
            raise ValueError(f"SynthConfig.min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"SynthConfig.jpeg_quality must be in 1..95 (Pillow advises against >95), got {self.jpeg_quality}")
        if self.quirks and self.classes * self.per_class < _MIN_IMAGES_FOR_QUIRKS:
            raise ValueError(
                f"quirks=True needs at least {_MIN_IMAGES_FOR_QUIRKS} images (classes * per_class), got "
                f"{self.classes} * {self.per_class}; raise per_class or set quirks=False"
            )


@dataclass
class SynthReport:
    """What :func:`generate` wrote.

    Attributes:
        dest: Normalized destination prefix.
        classes: Breed names in class-id order (``classes[i]`` has class id ``i + 1``).
        images: Valid, distinct images, i.e. what a correct clean step keeps.
        files: Members of ``images.tar.gz``.
        quirks: Member path to quirk kind.
        seconds: Wall time.
    """

    dest: str
    classes: list[str]
    images: int
    files: int
    quirks: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"synth: {self.images} images in {self.files} files, {len(self.classes)} classes, "
            f"{len(self.quirks)} quirks in {self.seconds:.1f}s -> {self.dest}"
        )


@dataclass(frozen=True)
class ClassStyle:
    """How one class looks: what stays fixed across its images."""

    shape: str
    texture: str
    hue: float


def choose_breeds(classes: int) -> list[str]:
    """Picks ``classes`` breeds, alternating cat and dog, in class-id order.

    Args:
        classes: How many, 1..37.

    Returns:
        Breed names sorted as the real ``list.txt`` numbers them (case-insensitive).
    """
    if not 1 <= classes <= len(OXFORD_BREEDS):
        raise ValueError(f"classes must be in 1..{len(OXFORD_BREEDS)}, got {classes}")
    mixed: list[str] = []
    for i in range(max(len(CAT_BREEDS), len(DOG_BREEDS))):
        mixed.extend(b[i] for b in (CAT_BREEDS, DOG_BREEDS) if i < len(b))
    return sorted(mixed[:classes], key=str.lower)


def class_style(class_index: int) -> ClassStyle:
    """The fixed look of class ``class_index`` (0-based class id).

    Shapes (8) and textures (5) cycle with coprime periods, so all 37 classes get
    distinct pairs. Hues step by :data:`_HUE_STEP`, found by a small search so that
    classes sharing a shape or a texture differ in hue by at least 0.22 of the hue
    circle, and any two of the first 12 classes by at least 0.07.
    """
    if not 0 <= class_index < len(OXFORD_BREEDS):
        raise ValueError(f"class_index must be in 0..{len(OXFORD_BREEDS) - 1}, got {class_index}")
    return ClassStyle(
        shape=SHAPES[class_index % len(SHAPES)],
        texture=TEXTURES[class_index % len(TEXTURES)],
        hue=(class_index * _HUE_STEP) % 1.0,
    )


def image_rng(seed: int, class_index: int, image_number: int) -> np.random.Generator:
    """The generator behind one image, independent of every other image."""
    return np.random.default_rng([seed, _STREAM_IMAGE, class_index, image_number])


def sample_size(rng: np.random.Generator, min_side: int = 200, max_side: int = 800) -> tuple[int, int]:
    """Draws ``(width, height)`` like the real set: mostly 500 px long side, 4:3, landscape.

    Args:
        rng: Source of randomness.
        min_side: Lower bound for both sides.
        max_side: Upper bound for both sides.
    """
    # Most Oxford-IIIT Pet images are Flickr "medium" renditions (500 px long side);
    # the rest spread over a few hundred pixels either way.
    long_side = 500 if rng.random() < 0.6 else int(rng.integers(300, 801))
    ratio = float(rng.choice([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9], p=[0.55, 0.15, 0.1, 0.1, 0.1]))
    long_side = min(max(long_side, min_side), max_side)
    short_side = min(max(round(long_side / ratio), min_side), max_side)
    if rng.random() < 0.3:
        return short_side, long_side
    return long_side, short_side


def sample_elongated_size(rng: np.random.Generator, min_side: int = 200, max_side: int = 800) -> tuple[int, int]:
    """Draws a wide or tall ``(width, height)``: aspect ratio 1.6-2.2, orientation random.

    The long side is drawn as :func:`sample_size` draws it; where ``min_side`` would
    push the short side up, the long side grows with it (up to ``max_side``), so the
    ratio holds unless the bounds leave no room for it.

    Args:
        rng: Source of randomness.
        min_side: Lower bound for both sides.
        max_side: Upper bound for both sides.
    """
    long_side = 500 if rng.random() < 0.6 else int(rng.integers(300, 801))
    aspect = rng.uniform(*_OFF_CENTRE_ASPECT)
    long_side = min(max(long_side, min_side), max_side)
    short_side = round(long_side / aspect)
    if short_side < min_side:
        short_side = min_side
        long_side = min(max_side, max(long_side, round(min_side * aspect)))
    short_side = min(short_side, long_side)
    if rng.random() < 0.5:
        return short_side, long_side
    return long_side, short_side


def _end_band_position(rng: np.random.Generator, size: tuple[int, int], extent: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of an ``extent`` (w, h) object in a ``size`` (w, h) image, for off_centre.

    With probability :data:`_OFF_CENTRE_END_BAND` the object's centre lies in one of the two
    end bands of the long axis outside the central square (or as far out as the object's
    size allows), either end alike; otherwise anywhere. Always fully in frame.
    """
    horizontal = size[0] >= size[1]
    length, across = size if horizontal else size[::-1]
    along_extent, across_extent = extent if horizontal else extent[::-1]
    room = length - along_extent
    if rng.random() < _OFF_CENTRE_END_BAND:
        band = (length - across) // 2  # each end band's width
        # The last start that keeps the centre in the band (the edge, if the object is too big).
        last = max(0, min(room, band - (along_extent + 1) // 2))
        along = int(rng.integers(0, last + 1))
        if rng.random() < 0.5:
            along = room - along  # the other end
    else:
        along = int(rng.integers(0, room + 1))
    other = int(rng.integers(0, across - across_extent + 1))
    return (along, other) if horizontal else (other, along)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-saturation gradient with blotchy and fine noise and small clutter shapes."""
    hue = rng.random()
    c0 = _rgb(hue, rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9))
    c1 = _rgb(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(0.0, math.cos(angle), width, dtype=np.float32)
    ys = np.linspace(0.0, math.sin(angle), height, dtype=np.float32)
    t = ys[:, None] + xs[None, :]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    # Luminance grain in one channel: a third of the cost of colour noise, and it
    # keeps the JPEGs near the real set's size.
    grain = rng.standard_normal((height, width), dtype=np.float32) * np.float32(rng.uniform(2, 10))
    # Blotches: coarse colour noise upsampled, cheaper than full-resolution smooth noise.
    coarse = rng.normal(128.0, rng.uniform(5, 30), (max(2, height // 24), max(2, width // 24), 3))
    blotch = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    arr = np.asarray(blotch, dtype=np.float32) + (c0 - 128.0)
    arr += t[..., None] * (c1 - c0)
    arr += grain[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(int(rng.integers(3, 9))):
        r = short * rng.uniform(0.03, 0.08)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        colour = tuple(int(c) for c in _rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 0.95)))
        box = [cx - r, cy - r * rng.uniform(0.3, 1.0), cx + r, cy + r]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=max(1, int(r / 3)))
    return img


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The object's silhouette filling a ``w`` x ``h`` box (before rotation)."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = w - 1, h - 1
    cx, cy = x1 / 2, y1 / 2
    if shape == "ellipse":
        draw.ellipse([0, 0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, 0), (x1, y1), (0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, 0), (x1, cy), (cx, y1), (0, cy)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular(cx, cy, cx, cy, 6, math.pi / 6), fill=255)
    elif shape == "star":
        inner = rng.uniform(0.38, 0.5)
        outer = _regular(cx, cy, cx, cy, 5, -math.pi / 2)
        inner_pts = _regular(cx, cy, cx * inner, cy * inner, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner_pts, strict=True) for p in pair], fill=255)
    elif shape == "ring":
        hole = rng.uniform(0.4, 0.55)
        draw.ellipse([0, 0, x1, y1], fill=255)
        draw.ellipse([cx * (1 - hole), cy * (1 - hole), cx * (1 + hole), cy * (1 + hole)], fill=0)
    elif shape == "cross":
        arm = rng.uniform(0.16, 0.22)
        draw.rectangle([cx - x1 * arm, 0, cx + x1 * arm, y1], fill=255)
        draw.rectangle([0, cy - y1 * arm, x1, cy + y1 * arm], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def _regular(cx: float, cy: float, rx: float, ry: float, n: int, start: float) -> list[tuple[float, float]]:
    return [
        (
            cx + rx * math.cos(start + 2 * math.pi * k / n),
            cy + ry * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _texture(texture: str, colour: np.ndarray, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """The object's surface: the class hue with a dark same-hue pattern."""
    dark = colour * np.float32(rng.uniform(0.2, 0.4))
    xx = np.arange(w, dtype=np.float32)[None, :]
    yy = np.arange(h, dtype=np.float32)[:, None]
    period = max(4.0, min(w, h) / rng.uniform(4.0, 6.0))
    if texture == "plain":
        t = np.broadcast_to(0.15 * yy / max(h - 1, 1), (h, w))
    elif texture == "stripes":
        t = ((xx // (period / 2)) % 2) * np.ones_like(yy)
    elif texture == "dots":
        dx, dy = xx % period - period / 2, yy % period - period / 2
        t = (dx * dx + dy * dy < (0.3 * period) ** 2).astype(np.float32)
    elif texture == "checker":
        t = ((xx // (period / 2) + yy // (period / 2)) % 2).astype(np.float32)
    elif texture == "gradient":
        t = np.broadcast_to((xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2, (h, w))
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    arr = colour + t[..., None] * (dark - colour)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_image(
    class_index: int, rng: np.random.Generator, size: tuple[int, int], *, off_centre: bool = False
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draws one upright RGB image of class ``class_index`` and its head box.

    Args:
        class_index: 0-based class id (see :func:`class_style`).
        rng: Source of every random choice for this image.
        size: ``(width, height)`` in pixels, each at least 32.
        off_centre: A smaller object, half the time centred in an end band of the long
            axis outside the central square (see :class:`SynthConfig`); the same draws
            as without it otherwise, so ``False`` renders what it always did.

    Returns:
        The image and the "head" box ``(xmin, ymin, xmax, ymax)``: the top 40% of the
        drawn object, 1-based inclusive pixel coordinates as in PASCAL VOC files.
    """
    width, height = size
    if width < 32 or height < 32:
        raise ValueError(f"size must be at least 32x32 pixels, got {size}")
    style = class_style(class_index)
    img = _background(rng, width, height)

    short = min(width, height)
    # Rotation can grow the box by up to sqrt(2); 0.6 * sqrt(2) < 1 keeps it in frame
    # (off_centre: 0.45 * sqrt(2) < 1 too).
    side = int(short * rng.uniform(*(_OFF_CENTRE_SIDE if off_centre else _SIDE)))
    aspect = rng.uniform(0.75, 1.0)
    w, h = (side, max(8, int(side * aspect))) if rng.random() < 0.5 else (max(8, int(side * aspect)), side)
    colour = _rgb(style.hue + rng.uniform(-0.02, 0.02), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    mask = _shape_mask(style.shape, w, h, rng)
    surface = _texture(style.texture, colour, w, h, rng)
    angle = float(rng.uniform(-180, 180))
    mask = mask.rotate(angle, resample=Image.BILINEAR, expand=True)
    surface = surface.rotate(angle, resample=Image.BILINEAR, expand=True)
    mw, mh = mask.size
    if off_centre:
        x0, y0 = _end_band_position(rng, (width, height), (mw, mh))
    else:
        x0 = int(rng.integers(0, width - mw + 1))
        y0 = int(rng.integers(0, height - mh + 1))
    img.paste(surface, (x0, y0), mask)

    m = np.asarray(mask) > 127
    rows = np.flatnonzero(m.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    head_bottom = top + max(1, round(_HEAD_FRACTION * (bottom - top + 1))) - 1
    cols = np.flatnonzero(m[top : head_bottom + 1].any(axis=0))
    box = (x0 + int(cols[0]) + 1, y0 + top + 1, x0 + int(cols[-1]) + 1, y0 + head_bottom + 1)

    # Lighting: exposure gain and contrast around mid-grey, as cameras vary; a
    # lookup table applies it without another full-resolution float pass.
    gain, contrast = rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25)
    levels = np.arange(256, dtype=np.float64)
    lut = np.clip((levels - 128.0) * contrast + 128.0 * gain, 0, 255).round().astype(np.uint8)
    return img.point(lut.tolist() * 3), box


@dataclass(frozen=True)
class _Member:
    """One planned member of images.tar.gz."""

    class_index: int
    number: int
    kind: str  # "image" for a plain JPEG, otherwise a quirk kind
    breed: str
    source: str = ""  # for "duplicate": the member whose bytes it copies

    @property
    def path(self) -> str:
        ext = "mat" if self.kind == "not_an_image" else "jpg"
        return f"images/{self.breed}_{self.number}.{ext}"

    @property
    def stem(self) -> str:
        return f"{self.breed}_{self.number}"


@dataclass(frozen=True)
class _Rendered:
    """A member's bytes and, for valid images, the facts its annotation needs."""

    data: bytes
    width: int = 0  # upright size, as the annotation records it
    height: int = 0
    depth: int = 3
    box: tuple[int, int, int, int] | None = None


def _plan(cfg: SynthConfig, breeds: Sequence[str]) -> list[_Member]:
    """Every member, with quirks placed by an RNG of their own."""
    members = {(c, n): _Member(c, n, "image", breeds[c]) for c in range(cfg.classes) for n in range(1, cfg.per_class + 1)}
    if not cfg.quirks:
        return list(members.values())
    rng = np.random.default_rng([cfg.seed, _STREAM_QUIRKS])
    next_number = [cfg.per_class + 1] * cfg.classes
    extras = []
    for kind in _EXTRA_QUIRKS:
        c = int(rng.integers(cfg.classes))
        extras.append(_Member(c, next_number[c], kind, breeds[c]))
        next_number[c] += 1

    # The duplicate's original must sort before its copy, so that the copy (an
    # extra) is the member a sort-order dedup rejects; <Breed>_1.jpg always does.
    dup = next(m for m in extras if m.kind == "duplicate")
    candidates = [key for key, m in members.items() if key[0] == dup.class_index and m.path < dup.path]
    original = candidates[int(rng.integers(len(candidates)))]
    extras[extras.index(dup)] = dataclasses.replace(dup, source=members[original].path)

    others = [key for key in members if key != original]
    picks = rng.choice(len(others), size=len(_IN_PLACE_QUIRKS), replace=False)
    for kind, pick in zip(_IN_PLACE_QUIRKS, picks, strict=True):
        key = others[int(pick)]
        members[key] = dataclasses.replace(members[key], kind=kind)
    return list(members.values()) + extras


def _jpeg(img: Image.Image, quality: int, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def _mat_bytes(rng: np.random.Generator) -> bytes:
    """A small file with a MATLAB 5.0 MAT-file header, like the real set's stray .mat files."""
    text = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jun 18 12:00:00 2012"
    header = text.ljust(116, b" ") + bytes(8) + b"\x00\x01" + b"IM"
    return header + rng.integers(0, 256, int(rng.integers(64, 512)), dtype=np.uint8).tobytes()


def _render_member(member: _Member, cfg: SynthConfig) -> _Rendered:
    """Renders and encodes one member (duplicates are filled in afterwards)."""
    rng = image_rng(cfg.seed, member.class_index, member.number)
    if member.kind == "not_an_image":
        return _Rendered(_mat_bytes(rng))
    if member.kind == "duplicate":
        return _Rendered(b"")
    sample = sample_elongated_size if cfg.off_centre else sample_size
    width, height = sample(rng, cfg.min_side, cfg.max_side)
    img, box = render_image(member.class_index, rng, (width, height), off_centre=cfg.off_centre)
    q = cfg.jpeg_quality
    depth = 3
    if member.kind == "image":
        data = _jpeg(img, q)
    elif member.kind == "truncated":
        # Cut inside the entropy-coded data: headers parse, decoding fails, no EOI.
        full = _jpeg(img, q)
        return _Rendered(full[: int(len(full) * _TRUNCATE_FRACTION)])
    elif member.kind == "grayscale":
        data, depth = _jpeg(img.convert("L"), q), 1
    elif member.kind == "cmyk":
        data = _jpeg(img.convert("CMYK"), q)
    elif member.kind == "png_rgb":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
    elif member.kind == "png_palette":
        buf = io.BytesIO()
        img.quantize(colors=64).save(buf, format="PNG", transparency=0)
        data = buf.getvalue()
    elif member.kind == "exif_rotated":
        # Orientation 6 means "rotate 90 degrees clockwise to display", so store the
        # upright image turned 90 degrees counter-clockwise (PIL's ROTATE_90).
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = 6
        data = _jpeg(img.transpose(Image.Transpose.ROTATE_90), q, exif=exif.tobytes())
    else:
        raise AssertionError(f"unplanned member kind {member.kind!r}")
    return _Rendered(data, width, height, depth, box)


def _voc_xml(stem: str, breed: str, r: _Rendered, pose: str) -> str:
    assert r.box is not None
    xmin, ymin, xmax, ymax = r.box
    species = "cat" if breed[0].isupper() else "dog"
    return (
        "<annotation>\n"
        "\t<folder>OXIIIT</folder>\n"
        f"\t<filename>{stem}.jpg</filename>\n"
        "\t<source>\n"
        "\t\t<database>OXFORD-IIIT Pet Dataset</database>\n"
        "\t\t<annotation>OXIIIT</annotation>\n"
        "\t\t<image>flickr</image>\n"
        "\t</source>\n"
        "\t<size>\n"
        f"\t\t<width>{r.width}</width>\n"
        f"\t\t<height>{r.height}</height>\n"
        f"\t\t<depth>{r.depth}</depth>\n"
        "\t</size>\n"
        "\t<segmented>0</segmented>\n"
        "\t<object>\n"
        f"\t\t<name>{species}</name>\n"
        f"\t\t<pose>{pose}</pose>\n"
        "\t\t<truncated>0</truncated>\n"
        "\t\t<occluded>0</occluded>\n"
        "\t\t<bndbox>\n"
        f"\t\t\t<xmin>{xmin}</xmin>\n"
        f"\t\t\t<ymin>{ymin}</ymin>\n"
        f"\t\t\t<xmax>{xmax}</xmax>\n"
        f"\t\t\t<ymax>{ymax}</ymax>\n"
        "\t\t</bndbox>\n"
        "\t\t<difficult>0</difficult>\n"
        "\t</object>\n"
        "</annotation>\n"
    )


def _annotations(cfg: SynthConfig, breeds: Sequence[str], kept: Sequence[_Member], rendered: dict[str, _Rendered]) -> dict[str, bytes]:
    """list.txt, trainval.txt, test.txt and head-box XMLs for the images cleaning keeps."""
    rng = np.random.default_rng([cfg.seed, _STREAM_SPLIT])
    species = [1 if b[0].isupper() else 2 for b in breeds]
    # Breed ids count within each species among the chosen breeds, in class-id order.
    breed_id = [species[: c + 1].count(species[c]) for c in range(len(breeds))]

    def line(m: _Member) -> str:
        c = m.class_index
        return f"{m.stem} {c + 1} {species[c]} {breed_id[c]}\n"

    ordered = sorted(kept, key=lambda m: (m.class_index, m.stem))
    trainval: set[str] = set()
    for c in range(len(breeds)):
        stems = [m.stem for m in ordered if m.class_index == c]
        order = rng.permutation(len(stems))
        trainval.update(stems[int(i)] for i in order[: math.ceil(len(stems) / 2)])

    # The real release lacks head boxes for some images; so does this one.
    n_missing = max(1, round(_XML_MISSING_FRACTION * len(ordered))) if len(ordered) >= 2 else 0
    missing = {ordered[int(i)].stem for i in rng.choice(len(ordered), size=n_missing, replace=False)}
    poses = ("Frontal", "Frontal", "Left", "Right", "Unspecified")
    files = {
        "annotations/list.txt": (LIST_HEADER + "".join(line(m) for m in ordered)).encode(),
        "annotations/trainval.txt": "".join(line(m) for m in ordered if m.stem in trainval).encode(),
        "annotations/test.txt": "".join(line(m) for m in ordered if m.stem not in trainval).encode(),
    }
    for m in ordered:
        pose = poses[int(rng.integers(len(poses)))]
        if m.stem not in missing:
            xml = _voc_xml(m.stem, breeds[m.class_index], rendered[m.path], pose)
            files[f"annotations/xmls/{m.stem}.xml"] = xml.encode()
    return files


def _write_tar_gz(path: str, files: dict[str, bytes], compresslevel: int) -> None:
    """Writes a byte-reproducible tar.gz: sorted members, fixed owner/mode/mtimes."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = _TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))


def _render_all(members: Iterable[_Member], cfg: SynthConfig, progress: bool) -> dict[str, _Rendered]:
    members = list(members)
    # Threads overlap Pillow's JPEG encoding and numpy work, which release the GIL;
    # every image has its own RNG, so the output does not depend on scheduling.
    workers = max(1, min(4, resources.available_cpus()))
    out: dict[str, _Rendered] = {}
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(members), desc="synth images", unit="img", disable=not progress) as bar,
    ):
        for m, r in zip(members, pool.map(lambda m: _render_member(m, cfg), members), strict=True):
            out[m.path] = r
            bar.update()
    for m in members:
        if m.kind == "duplicate":
            out[m.path] = dataclasses.replace(out[m.source])
    return out


def generate(dest: str, cfg: SynthConfig, *, progress: bool = True) -> SynthReport:
    """Writes a synthetic Oxford-IIIT-Pet-shaped dataset under ``dest``.

    Writes ``DEST/images.tar.gz`` and ``DEST/annotations.tar.gz``, then
    ``DEST/synth.json`` with ``config``, ``classes`` (class-id order), ``members``
    (entries in ``images.tar.gz``), ``valid_images`` (what cleaning keeps),
    ``quirks`` (member path to kind), ``expected_rejects`` (member path to the
    clean step's reason code) and ``duplicate_of`` (copy to original).
    ``synth.json`` goes last, so its presence means both archives are complete.

    ``annotations.tar.gz`` holds ``annotations/list.txt`` (real header),
    ``trainval.txt`` and ``test.txt`` (about half of each class each), and
    ``annotations/xmls/<stem>.xml`` head boxes for about 92% of the kept images.
    Breed ids in the lists count within each species among the chosen breeds.
    Only images that cleaning keeps are listed or annotated.

    Args:
        dest: Storage URI or local directory.
        cfg: What to generate.
        progress: Show a tqdm progress bar.

    Returns:
        What was written.

    Raises:
        TypeError: If ``cfg`` is not a :class:`SynthConfig`.
        ValueError: If ``dest`` is not a supported storage URI.
    """
    if not isinstance(cfg, SynthConfig):
        raise TypeError(f"cfg must be a SynthConfig, got {type(cfg).__name__}")
    dest = storage.normalize_uri(dest)
    start = time.perf_counter()
    breeds = choose_breeds(cfg.classes)
    members = _plan(cfg, breeds)
    rendered = _render_all(members, cfg, progress)

    quirks = {m.path: m.kind for m in sorted(members, key=lambda m: m.path) if m.kind != "image"}
    expected_rejects = {p: EXPECTED_REJECT_REASONS[k] for p, k in quirks.items() if k in EXPECTED_REJECT_REASONS}
    for m in members:
        if m.kind == "duplicate":
            assert m.source < m.path, "the copy must be the later path of a duplicate pair"
    kept = [m for m in members if m.path not in expected_rejects]
    assert len(kept) == cfg.classes * cfg.per_class

    images = {m.path: rendered[m.path].data for m in members}
    annotations = _annotations(cfg, breeds, kept, rendered)
    meta = {
        "config": config_to_dict(cfg),
        "classes": list(breeds),
        "members": len(images),
        "valid_images": len(kept),
        "quirks": quirks,
        "expected_rejects": expected_rejects,
        "duplicate_of": {m.path: m.source for m in members if m.kind == "duplicate"},
    }
    with tempfile.TemporaryDirectory(prefix="imgpipe-synth-") as tmp:
        # JPEG bytes barely compress, so the fastest gzip level costs no size there.
        for name, files, level in (
            ("images.tar.gz", images, 1),
            ("annotations.tar.gz", annotations, 9),
        ):
            local = os.path.join(tmp, name)
            _write_tar_gz(local, files, level)
            storage.upload_file(local, storage.join(dest, name))
    storage.write_bytes(storage.join(dest, "synth.json"), json.dumps(meta, indent=2).encode() + b"\n")
    return SynthReport(
        dest=dest,
        classes=list(breeds),
        images=len(kept),
        files=len(images),
        quirks=quirks,
        seconds=time.perf_counter() - start,
    )
