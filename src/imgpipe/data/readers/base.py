"""What every source reader of the download step is: members in a stable order, and the settings they share.

A reader turns one source (an archive, a bucket prefix, a URI list, WebDataset shards, a
Hugging Face Parquet dataset) into :class:`~imgpipe.data.archive.Member` objects, in an order
that is the same from one run to the next, each read once by the step before it asks for the
next. Readers that fetch many objects (a prefix, a URI list) fetch ahead in a bounded pool and
hand the members over in order (:func:`ordered_map`); a member that could not be fetched comes
flagged with its reject reason instead of failing the step.

    for member in reader.members():
        data = member.read(limit)       # or a reject, when member.reason is set
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from imgpipe.data.archive import Member
from imgpipe.data.archivecaps import Caps
from imgpipe.data.sharding import Shard
from imgpipe.data.sources import SourcePolicy
from imgpipe.data.transport import HttpSettings

__all__ = ["ReaderSettings", "Carry", "Reader", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


class Carry(Protocol):
    """The previous run's output, for a listing that fetches only what changed (an incremental run)."""

    def known(self, path: str) -> tuple[int, str | None] | None:
        """The size and change token the previous run recorded for ``path``, if it had it."""

    def take(self, path: str, size: int, etag: str | None, *, store_md5: bool = False) -> bytes | None:
        """Its bytes (checked against the sha256 recorded with them) when ``size`` and ``etag`` are what it recorded, else ``None``.

        With ``store_md5`` the bytes must also have ``etag`` as their MD5 (S3's single-part ETag).
        """


@dataclass(frozen=True)
class ReaderSettings:
    """What readers share: the step's limits, the source policy and how many objects are fetched at once.

    Attributes:
        max_member_bytes: Largest object read; a bigger one is a ``member_too_large`` reject.
        fetch_workers: Objects fetched at once by a listing reader (a bounded pool; memory
            holds at most twice this many fetched objects).
        http: Timeouts, retries and the size cap of HTTP transfers.
        policy: Where a listed URI may lead (a URI list's entries are run input).
        carry: The previous run's objects that need no fetching (incremental runs).
        shard: This pod's share of a listing (a sharded download); ``None``: all of it.
        image_column: A Hugging Face dataset's image column; ``None``: ``image``, else ``img``.
        label_column: A Hugging Face dataset's label column; ``None``: ``label``, ``labels``, else ``fine_label``.
        label_key: Where a WebDataset sample's class is: empty for ``cls``, else a ``json``'s
            ``label``/``class``/``cls``; a part (``txt``, ``caption.txt``), or ``PART:KEY`` for a
            key of a JSON part (:mod:`imgpipe.data.readers.webdataset`).
        class_names: The names of a WebDataset's integer classes, by index.
        caps: The step's caps, which every nested archive passes before it is opened
            (:mod:`imgpipe.data.archivecaps`); ``None``: nested archives are not capped.
    """

    max_member_bytes: int = 256 << 20
    fetch_workers: int = 16
    http: HttpSettings = field(default_factory=HttpSettings)
    policy: SourcePolicy = field(default_factory=SourcePolicy.trusted)
    carry: Carry | None = None
    shard: Shard | None = None
    image_column: str | None = None
    label_column: str | None = None
    label_key: str = ""
    class_names: tuple[str, ...] = ()
    caps: Caps | None = None

    def keeps(self, key: str) -> bool:
        """Whether the listed input named ``key`` is this pod's to read (:meth:`Shard.owns`)."""
        return self.shard is None or self.shard.owns(key)


class Reader(ABC):
    """One source of members.

    Attributes:
        uri: The source as messages and the manifest show it (redacted).
        kind: What it is (``tar``, ``zip``, ``directory``, ``prefix``, ``urilist``, ``webdataset``, ``hf-parquet``, ...).
        bytes: Its own size where it is one file whose expansion is capped (archives), else ``None``.
        streams_skipped: Whether a rejected member's data still passes through (a tar stream's does).
    """

    uri: str
    kind: str
    bytes: int | None = None
    streams_skipped: bool = False

    @abstractmethod
    def members(self) -> Iterator[Member]:
        """Every member, in a stable order; read each before asking for the next."""

    def declared_members(self) -> int | None:
        """How many entries the source declares before it is read (a zip's index), if it does."""
        return None

    def precheck(self, caps: Caps) -> None:
        """Refuses the source, before it is read, where what it declares crosses ``caps`` (a zip's index)."""
        return None  # most sources declare nothing in advance

    def manifest_entry(self) -> dict[str, Any]:
        """What the download manifest records of this source."""
        return {"uri": self.uri, "format": self.kind, "bytes": self.bytes}

    @property
    def checked_in_advance(self) -> bool:
        """Whether the step reads it all once before touching its destination (a corrupt archive must fail first).

        Listings need not: an object that cannot be fetched is a reject, never a failure.
        """
        return True


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, never more than ``2 * workers`` results ahead.

    ``items`` is consumed lazily, so a listing of millions is never held whole.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="imgpipe-fetch") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
