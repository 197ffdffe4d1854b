"""A tar archive read as a stream with bounded memory: tarfile's stream mode, hardened against hostile headers.

    with tar_stream(path, fmt) as tf:                # fmt: "tar", "tar.gz", "tar.bz2" or "tar.xz"
        while (info := next_tar(tf)) is not None:
            info.problem                             # an oversized extended header it followed, or None

A tar extended header (GNU longname/longlink, pax) over :data:`MAX_EXTENDED_HEADER_BYTES` is
skipped unread and the member it describes gets a ``problem``, chains of extended headers stop
at :data:`MAX_HEADER_CHAIN`, data a header declares is skipped in bounded reads that stop at the
end of the stream, and compressed data is inflated a read at a time. Which members are safe to
read, and the :class:`~imgpipe.data.archive.Member` each becomes, is :mod:`imgpipe.data.archive`'s.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO

__all__ = [
    "MAX_EXTENDED_HEADER_BYTES",
    "MAX_HEADER_CHAIN",
    "COMPRESSED_TAR",
    "TAR_FORMATS",
    "utf8_len",
    "combine_problems",
    "next_tar",
    "tar_stream",
]

# Room for a pax header carrying a PATH_MAX path and link path plus the usual times,
# owners and a few xattrs; tarfile reads a whole extended header into memory.
MAX_EXTENDED_HEADER_BYTES = 64 << 10
# Real archivers write at most a longname, a longlink and a pax header before a member;
# tarfile recurses once per header, so an endless chain would end in RecursionError.
MAX_HEADER_CHAIN = 8

_CHUNK = 1 << 20  # the most one read of skipped data asks for
# Magic bytes, format, codec name and opener of each compressed tar (format detection reads them too).
COMPRESSED_TAR = (
    (b"\x1f\x8b", "tar.gz", "gzip", gzip.open),
    (b"BZh", "tar.bz2", "bzip2", bz2.open),
    (b"\xfd7zXZ\x00", "tar.xz", "xz", lzma.open),
)
_TAR_CODECS = {fmt: (codec, opener) for _, fmt, codec, opener in COMPRESSED_TAR}
TAR_FORMATS = ("tar", *_TAR_CODECS)
_EXTENDED_HEADERS = {
    tarfile.GNUTYPE_LONGNAME: "GNU longname header",
    tarfile.GNUTYPE_LONGLINK: "GNU longlink header",
    tarfile.XHDTYPE: "pax header",
    tarfile.XGLTYPE: "pax global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
}


def utf8_len(text: str) -> int:
    """The UTF-8 size of a name, whatever lone surrogates tarfile's decoding left in it."""
    # surrogatepass: tar names decoded with surrogateescape must be countable, not an error.
    return len(text.encode("utf-8", "surrogatepass"))


