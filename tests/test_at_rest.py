"""No configured secret at rest: every place imgpipe writes a file is found in the code, and each passes the one redaction.

The writers are found by reading the code (``ast``), not from a list kept by hand: every call
that writes a file or an object in ``src/imgpipe``, ``components`` and ``pipelines``. Text goes
through :func:`imgpipe.storage.write_text`, :func:`~imgpipe.storage.write_json` or
:func:`imgpipe.writer.write_entry` with a ``str``, which redact it. Anything else (a direct
``open(..., "w")``, ``Path.write_text``, text encoded to bytes before the writer sees it) must say
on its own line, in an ``# at rest:`` comment, why it holds no configured value (image bytes, a
spool of a listing, a key file written 0600). A new writer without either fails here.

Each kind of configured secret (URI userinfo, a presigned query, a token in a query, a header,
the environment) is then planted in what those writers take and searched for in what they wrote.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from imgpipe import storage, writer
from imgpipe.clean.config import CleanConfig
from imgpipe.config import config_record, config_to_dict, config_to_yaml

ROOT = Path(__file__).resolve().parents[1]
SCOPES = [ROOT / "src" / "imgpipe", ROOT / "components", ROOT / "pipelines"]
# The writer itself: the backends below storage.write_bytes.
WRITER_ITSELF = ROOT / "src" / "imgpipe" / "storage"
MARK = "# at rest:"
# The writers that take bytes as they are (text must reach them as str, or through write_text).
BYTES_WRITERS = {"write_bytes": 1, "write_entry": 2, "_write": 2}
OPENERS = {"open", "fdopen"}


def _files() -> list[Path]:
    return [p for scope in SCOPES for p in sorted(scope.rglob("*.py")) if WRITER_ITSELF not in p.parents]


def _name(func: ast.expr) -> tuple[str, str]:
    """``(receiver, name)`` of a call's function: ``("storage", "write_bytes")``, ``("", "open")``."""
    if isinstance(func, ast.Attribute):
        receiver = func.value.id if isinstance(func.value, ast.Name) else ""
        return receiver, func.attr
    return "", func.id if isinstance(func, ast.Name) else ""


def _writes_mode(call: ast.Call) -> bool:
    """Whether an ``open``-like call opens for writing (a mode with w, a, x or +; os.open's O_WRONLY/O_CREAT)."""
    args = [*call.args, *(k.value for k in call.keywords if k.arg in ("mode", "flags"))]
    for arg in args:
        text = ast.unparse(arg)
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and any(c in arg.value for c in "wax+"):
            return True
        if "O_WRONLY" in text or "O_CREAT" in text or "O_RDWR" in text:
            return True
    return False


def _encodes(expr: ast.expr) -> bool:
    """Whether ``expr`` is text made into bytes (``text.encode()``, ``json.dumps(...).encode() + b"\\n"``)."""
    if isinstance(expr, ast.BinOp):
        return _encodes(expr.left)
    return isinstance(expr, ast.Call) and _name(expr.func)[1] == "encode"


def _writes_a_file(node: ast.Call, receiver: str, name: str) -> bool:
    """``Path.write_text/write_bytes``, an ``open`` for writing, or ``json.dump``/``yaml.dump`` into a stream."""
    opens = name in OPENERS or (receiver in ("os", "gzip", "tarfile", "io") and name == "open")
    dumps = name in ("dump", "safe_dump") and receiver in ("json", "yaml") and len(node.args) >= 2
    return name in ("write_text", "write_bytes") or (opens and _writes_mode(node)) or dumps


def _writes_a_file(node: ast.Call, receiver: str, name: str) -> bool:
    """``Path.write_text/write_bytes``, an ``open`` for writing, or ``json.dump``/``yaml.dump`` into a stream."""
    opens = name in OPENERS or (receiver in ("os", "gzip", "tarfile", "io") and name == "open")
    dumps = name in ("dump", "safe_dump") and receiver in ("json", "yaml") and len(node.args) >= 2
    return name in ("write_text", "write_bytes") or (opens and _writes_mode(node)) or dumps


