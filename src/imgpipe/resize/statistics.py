"""Dataset statistics of a resize output, in fixed-size sums that tasks accumulate and the driver merges.

    moments = split_moments(manifest, "train")   # per-channel mean and std a resize output recorded

How it works in detail: docs/internals/resize.md, "imgpipe.resize.statistics".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "PIXEL_SCALE",
    "MIN_STD",
    "SIZE_EDGES",
    "ASPECT_EDGES",
    "SplitStatistics",
    "DatasetStatistics",
    "split_moments",
]

# Grey levels per unit: the statistics are of pixels scaled to [0, 1], as training sees them.
PIXEL_SCALE = 255
# The smallest std a reader gets: a channel that never varies (a constant image set) would
# otherwise divide by zero when normalized; one grey level keeps it finite.
MIN_STD = 1.0 / PIXEL_SCALE

# Source sides in pixels: thumbnails, the common model inputs and their 256 resize, photos.
# Each edge is a bin's lower bound: bin i holds [edge i, edge i+1), the last bin everything
# from the last edge up, so there are as many bins as edges.
SIZE_EDGES: tuple[int, ...] = (0, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# width / height, symmetric around 1 (portrait below, landscape above: 0.5 is 1:2, 2.0 is 2:1).
ASPECT_EDGES: tuple[float, ...] = (0.0, 0.25, 0.5, 2 / 3, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, 4.0)

_LEVELS = np.arange(PIXEL_SCALE + 1, dtype=np.int64)
_SQUARES = _LEVELS * _LEVELS


def _bin(edges: Sequence[float], value: float) -> int:
    """The bin of ``value`` over lower bounds ``edges``: below the first edge counts as the first bin."""
    return max(int(np.searchsorted(edges, value, side="right")) - 1, 0)


@dataclass
class SplitStatistics:
    """The fixed-size sums of one split (see the module docstring).

    Attributes:
        images: Rows counted.
        classes: Images per ``label``.
        channels: The channel count of the pixels in ``pixels``/``sums`` (0 before the first row).
        pixels: Pixels per channel summed (every pixel of every image of ``channels`` channels).
        sums: Per channel, the sum of the grey levels.
        squares: Per channel, the sum of the squared grey levels.
        other_channels: Rows of another channel count, left out of the pixel sums (clean
            writes one mode for all rows; only a hand-made input mixes them).
        width: Counts of the source widths over :data:`SIZE_EDGES`' bins.
        height: Counts of the source heights, likewise.
        aspect: Counts of the source ``width / height`` over :data:`ASPECT_EDGES`' bins.
        unsized: Rows without a source size (an input without clean's ``width``/``height``),
            so in no size or aspect bin.
    """

    images: int = 0
    classes: dict[int, int] = field(default_factory=dict)
    channels: int = 0
    pixels: int = 0
    sums: list[int] = field(default_factory=list)
    squares: list[int] = field(default_factory=list)
    other_channels: int = 0
    width: list[int] = field(default_factory=lambda: [0] * len(SIZE_EDGES))
    height: list[int] = field(default_factory=lambda: [0] * len(SIZE_EDGES))
    aspect: list[int] = field(default_factory=lambda: [0] * len(ASPECT_EDGES))
    unsized: int = 0

    def add(self, label: int, width: int | None, height: int | None, pixels: np.ndarray) -> None:
        """Counts one written image: its class, its source size, and its stored ``H x W x C`` uint8 pixels."""
        self.images += 1
        self.classes[int(label)] = self.classes.get(int(label), 0) + 1
        if width and height and width > 0 and height > 0:
            self.width[_bin(SIZE_EDGES, width)] += 1
            self.height[_bin(SIZE_EDGES, height)] += 1
            self.aspect[_bin(ASPECT_EDGES, width / height)] += 1
        else:
            self.unsized += 1
        channels = pixels.shape[2]
        if not self.channels:
            self.channels, self.sums, self.squares = channels, [0] * channels, [0] * channels
        if channels != self.channels:
            self.other_channels += 1
            return
        flat = pixels.reshape(-1, channels)
        self.pixels += flat.shape[0]
        for c in range(channels):
            # A histogram of the 256 levels, then two dot products: exact integer sums, and
            # several times faster than squaring the pixels as floats.
            counts = np.bincount(flat[:, c], minlength=PIXEL_SCALE + 1)
            self.sums[c] += int(counts @ _LEVELS)
            self.squares[c] += int(counts @ _SQUARES)

    def merge(self, other: SplitStatistics) -> None:
        """Adds ``other``'s counts to these.

        Pixel sums of two channel counts cannot be added: the one with more pixels is kept,
        and the other's rows count as ``other_channels``.
        """
        other_rows = self.other_channels + other.other_channels
        if self.channels and other.channels and self.channels != other.channels:
            keep, drop = (self, other) if self.pixels >= other.pixels else (other, self)
            other_rows += drop.images - drop.other_channels
            channels, pixels, sums, squares = (
                keep.channels,
                keep.pixels,
                list(keep.sums),
                list(keep.squares),
            )
        elif not other.channels or not self.channels:
            keep = self if self.channels else other
            channels, pixels, sums, squares = (
                keep.channels,
                keep.pixels,
                list(keep.sums),
                list(keep.squares),
            )
        else:
            channels, pixels = self.channels, self.pixels + other.pixels
            sums = [a + b for a, b in zip(self.sums, other.sums)]
            squares = [a + b for a, b in zip(self.squares, other.squares)]
        self.channels, self.pixels, self.sums, self.squares, self.other_channels = (
            channels,
            pixels,
            sums,
            squares,
            other_rows,
        )
        self.images += other.images
        for label, n in other.classes.items():
            self.classes[label] = self.classes.get(label, 0) + n
        self.width = [a + b for a, b in zip(self.width, other.width)]
        self.height = [a + b for a, b in zip(self.height, other.height)]
        self.aspect = [a + b for a, b in zip(self.aspect, other.aspect)]
        self.unsized += other.unsized

    def mean_std(self) -> tuple[list[float], list[float]] | None:
        """Per-channel mean and (population) std of the pixels scaled to [0, 1]; ``None`` without pixels."""
        if not self.pixels:
            return None
        n = self.pixels
        mean = [s / n / PIXEL_SCALE for s in self.sums]
        # n * sum(x^2) - sum(x)^2 in exact integers, so no cancellation before the one division.
        std = [math.sqrt(max(0, n * q - s * s)) / n / PIXEL_SCALE for s, q in zip(self.sums, self.squares)]
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (how a task hands it back); class labels become strings, as JSON keys are."""
        return {
            "images": self.images,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            "channels": self.channels,
            "pixels": self.pixels,
            "sums": self.sums,
            "squares": self.squares,
            "other_channels": self.other_channels,
            "width": self.width,
            "height": self.height,
            "aspect": self.aspect,
            "unsized": self.unsized,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> SplitStatistics:
        """The inverse of :meth:`to_dict`."""
        return cls(
            images=int(value["images"]),
            classes={int(k): int(v) for k, v in value["classes"].items()},
            channels=int(value["channels"]),
            pixels=int(value["pixels"]),
            sums=[int(v) for v in value["sums"]],
            squares=[int(v) for v in value["squares"]],
            other_channels=int(value["other_channels"]),
            width=[int(v) for v in value["width"]],
            height=[int(v) for v in value["height"]],
            aspect=[int(v) for v in value["aspect"]],
            unsized=int(value["unsized"]),
        )


@dataclass
class DatasetStatistics:
    """:class:`SplitStatistics` per split: what one task accumulates, and what the driver merges."""

    splits: dict[str, SplitStatistics] = field(default_factory=dict)

    def add(self, split: str, label: int, width: int | None, height: int | None, pixels: np.ndarray) -> None:
        """Counts one written image of ``split`` (:meth:`SplitStatistics.add`)."""
        self.splits.setdefault(split, SplitStatistics()).add(label, width, height, pixels)

    def merge(self, other: DatasetStatistics) -> None:
        """Adds ``other``'s counts, split by split."""
        for split, stats in other.splits.items():
            self.splits.setdefault(split, SplitStatistics()).merge(stats)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {split: stats.to_dict() for split, stats in sorted(self.splits.items())}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DatasetStatistics:
        """The inverse of :meth:`to_dict`."""
        return cls({split: SplitStatistics.from_dict(stats) for split, stats in value.items()})

    def manifest_block(self, classes: Sequence[str], color_space: str) -> dict[str, Any]:
        """The manifest's ``statistics`` (the module docstring has its layout).

        Args:
            classes: Class names in label order; a label without one is named by its index.
            color_space: The colour space of the stored pixels (:func:`imgpipe.resize.spec.color_space`).
        """

        def name(label: int) -> str:
            return classes[label] if 0 <= label < len(classes) else str(label)

        splits: dict[str, Any] = {}
        for split, stats in sorted(self.splits.items()):
            moments = stats.mean_std()
            splits[split] = {
                "images": stats.images,
                "images_per_class": {name(k): v for k, v in sorted(stats.classes.items())},
                "channels": stats.channels,
                "mean": None if moments is None else moments[0],
                "std": None if moments is None else moments[1],
                "width": stats.width,
                "height": stats.height,
                "aspect": stats.aspect,
                "unsized": stats.unsized,
                "other_channels": stats.other_channels,
            }
        return {
            "color_space": color_space,
            "pixel_scale": PIXEL_SCALE,
            "size_edges": list(SIZE_EDGES),
            "aspect_edges": [round(e, 6) for e in ASPECT_EDGES],
            "splits": splits,
        }


def split_moments(manifest: Mapping[str, Any], split: str = "train") -> tuple[list[float], list[float]] | None:
    """The per-channel mean and std (of pixels / 255) a resize manifest records for ``split``.

    Each std is at least :data:`MIN_STD`, so normalizing by it stays finite.

    Returns:
        ``(mean, std)``, one value per stored channel; ``None`` for a manifest written
        before resize recorded statistics, or a split without pixels.
    """
    stats = ((manifest.get("extra") or {}).get("statistics") or {}).get("splits", {}).get(split) or {}
    if not stats.get("mean") or not stats.get("std"):
        return None
    return [float(m) for m in stats["mean"]], [max(float(s), MIN_STD) for s in stats["std"]]
