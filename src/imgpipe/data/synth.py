"""A deterministic, offline stand-in for the Oxford-IIIT Pet release.

    generate("file:///tmp/sample", SynthConfig(classes=12, per_class=60))   # images.tar.gz, annotations.tar.gz, synth.json

How it works in detail: docs/internals/steps.md, "imgpipe.data.synth".
"""

from __future__ import annotations

import dataclasses
import gzip
import io
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
from PIL import Image
from tqdm import tqdm

from imgpipe import resources, storage
from imgpipe.config import config_record
from imgpipe.data.synth_images import (
    OXFORD_BREEDS,
    choose_breeds,
    image_rng,
    render_image,
    sample_elongated_size,
    sample_size,
)

__all__ = [
    "QUIRK_COUNTS",
    "EXPECTED_REJECT_REASONS",
    "SynthConfig",
    "SynthReport",
    "generate",
]


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

# Random streams beside synth_images._STREAM_IMAGE (distinct second words, so seeds never collide).
_STREAM_QUIRKS = 0x0F1C
_STREAM_SPLIT = 0x5B17

# Fixed archive metadata, so equal content gives equal bytes (mtime is the
# 2012 release date of the real set; any constant works).
_TAR_MTIME = 1_340_000_000
_EXIF_ORIENTATION = 0x0112
_TRUNCATE_FRACTION = 0.6
_XML_MISSING_FRACTION = 0.08

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
        if self.per_class > 100_000:
            raise ValueError(f"SynthConfig.per_class must be <= 100000 (a sample data set), got {self.per_class}")
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
        open(path, "wb") as raw,  # at rest: the sample archive (generated pictures)
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,  # at rest: the sample archive (generated pictures)
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
        "config": config_record(cfg),
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
    storage.write_json(storage.join(dest, "synth.json"), meta)
    return SynthReport(
        dest=dest,
        classes=list(breeds),
        images=len(kept),
        files=len(images),
        quirks=quirks,
        seconds=time.perf_counter() - start,
    )
