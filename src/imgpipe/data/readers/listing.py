"""A prefix of loose objects (``s3://bucket/prefix/``) as a source: listed a page at a time, fetched in a bounded pool.

    reader = PrefixReader("s3://ml-data/pets/", settings)
    for member in reader.members(): ...          # member.path: the key below the prefix

Members come in the store's listing order (S3 lists keys in UTF-8 byte order), each with its
size and ETag (:attr:`~imgpipe.data.archive.Member.etag`, recorded in the output for the next
incremental run). The census lists the prefix once, into a temporary file the fetch then
reads. ``settings.fetch_workers`` objects are fetched at once, at most twice that many
held; boto3 retries throttling and 5xx answers (its adaptive mode, :mod:`imgpipe.storage`).
An object that still cannot be read, or is gone by the time it is read, or is larger than
``max_member_bytes``, is a reject with its reason; a key with ``..`` or a leading ``/`` is an
``unsafe_member``; any other error over one object (its key, the previous run's copy of it) is
its ``fetch_failed``, and only a listing that fails fails the step. Where the previous run
holds an object of the same key, size and ETag (``settings.carry``), its bytes are taken from there and the object is not fetched, once they
are proved against the store: their MD5 is the listed ETag (a single-part upload's). An
object whose ETag is no MD5 (a multipart upload's) is fetched on every run.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from functools import partial
from typing import IO, Any

from imgpipe import storage
from imgpipe.data import archive
from imgpipe.data.archive import Member
from imgpipe.data.readers.base import Reader, ReaderSettings, ordered_map
from imgpipe.data.transport import FETCH_FAILED, TOO_LARGE

__all__ = ["VANISHED", "PrefixReader", "fetched", "read_object"]

# An object listed but gone (deleted, or replaced by a folder) when it was read.
VANISHED = "vanished"


def fetched(path: str, data: bytes, *, etag: str | None = None, label: str | None = None) -> Member:
    """A member whose bytes are in hand."""
    return Member(path, len(data), opener=partial(io.BytesIO, data), etag=etag, label=label)


def read_object(uri: str, limit: int) -> tuple[bytes, storage.ObjectInfo]:
    """The bytes of one stored object with its size and change token, refusing more than ``limit`` (it may have grown since it was listed).

    Raises:
        archive.MemberTooLarge: Past ``limit`` bytes.
        FileNotFoundError: If it is gone.
    """
    data, info = storage.read_some(uri, limit + 1)
    if len(data) > limit or info.size > limit:
        raise archive.MemberTooLarge(f"more than {limit} bytes")
    return data, info


class PrefixReader(Reader):
    """The objects below one storage prefix (any scheme :mod:`imgpipe.storage` serves)."""

    kind = "prefix"

    def __init__(self, prefix: str, settings: ReaderSettings) -> None:
        self.prefix = storage.normalize_uri(prefix).rstrip("/") + "/"
        self.uri = storage.redact_uri(self.prefix)
        self.settings = settings
        self.listed = 0
        self._spool: IO[str] | None = None

    @property
    def checked_in_advance(self) -> bool:
        return False

    def manifest_entry(self) -> dict[str, Any]:
        return {"uri": self.uri, "format": self.kind, "sha256": None, "bytes": None, "objects": self.listed}

    def census(self) -> tuple[int, int]:
        """Objects and bytes below the prefix (the listing, nothing fetched).

        The listing is kept in a temporary file, a line an object, which :meth:`members`
        then reads instead of listing again: one pass over a store's listing per run, and
        memory flat with the count (``docs/benchmarks.md``: a listing page costs a round trip).
        """
        self._drop_spool()
        # Kept open past this call (members() reads and closes it): no context manager.
        spool = self._spool = tempfile.TemporaryFile(mode="w+", encoding="utf-8", prefix="imgpipe-listing-")  # noqa: SIM115
        count = total = 0
        for info in self._listed(counted=False):
            spool.write(json.dumps([info.uri, info.size, info.etag]) + "\n")
            count, total = count + 1, total + info.size
        return count, total

    def members(self) -> Iterator[Member]:
        self.listed = 0
        return ordered_map(self._member, self._listing(), self.settings.fetch_workers)

    def _listing(self) -> Iterator[storage.ObjectInfo]:
        """The census's listing where it was taken, else the store's."""
        spool, self._spool = self._spool, None
        if spool is None:
            yield from self._listed()
            return
        with spool:
            spool.seek(0)
            for line in spool:
                uri, size, etag = json.loads(line)
                self.listed += 1
                yield storage.ObjectInfo(uri, int(size), etag)

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _listed(self, counted: bool = True) -> Iterator[storage.ObjectInfo]:
        for info in storage.iter_objects(self.prefix):
            if info.uri.endswith("/") and info.size == 0:
                continue  # a "folder" marker some consoles create
            if not self.settings.keeps(info.uri[len(self.prefix) :]):
                continue  # another shard's
            self.listed += counted
            yield info

    def _member(self, info: storage.ObjectInfo) -> Member:
        """One listed object as a member, or as a reject with its reason: nothing about one object fails the step."""
        try:
            return self._read(info)
        except Exception as exc:  # noqa: BLE001 - whatever one object raises is that object's reject
            path = info.uri[len(self.prefix) :]
            return Member(path, info.size, FETCH_FAILED, f"{type(exc).__name__}: {storage.redact_text(str(exc))[:200]}", etag=info.etag)

    def _read(self, info: storage.ObjectInfo) -> Member:
        key = info.uri[len(self.prefix) :]
        path, problem = archive.normalize_member_path(key)
        if problem is not None:
            return Member(path, info.size, archive.UNSAFE_MEMBER, problem, etag=info.etag)
        carry = self.settings.carry
        if carry is not None:
            # The previous output is only a record; the listing's ETag is the store's word.
            data = carry.take(path, info.size, info.etag, store_md5=True)
            if data is not None:
                return fetched(path, data, etag=info.etag)  # carried
        limit = self.settings.max_member_bytes
        if info.size > limit:
            return Member(path, info.size, TOO_LARGE, f"{info.size} bytes listed > max_member_bytes={limit}", etag=info.etag)
        try:
            data, now = read_object(info.uri, limit)
        except archive.MemberTooLarge:
            return Member(path, info.size, TOO_LARGE, f"grew past max_member_bytes={limit} after it was listed", etag=info.etag)
        except FileNotFoundError:
            return Member(path, info.size, VANISHED, "listed, then gone when it was read", etag=info.etag)
        except Exception as exc:  # noqa: BLE001 - what boto3 raises once its own retries are spent is this object's reject
            return Member(path, info.size, FETCH_FAILED, f"{type(exc).__name__}: {storage.redact_text(str(exc))[:200]}", etag=info.etag)
        return fetched(path, data, etag=now.etag or info.etag)
