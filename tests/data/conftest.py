"""The fuzzing harness of the reader tests: hostile bytes, and a source's every member read or flagged, else the source refused.

Each test of ``tests/data/test_fuzz_*.py`` generates files with ``hypothesis`` (random and mutated
bytes, tar and zip archives with odd members, WebDataset shards with odd parts, Parquet files of
random schemas and ``huggingface`` metadata, ``save_to_disk`` folders with odd JSON, URI lists
with odd rows, bucket prefixes with odd keys), opens each through
:func:`imgpipe.data.readers.factory.open_source` as the download step does (:func:`drain`), and
reads every member. What must hold: no exception escapes but the step's refusals (``ValueError``,
naming the source, and ``FileNotFoundError``), and every input is either read or flagged with a
reason; where the file was written whole, the members are exactly its entries (rows, samples,
list lines). Runs are derandomized (:data:`FUZZ`), so ``make test`` sees the same examples every time.

Also what the source tests (``test_listed_sources.py``, ``test_file_sources.py``,
``test_hf_sources.py``) read a download output with: :data:`FAST`, :func:`rows`, :func:`rejects`
and :func:`reconciles`.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from imgpipe import contract, storage
from imgpipe.data import archive
from imgpipe.data.readers.base import ReaderSettings
from imgpipe.data.readers.factory import open_source
from imgpipe.data.sources import SourcePolicy
from imgpipe.steps.download import DownloadConfig

LIMIT = 4096
# Local files only: a URI list's entries must never reach the network.
LOCAL_ONLY = SourcePolicy(schemes=frozenset())
SETTINGS = ReaderSettings(max_member_bytes=LIMIT, fetch_workers=2, policy=LOCAL_ONLY)
REFUSALS = (ValueError, FileNotFoundError)
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@dataclass
class Tally:
    """What reading a source came to: members read, members flagged with a reason."""

    read: int = 0
    flagged: int = 0

    @property
    def members(self) -> int:
        return self.read + self.flagged


def drain(uri: str, spool: Path, shown: str, rs: ReaderSettings = SETTINGS, **kwargs) -> Tally | None:
    """Opens ``uri`` and reads every member; ``None`` where the source was refused (in one line naming it)."""
    tally = Tally()
    try:
        reader = open_source(uri, sha256=None, spool=spool, settings=rs, **kwargs)
        for member in reader.members():
            assert isinstance(member.path, str) and member.path
            if member.reason is not None:
                assert isinstance(member.reason, str) and member.reason and isinstance(member.detail, str)
                tally.flagged += 1
                continue
            try:
                data = member.read(LIMIT)
            except archive.MemberTooLarge:  # the step's member_too_large reject
                tally.flagged += 1
                continue
            except archive.ArchiveError:  # a corrupt member: the step's extraction adds the source's name
                return None
            assert len(data) <= LIMIT
            tally.read += 1
    except REFUSALS as exc:
        if isinstance(exc, ValueError):
            assert shown in str(exc), f"a refusal must name the source {shown!r}: {exc}"
        return None
    return tally


# --------------------------------------------------------------------------- bytes and mutations


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` whole, or with bits flipped, cut short, a run zeroed or random bytes spliced in."""
    kind = draw(st.sampled_from(["whole", "flip", "truncate", "zero", "splice"]))
    if kind == "whole" or not data:
        return data
    buf = bytearray(data)
    at = draw(st.integers(0, len(buf) - 1))
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=8)):
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del buf[at:]
    elif kind == "zero":
        buf[at : at + draw(st.integers(1, 512))] = bytes(min(len(buf) - at, 512))
    else:
        buf[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(buf)


def workdir():
    return tempfile.TemporaryDirectory(prefix="imgpipe-fuzz-")


# --------------------------------------------------------------------------- a download output


FAST = DownloadConfig(retries=1, backoff_s=0.0, timeout_s=5.0, fetch_workers=4)


def rows(prefix: str) -> dict[str, dict]:
    """path -> row (bytes, label, etag, sha256) of a committed download output."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in contract.data_files(prefix)]
    table = pa.concat_tables(tables) if tables else pa.table({"path": []})
    return {r["path"]: r for r in table.to_pylist()}


def rejects(prefix: str) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in contract.read_rejects(prefix).to_pylist()}


def reconciles(report, prefix: str) -> None:
    assert report.inputs == report.outputs + report.rejected == len(rows(prefix)) + len(rejects(prefix))
