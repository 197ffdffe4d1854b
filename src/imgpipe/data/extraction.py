"""The download step's accounting: every member counted once, and the caps that stop an archive bomb.

    state = Extraction(caps)
    for reader in readers:
        extract_source(reader, state, shards)   # members read, counted, written or rejected
    state.inputs, state.rejects, state.extracted

Caps (:class:`Caps`) count across all sources: members (rejects included), bytes extracted
(each member's data plus its header and path), and each archive's expansion over its own
size. Crossing one aborts the step with a message naming the cap and where it was crossed.
Duplicate paths are found in constant memory per member (:class:`SeenPaths`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from tqdm import tqdm

from imgpipe.contract import Reject
from imgpipe.data import archive
from imgpipe.data.archive import Member
from imgpipe.data.archivecaps import Caps, too_expanded, too_many
from imgpipe.data.labels import BAD_LABEL, check_class_name
from imgpipe.data.readers.base import Reader
from imgpipe.data.transport import basename

__all__ = ["MEMBER_TOO_LARGE", "DUPLICATE_MEMBER", "SeenPaths", "Extraction", "read_member", "Sink", "extract_source", "Discard", "dry_run"]

MEMBER_TOO_LARGE = "member_too_large"
DUPLICATE_MEMBER = "duplicate_member"


class SeenPaths:
    """The member paths seen so far, 16 bytes each: finds a duplicate path in a stream of millions.

    A set of the paths themselves costs about 150 bytes a member (the string and the set's
    slot), 150 MB at a million members. Each path is kept as its 128-bit BLAKE2b digest
    instead (a collision is as likely as guessing a random 128-bit key), recent ones in a
    small set, older ones in sorted NumPy runs merged as they double (a log-structured
    merge: each digest is re-sorted O(log n) times, a look-up searches O(log n) runs).
    """

    _RECENT = 1 << 16

    def __init__(self) -> None:
        self._recent: set[bytes] = set()
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._recent) + sum(len(run) for run in self._runs)

    def add(self, path: str) -> bool:
        """Adds ``path``; whether it had been added before."""
        key = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if key in self._recent or any(self._in_run(run, key) for run in self._runs):
            return True
        self._recent.add(key)
        if len(self._recent) >= self._RECENT:
            self._flush()
        return False

    @staticmethod
    def _in_run(run: np.ndarray, key: bytes) -> bool:
        # Every key is exactly 16 bytes, so NumPy's fixed-width comparison is exact.
        probe = np.array([key], dtype="S16")
        at = int(np.searchsorted(run, probe)[0])
        return at < len(run) and bool(run[at : at + 1] == probe)

    def _flush(self) -> None:
        run = np.sort(np.array(list(self._recent), dtype="S16"))
        self._recent = set()
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate([self._runs.pop(), run]))
        self._runs.append(run)


@dataclass
class Extraction:
    """Running totals over all sources, and the caps on them."""

    cfg: Caps
    inputs: int = 0
    extracted: int = 0  # data bytes written (the manifest's bytes_extracted)
    charged: int = 0  # data plus header and path bytes, all sources: max_total_bytes
    expanded: int = 0  # the same for the current source, plus skipped tar data: the ratio
    rejects: list[Reject] = field(default_factory=list)
    seen: SeenPaths = field(default_factory=lambda: SeenPaths())
    per_source: dict[str, int] = field(default_factory=dict)  # members by source URI

    def start(self, source: Reader) -> None:
        """Begins a source; refuses a zip whose index alone declares too many entries or bytes.

        The index counts directory entries too: they cost memory when it is parsed. The
        source's own pre-checks (:meth:`Reader.precheck`) are those every nested archive passes.
        """
        self.expanded = 0
        declared = source.declared_members()
        if declared is not None and self.inputs + declared > self.cfg.max_members:
            raise ValueError(too_many(source.uri, self.cfg.max_members, f"its index declares {declared} entries, directories included"))
        source.precheck(self.cfg)

    def admit(self, source: Reader, member: Member) -> None:
        """Counts a member, read or rejected, with its header and path bytes."""
        self.inputs += 1
        self.per_source[source.uri] = self.per_source.get(source.uri, 0) + 1
        if self.inputs > self.cfg.max_members:
            raise ValueError(too_many(source.uri, self.cfg.max_members, f"at {member.path!r}"))
        self._charge(source, member, member.header_bytes)

    def screen(self, member: Member) -> Reject | None:
        """The reject for a member that must not be read, else ``None``."""
        duplicate = self.seen.add(member.path)
        if member.reason is not None:
            return Reject(member.path, member.reason, member.detail)
        if member.label is not None and (bad := check_class_name(member.label)) is not None:  # every reader's given label
            return Reject(member.path, BAD_LABEL, bad)
        if duplicate:
            return Reject(member.path, DUPLICATE_MEMBER, "an earlier member has the same path")
        if member.size > self.cfg.max_member_bytes:
            return Reject(member.path, MEMBER_TOO_LARGE, _too_large(member.size, self.cfg))
        return None

    def count(self, source: Reader, member: Member, size: int) -> None:
        """Counts the data bytes of a member that was read."""
        self.extracted += size
        self._charge(source, member, size)

    def skip(self, source: Reader, member: Member) -> None:
        """Counts a rejected member: a tar stream inflates its data all the same."""
        if source.streams_skipped:
            self._expand(source, member, member.size)

    def _charge(self, source: Reader, member: Member, size: int) -> None:
        self.charged += size
        if self.charged > self.cfg.max_total_bytes:
            raise ValueError(
                f"refusing to extract more than max_total_bytes={self.cfg.max_total_bytes} bytes "
                f"(reached at {member.path!r} of {source.uri}); this looks like an archive bomb. "
                "Raise max_total_bytes if the data set really is that large. Nothing was committed."
            )
        self._expand(source, member, size)

    def _expand(self, source: Reader, member: Member, size: int) -> None:
        self.expanded += size
        if source.bytes is None:  # a directory: its files are what they are
            return
        if self.expanded > self.cfg.expansion_limit(source.bytes):
            raise ValueError(too_expanded(source.uri, self.cfg, source.bytes, f"reached at {member.path!r}"))


def _too_large(size: int, cfg: Caps) -> str:
    return f"{size} bytes > max_member_bytes={cfg.max_member_bytes}"


def read_member(member: Member, state: Extraction) -> bytes | Reject:
    """The member's bytes, or the reject that keeps it out of the output."""
    reject = state.screen(member)
    if reject is not None:
        return reject
    try:
        return member.read(state.cfg.max_member_bytes)
    except archive.MemberTooLarge:
        # The header understated the size; the reader stopped at the limit.
        return Reject(
            member.path,
            MEMBER_TOO_LARGE,
            f"more than max_member_bytes={state.cfg.max_member_bytes} bytes",
        )


