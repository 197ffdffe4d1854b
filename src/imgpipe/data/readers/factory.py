"""Which reader a source URI gets: the one place that tells a bucket prefix from an archive, a URI list or Parquet.

    reader = open_source(uri, sha256=None, spool=Path(tmp) / "source-000", settings=settings)

Decided from the URI, then from the content:

* a URI ending in ``/``, or an ``s3://`` URI with no object at it but objects below it, or a
  local directory: a Hugging Face dataset where it holds Parquet shards or ``save_to_disk``'s
  files (:class:`~imgpipe.data.readers.hffolder.HfFolderReader`), else a prefix of loose
  objects (:class:`~imgpipe.data.readers.listing.PrefixReader`) or every file below the
  directory (:class:`~imgpipe.data.readers.archives.DirectoryReader`); an empty one is refused;
* anything else is made local (HTTP spooled with resumes, an object downloaded, a local
  file read in place), hashed and checked against its sha256 pin, then judged by its bytes:
  a tar or zip (WebDataset when its first members pair images with class parts, or when the
  source was a brace pattern), Parquet (a Hugging Face image dataset), or a CSV/JSONL URI
  list. Anything else is refused, naming what is supported.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imgpipe import storage
from imgpipe.data import archive
from imgpipe.data.readers.archives import ArchiveReader, DirectoryReader
from imgpipe.data.readers.base import Reader, ReaderSettings
from imgpipe.data.readers.hffolder import HfFolderReader, sniff_folder
from imgpipe.data.readers.hfparquet import HfParquetReader, ImageFiles, is_parquet
from imgpipe.data.readers.listing import PrefixReader
from imgpipe.data.readers.urilist import UriListReader, looks_like_uri_list
from imgpipe.data.readers.webdataset import WebDatasetReader, looks_like_webdataset
from imgpipe.data.sources import is_http
from imgpipe.data.transport import HttpSpooler, basename, byte_bar

__all__ = ["SUPPORTED", "is_prefix", "open_source"]

SUPPORTED = (
    "a tar/tar.gz/tar.bz2/tar.xz/zip archive (nested archives one level deep), WebDataset shards "
    "(brace patterns like shards-{000..099}.tar), a Hugging Face Parquet file, a CSV or JSON Lines list "
    "of uri,label, a local directory or a bucket prefix (s3://bucket/prefix/) of loose images, of Hugging Face "
    "Parquet shards (the Hub's data/train-00000-of-00001.parquet with its README.md) or of a datasets save_to_disk folder"
)
_CHUNK = 1 << 20


def is_prefix(uri: str) -> bool:
    """Whether ``uri`` names a prefix of loose objects in a (non-local) store rather than one object."""
    if is_http(uri) or not storage.serves(uri) or storage.is_local(uri):
        return False
    if uri.endswith("/"):
        return True
    if storage.size(uri) is not None:
        return False
    return next(storage.iter_objects(uri.rstrip("/") + "/"), None) is not None


def open_source(uri: str, *, sha256: str | None, spool: Path, settings: ReaderSettings, webdataset: bool = False) -> Reader:
    """The reader of one source, made local where it is one file (see the module docstring).

    Messages and the manifest name the source by :func:`storage.redact_uri`: a presigned URL's
    signature or a ``user:pass@`` never leaves here.

    Raises:
        ValueError: On a checksum mismatch, a file over ``max_download_bytes``, or content
            that is none of :data:`SUPPORTED`.
        FileNotFoundError: If there is nothing at ``uri``.
    """
    shown = storage.redact_uri(uri)
    if is_prefix(uri):
        _no_pin(shown, sha256, "a bucket prefix")
        layout = sniff_folder(uri)
        if layout is not None:
            return HfFolderReader(shown, uri, layout, settings, spool.with_name(spool.name + ".d"))
        return PrefixReader(uri, settings)
    final = None
    if is_http(uri):
        spooler = HttpSpooler(uri, spool, settings.http, settings.policy, pinned=sha256 is not None)
        digest, size = spooler.run()
        local, final = spool, storage.redact_uri(spooler.final_url)
    elif storage.serves(uri) and storage.is_local(uri):
        local = storage.local_path(uri)
        if local.is_dir():
            _no_pin(shown, sha256, "a directory")
            layout = sniff_folder(storage.normalize_uri(str(local)))
            if layout is not None:
                return HfFolderReader(shown, storage.normalize_uri(str(local)), layout, settings, spool.with_name(spool.name + ".d"))
            return DirectoryReader(shown, local, settings.carry, settings.keeps if settings.shard else None)
        if not local.is_file():
            _no_fifo(shown, local)
            raise FileNotFoundError(f"download source {shown} does not exist (no file or directory at {local})")
        _check_size(shown, local.stat().st_size, settings)
        digest, size = _hash_file(local, f"hash {local.name}")
    elif storage.serves(uri):
        local = spool
        digest, size = _spool_object(uri, spool, settings)
    else:
        schemes = ", ".join(f"{s}://" for s in storage.schemes())
        raise ValueError(f"unsupported source {shown!r}: use http(s)://, {schemes} or a local path")
    if sha256 is not None and sha256 != digest:
        raise ValueError(
            f"sha256 mismatch for {shown}: expected {sha256}, got {digest}; the download is corrupt or the source changed. "
            "Nothing was written to dest."
        )
    return _by_content(uri, shown, local, digest, size, final, settings, webdataset)


def _by_content(uri: str, shown: str, local: Path, digest: str, size: int, final: str | None, settings: ReaderSettings, webdataset: bool) -> Reader:
    try:
        fmt, refused = archive.detect_format(local, name=shown), None
    except ValueError as exc:
        fmt, refused = None, exc
    limit = settings.max_member_bytes
    if fmt is not None:
        if webdataset or looks_like_webdataset(local, fmt):
            return WebDatasetReader(
                shown, local, fmt, sha256=digest, size=size, max_member_bytes=limit, label_key=settings.label_key, class_names=settings.class_names
            )
        return ArchiveReader(shown, local, fmt, sha256=digest, size=size, final_uri=final, max_member_bytes=limit, caps=settings.caps)
    if is_parquet(local):
        return HfParquetReader(
            shown,
            local,
            sha256=digest,
            size=size,
            max_member_bytes=limit,
            images=_beside(uri, settings),
            image_column=settings.image_column,
            label_column=settings.label_column,
        )
    listing = looks_like_uri_list(local)
    if listing is not None:
        return UriListReader(uri, local, listing, settings)
    raise ValueError(f"{refused}; nor is it anything else the download step reads: {SUPPORTED}")


def _beside(uri: str, settings: ReaderSettings) -> ImageFiles | None:
    """Where a single Parquet file's path-only images may be read: its own folder (not over HTTP)."""
    if is_http(uri) or not storage.serves(uri):
        return None
    folder = storage.normalize_uri(uri).rsplit("/", 1)[0]
    return ImageFiles(folder, "", settings.policy)


