"""Real image sets that Python packages ship, written once as a fixed split of class folders.

* ``digits``: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8 x 8 at 17 grey
  levels, from the UCI "Optical Recognition of Handwritten Digits" set), ten classes.
* ``lfw``: scikit-image's ``data.lfw_subset`` (200 grey 25 x 25 crops from Labeled Faces in
  the Wild: 100 faces, then 100 non-face patches), two classes.

Looked at and left out: scikit-learn's ``load_sample_images`` and scikit-image's other
``data`` pictures are single photographs, not labelled sets (bench/common/photos.py cuts them
into resize inputs); ``fetch_olivetti_faces``, ``fetch_lfw_people`` and torchvision's
datasets download at run time, which this bench may not.

Each image is upscaled to ``--size`` (bilinear) and written as an 8-bit grey PNG under
``{out}/{set}/{split}/{class}/{set}-{index:05d}.png``: a fixed, stratified
``train``/``val``/``test`` split (60/20/20 by default, a seeded NumPy generator), so every
system reads the same files. imgpipe's download reads the folder (its ``split_from:
source`` keeps the three splits); torchvision's ``ImageFolder`` reads each split.

    python bench/race/real_sets.py OUT --sets digits,lfw --size 64
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SETS", "RealSet", "load_set", "split_indices", "write_set"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RealSet:
    """A labelled set as arrays: ``images`` N x H x W uint8 grey, ``labels`` N class indices, ``classes`` their names."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str


def _digits() -> RealSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 17 levels, 0-16, to 0-255
    return RealSet("digits", images, d.target.astype(np.int64), tuple(str(c) for c in d.target_names), "sklearn.datasets.load_digits")


def _lfw() -> RealSet:
    import skimage.data

    faces = skimage.data.lfw_subset()  # float in [0, 1]; the first 100 are faces (its docstring)
    images = np.round(np.clip(faces, 0.0, 1.0) * 255.0).astype(np.uint8)
    labels = np.r_[np.zeros(100, np.int64), np.ones(len(images) - 100, np.int64)]
    return RealSet("lfw", images, labels, ("face", "not_face"), "skimage.data.lfw_subset")


SETS = {"digits": _digits, "lfw": _lfw}


def load_set(name: str) -> RealSet:
    """The set ``name`` (a key of :data:`SETS`).

    Raises:
        ValueError: For a name not in :data:`SETS`.
    """
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")
    return SETS[name]()


def split_indices(labels: np.ndarray, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """A stratified split of ``labels`` by ``fractions`` (train, val, test), the same for the same seed.

    Per class, the images are shuffled and cut at the rounded cumulative fractions, so every
    split holds every class in proportion.

    Raises:
        ValueError: If the fractions do not sum to 1, or a class is too small to give every
            split an image (naming the class, its count and what it needs).
    """
    if len(fractions) != len(SPLITS) or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        pieces = np.split(members, cuts)
        if any(len(p) == 0 for p in pieces):
            need = int(np.ceil(1 / min(fractions)))
            raise ValueError(
                f"class {cls} has {len(members)} images: a {'/'.join(f'{f:g}' for f in fractions)} split needs at least "
                f"{need} per class to put one in each of {', '.join(SPLITS)}"
            )
        for split, piece in zip(SPLITS, pieces):
            parts[split].append(piece)
    return {s: np.sort(np.concatenate(parts[s])) for s in SPLITS}


def write_set(data: RealSet, out: Path, *, size: int, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict:
    """Writes ``data`` as grey PNGs in class folders by split under ``out``; returns the split's counts.

    A ``{set}.split.json`` beside the set's folder records the source, size, fractions, seed and the
    indices of each split, so the split can be checked and rebuilt.
    """
    splits = split_indices(data.labels, fractions, seed)
    for split, indices in splits.items():
        for i in indices:
            folder = out / split / data.classes[int(data.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(data.images[i], mode="L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            img.save(folder / f"{data.name}-{int(i):05d}.png")
    summary = {
        "set": data.name,
        "source": data.source,
        "classes": list(data.classes),
        "size": size,
        "fractions": list(fractions),
        "seed": seed,
        "counts": {s: int(len(v)) for s, v in splits.items()},
        "indices": {s: v.tolist() for s, v in splits.items()},
    }
    (out.parent / f"{out.name}.split.json").write_text(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sets", default="digits,lfw")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", default="0.6,0.2,0.2", help="train,val,test fractions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.split.split(",")]
    for name in args.sets.split(","):
        summary = write_set(load_set(name), args.out / name, size=args.size, fractions=fractions, seed=args.seed)
        print(name, summary["counts"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
