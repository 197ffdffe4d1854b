"""The contract every step's output prefix keeps: the names, the types and the readers of a committed output.

A committed step output ``DEST/`` holds:

* data files (Parquet shards) listed in the manifest,
* ``__imgpipe__/rejects.parquet`` with ``path``, ``reason``, ``detail`` (one row per dropped input),
* ``__imgpipe__/config.yaml``, the resolved config of the run that wrote it,
* ``__imgpipe__/manifest.json`` with ``step``, ``inputs``, ``outputs``, ``rejected``, ``files`` and more,
* ``__imgpipe__/_SUCCESS``, written last.

Everything but the data is in ``__imgpipe__/`` (:data:`META_DIR`), so the prefix reads as a
plain directory of data rows in pyarrow, pandas and Ray Data (which skip names starting with
``_`` or ``.``) and in Hugging Face ``datasets`` (which skips folders starting with ``__``).
Outputs of earlier versions hold these files beside the data (:data:`LEGACY_NAMES`);
readers fall back to those names.

Readers check ``_SUCCESS`` and read only the files the manifest lists (:func:`read_manifest`,
:func:`data_files`), so a killed writer is never mistaken for a finished one, and stale files
from older runs are never read. The manifest records every file's size and SHA-256:
:func:`data_files` checks the sizes against one listing and :func:`verify_output` the digests,
so a file replaced after the commit is found, never read as part of the output. How a writer
commits such an output (claim, publish): :mod:`imgpipe.commit`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import storage

__all__ = [
    "dest_uri",
    "OWNER",
    "check_name",
    "MANIFEST",
    "SUCCESS",
    "REJECTS",
    "CONFIG",
    "META_DIR",
    "LABELS",
    "LEGACY_NAMES",
    "side_file",
    "read_side_file",
    "REJECTS_SCHEMA",
    "UncommittedOutputError",
    "verify_output",
    "FileEntry",
    "Reject",
    "StepReport",
    "read_manifest",
    "data_files",
    "check_sizes",
    "read_rejects",
    "is_committed",
]

# The folder of a step output's own files (markers, manifest, rejects, config, labels): directory
# readers skip it, so the prefix reads as its data rows only. Two underscores: pyarrow, pandas and Ray
# Data skip any name starting with "_", Hugging Face datasets only folders starting with "__"
# (datasets 5.2.0 src/datasets/data_files.py, _is_inside_unrequested_special_dir).
META_DIR = "__imgpipe__"
MANIFEST = f"{META_DIR}/manifest.json"
SUCCESS = f"{META_DIR}/_SUCCESS"
# Written first by every attempt: which step owns the prefix (a killed attempt leaves it).
OWNER = f"{META_DIR}/_OWNER"
REJECTS = f"{META_DIR}/rejects.parquet"
CONFIG = f"{META_DIR}/config.yaml"
# Files some steps write beside their data, each named here once.
LABELS = f"{META_DIR}/labels.json"  # clean, resize, merge: the class names, in label order
# Where outputs written before META_DIR held these files (beside the data): what readers fall
# back to (side_file, is_committed, commit.claim), so incremental runs and readers take older outputs.
LEGACY_NAMES = {
    SUCCESS: "_SUCCESS",
    OWNER: "_OWNER",
    MANIFEST: "manifest.json",
    REJECTS: "rejects.parquet",
    CONFIG: "config.yaml",
    LABELS: "labels.json",
}
MODEL = "model.pt"  # train: weights, labels, normalization and config
METRICS = "metrics.json"  # train: per-epoch and final metrics
REPORT = "report.html"  # train: metrics and pictures in one page
PREDICTIONS = "predictions.parquet"  # train: per-image predictions of val and test; predict: its output
MODEL_CARD = "model.json"  # train: what a model needs to run outside imgpipe (input, classes, recipe, metrics)
MODEL_ONNX = "model.onnx"  # train: the kept weights as ONNX (dynamic batch)
MODEL_TORCHSCRIPT = "model.ts"  # train: the kept weights as TorchScript (traced)
PROMOTION_JSON = "promotion.json"  # promote: the gate's decision
PROMOTION_HTML = "promotion.html"  # promote: the decision as a page
SCHEMA_VERSION = 1

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)


class UncommittedOutputError(ValueError):
    """A step output prefix that has no ``_SUCCESS`` marker (unfinished, killed or absent)."""


@dataclass(frozen=True)
class FileEntry:
    """One data file of a step output.

    Attributes:
        name: Path relative to the output prefix.
        rows: Rows it holds (0 for files that are not tables).
        bytes: Its size.
        sha256: Hex SHA-256 of its content; empty in manifests written before it was recorded.
    """

    name: str
    rows: int
    bytes: int
    sha256: str = ""


@dataclass(frozen=True)
class Reject:
    """One input that did not make it to the output, and why.

    Attributes:
        path: The original archive member path of the input.
        reason: A stable reason code (``truncated``, ``unsafe_member``, ...).
        detail: Human-readable specifics (the decoder's message, the limit crossed).
    """

    path: str
    reason: str
    detail: str = ""


@dataclass
class StepReport:
    """What a step did; the manifest is this report plus file and config details.

    Attributes:
        step: Step name.
        dest: The committed output prefix.
        inputs: Items the step received.
        outputs: Items it wrote.
        rejected: Items it dropped; ``inputs == outputs + rejected``.
        rejects_by_reason: Count per reason code.
        files: Data files written.
        seconds: Wall time.
        extra: Step-specific facts (labels, split sizes, source checksum, ...).
    """

    step: str
    dest: str
    inputs: int
    outputs: int
    rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejects_by_reason.items()))
        return (
            f"{self.step}: {self.inputs} in -> {self.outputs} out, {self.rejected} rejected"
            + (f" ({reasons})" if reasons else "")
            + f" in {self.seconds:.1f}s -> {self.dest}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> StepReport:
        """The report a committed output's ``manifest.json`` was written from (its extra keys dropped)."""
        return cls(
            step=manifest["step"],
            dest=manifest["dest"],
            inputs=int(manifest["inputs"]),
            outputs=int(manifest["outputs"]),
            rejected=int(manifest["rejected"]),
            rejects_by_reason=dict(manifest.get("rejects_by_reason", {})),
            files=[FileEntry(**f) for f in manifest.get("files", [])],
            seconds=float(manifest.get("seconds", 0.0)),
            extra=dict(manifest.get("extra", {})),
        )


def dest_uri(dest: str, name: str) -> str:
    return storage.join(dest, name)


# Characters no file name of an output has: a backslash (another separator) and controls.
_NOT_IN_NAMES = re.compile(r"[\\\x00-\x1f\x7f]")


def check_name(name: Any, where: str) -> str:
    """``name`` if it names a file inside a prefix: relative, ``/``-separated, no ``.``/``..``, no scheme.

    Names come from manifests and cards, which a run reads back from storage: a forged one
    must not lead a reader (or ``register``) to another prefix.

    Raises:
        ValueError: Naming ``where`` and the refused name.
    """
    segments = name.split("/") if isinstance(name, str) else [""]
    if not isinstance(name, str) or _NOT_IN_NAMES.search(name) or any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"{where}: file name {name!r} is not a plain name inside the prefix; the file was altered or forged")
    return name