def _no_pin(shown: str, sha256: str | None, what: str) -> None:
    if sha256 is not None:
        raise ValueError(f"sha256 was given for {shown}, {what}; checksums apply to single files only")


def _no_fifo(shown: str, local: Path) -> None:
    """Refuses a FIFO, device or socket at ``local`` by its kind (never opened to wait on it); nothing at all is the caller's to say."""
    if os.path.lexists(local):
        try:
            storage.check_regular(local)
        except storage.NotRegularFile as exc:
            raise ValueError(f"download source {shown} is a {exc.kind}, not a regular file; name a file, a directory or a prefix") from None
        except FileNotFoundError:
            return  # a link to nothing


def _check_size(shown: str, size: int, settings: ReaderSettings) -> None:
    if size > settings.http.max_bytes:
        raise ValueError(
            f"download source {shown} is {size} bytes, more than max_download_bytes={settings.http.max_bytes}; "
            "raise max_download_bytes if it really is that large"
        )


def _hash_file(path: Path, label: str) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with storage.open_regular(path) as fh, byte_bar(label, path.stat().st_size) as bar:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest(), size


def _spool_object(uri: str, spool: Path, settings: ReaderSettings) -> tuple[str, int]:
    size = storage.size(uri)
    if size is None:
        raise FileNotFoundError(f"download source {storage.redact_uri(uri)} does not exist (no such object)")
    _check_size(uri, size, settings)
    storage.download_file(uri, spool)
    _check_size(uri, spool.stat().st_size, settings)  # the object may have changed since
    return _hash_file(spool, f"hash {basename(uri)}")
