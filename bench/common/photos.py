"""Sets of real-photograph JPEGs at a chosen size, built from the photos that libraries ship.

Sources: scikit-image's bundled ``skimage.data`` photos (astronaut, coffee, chelsea, rocket,
the left motorcycle of ``stereo_motorcycle``), scikit-learn's ``load_sample_images``
(china.jpg, flower.jpg) and matplotlib's ``grace_hopper.jpg``. None of these is large, so
an image of the wanted size is cut from a mirror tiling of one source (the source, its
left-right and its up-down mirror, repeated, so there are no seams), at a random offset,
after a random flip; a quarter of the images are portrait. Each image is then encoded as
a baseline JPEG at quality 90 (Pillow's default 4:2:0 chroma subsampling, as most
cameras and web images use). Everything comes from a seeded ``numpy.random.Generator``,
so a set is the same on every run.

Needs ``scikit-image`` and ``scikit-learn`` (the ``bench`` extra); matplotlib is a core
dependency.

    python bench/common/photos.py OUT_DIR --width 2000 --height 1500 --count 10
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Photo", "source_photos", "make_photo", "photo_set"]


@dataclass(frozen=True)
class Photo:
    """One encoded photo of a set: a file name, its source's name and the JPEG bytes."""

    name: str
    source: str
    width: int
    height: int
    data: bytes


def source_photos() -> dict[str, np.ndarray]:
    """The bundled colour photographs as HWC uint8 RGB arrays, by name."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {name: np.asarray(getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")}
    photos["motorcycle"] = np.asarray(skimage.data.stereo_motorcycle()[0])
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images):
        photos[Path(filename).stem] = np.asarray(image)
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as img:
        photos["grace_hopper"] = np.asarray(img.convert("RGB"))
    return {name: np.ascontiguousarray(arr[:, :, :3]) for name, arr in photos.items()}


def _mirror_tile(src: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A ``height x width`` window at a random offset of the seamless mirror tiling of ``src``."""
    h, w = src.shape[:2]
    block = np.concatenate(
        [
            np.concatenate([src, src[:, ::-1]], axis=1),
            np.concatenate([src[::-1], src[::-1, ::-1]], axis=1),
        ]
    )
    y0, x0 = int(rng.integers(0, 2 * h)), int(rng.integers(0, 2 * w))
    reps_y, reps_x = -(-(y0 + height) // (2 * h)), -(-(x0 + width) // (2 * w))
    tiled = np.tile(block, (reps_y, reps_x, 1))
    return tiled[y0 : y0 + height, x0 : x0 + width]


def make_photo(
    sources: dict[str, np.ndarray],
    width: int,
    height: int,
    rng: np.random.Generator,
    quality: int = 90,
) -> tuple[str, np.ndarray, bytes]:
    """One photo about ``width x height`` (swapped for portrait): source name, pixels, JPEG bytes."""
    name = list(sources)[int(rng.integers(len(sources)))]
    src = sources[name]
    if rng.random() < 0.5:
        src = src[:, ::-1]
    if rng.random() < 0.25:
        width, height = height, width
    pixels = np.ascontiguousarray(_mirror_tile(src, height, width, rng))
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality)
    return name, pixels, buf.getvalue()


def photo_set(count: int, width: int, height: int, seed: int = 0, quality: int = 90) -> list[Photo]:
    """``count`` different JPEG photos of about ``width x height`` pixels."""
    sources = source_photos()
    rng = np.random.default_rng(seed)
    photos = []
    for i in range(count):
        name, pixels, data = make_photo(sources, width, height, rng, quality)
        photos.append(Photo(f"{name}_{i:05d}.jpg", name, pixels.shape[1], pixels.shape[0], data))
    return photos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for photo in photo_set(args.count, args.width, args.height, args.seed, args.quality):
        (args.out / photo.name).write_bytes(photo.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
