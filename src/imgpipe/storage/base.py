"""The interface every storage backend implements, and what backends share.

A backend is one subclass of :class:`Backend`; :mod:`imgpipe.storage` chooses it by URI
scheme and hands it canonical URIs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

__all__ = ["TMP_MARKER", "ObjectInfo", "Backend", "forget_arrow_filesystems"]

# In the name of a write in progress: listings skip it, and it is never a final name.
TMP_MARKER = ".tmp-"
_arrow_filesystems: dict[tuple[Any, ...], Any] = {}
_arrow_lock = threading.Lock()


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, size in bytes and change token.

    ``etag`` changes whenever the object's bytes do: S3's ETag, or a local file's
    modification time and inode (``None`` where a store gives none).
    """

    uri: str
    size: int
    etag: str | None = None


class Backend(ABC):
    """Operations every storage backend provides, on full URIs.

    A new scheme is one subclass, its settings (what :meth:`settings` returns and
    :meth:`use_settings` takes) and one entry in ``imgpipe.storage._BACKENDS``.
    Its methods take URIs :func:`imgpipe.storage.normalize_uri` has already made canonical.
    """

    # Objects are files of this machine's file system (a path can be handed to a library).
    local = False
    # A forked child can keep using this backend (no client threads to inherit broken).
    fork_safe = True

    def settings(self) -> Any:
        """What another process needs to reach the same store (never credentials); ``None`` for none."""
        return None

    def use_settings(self, settings: Any) -> None:  # noqa: B027 - most backends have none
        """Adopts :meth:`settings` of another process."""

    def segments(self, uri: str) -> list[str]:
        """The location of ``uri`` as path segments, root first (a bucket counts as one)."""
        return [p for p in urlparse(uri).path.split("/") if p]

    def exists(self, uri: str) -> bool:
        """Whether an object exists at exactly this URI."""
        return self.size(uri) is not None

    @abstractmethod
    def size(self, uri: str) -> int | None:
        """The size of the object at exactly this URI, ``None`` if there is none."""

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size and change token of the object at exactly this URI, ``None`` if there is none."""
        size = self.size(uri)
        return None if size is None else ObjectInfo(uri, size)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """All committed objects below ``prefix`` (recursively), sorted by URI."""
        return sorted(self.iter_objects(prefix), key=lambda o: o.uri)

    @abstractmethod
    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """The committed objects below ``prefix``, a page at a time (never all held at once), in the store's order."""

    @abstractmethod
    def open_read(self, uri: str) -> IO[bytes]:
        """A streaming binary reader; raises FileNotFoundError if absent."""

    def read_some(self, uri: str, limit: int) -> tuple[bytes, ObjectInfo]:
        """At most ``limit`` bytes of an object, with its whole size and change token as read.

        Raises:
            FileNotFoundError: If there is no object.
        """
        info = self.stat(uri)
        if info is None:
            raise FileNotFoundError(f"no object at {uri}")
        with self.open_read(uri) as fh:
            return fh.read(limit), info

    @abstractmethod
    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary writer whose object appears only when the block exits cleanly."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Deletes one object; absent objects are ignored."""

    @abstractmethod
    def delete_many(self, uris: list[str]) -> int:
        """Deletes these objects (absent ones are ignored); returns how many were asked for."""

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object below ``prefix``; returns how many."""
        return self.delete_many([o.uri for o in self.list_objects(prefix)])

    def symlinks(self, prefix: str) -> list[str]:
        """Symbolic links on the way to ``prefix`` or below it (none where the store has no links)."""
        return []

    @abstractmethod
    def arrow_path(self, uri: str) -> str:
        """The path of ``uri`` inside this backend's ``pyarrow.fs`` file system (no I/O)."""

    def arrow_key(self) -> Any:
        """What a cached ``pyarrow.fs`` file system depends on: another value makes another one."""
        return self.settings()

    @abstractmethod
    def new_arrow_filesystem(self) -> Any:
        """A new ``pyarrow.fs.FileSystem`` for this backend; use :func:`arrow_filesystem`, which caches."""

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """A ``pyarrow.fs.FileSystem`` (one per process and settings) and the path within it."""
        key = (type(self), os.getpid(), self.arrow_key())
        with _arrow_lock:
            fs = _arrow_filesystems.get(key)
            if fs is None:
                fs = _arrow_filesystems[key] = self.new_arrow_filesystem()
        return fs, self.arrow_path(uri)

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        """Copies an object to a local file (atomically)."""
        local_path = Path(local_path)
        tmp = local_path.with_name(f"{local_path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with self.open_read(uri) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)

    def presigned_get(self, uri: str, expires_s: int) -> str:
        """An HTTP(S) URL that reads ``uri`` without credentials for ``expires_s`` seconds.

        Raises:
            ValueError: Where the store has no such URL (a local file).
        """
        raise ValueError(f"{uri} cannot be read over HTTP without credentials: keep it in an S3-compatible store")

    def upload_file(self, local_path: str | os.PathLike[str], uri: str) -> None:
        """Copies a local file to an object."""
        with open(local_path, "rb") as src, self.open_write(uri) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def forget_arrow_filesystems() -> None:
    """Drops the cached ``pyarrow.fs`` file systems (after a backend's settings change)."""
    with _arrow_lock:
        _arrow_filesystems.clear()
