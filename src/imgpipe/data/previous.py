"""The previous run's download output, for a listing that fetches only what changed since (incremental runs).

    previous = PreviousDownload(prefix)          # a committed download output of an earlier run
    reader = PrefixReader(uri, ReaderSettings(carry=previous))
    ...
    previous.counts(listed)   # {"new": ..., "changed": ..., "unchanged": ..., "deleted": ...}

Only the previous output's metadata is held (path, size, change token, sha256, where the row
is: about 150 bytes an object); an unchanged object's bytes are read from its row group when
the listing reaches it, and must hash to the sha256 recorded with them, or the object is
fetched again from its source (a previous output is read back from storage: untrusted).
An object is unchanged when the listing gives the same key, size and change token (S3's
ETag; a local file's modification time and inode; an HTTP ETag, asked for with
``If-None-Match``); an object without a change token is always fetched.

A record can be forged whole (bytes, sha256 and ETag alike), so a store listing that gives a
content hash proves the bytes against the store itself (``take(..., store_md5=True)``): S3's
ETag of a single-part upload is the MD5 of the object, and carried bytes must have it; an
object whose ETag is no MD5 (a multipart upload's ``<md5>-<parts>``) is fetched again.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from imgpipe import contract, storage

__all__ = ["PreviousDownload"]

# Row groups kept decoded at once: fetch threads read neighbouring rows of the same few groups.
_CACHED_GROUPS = 4
# S3's ETag of a single-part upload: the MD5 of its bytes (a multipart one ends "-<parts>").
# https://docs.aws.amazon.com/AmazonS3/latest/API/API_Object.html (ETag)
_MD5_ETAG = re.compile(r"[0-9a-fA-F]{32}")


@dataclass(frozen=True, slots=True)
class _Row:
    size: int
    etag: str | None
    sha256: str
    file: int
    group: int
    index: int


class PreviousDownload:
    """The rows of a committed download output, by member path (thread-safe)."""

    def __init__(self, prefix: str) -> None:
        manifest = contract.read_manifest(prefix, expect_step="download")
        self.prefix = storage.normalize_uri(prefix)
        self.files = contract.data_files(prefix, manifest)
        self._rows: dict[str, _Row] = {}
        for f, uri in enumerate(self.files):
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                columns = [c for c in ("path", "size", "etag", "sha256") if c in pf.schema_arrow.names]
                for g in range(pf.metadata.num_row_groups):
                    table = pf.read_row_group(g, columns=columns)
                    etags = table.column("etag").to_pylist() if "etag" in columns else [None] * table.num_rows
                    for i, (p, size, etag, sha) in enumerate(
                        zip(table.column("path").to_pylist(), table.column("size").to_pylist(), etags, table.column("sha256").to_pylist())
                    ):
                        self._rows[p] = _Row(int(size), etag, sha, f, g, i)
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._seen: set[str] = set()
        self.carried = 0
        self.refused = 0  # rows whose bytes failed a check: their recorded sha256, or the store's MD5
        self.unproved = 0  # unchanged rows the store gives no MD5 for (multipart uploads): fetched again

    def __len__(self) -> int:
        return len(self._rows)

    def known(self, path: str) -> tuple[int, str | None] | None:
        """The size and change token recorded for ``path``; marks it as still listed."""
        row = self._rows.get(path)
        if row is None:
            return None
        with self._lock:
            self._seen.add(path)
        return row.size, row.etag

    def take(self, path: str, size: int, etag: str | None, *, store_md5: bool = False) -> bytes | None:
        """The recorded bytes of ``path`` when its size and change token are unchanged (and they hash as recorded).

        Args:
            path: The member path, as recorded.
            size: Its size as the listing gives it now.
            etag: Its change token as the listing gives it now.
            store_md5: ``etag`` is S3's: carry only bytes whose MD5 it is (a single-part
                upload's ETag); an ETag that is no MD5 (a multipart upload's) is fetched again.
        """
        row = self._rows.get(path)
        if row is None:
            return None
        with self._lock:
            self._seen.add(path)
        if etag is None or row.etag != etag or row.size != size:
            return None
        md5 = etag.strip('"')  # an HTTP ETag is quoted; a weak one (W/"...") proves nothing
        if store_md5 and not _MD5_ETAG.fullmatch(md5):
            with self._lock:
                self.unproved += 1
            return None
        data = self._bytes(row)
        if (
            data is None
            or hashlib.sha256(data).hexdigest() != row.sha256
            or (store_md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != md5.lower())
        ):
            with self._lock:
                self.refused += 1
            return None
        with self._lock:
            self.carried += 1
        return data

    def _bytes(self, row: _Row) -> bytes | None:
        key = (row.file, row.group)
        with self._lock:
            column = self._groups.get(key)
            if column is not None:
                self._groups.move_to_end(key)
        if column is None:
            fs, path = storage.arrow_filesystem(self.files[row.file])
            with fs.open_input_file(path) as fh:
                column = pq.ParquetFile(fh).read_row_group(row.group, columns=["bytes"]).column("bytes")
            with self._lock:
                self._groups[key] = column
                while len(self._groups) > _CACHED_GROUPS:
                    self._groups.popitem(last=False)
        value = column[row.index].as_py()
        return value if isinstance(value, bytes) else None

    def counts(self, listed: int) -> dict[str, int]:
        """New, changed, unchanged and deleted objects, for a run that listed ``listed`` objects.

        ``carried_unproved`` objects were known but fetched again, their store giving no proof
        of the recorded bytes (no MD5 ETag: a multipart upload, a local file, most HTTP servers):
        neither changed nor unchanged.
        """
        seen = len(self._seen)
        return {
            "new": listed - seen,
            "changed": seen - self.carried - self.unproved,
            "unchanged": self.carried,
            "deleted": len(self._rows) - seen,
            "carried_refused": self.refused,
            "carried_unproved": self.unproved,
        }
