"""Hostile archives and WebDataset shards, generated: every member read or flagged with a reason, else the source refused in one line."""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
import re
import stat
import tarfile
import zipfile
from pathlib import Path

from hypothesis import assume, given
from hypothesis import strategies as st

from imgpipe.data import archive
from imgpipe.data.labelgate import MAX_CLASSES
from imgpipe.data.readers.base import ReaderSettings
from imgpipe.data.readers.factory import open_source
from imgpipe.data.readers.webdataset import sample_key
from tests.data.conftest import FUZZ, LIMIT, LOCAL_ONLY, drain, mutated, workdir

NAMES = st.one_of(
    st.sampled_from(
        [
            "a.jpg",
            "../x.jpg",
            "/etc/passwd",
            "./b.png",
            "c/../../d.png",
            ".",
            "d/",
            "x\\..\\y",
            "C:x",
            "a//b/./c.png",
            "k.cls",
            "k.json",
            "s.tar",
            "t.zip",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=24),
)
TYPES = st.sampled_from(
    [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, b"Z"]
)
TAR_MEMBERS = st.lists(st.tuples(NAMES, TYPES, st.binary(max_size=96)), max_size=8)


def tar_of(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.REGTYPE, b"Z"):
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = data[:40].decode("latin-1")
                tf.addfile(info)
    return buf.getvalue()


COMPRESS = {"tar": lambda b: b, "tar.gz": lambda b: gzip.compress(b, mtime=0), "tar.bz2": bz2.compress, "tar.xz": lzma.compress}


def non_dirs(data: bytes) -> int:
    """The entries an archive reader must account for, counted by the standard library alone."""
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return sum(not (i.is_dir() or stat.S_ISDIR(i.external_attr >> 16)) for i in zf.infolist())
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return sum(not i.isdir() for i in tf.getmembers())


# --------------------------------------------------------------------------- archives


@FUZZ
@given(members=TAR_MEMBERS, codec=st.sampled_from(sorted(COMPRESS)), data=st.data())
def test_fuzzed_tar_archives_are_read_member_by_member_or_refused(members, codec, data):
    try:
        whole = COMPRESS[codec](tar_of(members))
    except (ValueError, UnicodeError):
        assume(False)  # tarfile cannot write it
    hostile = data.draw(mutated(whole))
    with workdir() as tmp:
        src = Path(tmp) / "src.bin"
        src.write_bytes(hostile)
        tally = drain(str(src), Path(tmp) / "spool", src.name)
    nested = any(n.lower().endswith((".tar", ".zip")) for n, _, _ in members)
    if hostile == whole and members and not nested:
        assert tally is not None and tally.members == non_dirs(tar_of(members))


ZIP_MEMBERS = st.lists(
    st.tuples(
        NAMES,
        st.sampled_from([0, 0o100644, 0o120777, 0o020644, 0o010644, 0o040755]),
        st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
        st.binary(max_size=96),
    ),
    max_size=8,
)


def zip_of(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, mode, method, data in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr, info.compress_type = mode << 16, method
            zf.writestr(info, data)
    return buf.getvalue()


@FUZZ
@given(members=ZIP_MEMBERS, data=st.data())
def test_fuzzed_zip_archives_are_read_member_by_member_or_refused(members, data):
    try:
        whole = zip_of(members)
    except (ValueError, UnicodeError):
        assume(False)
    hostile = data.draw(mutated(whole))
    with workdir() as tmp:
        src = Path(tmp) / "src.zip"
        src.write_bytes(hostile)
        tally = drain(str(src), Path(tmp) / "spool", src.name)
    nested = any(n.lower().endswith((".tar", ".zip")) for n, *_ in members)
    if hostile == whole and members and not nested:
        assert tally is not None and tally.members == non_dirs(whole)


@FUZZ
@given(inner=TAR_MEMBERS, name=st.sampled_from(["in.tar", "cls/in.tar.gz", "in.zip", "in.tar.xz", "x.tbz2"]), other=TAR_MEMBERS, data=st.data())
def test_fuzzed_archives_inside_an_archive_are_read_or_rejected(inner, name, other, data):
    try:
        body = tar_of(inner)
        body = zip_of([(n, 0, zipfile.ZIP_STORED, d) for n, _, d in inner]) if name.endswith(".zip") else body
        codec = {".gz": "tar.gz", ".xz": "tar.xz", "bz2": "tar.bz2"}.get(name[-3:], "tar")
        hostile = data.draw(mutated(COMPRESS[codec](body) if not name.endswith(".zip") else body))
        outer = tar_of([*other, (name, tarfile.REGTYPE, hostile)])
    except (ValueError, UnicodeError):
        assume(False)
    with workdir() as tmp:
        src = Path(tmp) / "outer.tar"
        src.write_bytes(outer)
        drain(str(src), Path(tmp) / "spool", src.name)


@FUZZ
@given(
    blob=st.one_of(
        st.binary(max_size=2048), st.binary(max_size=64).map(lambda b: b"\x1f\x8b" + b), st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b)
    )
)
def test_random_bytes_are_refused_in_one_line_naming_the_source(blob):
    with workdir() as tmp:
        src = Path(tmp) / "random.bin"
        src.write_bytes(blob)
        drain(str(src), Path(tmp) / "spool", src.name)


# --------------------------------------------------------------------------- WebDataset


PART = st.sampled_from(["jpg", "png", "cls", "json", "txt", "caption.txt", "weird", "JPG", "cls.gz", ""])
PART_DATA = st.one_of(
    st.binary(max_size=32),
    st.integers(-3, 10**20).map(lambda i: str(i).encode()),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(["label", "class", "cls", "x"]), kids, max_size=3),
        max_leaves=6,
    ).map(lambda v: json.dumps(v).encode()),
)
SAMPLES = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "d/c", "../e", "f.g", ""]), PART, st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.SYMTYPE]), PART_DATA
    ),
    max_size=10,
)