def side_file(prefix: str, name: str) -> str | None:
    """The URI of the side file ``name`` (:data:`MANIFEST`, :data:`LABELS`, ...) in ``prefix``, ``None`` if absent.

    The current name first, then the one earlier versions wrote (:data:`LEGACY_NAMES`).
    """
    for candidate in (name, LEGACY_NAMES.get(name)):
        if candidate and storage.exists(dest_uri(prefix, candidate)):
            return dest_uri(prefix, candidate)
    return None


def read_side_file(prefix: str, name: str) -> bytes:
    """The content of the side file ``name`` of ``prefix``, under its current or its earlier name.

    Raises:
        FileNotFoundError: If neither is present.
    """
    try:
        return storage.read_bytes(dest_uri(prefix, name))
    except FileNotFoundError:
        if name not in LEGACY_NAMES:
            raise
    return storage.read_bytes(dest_uri(prefix, LEGACY_NAMES[name]))


def is_committed(prefix: str) -> bool:
    """Whether ``prefix`` holds a committed step output (its ``_SUCCESS`` marker, or an earlier version's)."""
    return side_file(prefix, SUCCESS) is not None


def read_manifest(prefix: str, expect_step: str | None = None) -> dict[str, Any]:
    """Reads a committed output's manifest.

    Args:
        prefix: The step output prefix.
        expect_step: If given, the manifest's ``step`` must match.

    Raises:
        UncommittedOutputError: If ``_SUCCESS`` is missing.
        ValueError: If the manifest is unreadable or from another step.
    """
    prefix = storage.normalize_uri(prefix)
    if not is_committed(prefix):
        raise UncommittedOutputError(
            f"{prefix} is not a committed step output (no {SUCCESS} marker): the step that writes "
            "it has not finished, failed, or was pointed elsewhere; re-run that step first"
        )
    try:
        manifest = json.loads(read_side_file(prefix, MANIFEST))
    except FileNotFoundError as exc:
        raise ValueError(f"{prefix} has {SUCCESS} but no {MANIFEST}; the output is damaged") from exc
    if expect_step is not None and manifest.get("step") != expect_step:
        raise ValueError(f"{prefix} holds the output of step {manifest.get('step')!r}, expected {expect_step!r}")
    files = manifest.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, Mapping) for f in files):
        raise ValueError(f"{prefix}/{MANIFEST}: 'files' must be a list of file entries; the manifest is damaged")
    for f in files:
        check_name(f.get("name"), f"{prefix}/{MANIFEST}")
    return manifest