def find_writers() -> tuple[list[str], list[str], list[str]]:
    """Every write call: ``(redacting, marked, unmarked)``, each an entry ``path:line: code``."""
    redacting, marked, unmarked = [], [], []
    for path in _files():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            receiver, name = _name(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
            text = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            said = any(MARK in line for line in text)
            if name in ("write_text", "write_json") and receiver == "storage":
                redacting.append(where)
            elif name in BYTES_WRITERS and receiver in ("storage", "writer", ""):
                # Text encoded before the writer sees it passes no redaction; a str handed to write_entry does.
                at = BYTES_WRITERS[name]
                data = node.args[at] if len(node.args) > at else None
                if data is not None and _encodes(data) and not said:
                    unmarked.append(where)
                elif name != "write_bytes":
                    redacting.append(where)
            elif _writes_a_file(node, receiver, name):
                (marked if said else unmarked).append(where)
    return redacting, marked, unmarked


def test_every_writer_is_found_and_passes_the_redaction_or_says_why_not():
    redacting, marked, unmarked = find_writers()
    assert not unmarked, (
        "these write text or files past the one redaction: use storage.write_text/write_json (or hand write_entry a str), "
        f"or say why it holds no configured value in a '{MARK}' comment on its line:\n" + "\n".join(unmarked)
    )
    # The search finds the writers it is about (manifests, configs, reports, settings, artifacts), not none.
    assert len(redacting) >= 15, redacting
    joined = "\n".join(redacting)
    for writer_of in ("commit.py", "writer.py", "local/run.py", "artifacts.py", "publish.py", "train/outputs.py"):
        assert writer_of in joined, f"no redacting writer found in {writer_of}"
    for entry in marked:  # each says why
        assert entry.split(MARK, 1)[-1].strip(), entry


def test_a_direct_write_without_a_reason_is_caught(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    code = "def f(p, cfg):\n    Path(p).write_text(json.dumps(cfg))\n    storage.write_bytes(p, json.dumps(cfg).encode())\n"
    bad.write_text(code)
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "_files", lambda: [bad])
    monkeypatch.setattr(module, "ROOT", tmp_path)
    assert len(find_writers()[2]) == 2


# Each kind of configured secret, planted in the values a run is configured with.
PASSWORD = "pw-7d1e0c4b2a"
SIGNATURE = "sig-4f9a0e6b13"
TOKEN = "tok-2b8c5d7e90"
HEADER = "bearer-9e3f1a6c52"
ENV_SECRET = "env-secret-6a0d2f8e41"
PLANTED = (PASSWORD, SIGNATURE, TOKEN, HEADER, ENV_SECRET)


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)


def _secret_values() -> dict:
    return {
        "userinfo": f"https://reviewer:{PASSWORD}@labels.example/review.csv",
        "presigned": f"s3://team/labels.csv?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKIA",
        "token_query": f"https://hub.example/data.parquet?token={TOKEN}",
        "header": f"Authorization: Bearer {HEADER}",
        "headers": {"Authorization": f"Bearer {HEADER}"},
        "environment": f"the key is {ENV_SECRET}",
    }


def _assert_clean(blob: str | bytes, where: str) -> None:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    found = [s for s in PLANTED if s in text]
    assert not found, f"{found} in {where}: {text[:2000]}"


def test_write_text_json_and_entry_cut_every_kind_of_secret(tmp_path, secret_env):
    values = _secret_values()
    storage.write_text(str(tmp_path / "a.yaml"), yaml.safe_dump(values))
    storage.write_json(str(tmp_path / "b.json"), values)
    writer.write_entry(str(tmp_path / "out"), "c.json", json.dumps(values))
    writer.write_entry(str(tmp_path / "out"), "d.html", "<p>" + " ".join(str(v) for v in values.values()) + "</p>")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            _assert_clean(path.read_bytes(), str(path))
    # What the JSON writer wrote still parses and still names each location.
    kept = json.loads((tmp_path / "b.json").read_text())
    assert kept["userinfo"].startswith("https://labels.example/review.csv") and kept["headers"]["Authorization"] == "(redacted)"


def test_a_config_at_rest_is_redacted_and_the_one_in_use_is_not(tmp_path, secret_env):
    cfg = CleanConfig(label_overrides=_secret_values()["userinfo"], labels_csv=_secret_values()["presigned"])
    assert config_to_dict(cfg)["label_overrides"] == cfg.label_overrides  # what the step reads with
    _assert_clean(json.dumps(config_record(cfg)), "config_record")
    _assert_clean(config_to_yaml(cfg), "config_to_yaml")
    assert config_record(cfg)["label_overrides"] == "https://labels.example/review.csv (credentials and query removed)"