@FUZZ
@given(parts=SAMPLES, label_key=st.sampled_from(["", "txt", "json:label", "cls"]), names=st.sampled_from([(), ("cat", "dog")]), data=st.data())
def test_fuzzed_webdataset_shards_give_one_input_per_sample_or_are_refused(parts, label_key, names, data):
    members = [(f"{key}.{ext}" if ext else key, kind, body) for key, ext, kind, body in parts]
    assume(all(name for name, _, _ in members))
    whole = tar_of(members)
    hostile = data.draw(mutated(whole))
    rs = ReaderSettings(max_member_bytes=LIMIT, policy=LOCAL_ONLY, label_key=label_key, class_names=names)
    with workdir() as tmp:
        src = Path(tmp) / "shard-000.tar"
        src.write_bytes(hostile)
        tally = drain(str(src), Path(tmp) / "spool", src.name, rs, webdataset=True)
        if hostile == whole:
            assert tally is not None and tally.members == _samples(src)


def _samples(path: Path) -> int:
    """Inputs of a shard: each flagged entry, and each run of safe entries sharing a key."""
    flagged = [m for m in archive.iter_archive(path, "tar") if m.reason is not None]
    keys = [sample_key(m.path)[0] for m in archive.iter_archive(path, "tar") if m.reason is None]
    return len(flagged) + len([k for k, _ in itertools.groupby(keys)])


CLS_BODY = st.one_of(
    st.integers(-(10**6), 10**6).map(lambda i: str(i).encode()),
    st.integers(0, 3).map(lambda i: f" {i:+d}\n".encode()),
    st.integers(1, 9000).map(lambda n: b"9" * n),  # past Python's int-string limit at 4301 digits
    st.integers(1, 9000).map(lambda n: b"0" * n + b"1"),
    st.sampled_from([b"", b" ", b"1.0", b"0x1", b"1e3", b"\xd9\xa3", b"--1", b"1 2", b"nan", b"\x00"]),
    st.binary(max_size=16),
)


def _cls_expected(body: bytes, names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """What a ``.cls`` body gives, by the rule of imgpipe.data.labelgate: ``(None, label)`` or ``(reason, None)``."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return "no_label", None
    match = re.fullmatch(r"([+-]?)0*([0-9]+)", text)
    if match is None or len(match.group(2)) > 12:
        return "bad_label", None
    index = int(match.group(1) + match.group(2))
    if 0 <= index < (len(names) or MAX_CLASSES):
        return None, names[index] if names else str(index)
    return "bad_label", None


@FUZZ
@given(bodies=st.lists(CLS_BODY, min_size=1, max_size=6), names=st.sampled_from([(), ("cat", "dog"), tuple(f"c{i}" for i in range(12))]))
def test_fuzzed_cls_parts_give_each_sample_its_class_or_its_own_reject(bodies, names):
    members = []
    for i, body in enumerate(bodies):
        members += [(f"k{i}.jpg", tarfile.REGTYPE, b"\xff\xd8\xff"), (f"k{i}.cls", tarfile.REGTYPE, body)]
    rs = ReaderSettings(max_member_bytes=LIMIT, policy=LOCAL_ONLY, class_names=names)
    with workdir() as tmp:
        src = Path(tmp) / "shard-000.tar"
        src.write_bytes(tar_of(members))
        reader = open_source(str(src), sha256=None, spool=Path(tmp) / "spool", settings=rs, webdataset=True)
        got = {m.path: (m.reason, m.label) for m in reader.members()}
    assert got == {f"k{i}.jpg": _cls_expected(body, names) for i, body in enumerate(bodies)}
    assert reader.manifest_entry().get("classes") == (list(names) or None)