def data_files(
    prefix: str,
    manifest: Mapping[str, Any] | None = None,
    select: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[str]:
    """URIs of the data files a committed output lists (never a directory listing).

    Each listed file (of those ``select`` keeps, given its manifest entry) must have a plain
    name inside the prefix (:func:`check_name`) and be present with the size the manifest
    records (one listing of the prefix): a file deleted or replaced after the commit fails
    here, not mid-read.

    Raises:
        ValueError: If a listed file's name leaves the prefix, or it is missing or has another size.
    """
    prefix = storage.normalize_uri(prefix)
    manifest = manifest or read_manifest(prefix)
    files = [f for f in manifest["files"] if select is None or select(f)]
    for f in files:
        check_name(f.get("name"), f"{prefix}/{MANIFEST}")
    check_sizes(prefix, files)
    return [dest_uri(prefix, f["name"]) for f in files]


def check_sizes(prefix: str, files: Iterable[Mapping[str, Any]]) -> None:
    """Checks, against one listing of ``prefix``, that each manifest entry's file is there with its recorded size.

    Raises:
        ValueError: If a file is missing or has another size.
    """
    sizes = {o.uri: o.size for o in storage.list_objects(prefix)}
    for f in files:
        found = sizes.get(dest_uri(prefix, f["name"]))
        if found != f["bytes"]:
            state = "is missing" if found is None else f"has {found} bytes"
            raise ValueError(
                f"{prefix}: data file {f['name']} {state}, the manifest says {f['bytes']} bytes; "
                "the output changed after it was committed (a concurrent or manual write). "
                "Re-run the step that writes it"
            )


def verify_output(prefix: str) -> dict[str, Any]:
    """Checks every data file of a committed output against its recorded SHA-256.

    Reads every byte: for audits and tests; readers rely on :func:`data_files`'s size
    check.

    Returns:
        The manifest.

    Raises:
        UncommittedOutputError: If the output is not committed.
        ValueError: If a file is missing or its size or digest differ from the manifest.
    """
    prefix = storage.normalize_uri(prefix)
    manifest = read_manifest(prefix)
    check_sizes(prefix, manifest["files"])
    for f in manifest["files"]:
        if not f.get("sha256"):
            continue  # written before digests were recorded
        digest = hashlib.sha256()
        with storage.open_read(dest_uri(prefix, f["name"])) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != f["sha256"]:
            raise ValueError(
                f"{prefix}: data file {f['name']} does not match the sha256 its manifest records; "
                "it was replaced after the commit. Re-run the step that writes it"
            )
    return manifest


def read_rejects(prefix: str) -> pa.Table:
    """The rejects table of a committed output."""
    read_manifest(prefix)
    # ParquetFile, not read_table: one small file needs no pyarrow.dataset (a 30 ms import).
    return pq.ParquetFile(io.BytesIO(read_side_file(prefix, REJECTS))).read()
