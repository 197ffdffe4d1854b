"""The commit protocol a step's writer follows: claim the output prefix, write the data, publish.

    attempt = claim(dest, "promote")            # dest emptied and owned by this attempt
    ...                                         # the data files
    publish(dest, "promote", attempt, manifest_body(report, cfg, upstream))   # manifest, then _SUCCESS

The order is the protocol: data first, manifest next, ``_SUCCESS`` last; a re-run
removes ``_SUCCESS`` before touching anything else. Readers check ``_SUCCESS`` and
read only the files the manifest lists, so a killed writer is never mistaken for a
finished one, and stale files from older runs are never read.

Two attempts of one step may write one prefix at once (a retry started while the
first attempt still runs). Each attempt claims the prefix under its own attempt id
(in ``__imgpipe__/_OWNER``); the newest claim owns it, and an attempt that no longer owns the
prefix stops without committing (:class:`ConcurrentWriterError`).

What a committed output holds and how it is read: :mod:`imgpipe.contract`. A dataset step
writes through :class:`imgpipe.writer.OutputWriter`, which calls these.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from imgpipe import storage
from imgpipe.config import config_record
from imgpipe.contract import LEGACY_NAMES, MANIFEST, OWNER, SCHEMA_VERSION, SUCCESS, StepReport, check_sizes, dest_uri, side_file

__all__ = [
    "MIN_DEST_SEGMENTS",
    "ConcurrentWriterError",
    "check_destination",
    "claim",
    "publish",
    "check_disjoint",
    "manifest_body",
]

# An output prefix has at least this many segments (the bucket counts as one): a destination
# is emptied before writing, and "s3://bucket" or "/data" must never be.
MIN_DEST_SEGMENTS = 2


class ConcurrentWriterError(RuntimeError):
    """Another attempt claimed the output prefix while this one was writing it."""


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
    storage.write_text(dest_uri(dest, OWNER), json.dumps(marker))
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
    check_sizes(dest, manifest.get("files", []))
    body = {**manifest, "attempt": attempt}
    storage.write_json(dest_uri(dest, MANIFEST), body)
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
        "config": config_record(config),
        "upstream": dict(upstream or {}),
    }
