"""How the synthetic Oxford-IIIT Pet looks: its breeds, each class's fixed shape, texture and hue, and one rendered image.

    rng = image_rng(seed, class_index, n)
    img, box = render_image(class_index, rng, sample_size(rng))

:mod:`imgpipe.data.synth` writes these images into a release; docs/internals/steps.md, "imgpipe.data.synth", has the details.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CAT_BREEDS",
    "DOG_BREEDS",
    "OXFORD_BREEDS",
    "SHAPES",
    "TEXTURES",
    "ClassStyle",
    "choose_breeds",
    "class_style",
    "image_rng",
    "sample_size",
    "sample_elongated_size",
    "render_image",
]

_HEAD_FRACTION = 0.4  # the head box's share of the object's height

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


# Stream tags keep the per-image, quirk-placement and split RNGs independent.
# SeedSequence zero-pads short entropy, so [seed, a] and [seed, a, 0] would collide
# without a distinct second word.
_STREAM_IMAGE = 0x1A6E


_HUE_STEP = 0.153  # see class_style


# off_centre: the aspect ratio range of the images, the object's side as a fraction of the
# short side, and how often its centre goes to an end band outside the central square.
_OFF_CENTRE_ASPECT = (1.6, 2.2)


_OFF_CENTRE_SIDE = (0.25, 0.45)


_OFF_CENTRE_END_BAND = 0.5


_SIDE = (0.3, 0.6)


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
