"""The download step: images from where they are into Parquet shards of raw bytes.

    report = download(["s3://ml-data/pets/"], "s3://b/run/download", DownloadConfig(), previous=None)

How it works in detail: docs/internals/steps.md, "imgpipe.steps.download".
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe import commit, resources, storage
from imgpipe.config import check_numbers, check_range
from imgpipe.contract import StepReport
from imgpipe.data.archivecaps import Caps
from imgpipe.data.extraction import Extraction, dry_run, extract_source
from imgpipe.data.labelgate import check_class_list
from imgpipe.data.previous import PreviousDownload
from imgpipe.data.readers.archives import DirectoryReader
from imgpipe.data.readers.base import Reader, ReaderSettings
from imgpipe.data.readers.factory import is_prefix, open_source
from imgpipe.data.readers.urilist import UriListReader
from imgpipe.data.readers.webdataset import expand_braces, parse_label_key
from imgpipe.data.sharding import Shard
from imgpipe.data.shards import SHARD_SCHEMA, ShardWriter
from imgpipe.data.sources import SourcePolicy
from imgpipe.data.transport import HttpSettings
from imgpipe.outcome import check_download
from imgpipe.phases import PhaseLog
from imgpipe.writer import OutputWriter

__all__ = [
    "STEP",
    "OXFORD_PET_IMAGES_URL",
    "OXFORD_PET_ANNOTATIONS_URL",
    "SHARD_SCHEMA",
    "DownloadConfig",
    "download",
]

STEP = "download"

# The Oxford-IIIT Pet release (https://www.robots.ox.ac.uk/~vgg/data/pets/), at the addresses
# torchvision's OxfordIIITPet uses. The release pins them by md5 only
# (5c4f3ee8e5d25df40f4fd59a7f44e54c, 95a8c909bbe2e81eed6a22bccdf3f68f): there is no published
# sha256, so a pin has to be computed once from a trusted copy, and DownloadConfig.sha256
# stays empty by default.
OXFORD_PET_IMAGES_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"
OXFORD_PET_ANNOTATIONS_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz"


MEMBER_TOO_LARGE = "member_too_large"
DUPLICATE_MEMBER = "duplicate_member"

_MiB = 1 << 20
_GiB = 1 << 30
# Arrow's binary type addresses a column chunk with int32 offsets.
_MAX_BINARY_BYTES = (1 << 31) - 1
# The largest byte count a size cap may name: a pebibyte, beyond any one run's storage.
_MAX_BYTES = 1 << 50
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = _MiB
# Headroom under max_expansion_ratio for tiny archives, whose per-member header and
# path costs alone can exceed 100x the few hundred bytes they compress to.
_EXPANSION_SLACK = _MiB
# The library's callers are the operator: their sources are trusted (the policy is frozen),
# all but link-local addresses, which no policy reaches.
_TRUSTED = SourcePolicy.trusted()


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download step.

    Attributes:
        sha256: Empty, or one expected SHA-256 hex digest per archive source, in
            source order (normalized to lowercase).
        max_member_bytes: Largest member accepted; bigger ones are rejected
            ``member_too_large``. Also bounds the memory one member takes.
        max_total_bytes: Cap on the bytes extracted from all sources together, each
            member counting its data plus ``archive.HEADER_BYTES`` and its path; crossing
            it aborts the run as an archive bomb.
        max_members: Cap on the members (rejects included) of all sources together;
            crossing it aborts the run before ``dest`` is touched.
        max_expansion_ratio: An archive whose extracted bytes (counted as for
            ``max_total_bytes``, plus the data of rejected tar members, which a tar
            stream inflates all the same) exceed this many times its own size, plus
            1 MiB, is refused as an archive bomb. Directories are exempt.
        max_download_bytes: Largest source file fetched (HTTP, S3 or local); checked
            on the announced size first and again on what arrives.
        shard_bytes: Target size of one Parquet shard, counted as for
            ``max_total_bytes`` (so zero-byte members still fill shards).
        row_group_rows: Rows per Parquet row group (downstream steps parallelize per
            row group).
        retries: HTTP retries after a failed attempt that made no progress.
        timeout_s: HTTP connect and read timeout.
        write_workers: Threads hashing row groups in parallel; memory holds at most
            ``write_workers + 2`` row groups (of ``row_group_rows`` rows, 32 MiB at most),
            whatever ``shard_bytes``.
        backoff_s: First HTTP retry delay; it doubles on each consecutive failure.
        fetch_workers: Objects of a bucket prefix or URI list fetched at once (memory holds
            at most twice as many fetched objects).
        label_key: Where a WebDataset sample's class is. Empty: its ``.cls`` (an integer index),
            else a ``.json``'s ``label``/``class``/``cls``; a caption ``.txt`` never by default.
            A part (``txt``, ``caption.txt``) takes that part's text as the class; ``PART:KEY``
            (``json:category``) a key of a JSON part.
        class_names: Names of a WebDataset's integer classes, by index (``.cls`` 0 is the first);
            the class order clean keeps. Empty: the integer is the name. They pass the label
            gate (:func:`imgpipe.data.labelgate.check_class_list`), and a ``.cls`` past them is
            that sample's ``bad_label``.
        image_column: The image column of a Hugging Face dataset (Parquet or ``save_to_disk``);
            unset: ``image``, else ``img``. An ``Image`` feature or a binary column.
        label_column: Its label column (a ``ClassLabel`` or a string); unset: ``label``,
            ``labels``, else ``fine_label``.
    """

    sha256: tuple[str, ...] = ()
    max_member_bytes: int = 256 * _MiB
    max_total_bytes: int = 64 * _GiB
    max_members: int = 1_000_000
    max_expansion_ratio: float = 100.0
    max_download_bytes: int = 32 * _GiB
    shard_bytes: int = 256 * _MiB
    row_group_rows: int = 128
    retries: int = 5
    timeout_s: float = 60.0
    write_workers: int = 4
    backoff_s: float = 1.0
    fetch_workers: int = 16
    label_key: str = ""
    class_names: tuple[str, ...] = ()
    image_column: str | None = None
    label_column: str | None = None

    def caps(self) -> Caps:
        """The limits on what all sources together may bring."""
        return Caps(self.max_member_bytes, self.max_total_bytes, self.max_members, self.max_expansion_ratio)

    def http(self) -> HttpSettings:
        """What HTTP transfers take from these settings."""
        return HttpSettings(retries=self.retries, timeout_s=self.timeout_s, backoff_s=self.backoff_s, max_bytes=self.max_download_bytes)

    def __post_init__(self) -> None:
        check_numbers(self)
        object.__setattr__(self, "sha256", _normalize_digests(self.sha256))
        parse_label_key(self.label_key)
        object.__setattr__(self, "class_names", _normalize_names(self.class_names))
        check_range("max_member_bytes", self.max_member_bytes, 1, _MAX_BINARY_BYTES, integer=True)
        check_range("max_total_bytes", self.max_total_bytes, 1, _MAX_BYTES, integer=True)
        check_range("max_members", self.max_members, 1, 1 << 32, integer=True)
        check_range("max_expansion_ratio", self.max_expansion_ratio, 0, 1e6, low_open=True)
        check_range("max_download_bytes", self.max_download_bytes, 1, _MAX_BYTES, integer=True)
        check_range("shard_bytes", self.shard_bytes, 1, _MAX_BINARY_BYTES, integer=True)
        check_range("row_group_rows", self.row_group_rows, 1, 1 << 16, integer=True)
        check_range("retries", self.retries, 0, 100, integer=True)
        check_range("write_workers", self.write_workers, 1, 256, integer=True)
        check_range("fetch_workers", self.fetch_workers, 1, 256, integer=True)
        check_range("timeout_s", self.timeout_s, 0, 86400, low_open=True)
        check_range("backoff_s", self.backoff_s, 0, 3600)


