"""Hostile Hugging Face datasets, URI lists and bucket prefixes, generated: one input per row, line or object, else the source refused."""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imgpipe import storage
from imgpipe.data.labelgate import check_class_list
from imgpipe.data.readers.base import ReaderSettings
from imgpipe.data.readers.hffolder import sniff_folder
from tests.data.conftest import FUZZ, LIMIT, LOCAL_ONLY, drain, mutated, workdir

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


# --------------------------------------------------------------------------- the card, state.json and dataset_info.json


CLASS_NAME = st.one_of(
    st.sampled_from(["cat", "dog", "Chat noir", "a/b", "..", "dog\x07", " x", "bidi\u202e", "x" * 129, ""]),
    st.text(max_size=6),
    st.integers(-2, 3),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=1),
)
CLASS_LIST = st.lists(CLASS_NAME, max_size=5)
# String keys only: JSON writes 1 and "1" alike, and YAML keeps the last of two equal keys.
NAMES_MAPPING = st.dictionaries(st.sampled_from(["0", "1", "2", "3", "4", "01", "-1", "x", " 1"]), CLASS_NAME, max_size=5)


def _gate(value: object) -> tuple[str, ...] | None:
    """The list the label gate keeps of ``value``, ``None`` where it refuses it."""
    try:
        return check_class_list(value, "x")
    except ValueError:
        return None


@st.composite
def alias_blocks(draw: st.DrawFn) -> tuple[str, str, list]:
    """YAML lines anchoring lists of aliases of lists, the alias of the last, and the value it stands for (shared, so never expanded here).

    A few hundred bytes that stand for up to 12**7 nodes.
    """
    depth, fanout = draw(st.integers(1, 7)), draw(st.integers(1, 12))
    lines, value = [f"x0: &x0 [{', '.join(['a'] * fanout)}]"], ["a"] * fanout
    for k in range(1, depth):
        lines.append(f"x{k}: &x{k} [{', '.join([f'*x{k - 1}'] * fanout)}]")
        value = [value] * fanout
    return "\n".join(lines) + "\n", f"*x{depth - 1}", value


@FUZZ
@given(
    names=st.one_of(CLASS_LIST, NAMES_MAPPING, CLASS_NAME),
    aliases=st.one_of(st.none(), alias_blocks()),
    column=st.sampled_from(["label", "labels"]),
)
def test_fuzzed_card_class_names_are_kept_whole_when_they_pass_the_gate_else_refused(names, aliases, column):
    features = [{"name": "image", "dtype": "image"}, {"name": column, "dtype": {"class_label": {"names": "NAMES"}}}]
    front = yaml.safe_dump({"dataset_info": {"features": features}}, allow_unicode=False)
    front = front.replace("names: NAMES", "names: " + (aliases[1] if aliases else json.dumps(names)))
    if aliases:
        front = aliases[0] + front
    card = f"---\n{front}---\n# A card\n"
    table = pa.table({"image": [b"\x89PNG"] * 2, column: pa.array([0, 1], pa.int64())})
    with workdir() as tmp:
        root = Path(tmp) / "hub"
        (root / "data").mkdir(parents=True)
        (root / "README.md").write_text(card)
        pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
        started = time.monotonic()
        try:
            layout = sniff_folder(str(root))
        except ValueError as exc:
            assert "hub/README.md: " in str(exc) and "\n" not in str(exc)
            layout = None
        assert time.monotonic() - started < 5, "the budget refuses an expansion before it is built"
        drain(str(root), Path(tmp) / "spool", "hub")
    listed = [names[k] for k in sorted(names, key=int)] if isinstance(names, dict) and _dense(names) else names
    expected = _gate(aliases[2] if aliases else listed)
    assert (layout is not None) == (expected is not None)
    if layout is not None:
        assert layout.card == {column: expected}


def _dense(mapping: dict) -> bool:
    """Whether a names mapping's keys are the class indices 0..n-1, once each (ints or digit strings)."""
    keys = [str(k) for k in mapping]
    return all(k.isascii() and k.isdigit() and (k == "0" or not k.startswith("0")) for k in keys) and sorted(map(int, keys)) == list(range(len(keys)))


DATA_FILE = "data-00000-of-00001.arrow"
FILENAME = st.one_of(
    st.sampled_from([DATA_FILE, DATA_FILE, DATA_FILE, "missing.arrow", "../ds/" + DATA_FILE, "", ".hidden", "a/b", "state.json"]),
    st.text(max_size=6),
    st.integers(),
    st.none(),
)


@FUZZ
@given(
    files=st.lists(st.one_of(FILENAME.map(lambda f: {"filename": f}), JSONISH), max_size=4),
    names=st.one_of(CLASS_LIST, CLASS_NAME),
    split=st.one_of(st.none(), st.sampled_from(["train", "validation", "x"]), JSONISH),
)
def test_fuzzed_state_and_dataset_info_files_are_checked_claims(files, names, split):
    table = pa.table({"image": [b"\x89PNG"] * 3, "label": pa.array([0, 1, 0], pa.int64())})
    stream = io.BytesIO()
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table)
    with workdir() as tmp:
        root = Path(tmp) / "ds"
        root.mkdir()
        (root / DATA_FILE).write_bytes(stream.getvalue())
        (root / "state.json").write_text(json.dumps({"_data_files": files, "_split": split}))
        (root / "dataset_info.json").write_text(json.dumps({"features": {"label": {"_type": "ClassLabel", "names": names}}}))
        tally = drain(str(root), Path(tmp) / "spool", "ds")
    honest = files in ([], [{"filename": DATA_FILE}])
    gated = _gate(names) is not None
    assert (tally is not None) == (honest and gated)
    if tally is not None:
        assert tally.members == (table.num_rows if files else 0), "each data file read once: the rows are the file's own"


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
