"""The contract every step's output prefix keeps, and the commit protocol behind it.

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

The order is the protocol: data first, manifest next, ``_SUCCESS`` last; a re-run
removes ``_SUCCESS`` before touching anything else. Readers check ``_SUCCESS`` and
read only the files the manifest lists, so a killed writer is never mistaken for a
finished one, and stale files from older runs are never read.

Two attempts of one step may write one prefix at once (a retry started while the
first attempt still runs). Each attempt claims the prefix under its own attempt id
(in ``__imgpipe__/_OWNER``); the newest claim owns it, and an attempt that no longer owns the
prefix stops without committing (:class:`ConcurrentWriterError`). The manifest records
every file's size and SHA-256: :func:`data_files` checks the sizes against one listing
and :func:`verify_output` the digests, so a file replaced after the commit is found,
never read as part of the output.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.config import config_to_dict

__all__ = [
    "dest_uri",
    "OWNER",
    "MIN_DEST_SEGMENTS",
    "check_destination",
    "check_name",
    "claim",
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
    "ConcurrentWriterError",
    "publish",
    "verify_output",
    "manifest_body",
    "FileEntry",
    "Reject",
    "StepReport",
    "read_manifest",
    "data_files",
    "read_rejects",
    "is_committed",
    "check_disjoint",
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
# An output prefix has at least this many segments (the bucket counts as one): a destination
# is emptied before writing, and "s3://bucket" or "/data" must never be.
MIN_DEST_SEGMENTS = 2
REJECTS = f"{META_DIR}/rejects.parquet"
CONFIG = f"{META_DIR}/config.yaml"
# Files some steps write beside their data, each named here once.
LABELS = f"{META_DIR}/labels.json"  # clean, resize, merge: the class names, in label order
# Where outputs written before META_DIR held these files (beside the data): what readers fall
# back to (side_file, is_committed, claim), so incremental runs and readers take older outputs.
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


class ConcurrentWriterError(RuntimeError):
    """Another attempt claimed the output prefix while this one was writing it."""


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
    _check_sizes(prefix, files)
    return [dest_uri(prefix, f["name"]) for f in files]


def _check_sizes(prefix: str, files: Iterable[Mapping[str, Any]]) -> None:
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
    _check_sizes(prefix, manifest["files"])
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


def _read_json(uri: str) -> dict[str, Any] | None:
    """A small JSON object, or ``None`` if it is absent or not a JSON object."""
    try:
        value = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _owner(dest: str) -> str | None:
    """The step that owns ``dest``: from its owner marker, else its manifest; ``None`` if neither.

    An owner marker written for another location (a copied or moved output) proves nothing
    here: it counts as no owner, so :func:`claim` refuses rather than deletes.
    """
    for name in (OWNER, LEGACY_NAMES[OWNER], MANIFEST, LEGACY_NAMES[MANIFEST]):
        uri = dest_uri(dest, name)
        if storage.exists(uri):
            marker = _read_json(uri) or {}
            if name in (OWNER, LEGACY_NAMES[OWNER]) and marker.get("path") not in (None, dest):
                return None
            return str(marker.get("step") or "") or None
    return None


def _attempt_of(dest: str, name: str) -> str | None:
    return ((_read_json(dest_uri(dest, name)) or {}).get("attempt")) or None


def check_destination(dest: str, step: str) -> str:
    """Refuses a destination a step must never empty: a bucket root, ``/``, a shallow prefix, a link.

    A local destination that is, passes through or holds a symbolic link is refused: what
    a step deletes there could be another output (or anything else) the link points at.

    Returns:
        ``dest`` normalized.

    Raises:
        ValueError: For a prefix of fewer than :data:`MIN_DEST_SEGMENTS` segments, or one
            with a symbolic link on the way to it or inside it.
    """
    dest = storage.normalize_uri(dest)
    if len(storage.segments(dest)) < MIN_DEST_SEGMENTS:
        raise ValueError(
            f"{step}: refusing to write to {dest}: a step empties its destination first, so it must be a "
            f"prefix of at least {MIN_DEST_SEGMENTS} segments (e.g. s3://bucket/imgpipe/{step}), never a bucket root or /"
        )
    links = storage.symlinks(dest)
    if links:
        real = os.path.realpath(storage.local_path(dest))
        raise ValueError(
            f"{step}: refusing to write to {dest}: symbolic link(s) {', '.join(links[:3])}"
            f"{', ...' if len(links) > 3 else ''} would let it reach other files (it resolves to {real}); "
            "name a real directory without links"
        )
    return dest


def claim(dest: str, step: str, *, keep: Iterable[str] = ()) -> str:
    """Makes ``dest`` this step's, emptied: refuses prefixes the step does not own.

    ``dest`` may be empty, or hold an output of the same step (committed, or left by a
    killed attempt: the owner marker says so). Anything else, another step's output or
    objects imgpipe never wrote, is refused rather than deleted, and so are bucket roots,
    ``/`` and shallow prefixes (:func:`check_destination`).

    Order: the ``_SUCCESS`` marker goes first (readers refuse the prefix from then on),
    then everything but ``keep`` and the owner marker, then the owner marker is written
    over with a new attempt id. The marker is never deleted: a claim killed while it
    deletes (a pod killed, a bulk delete cut off) leaves the prefix still marked as this
    step's, so the next attempt takes it over instead of refusing it as foreign (seen in
    ``make test-faults``, a kill -9 during a rerun's claim). The newest claim wins: an
    older attempt still writing finds out at :func:`publish` and stops.

    Args:
        dest: The output prefix.
        step: The step that writes it.
        keep: Names to leave in place (train keeps its checkpoint when resuming).

    Returns:
        This attempt's id, for :func:`publish`.

    Raises:
        ValueError: For a shallow prefix, or one the step does not own (naming some of
            what is there).
    """
    dest = check_destination(dest, step)
    present = storage.list_objects(dest)
    owner = _owner(dest) if present else None
    if present and owner != step:
        names = ", ".join(o.uri[len(dest.rstrip("/")) + 1 :] for o in present[:5])
        marker = side_file(dest, OWNER)
        moved = (_read_json(marker) or {}).get("path") if marker else None
        whose = (
            f"a {owner} output"
            if owner
            else f"an output written at {moved}, not here"
            if moved not in (None, dest)
            else "objects imgpipe did not write"
        )
        raise ValueError(
            f"{step}: refusing to overwrite {dest}: it holds {whose} ({len(present)} object(s): {names}"
            f"{', ...' if len(present) > 5 else ''}). Choose an empty prefix, or remove them yourself"
        )
    storage.delete(dest_uri(dest, SUCCESS))
    storage.delete(dest_uri(dest, LEGACY_NAMES[SUCCESS]))  # an earlier version's output
    markers = {dest_uri(dest, OWNER), dest_uri(dest, LEGACY_NAMES[OWNER])}
    kept = {dest_uri(dest, name) for name in keep} | markers
    storage.delete_many([obj.uri for obj in present if obj.uri not in kept])
    attempt = uuid.uuid4().hex
    marker = {
        "step": step,
        "attempt": attempt,
        "path": dest,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": _now(),
    }
    storage.write_bytes(dest_uri(dest, OWNER), json.dumps(marker).encode())
    storage.delete(dest_uri(dest, LEGACY_NAMES[OWNER]))  # an earlier version's marker, once the new one is there
    return attempt


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_owner(dest: str, step: str, attempt: str) -> None:
    current = _attempt_of(dest, OWNER)
    if current != attempt:
        raise ConcurrentWriterError(
            f"{step}: another attempt ({current or 'unknown'}) claimed {dest} while this attempt "
            f"({attempt}) was writing it; that attempt owns the output now, this one stops without "
            "committing"
        )


def publish(dest: str, step: str, attempt: str, manifest: Mapping[str, Any]) -> None:
    """Commits an output: the manifest, then ``_SUCCESS``, if this attempt still owns ``dest``.

    Ownership is checked before the manifest is written and again after ``_SUCCESS``:
    had another attempt claimed ``dest`` in between, the marker this attempt wrote is
    taken back (unless that attempt has committed since), so readers never accept a
    manifest whose files another attempt is replacing.

    Args:
        dest: The output prefix (normalized).
        step: The step name.
        attempt: The id :func:`claim` returned.
        manifest: The manifest body; its ``files`` must be present with their sizes.

    Raises:
        ConcurrentWriterError: If another attempt claimed ``dest`` meanwhile.
        ValueError: If a listed file is missing or has another size.
    """
    _check_owner(dest, step, attempt)
    _check_sizes(dest, manifest.get("files", []))
    body = {**manifest, "attempt": attempt}
    storage.write_bytes(dest_uri(dest, MANIFEST), json.dumps(body, indent=2).encode())
    _check_owner(dest, step, attempt)
    storage.write_bytes(dest_uri(dest, SUCCESS), b"")
    try:
        _check_owner(dest, step, attempt)
    except ConcurrentWriterError:
        if _attempt_of(dest, MANIFEST) in (attempt, None):
            storage.delete(dest_uri(dest, SUCCESS))
        raise


def check_disjoint(dest: str, sources: Iterable[str], step: str) -> None:
    """Refuses an output prefix that equals, contains or lies inside one of the step's inputs.

    ``OutputWriter.begin()`` empties ``dest``; were a source inside it, the step would
    delete its own input, and were ``dest`` inside a source, the output would be read
    back as input by the next run.

    Raises:
        ValueError: Naming both URIs.
    """
    out = storage.normalize_uri(dest).rstrip("/")
    for source in sources:
        src = storage.normalize_uri(source).rstrip("/")
        if src == out or src.startswith(out + "/") or out.startswith(src + "/"):
            raise ValueError(
                f"{step}: source {source} and dest {dest} overlap; the step clears dest before "
                "writing, so choose a dest outside the source (and vice versa)"
            )


def manifest_body(report: StepReport, config: Any, upstream: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest of a step output: the report plus provenance (every step writes this shape)."""
    return {
        "schema_version": SCHEMA_VERSION,
        **report.to_dict(),
        "created_at": _now(),
        "config": config_to_dict(config),
        "upstream": dict(upstream or {}),
    }
