"""Writing a step's output the contract's way: data files hashed as they are written, names scoped to the attempt, one writer per output.

    out = OutputWriter(dest, "clean")
    out.begin()                                   # claims dest (imgpipe.commit.claim)
    with out.parquet_file("part-00000.parquet", schema) as sink:
        sink.write(table)
    report = out.commit(inputs=n, rejects=rejects, config=cfg)   # manifest, then _SUCCESS

A data file is written under an attempt-scoped name (:func:`attempt_name`) so that two
attempts never write the same object; the manifest lists the names readers use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.commit import claim, manifest_body, publish
from imgpipe.config import config_to_yaml
from imgpipe.contract import CONFIG, REJECTS, REJECTS_SCHEMA, FileEntry, Reject, StepReport, dest_uri
from imgpipe.parquet import parquet_write_options, table_to_parquet_bytes

__all__ = ["HashingWriter", "entry_for_bytes", "write_entry", "ParquetSink", "stream_parquet", "attempt_name", "unscoped_name", "OutputWriter"]


class HashingWriter(io.RawIOBase):
    """A write-only stream that passes bytes on to ``sink`` while counting and hashing them.

    What a manifest records about a data file is computed from the bytes as they are
    written, so no file is read back to be described.
    """

    def __init__(self, sink: IO[bytes]) -> None:
        super().__init__()
        self._sink = sink
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._sink.write(view)
        self._hash.update(view)
        self._size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._size

    def entry(self, name: str, rows: int) -> FileEntry:
        """The manifest entry of what was written so far."""
        return FileEntry(name=name, rows=rows, bytes=self._size, sha256=self._hash.hexdigest())


def entry_for_bytes(name: str, data: bytes, rows: int = 0) -> FileEntry:
    """The manifest entry of a file written in one piece."""
    return FileEntry(name=name, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def write_entry(dest: str, name: str, data: bytes | str) -> FileEntry:
    """Writes ``data`` as ``name`` in the prefix ``dest`` (in one piece); returns its manifest entry.

    For outputs of small files that commit with :func:`publish` (train, compare); Parquet
    data files go through :class:`OutputWriter`. Text (``str``: a page, JSON, YAML) passes
    through :func:`imgpipe.storage.redact_text` first; bytes are written as they are.
    """
    if isinstance(data, str):
        data = storage.redact_text(data).encode()
    storage.write_bytes(dest_uri(dest, name), data)
    return entry_for_bytes(name, data)


class ParquetSink:
    """A data file :func:`stream_parquet` is writing: counts the rows it is given.

    Attributes:
        writer: The open ``pyarrow.parquet.ParquetWriter``.
        rows: Rows written so far.
        entry: The file's manifest entry, set once the file is committed.
    """

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer = writer
        self.rows = 0
        self.entry: FileEntry | None = None

    def write(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """Appends ``table`` as row groups of ``row_group_size`` rows (default: one row group)."""
        self.writer.write_table(table, row_group_size=row_group_size or max(1, table.num_rows))
        self.rows += table.num_rows


@contextlib.contextmanager
def stream_parquet(dest: str, name: str, schema: pa.Schema, **parquet_kwargs: Any) -> Iterator[ParquetSink]:
    """Streams the data file ``name`` of the output prefix ``dest``, hashed as it is written.

    For any process that writes a data file (a step's own, or a worker's such as a Ray
    task of resize): the object is committed (renamed or completed) when the block ends
    without an exception and dropped otherwise, and ``sink.entry`` then holds what the
    manifest records. The file belongs to the output only once the step's driver records
    the entry (:meth:`OutputWriter.add_file`) and commits.

    Defaults come from :func:`parquet_write_options`; ``parquet_kwargs`` (e.g.
    ``sorting_columns``) are added to the writer's.
    """
    kwargs = {**parquet_write_options(schema), **parquet_kwargs}
    with storage.open_write(dest_uri(dest, name)) as fh:
        handle = HashingWriter(fh)
        sink = ParquetSink(pq.ParquetWriter(handle, schema, **kwargs))
        try:
            yield sink
        finally:
            sink.writer.close()  # on an exception open_write then drops the object
    sink.entry = handle.entry(name, sink.rows)


# The attempt id in the names of files that workers write (attempt_name): long enough that two
# attempts never share one (48 random bits), short enough to read.
_ATTEMPT_CHARS = 12


_ATTEMPT_IN_NAME = re.compile(rf"\.a[0-9a-f]{{{_ATTEMPT_CHARS}}}(?=\.[^./]+$)")


def attempt_name(name: str, attempt: str) -> str:
    """``name`` scoped to one attempt: ``train/part-00003-000.parquet`` -> ``train/part-00003-000.a<id>.parquet``.

    Files that processes other than the step's driver write straight to the output (resize's
    Ray tasks) carry the attempt in their names, so a worker of an overtaken attempt that
    is still running can never replace a file of the attempt that owns the prefix: it can
    only add files that no manifest lists, which the next claim removes.

    Raises:
        ValueError: If ``attempt`` is not a claim's id, or ``name`` has no extension.
    """
    if not re.fullmatch(rf"[0-9a-f]{{{_ATTEMPT_CHARS},}}", attempt or ""):
        raise ValueError(f"{attempt!r} is not an attempt id (commit.claim returns one)")
    stem, dot, ext = name.rpartition(".")
    if not dot or "/" in ext:
        raise ValueError(f"{name!r} needs an extension to be scoped to an attempt")
    return f"{stem}.a{attempt[:_ATTEMPT_CHARS]}.{ext}"


def unscoped_name(name: str) -> str:
    """``name`` without the attempt :func:`attempt_name` put in it (for comparing the outputs of two runs)."""
    return _ATTEMPT_IN_NAME.sub("", name)


class OutputWriter:
    """Writes one step's output prefix and commits it.

    Usage::

        out = OutputWriter(dest, "clean")
        out.begin()                       # drops _SUCCESS, then stale files
        out.write_table("part-00000.parquet", table)   # thread-safe, call in parallel
        report = out.commit(inputs=n, rejects=rejects, config=cfg)

    Nothing becomes readable before ``commit`` writes ``_SUCCESS``.
    """

    def __init__(self, dest: str, step: str) -> None:
        self.dest = storage.normalize_uri(dest)
        self.step = step
        self._files: dict[str, FileEntry] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._attempt: str | None = None

    def uri(self, name: str) -> str:
        """Full URI of a file inside the output prefix."""
        return dest_uri(self.dest, name)

    def begin(self) -> None:
        """Invalidates any previous output at ``dest`` so a re-run starts clean (:func:`claim`).

        ``_SUCCESS`` goes first: from that moment readers refuse the prefix, and the
        stale files deleted next can never be read as part of a finished output. A prefix
        the step does not own is refused, never emptied.
        """
        self._attempt = claim(self.dest, self.step)
        self._started = time.monotonic()

    def _check_name(self, name: str) -> None:
        if self._attempt is None:
            raise RuntimeError("OutputWriter.begin() must be called before writing")
        # The output's own files (manifest, rejects, markers) start with "_"; directory readers
        # (pyarrow, pandas, Ray Data) skip such names, so a data file named so would be lost.
        if name.startswith("/") or any(part.startswith(("_", ".")) or not part for part in name.split("/")):
            raise ValueError(f"{name!r} is not a data file name: no part may be empty or start with '_' or '.' (reserved for the output's own files)")

    def write_table(self, name: str, table: pa.Table, **parquet_kwargs: Any) -> FileEntry:
        """Writes a Parquet data file (thread-safe) and records it for the manifest.

        Defaults come from :func:`parquet_write_options`; ``parquet_kwargs`` override them.
        """
        self._check_name(name)
        parquet_kwargs = {**parquet_write_options(table.schema), **parquet_kwargs}
        with storage.open_write(self.uri(name)) as fh:
            sink = HashingWriter(fh)
            pq.write_table(table, sink, **parquet_kwargs)
        entry = sink.entry(name, table.num_rows)
        with self._lock:
            self._files[name] = entry
        return entry

    @contextlib.contextmanager
    def parquet_file(self, name: str, schema: pa.Schema, **parquet_kwargs: Any) -> Iterator[ParquetSink]:
        """Streams a Parquet data file, row group by row group; recorded for the manifest on success.

        The file is committed (renamed or completed) when the block ends without an
        exception and dropped otherwise, so a failed step leaves no readable half-file.
        Defaults come from :func:`parquet_write_options`; ``parquet_kwargs`` (e.g.
        ``sorting_columns``) are added to the writer's.
        """
        self._check_name(name)
        with stream_parquet(self.dest, name, schema, **parquet_kwargs) as sink:
            yield sink
        assert sink.entry is not None
        self.add_file(sink.entry)

    @property
    def attempt(self) -> str:
        """This attempt's id (:func:`claim`), for files other processes write (:func:`attempt_name`)."""
        if self._attempt is None:
            raise RuntimeError("OutputWriter.begin() must be called first")
        return self._attempt

    def add_file(self, entry: FileEntry) -> None:
        """Records a data file written by another process (e.g. a pool worker)."""
        self._check_name(entry.name)
        with self._lock:
            self._files[entry.name] = entry

    @property
    def files(self) -> list[FileEntry]:
        """Data files written so far, sorted by name."""
        with self._lock:
            return sorted(self._files.values(), key=lambda f: f.name)

    def commit(
        self,
        *,
        inputs: int,
        rejects: Iterable[Reject],
        config: Any,
        extra: Mapping[str, Any] | None = None,
        upstream: Mapping[str, Any] | None = None,
    ) -> StepReport:
        """Writes rejects, config, manifest and finally ``_SUCCESS``.

        Args:
            inputs: How many items the step received.
            rejects: Every dropped item with its reason.
            config: The resolved step config (a dataclass).
            extra: Step-specific manifest fields.
            upstream: Where the inputs came from (URIs, upstream manifest facts).

        Raises:
            RuntimeError: If counts do not reconcile (``inputs != outputs + rejected``);
                nothing is committed then.
            ConcurrentWriterError: If another attempt claimed ``dest`` meanwhile.
        """
        if self._attempt is None:
            raise RuntimeError("OutputWriter.begin() must be called before commit()")
        rejects = sorted(rejects, key=lambda r: (r.path, r.reason))
        files = self.files
        outputs = sum(f.rows for f in files)
        if inputs != outputs + len(rejects):
            raise RuntimeError(
                f"{self.step}: counts do not reconcile: {inputs} inputs != {outputs} outputs + "
                f"{len(rejects)} rejected; refusing to commit {self.dest}"
            )
        rejects_table = pa.table(
            {
                "path": [r.path for r in rejects],
                "reason": [r.reason for r in rejects],
                "detail": [r.detail for r in rejects],
            },
            schema=REJECTS_SCHEMA,
        )
        storage.write_bytes(self.uri(REJECTS), table_to_parquet_bytes(rejects_table))
        storage.write_text(self.uri(CONFIG), config_to_yaml(config))
        report = StepReport(
            step=self.step,
            dest=self.dest,
            inputs=inputs,
            outputs=outputs,
            rejected=len(rejects),
            rejects_by_reason=dict(sorted(Counter(r.reason for r in rejects).items())),
            files=files,
            seconds=round(time.monotonic() - self._started, 3),
            extra=dict(extra or {}),
        )
        publish(self.dest, self.step, self._attempt or "", manifest_body(report, config, upstream))
        return report
