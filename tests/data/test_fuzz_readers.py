"""Hostile sources, generated: every reader either accounts for each input or refuses the source in one line.

Each test generates files with ``hypothesis`` (random and mutated bytes, tar and zip archives
with odd members, WebDataset shards with odd parts, Parquet files of random schemas and
``huggingface`` metadata, ``save_to_disk`` folders with odd JSON, URI lists with odd rows,
bucket prefixes with odd keys), opens each through
:func:`imgpipe.data.readers.factory.open_source` as the download step does, and reads every
member. What must hold: no exception escapes but the step's refusals (``ValueError``, naming
the source, and ``FileNotFoundError``), and every input is either read or flagged with a
reason; where the file was written whole, the members are exactly its entries (rows, samples,
list lines). Runs are derandomized, so ``make test`` sees the same examples every time.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import json
import lzma
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imgpipe import storage
from imgpipe.data import archive
from imgpipe.data.readers.base import ReaderSettings
from imgpipe.data.readers.factory import open_source
from imgpipe.data.readers.webdataset import sample_key
from imgpipe.data.sources import SourcePolicy

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


def workdir():
    return tempfile.TemporaryDirectory(prefix="imgpipe-fuzz-")


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


# --------------------------------------------------------------------------- Hugging Face Parquet


def _struct(*fields):
    return pa.struct(list(fields))


IMAGE_TYPES = [
    pa.binary(),
    pa.large_binary(),
    pa.string(),
    pa.int64(),
    pa.null(),
    pa.list_(pa.binary()),
    _struct(("bytes", pa.binary()), ("path", pa.string())),
    _struct(("bytes", pa.binary()), ("path", pa.int32())),
    _struct(("bytes", pa.binary()), ("path", pa.binary())),
    _struct(("bytes", pa.null()), ("path", pa.string())),
    _struct(("bytes", pa.null()), ("path", pa.large_string())),
    _struct(("bytes", pa.binary())),
    _struct(("bytes", pa.string()), ("path", pa.string())),
    _struct(("path", pa.string())),
]
LABEL_TYPES = [
    pa.int64(),
    pa.int8(),
    pa.uint64(),
    pa.string(),
    pa.large_string(),
    pa.float64(),
    pa.bool_(),
    pa.null(),
    pa.list_(pa.int64()),
    _struct(("x", pa.int64())),
    pa.dictionary(pa.int32(), pa.string()),
]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
NAMES_VALUE = st.one_of(st.lists(st.text(max_size=6), max_size=4), st.lists(JSONISH, max_size=4), JSONISH)
FEATURE = st.one_of(st.fixed_dictionaries({"_type": st.sampled_from(["ClassLabel", "Image", "Value"]), "names": NAMES_VALUE}), JSONISH)
FEATURES = st.one_of(st.dictionaries(st.sampled_from(["label", "image", "img", "labels", "other"]), FEATURE, max_size=3), JSONISH)
HF_META = st.one_of(
    st.none(),
    st.binary(max_size=24),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    FEATURES.map(lambda f: json.dumps({"info": {"features": f}}).encode()),
    FEATURES.map(lambda f: json.dumps({"features": f}).encode()),
    JSONISH.map(lambda v: json.dumps({"info": v}).encode()),
)


def _value(t: pa.DataType, draw: st.DrawFn):
    """A random value of Arrow type ``t`` (or null)."""
    if draw(st.integers(0, 5)) == 0 or pa.types.is_null(t):
        return None
    if pa.types.is_struct(t):
        return {t.field(i).name: _value(t.field(i).type, draw) for i in range(t.num_fields)}
    if pa.types.is_list(t):
        return [_value(t.value_type, draw) for _ in range(draw(st.integers(0, 2)))]
    if pa.types.is_dictionary(t):
        return draw(st.sampled_from(["cat", "dog"]))
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return draw(st.binary(max_size=24))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return draw(st.one_of(st.sampled_from(["x.png", "../up.png", "/abs.png", "sub/y.jpg", "", "C:\\z.png", "src.parquet"]), st.text(max_size=8)))
    if pa.types.is_boolean(t):
        return draw(st.booleans())
    if pa.types.is_floating(t):
        return draw(st.floats())
    if pa.types.is_unsigned_integer(t):
        return draw(st.integers(0, 2**63))
    if pa.types.is_integer(t):
        bits = t.bit_width - 1
        return draw(st.integers(-(2**bits), 2**bits - 1))
    raise AssertionError(t)


@st.composite
def hf_tables(draw: st.DrawFn) -> pa.Table:
    """A table with image-like and label-like columns of random types and ``huggingface`` metadata."""
    names = draw(st.sampled_from([("image", "label"), ("img", "labels"), ("image", "fine_label"), ("photo", "label"), ("image", "split", "label")]))
    types = {name: draw(st.sampled_from(IMAGE_TYPES if name in ("image", "img", "photo") else LABEL_TYPES)) for name in names}
    if "split" in types:
        types["split"] = draw(st.sampled_from([pa.string(), pa.int64()]))
    rows = draw(st.integers(0, 5))
    columns = {n: pa.array([_value(t, draw) for _ in range(rows)], type=t) for n, t in types.items()}
    meta = draw(HF_META)
    return pa.table(columns).replace_schema_metadata(None if meta is None else {b"huggingface": meta})


@FUZZ
@given(table=hf_tables(), row_group=st.integers(1, 3), columns=st.sampled_from([(None, None), ("photo", None), ("image", "label")]), data=st.data())
def test_fuzzed_hugging_face_parquet_gives_one_input_per_row_or_is_refused(table, row_group, columns, data):
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group)
    whole = buf.getvalue()
    hostile = data.draw(mutated(whole))
    rs = ReaderSettings(max_member_bytes=LIMIT, policy=LOCAL_ONLY, image_column=columns[0], label_column=columns[1])
    with workdir() as tmp:
        (Path(tmp) / "x.png").write_bytes(b"\x89PNG")
        src = Path(tmp) / "train-00000-of-00001.parquet"
        src.write_bytes(hostile)
        tally = drain(str(src), Path(tmp) / "spool", src.name, rs)
    if tally is not None and hostile == whole:
        assert tally.members == table.num_rows


def _state(draw: st.DrawFn) -> object:
    return draw(
        st.one_of(
            st.just({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}),
            st.fixed_dictionaries({"_data_files": JSONISH, "_split": JSONISH}),
            JSONISH,
        )
    )


@FUZZ
@given(table=hf_tables(), info=FEATURES, garbage=st.booleans(), data=st.data())
def test_fuzzed_save_to_disk_folders_give_one_input_per_row_or_are_refused(table, info, garbage, data):
    stream = io.BytesIO()
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table)
    body = data.draw(mutated(stream.getvalue())) if garbage else stream.getvalue()
    state = _state(data.draw)
    with workdir() as tmp:
        root = Path(tmp) / "ds"
        root.mkdir()
        (root / "data-00000-of-00001.arrow").write_bytes(body)
        (root / "state.json").write_text(json.dumps(state))
        (root / "dataset_info.json").write_text(json.dumps({"features": info}))
        drain(str(root), Path(tmp) / "spool", "ds")


@FUZZ
@given(
    card=st.one_of(st.text(max_size=40), JSONISH.map(lambda v: "---\n" + json.dumps({"dataset_info": v}) + "\n---\n")),
    blob=st.binary(max_size=64),
    table=hf_tables(),
)
def test_fuzzed_hub_folders_are_read_or_refused(card, blob, table):
    with workdir() as tmp:
        root = Path(tmp) / "hub"
        (root / "data").mkdir(parents=True)
        (root / "README.md").write_text(card, errors="surrogatepass")
        pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
        (root / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1" + blob + b"PAR1")
        drain(str(root), Path(tmp) / "spool", "hub")


# --------------------------------------------------------------------------- URI lists (local entries only)


ENTRY = st.one_of(
    st.sampled_from(
        [
            "img.jpg",
            "missing.jpg",
            "../up.jpg",
            "/etc/hostname",
            "C:\\x.jpg",
            "./a/../img.jpg",
            "",
            " ",
            "sub/",
            "file:///nonexistent",
            "s3://b/k",
            "https://example.com/x.jpg",
            "big.jpg",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":"), max_size=16),
)
LABEL = st.one_of(st.none(), st.text(max_size=6), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2), st.floats(allow_nan=True))


@FUZZ
@given(
    rows=st.lists(st.tuples(ENTRY, LABEL), max_size=8),
    junk=st.lists(st.sampled_from(["", "[1,2]", "{", "null", '"x"', '{"uri": 5}', '{"url": ["a"]}']), max_size=3),
)
def test_fuzzed_jsonl_uri_lists_give_one_input_per_line(rows, junk):
    lines = [json.dumps({"uri": uri, "label": label}) for uri, label in rows] + junk
    with workdir() as tmp:
        (Path(tmp) / "img.jpg").write_bytes(b"\xff\xd8\xff")
        (Path(tmp) / "big.jpg").write_bytes(bytes(LIMIT + 1))
        src = Path(tmp) / "list.jsonl"
        src.write_text("\n".join([json.dumps({"uri": "img.jpg"}), *lines]) + "\n", errors="surrogatepass")
        tally = drain(str(src), Path(tmp) / "spool", src.name)
    assert tally is not None and tally.members == 1 + len(rows) + sum(bool(j.strip()) for j in junk)


@FUZZ
@given(
    header=st.sampled_from(["uri,label", "URL ,Label", "label,uri,extra", "uri"]),
    cells=st.lists(st.lists(st.one_of(ENTRY, st.sampled_from(['"', '"a""b"', "\r", "\n", ","])), max_size=4), max_size=8),
)
def test_fuzzed_csv_uri_lists_give_one_input_per_row(header, cells):
    text = header + "\n" + "\n".join(",".join(row) for row in cells) + "\n"
    with workdir() as tmp:
        (Path(tmp) / "img.jpg").write_bytes(b"\xff\xd8\xff")
        src = Path(tmp) / "list.csv"
        src.write_text(text, errors="surrogatepass", newline="")
        tally = drain(str(src), Path(tmp) / "spool", src.name)
        expected = sum(1 for _ in csv.DictReader(io.StringIO(src.read_text(errors="replace"), newline="")))
    assert tally is not None and tally.members == expected


# --------------------------------------------------------------------------- bucket prefixes


KEYS = st.lists(
    st.one_of(
        st.sampled_from(["a.jpg", "d/b.png", "a b/c.jpg", "./x.jpg", "d//e.jpg", "ü/é.png", "%2e%2e/x", "f.parquet", "k.", "z" * 200]),
        st.text(st.sampled_from("ab/._-~ "), min_size=1, max_size=12),
    ),
    min_size=1,
    max_size=6,
    unique=True,
)
_prefixes = itertools.count()


@settings(
    max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    keys=KEYS,
    bodies=st.lists(
        st.one_of(st.binary(max_size=32), st.just(bytes(LIMIT + 1)), st.binary(max_size=16).map(lambda b: b"PAR1" + b + b"PAR1")),
        min_size=6,
        max_size=6,
    ),
)
def test_fuzzed_bucket_prefixes_give_one_input_per_object_or_are_refused(s3_bucket, keys, bodies):
    prefix = f"{s3_bucket}/fuzz-{next(_prefixes)}/"
    stored = 0
    for key, body in zip(keys, bodies, strict=False):
        try:
            storage.write_bytes(prefix + key, body)
            stored += 1
        except Exception:  # noqa: BLE001 - a key the store itself refuses is no input
            pass
    assume(stored)
    listed = [i for i in storage.iter_objects(prefix) if not (i.uri.endswith("/") and i.size == 0)]
    with workdir() as tmp:
        tally = drain(prefix, Path(tmp) / "spool", storage.redact_uri(prefix))
    if tally is not None and not any(i.uri.endswith(".parquet") for i in listed):
        assert tally.members == len(listed)