class Sink(Protocol):
    """Where read members go: the step's shard writer, or nowhere (:class:`Discard`)."""

    def add(self, member: Member, data: bytes) -> None:
        """Takes one member's bytes."""


def extract_source(source: Reader, state: Extraction, shards: Sink) -> None:
    """Reads every member of ``source`` once: counted, then written to ``shards`` or recorded as a reject."""
    bar = tqdm(unit="member", desc=f"extract {basename(source.uri)}", disable=None)
    state.start(source)
    try:
        with closing(source.members()) as members, bar:
            for member in members:
                state.admit(source, member)
                bar.update(1)
                outcome = read_member(member, state)
                if isinstance(outcome, Reject):
                    state.rejects.append(outcome)
                    state.skip(source, member)
                    continue
                state.count(source, member, len(outcome))
                shards.add(member, outcome)
    except archive.ArchiveError as exc:
        if str(exc).startswith(source.uri):
            raise
        raise archive.ArchiveError(f"{source.uri}: {exc}") from exc


class Discard:
    """A shard sink that keeps nothing: what a dry run of the extraction writes to."""

    def add(self, member: Member, data: bytes) -> None:
        """Drops the member."""


def dry_run(sources: Sequence[Reader], cfg: Caps) -> int:
    """Reads every member as the extraction will, writing nothing; returns the members read.

    A truncated or corrupt archive, or one over a size cap, fails here, before the
    destination is touched: the previous committed output survives a bad download.
    """
    state = Extraction(cfg)
    for source in sources:
        extract_source(source, state, Discard())
    return state.inputs