def combine_problems(*problems: str | None) -> str | None:
    """The problems found, joined with ``; ``, or ``None`` when there are none."""
    found = [p for p in problems if p]
    return "; ".join(found) if found else None


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose extended headers cannot exhaust memory or the stack.

    tarfile reads a GNU longname/longlink or pax header whole
    (``TarInfo._proc_gnulong``/``_proc_pax`` read ``self._block(self.size)`` bytes) and
    recurses once per header. Here an oversized one is skipped in bounded reads and
    the member it describes comes back with ``problem`` set, and a chain longer than
    :data:`MAX_HEADER_CHAIN` fails the archive (``next()`` turns
    ``SubsequentHeaderError`` into ``ReadError``).
    """

    __slots__ = ("problem",)

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.problem: str | None = None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        kind = _EXTENDED_HEADERS.get(self.type)
        if kind is None:
            return super()._proc_member(tarfile_)
        chain = getattr(tarfile_, "_imgpipe_header_chain", 0) + 1
        if chain > MAX_HEADER_CHAIN:
            raise tarfile.SubsequentHeaderError(
                f"more than MAX_HEADER_CHAIN={MAX_HEADER_CHAIN} extended headers in a row at byte {self.offset} of the tar stream"
            )
        tarfile_._imgpipe_header_chain = chain  # type: ignore[attr-defined]
        try:
            if self.size > MAX_EXTENDED_HEADER_BYTES:
                return self._skip_header(tarfile_, kind)
            member = super()._proc_member(tarfile_)
        finally:
            tarfile_._imgpipe_header_chain = chain - 1  # type: ignore[attr-defined]
        if self.type == tarfile.XGLTYPE:
            _check_global_headers(tarfile_)
        return member

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # An old GNU sparse map continues in as many extension blocks as the archive
        # chains, and tarfile keeps every entry. Sparse files are no images: skip the
        # blocks unread and leave an empty map, which marks the member unreadable.
        _, isextended, real_size = self._sparse_structs
        del self._sparse_structs
        while isextended:
            block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.SubsequentHeaderError("the tar stream ends inside a sparse map")
            isextended = bool(block[504])  # the isextended byte of an extension block
        self.sparse = []
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)
        self.size = real_size
        return self

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str], tarfile_: tarfile.TarFile) -> None:
        # A pax 1.0 sparse map is a list of numbers at the start of the member's data,
        # as long as it claims; tarfile reads it all. The member's position is already
        # known from its header, so leave the map unread.
        next.sparse = []

    def _skip_header(self, tarfile_: tarfile.TarFile, kind: str) -> tarfile.TarInfo:
        _skip(tarfile_.fileobj, self._block(self.size), kind)
        try:
            member = self.fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        problem = f"{kind} of {self.size} bytes exceeds {MAX_EXTENDED_HEADER_BYTES}"
        member.problem = combine_problems(problem, member.problem)
        return member


def _check_global_headers(tarfile_: tarfile.TarFile) -> None:
    # Global pax headers accumulate in tarfile.pax_headers for the rest of the archive.
    size = sum(utf8_len(k) + utf8_len(v) for k, v in tarfile_.pax_headers.items())
    if size > MAX_EXTENDED_HEADER_BYTES:
        raise tarfile.SubsequentHeaderError(f"pax global headers hold {size} bytes, more than {MAX_EXTENDED_HEADER_BYTES}")


def _skip(fileobj: IO[bytes], count: int, what: str) -> None:
    """Reads and drops ``count`` bytes of a tar stream in bounded chunks.

    ``tarfile._Stream.seek`` loops over the whole distance even past the end of the
    data, so a header declaring an exabyte-sized member would spin forever.
    """
    while count > 0:
        got = len(fileobj.read(min(count, _CHUNK)))
        if not got:
            raise tarfile.ReadError(f"the tar stream ends inside {what} (truncated?)")
        count -= got


def next_tar(tf: tarfile.TarFile) -> _BoundedTarInfo | None:
    """``tf.next()``, skipping the previous member's data with :func:`_skip`.

    The header comes back with ``problem`` set when an oversized extended header before it
    was skipped (:class:`_BoundedTarInfo`); ``None`` at the end of the archive.
    """
    # Opening read the first header already (tf.firstmember); its data is still to come.
    if tf.firstmember is None and tf.offset > tf.fileobj.tell():
        _skip(tf.fileobj, tf.offset - tf.fileobj.tell(), "a member's data")
    return tf.next()  # type: ignore[return-value]


class _BoundedDecompression:
    """A compressed tar's bytes for tarfile's stream mode, decompressed a read at a time.

    tarfile's own ``r|gz``/``r|bz2``/``r|xz`` decompress each 10 KiB input buffer
    whole (no ``max_length``) and copy what is left on every read: 854 bytes of bzip2
    become a GiB in one call. ``gzip.open`` and friends inflate only what a read asks
    for. Codec errors become ``tarfile.ReadError`` as in tarfile's own stream.
    """

    def __init__(self, fh: IO[bytes], codec: str) -> None:
        self._fh = fh
        self._codec = codec

    def read(self, size: int) -> bytes:
        try:
            return self._fh.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:  # bz2 raises OSError
            raise tarfile.ReadError(f"corrupt {self._codec} data: {exc}") from exc


@contextlib.contextmanager
def tar_stream(path: str | os.PathLike[str], fmt: str) -> Iterator[tarfile.TarFile]:
    """The local tar archive at ``path`` (``fmt`` one of :data:`TAR_FORMATS`) open in bounded stream mode; read it with :func:`next_tar`."""
    codec, opener = _TAR_CODECS.get(fmt, (None, None))
    with opener(path, "rb") if opener else open(path, "rb") as fh:
        stream = _BoundedDecompression(fh, codec) if codec else fh
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tf:
            yield tf
