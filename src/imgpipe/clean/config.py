"""The clean step's settings (torch-, Ray- and decoder-free, so the pipeline compiles anywhere)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from imgpipe.clean.neardup import MAX_DISTANCE
from imgpipe.clean.quality import OUTLIERS
from imgpipe.config import check_numbers, check_range
from imgpipe.data.formats import DEFAULT_FORMATS, check_formats
from imgpipe.data.images import MAX_PIXELS, MAX_PIXELS_LIMIT
from imgpipe.data.labels import LabelSource

__all__ = ["SPLITS", "CleanConfig"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CleanConfig:
    """Settings of the clean step.

    Attributes:
        grayscale: Store single-channel ``L`` images instead of RGB.
        split: Train/val/test fractions; they must sum to 1 and train must be > 0.
        seed: Base seed for the split and the shuffled order.
        label_source: ``oxford`` (``Breed_Name_12.jpg``), ``folder`` (class per
            folder), ``csv`` (``labels_csv``), ``given`` (the label the source gave each
            image: a URI list's, a WebDataset sample's, a Hugging Face ``ClassLabel``), or
            ``auto``, decided per image: the source's label where it gave one, else its class
            folder when the unlabelled images sit in several folders, else oxford
            (:class:`imgpipe.data.labels.AutoLabeler`).
        labels_csv: URI of a ``path,label`` CSV, for ``label_source='csv'``.
        label_overrides: URI of a ``path,label`` CSV whose labels replace the ones the
            label source gives (paths or bare file names; other columns ignored): the
            reviewed ``label_overrides.csv`` of a label audit (``imgpipe audit``).
        max_pixels: Largest width*height accepted; larger is ``too_large``. The default
            is PIL's own decompression-bomb limit.
        min_side: Smallest width or height accepted; smaller is ``too_small``.
        jpeg_quality: Quality for JPEGs that normalization had to re-encode.
        formats: Image formats to decode, by Pillow's name in lowercase (any of
            :data:`imgpipe.data.formats.DECODABLE_FORMATS`); a file whose signature names
            another format is rejected ``unsupported_format``, its plugin never run. Add
            ``jpeg2000`` (needs Pillow with OpenJPEG, as its wheels have), ``avif``,
            ``ico``, ``psd`` and others as needed; EPS is never decoded (Ghostscript).
        workers: Decode processes; 0 means one per CPU the container may use. Fewer start
            when the memory cannot hold that many (the manifest's ``decode_pool`` says how
            many did). 1 decodes in the step's own process, where an image that gets the
            process killed takes the step with it.
        image_timeout_s: Longest one image may take to decode and normalize; the
            worker past it is killed and the image is ``decode_timeout``. 0 means no
            limit.
        rows_per_shard: Rows per output Parquet shard.
        row_group_rows: Most rows per Parquet row group (the unit resize parallelizes on).
        row_group_bytes: Target bytes per row group: groups of large photos get fewer rows
            (down to 8), so a set of 12-megapixel images still spreads over all workers.
        annotations: Prefix of a committed download output of the Oxford-IIIT Pet
            ``annotations.tar.gz``; the head boxes in ``annotations/xmls/*.xml`` become
            the ``bbox`` column (resize's ``roi_crop`` uses it). Boxes annotated on an
            image of another size than the cleaned one are left out.
        split_from: ``source`` (the default): an image keeps the split its source gives it (a
            ``train``/``val``/``test`` folder, the Hub's ``data/train-*`` and ``data/test-*``
            files, a ``split`` column); a split the source lacks is carved from its train
            images, stratified, in the ratio ``split`` gives, and images the source gives no
            split get the stratified random split (so a source without splits is split at
            random). ``random``: the stratified ``split`` of every image, whatever the source
            says. ``annotations``: the Oxford-IIIT Pet release's own ``test.txt`` images are the
            test split, and val is carved from ``trainval.txt``'s in the same way; images in
            neither list get the random split. Needs ``annotations``.
        min_classes: Fewest classes with a kept image: a classifier needs two, so a clean that
            keeps images of fewer fails the step (naming the classes it found). 1 accepts a
            one-class set (to merge with others later, or for anything but a classifier);
            train still refuses to fit a model over one class.
        min_images_per_class: Fewest images a class may keep; a class below it fails the step
            (naming the classes). 0 turns the check off.
        min_images_per_split: Fewest images a split whose fraction is above 0 may get; below
            it the step fails (a tiny dataset's test split can round to nothing). 0 turns the
            check off.
        skip_hashes_from: Prefix of a previous committed clean output (incremental
            re-runs). Images whose sha256 it holds are not decoded again: their rows
            are copied from it (bytes, size, mode, head box) and keep their split, so no
            image moves between train and test across runs. Everything else is cleaned
            as usual; labels and the shuffled order are computed over the union. The
            previous output must have been cleaned with the same image settings.
        near_duplicates: What to do with near-duplicates (images whose perceptual hashes,
            or one's and the other's mirrored, differ in at most ``near_duplicate_distance``
            bits): ``reject`` keeps the first of each group in the shuffled order (a carried
            image before others) and rejects the rest as ``near_duplicate``; ``group`` keeps
            them all, each group in its first image's split, so no group spans train and
            test; ``off`` does neither.
        near_duplicate_distance: Largest Hamming distance between two 64-bit pHashes of
            near-duplicates, 0..32 (0: same hash only; pHashes differ in even numbers of
            bits, so 2 means 2 or 3). At 2 a JPEG re-encode is found nearly always and a 10%
            resize or a mirror image about 9 times in 10 on the synthetic sample; at 4, 99
            in 100, but two distinct images of the 3,705 of ``bench/steps/clean.py``'s sample meet.
        outlier_z: Robust z-score (median and MAD over the dataset) past which an image is
            flagged ``dark``, ``overexposed``, ``blurry``, ``low_information`` or
            ``odd_aspect`` in the manifest; flagged images are kept unless a
            ``reject_*`` threshold says otherwise.
        blank_std: Images whose grey standard deviation (0..255, on a 64-pixel thumbnail)
            is below this are rejected ``blank``; 0 rejects none.
        reject_dark: Robust z-score of low brightness past which an image is rejected
            ``dark``; unset: such images are only flagged.
        reject_overexposed: Robust z-score of high brightness past which an image is
            rejected ``overexposed``; unset: flagged only.
        reject_blurry: Robust z-score of low (log) variance of the Laplacian past which an
            image is rejected ``blurry``; unset: flagged only.
        reject_low_information: Robust z-score of low grey-histogram entropy past which an
            image is rejected ``low_information``; unset: flagged only.
        reject_odd_aspect: Robust z-score of the (log) aspect ratio, either way, past which
            an image is rejected ``odd_aspect``; unset: flagged only.
    """

    # The fields that name something to read: a pipeline task checks them against its
    # read policy (imgpipe.readpolicy) before the step starts.
    READS: ClassVar[tuple[str, ...]] = ("labels_csv", "label_overrides", "annotations", "skip_hashes_from")

    grayscale: bool = False
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    label_source: LabelSource = "auto"
    labels_csv: str | None = None
    label_overrides: str | None = None
    max_pixels: int = MAX_PIXELS
    min_side: int = 32
    jpeg_quality: int = 95
    formats: tuple[str, ...] = DEFAULT_FORMATS
    workers: int = 0
    image_timeout_s: float = 60.0
    rows_per_shard: int = 2048
    row_group_rows: int = 128
    row_group_bytes: int = 64 << 20
    annotations: str | None = None
    split_from: Literal["source", "random", "annotations"] = "source"
    min_classes: int = 2
    min_images_per_class: int = 1
    min_images_per_split: int = 1
    skip_hashes_from: str | None = None
    near_duplicates: Literal["reject", "group", "off"] = "reject"
    near_duplicate_distance: int = 2
    outlier_z: float = 3.5
    blank_std: float = 1.0
    reject_dark: float | None = None
    reject_overexposed: float | None = None
    reject_blurry: float | None = None
    reject_low_information: float | None = None
    reject_odd_aspect: float | None = None

    def outcome_limits(self) -> dict[str, Any]:
        """The limits a committed clean output is held to (:func:`imgpipe.outcome.check_clean`'s keywords)."""
        return {
            "min_classes": self.min_classes,
            "min_images_per_class": self.min_images_per_class,
            "min_images_per_split": self.min_images_per_split,
            "fractions": self.split,
        }

    def reject_z(self) -> dict[str, float | None]:
        """The ``reject_<reason>`` thresholds by outlier reason (:data:`imgpipe.clean.quality.OUTLIERS`)."""
        return {o.reason: getattr(self, f"reject_{o.reason}") for o in OUTLIERS}

    def __post_init__(self) -> None:
        check_numbers(self)
        if len(self.split) != 3 or any(f < 0 for f in self.split):
            raise ValueError(f"split must be three non-negative fractions (train,val,test), got {self.split}")
        if not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1, got {self.split} (sum {sum(self.split)})")
        if self.split[0] <= 0:
            raise ValueError("split: the train fraction must be > 0")
        if self.label_source not in ("auto", "oxford", "folder", "csv", "given"):
            raise ValueError(f"label_source must be auto, oxford, folder, csv or given, got {self.label_source!r}")
        if self.label_source == "csv" and not self.labels_csv:
            raise ValueError("label_source='csv' needs labels_csv, the URI of a path,label CSV")
        if self.split_from not in ("source", "random", "annotations"):
            raise ValueError(f"split_from must be source, random or annotations, got {self.split_from!r}")
        check_range("min_classes", self.min_classes, 1, integer=True, note="1 accepts a one-class set")
        check_range("min_images_per_class", self.min_images_per_class, 0, integer=True, note="0 = no minimum")
        check_range("min_images_per_split", self.min_images_per_split, 0, integer=True, note="0 = no minimum")
        if self.split_from == "annotations" and not self.annotations:
            raise ValueError("split_from='annotations' needs annotations, the download of the release's annotations archive")
        check_range("max_pixels", self.max_pixels, 1, MAX_PIXELS_LIMIT, integer=True)
        check_range("min_side", self.min_side, 1, 65535, integer=True, note="JPEG's and WebP's largest side")
        check_range("jpeg_quality", self.jpeg_quality, 1, 100, integer=True)
        object.__setattr__(self, "formats", check_formats(self.formats))
        check_range("workers", self.workers, 0, 1024, integer=True, note="0 = all cores")
        check_range("image_timeout_s", self.image_timeout_s, 0, 86400, note="0 = no limit")
        check_range("rows_per_shard", self.rows_per_shard, 1, 1 << 20, integer=True)
        check_range("row_group_rows", self.row_group_rows, 1, 1 << 16, integer=True)
        # Arrow's binary type addresses a column chunk with int32 offsets.
        check_range("row_group_bytes", self.row_group_bytes, 1, (1 << 31) - 1, integer=True)
        if self.near_duplicates not in ("reject", "group", "off"):
            raise ValueError(f"near_duplicates must be reject, group or off, got {self.near_duplicates!r}")
        if isinstance(self.near_duplicate_distance, bool) or not 0 <= self.near_duplicate_distance <= MAX_DISTANCE:
            raise ValueError(
                f"near_duplicate_distance must be an integer within 0..{MAX_DISTANCE} bits of a 64-bit hash"
                f" (unrelated images differ by ~32), got {self.near_duplicate_distance!r};"
                " near_duplicates=off turns the search off"
            )
        if not 0 < self.outlier_z < math.inf:
            raise ValueError(f"outlier_z must be a positive robust z-score (e.g. 3.5), got {self.outlier_z}")
        if not 0 <= self.blank_std <= 128:
            raise ValueError(f"blank_std must be within 0..128 (grey levels; 0 rejects no image as blank), got {self.blank_std}")
        for reason, limit in self.reject_z().items():
            if limit is not None and not 0 < limit < math.inf:
                raise ValueError(f"reject_{reason} must be a positive robust z-score (e.g. 5) or unset to keep such images, got {limit}")