def _normalize_digests(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)  # one source, one digest: forgive the missing tuple
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"sha256 must be a list of hex digests, one per source; got {value!r}")
    digests = []
    for i, digest in enumerate(value):
        if not isinstance(digest, str):
            raise TypeError(f"sha256[{i}] must be a string, got {type(digest).__name__}")
        digest = digest.strip().lower()
        if not _HEX64.match(digest):
            raise ValueError(
                f"sha256[{i}]={digest!r} is not a SHA-256 digest (64 hex characters); "
                "md5 or sha1 sums are not accepted, compute `sha256sum` of a trusted copy"
            )
        digests.append(digest)
    return tuple(digests)


def _normalize_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"class_names must be a list of class names, by index; got {type(value).__name__}")
    return check_class_list([n.strip() if isinstance(n, str) else n for n in value], "class_names (download config)")


# --------------------------------------------------------------------------- sources


def _source_list(sources: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a URI or a list of URIs, got {type(sources).__name__}")
    out = []
    for src in sources:
        if not isinstance(src, (str, os.PathLike)) or not os.fspath(src):
            raise ValueError(f"every source must be a non-empty URI or path, got {src!r}")
        out.append(os.fspath(src))
    if not out:
        raise ValueError("no sources given: pass at least one archive URI, directory, prefix or list")
    return out


@dataclass(frozen=True)
class _Planned:
    """One source to open: its URI, its sha256 pin, and whether it is a WebDataset shard of a brace pattern."""

    uri: str
    sha256: str | None
    webdataset: bool


def _plan(uris: list[str], digests: Sequence[str | None]) -> list[_Planned]:
    """The sources with brace patterns expanded into their shards (a pin names one file, never a pattern)."""
    planned = []
    for uri, digest in zip(uris, digests, strict=True):
        shards = expand_braces(uri)
        if shards == [uri]:
            planned.append(_Planned(uri, digest, False))
            continue
        if digest is not None:
            raise ValueError(f"a sha256 pin names one file; {storage.redact_uri(uri)} is a pattern of {len(shards)} shards")
        planned += [_Planned(shard, None, True) for shard in shards]
    return planned


# Names of a single file that may be a URI list, which a sharded download splits by entry
# (so every pod reads it); any other single file goes whole to the shard that owns its URI.
_LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson")


def _is_mine(item: _Planned, shard: Shard | None) -> bool | None:
    """Whether this pod reads ``item`` at all: True, False, or ``None`` when only its content can tell (a listing is split by entry)."""
    if shard is None or shard.count == 1:
        return True
    if item.webdataset:
        return shard.owns(item.uri)
    if is_prefix(item.uri) or (storage.serves(item.uri) and storage.is_local(item.uri) and storage.local_path(item.uri).is_dir()):
        return True  # split object by object
    if item.uri.split("?", 1)[0].lower().endswith(_LIST_SUFFIXES):
        return None
    return shard.owns(item.uri)


def _split_by_entry(reader: Reader) -> bool:
    """Whether a reader splits its members among shards itself (listings) rather than going whole to one."""
    return isinstance(reader, (UriListReader, DirectoryReader)) or not reader.checked_in_advance


def _check_outside_dest(uri: str, dest: str) -> None:
    """Refuses a storage source that ``OutputWriter.begin()`` would delete, or that would see the output."""
    if storage.serves(uri):
        commit.check_disjoint(dest, [uri], STEP)


def _census(readers: Sequence[Reader], caps: Caps) -> None:
    """Checks the listings against the caps before ``dest`` is touched (they are read only once, after it is)."""
    members = total = 0
    for reader in readers:
        if reader.checked_in_advance or not hasattr(reader, "census"):
            continue
        count, size = reader.census()
        members, total = members + count, total + (size or 0)
        if members > caps.max_members:
            raise ValueError(
                f"{reader.uri} brings the count of objects over max_members={caps.max_members}; raise it if the data set "
                "really has that many. Nothing was committed."
            )
        if total > caps.max_total_bytes:
            raise ValueError(
                f"{reader.uri} brings the bytes listed over max_total_bytes={caps.max_total_bytes}; raise it if the data "
                "set really is that large. Nothing was committed."
            )


def _extract_all(readers: Sequence[Reader], out: OutputWriter, cfg: DownloadConfig) -> Extraction:
    state = Extraction(cfg.caps())
    with ShardWriter(out, shard_bytes=cfg.shard_bytes, row_group_rows=cfg.row_group_rows, write_workers=cfg.write_workers) as shards:
        for reader in readers:
            extract_source(reader, state, shards)
    return state


def download(
    sources: str | os.PathLike[str] | Sequence[str],
    dest: str,
    cfg: DownloadConfig,
    *,
    policy: SourcePolicy = _TRUSTED,
    previous: str | None = None,
    shard: Shard | None = None,
) -> StepReport:
    """Pulls images from where they are into ``dest`` as Parquet shards.

    Every source that is one file is fetched, its checksum verified and every member read
    once (a dry run), and every listing counted, before ``dest`` is touched: a corrupt,
    truncated or oversized archive fails there and leaves the previous committed output as
    it was. Only then is ``dest`` claimed (:func:`imgpipe.commit.claim`: it must be empty or
    a download output) and the new output written and committed. Re-running with the same
    sources and dest reproduces the same rows and shard names.

    Args:
        sources: One URI/path or a list; see the module docstring for the kinds.
        dest: The output prefix (``file://``, ``s3://`` or a local path).
        cfg: Step settings.
        policy: Where sources may come from. The default trusts the caller; a URI
            from someone else (a pipeline parameter) needs ``SourcePolicy.from_env()``.
        previous: A committed download output of an earlier run over the same listings: an
            object whose key, size and change token it recorded is taken from it instead of
            being fetched (:mod:`imgpipe.data.previous`).

    Returns:
        The committed step report; ``extra["sources"]`` lists each source's URI, format,
        SHA-256 and size (for HTTP where redirects led, for a listing how many objects), and
        ``extra["incremental"]`` the new, changed, unchanged and deleted counts against ``previous``.

    Raises:
        ValueError: On a checksum mismatch, an unsupported or corrupt archive, a bad
            source or config, a source or redirect the policy refuses
            (:class:`imgpipe.data.sources.SourceRefused`), or when a size or count cap
            is exceeded.
        FileNotFoundError: If a source does not exist (including HTTP 404).
        ConnectionError: If an HTTP download keeps failing after ``cfg.retries`` retries.
    """
    if not isinstance(cfg, DownloadConfig):
        raise TypeError(f"cfg must be a DownloadConfig, got {type(cfg).__name__}")
    if not isinstance(policy, SourcePolicy):
        raise TypeError(f"policy must be a SourcePolicy, got {type(policy).__name__}")
    resources.use_system_allocator()
    resources.one_malloc_arena()  # before the pool's threads start
    uris = _source_list(sources)
    if cfg.sha256 and len(cfg.sha256) != len(uris):
        raise ValueError(f"got {len(cfg.sha256)} sha256 digest(s) for {len(uris)} source(s); give one digest per source, in the same order, or none")
    planned = _plan(uris, list(cfg.sha256) or [None] * len(uris))
    dest = storage.normalize_uri(dest)
    for item in planned:
        _check_outside_dest(item.uri, dest)
        policy.check_source(item.uri, pinned=item.sha256 is not None)
    carry = PreviousDownload(previous) if previous else None
    settings = ReaderSettings(cfg.max_member_bytes, cfg.fetch_workers, cfg.http(), policy, carry, shard, caps=cfg.caps())
    settings = dataclasses.replace(settings, image_column=cfg.image_column, label_column=cfg.label_column)
    settings = dataclasses.replace(settings, label_key=cfg.label_key, class_names=cfg.class_names)
    phases = PhaseLog(STEP)
    with tempfile.TemporaryDirectory(prefix="imgpipe-download-") as spool_dir:
        readers = []
        for i, item in enumerate(planned):
            mine = _is_mine(item, shard)
            if mine is False:
                continue  # another shard's file: not fetched here
            reader = open_source(
                item.uri, sha256=item.sha256, spool=Path(spool_dir) / f"source-{i:05d}", settings=settings, webdataset=item.webdataset
            )
            if mine or _split_by_entry(reader) or (shard is not None and shard.owns(item.uri)):
                readers.append(reader)
        phases.done("fetch", sources=len(readers), bytes=sum(r.bytes or 0 for r in readers))
        # Every file is local, verified and readable to its last member, and every listing
        # within the caps: only now may the old output go.
        phases.done("dry run", members=dry_run([r for r in readers if r.checked_in_advance], cfg.caps()))
        _census(readers, cfg.caps())
        out = OutputWriter(dest, STEP)
        out.begin()
        state = _extract_all(readers, out, cfg)
        phases.done("extract", members=state.inputs, rejected=len(state.rejects), bytes=state.extracted)
    extra: dict[str, Any] = {"sources": [r.manifest_entry() for r in readers], "bytes_extracted": state.extracted}
    if shard is not None:
        extra["shard"] = shard.as_dict()
    if carry is not None:
        listed = sum(state.per_source.get(r.uri, 0) for r in readers if not r.checked_in_advance or isinstance(r, DirectoryReader))
        counts = carry.counts(listed)
        extra["incremental"] = {"previous": carry.prefix, **counts}
        phases.done("incremental", **counts)
    report = out.commit(
        inputs=state.inputs,
        rejects=state.rejects,
        config=cfg,
        extra=extra,
        upstream={"sources": [storage.redact_uri(u) for u in uris], **({"previous": carry.prefix} if carry else {})},
    )
    phases.done("commit", outputs=report.outputs, rejected=report.rejected, files=len(report.files))
    if shard is None:  # one shard of a listing may hold nothing; the merge checks the whole
        check_download(report)
    return report
