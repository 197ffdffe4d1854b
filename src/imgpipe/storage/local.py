"""``file://`` URIs: objects are files of the local (or a mounted) file system.

Writes go to a ``.tmp-*`` file renamed into place once complete. Used through
:mod:`imgpipe.storage`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from imgpipe.storage.base import TMP_MARKER, Backend, ObjectInfo
from imgpipe.storage.regular import open_regular

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """``file://`` URIs on the local (or mounted) file system."""

    local = True

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(urlparse(uri).path)

    def size(self, uri: str) -> int | None:
        path = self._path(uri)
        return path.stat().st_size if path.is_file() else None

    def stat(self, uri: str) -> ObjectInfo | None:
        path = self._path(uri)
        return self._info(path) if path.is_file() else None

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        root = self._path(prefix)
        if root.is_file():
            yield self._info(root)
            return
        if root.is_dir():
            for dirpath, dirs, files in os.walk(root):
                dirs.sort()  # a stable order from one listing to the next
                for name in sorted(files):
                    if TMP_MARKER in name:
                        continue  # an uncommitted write in progress (or abandoned)
                    yield self._info(Path(dirpath) / name)

    @staticmethod
    def _info(path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo("file://" + str(path), st.st_size, f"{st.st_mtime_ns:x}-{st.st_ino:x}")

    def open_read(self, uri: str) -> IO[bytes]:
        path = self._path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no object at {uri}")
        return open_regular(path)  # swapped for a FIFO since is_file(): refused, not waited on

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        path = self._path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        root = self._path(prefix)
        if root.is_file():
            root.unlink()
            return 1
        if not root.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(root))
        shutil.rmtree(root)
        return count

    def delete_many(self, uris: list[str]) -> int:
        for uri in uris:
            self.delete(uri)
        return len(uris)

    def symlinks(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        found = [str(p) for p in (path, *path.parents) if p.is_symlink()]
        if path.is_dir() and not path.is_symlink():
            for dirpath, dirs, files in os.walk(path):  # os.walk does not follow links
                found += [os.path.join(dirpath, n) for n in (*dirs, *files) if os.path.islink(os.path.join(dirpath, n))]
        return sorted(found)

    def arrow_path(self, uri: str) -> str:
        return str(self._path(uri))

    def new_arrow_filesystem(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    def download_file(self, uri: str, local_path: str | os.PathLike[str]) -> None:
        src = self._path(uri)
        if not src.is_file():
            raise FileNotFoundError(f"no object at {uri}")
        local_path = Path(local_path)
        tmp = local_path.with_name(f"{local_path.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with open_regular(src) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
