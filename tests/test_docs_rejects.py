"""docs/steps.md lists every reject code the steps write, the settings that govern them, and every resize preset.

The codes are collected from the source, not from a list kept by hand: :func:`written_codes`
reads every module of ``src/imgpipe`` and takes the reason where a reject is made
(:data:`SINKS`: ``Reject(path, reason, ...)``, ``ImageRejected(reason, ...)``,
``ResizeError``, ``FetchFailed``, a reader's ``Member(path, size, reason, ...)``, clean's
``TaskResult.failed(row, reason, ...)``), in predict's reject rows (``{"path", "reason", ...}``),
in merge's ``why[row] = (reason, detail)``, and in the train loader's refusals
(``"reason: detail"`` strings, counted in ``metrics.json``'s ``loader_rejected``), resolving
constants (``BAD_LABEL``, ``archive.UNSAFE_MEMBER``, ``reason = A if x else B``) through the
modules' own assignments and imports. Clean's quality codes come from
:func:`imgpipe.clean.quality.assess` itself. A reason passed through from another reject
(``exc.reason``) is found where it was made. A new code, anywhere, fails here until the table
in docs/steps.md, "Reject codes", has a row for it; a row whose code no step writes fails too.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from functools import cache
from pathlib import Path

import numpy as np

from imgpipe.clean.config import CleanConfig
from imgpipe.clean.quality import METRICS, assess
from imgpipe.resize.config import ResizeConfig
from imgpipe.resize.spec import OPS, PRESETS
from imgpipe.steps.download import DownloadConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "imgpipe"
STEPS_DOC = ROOT / "docs" / "steps.md"

# Calls that make a reject, and the position of their reason argument (also taken as ``reason=``).
SINKS = {"Reject": 1, "ImageRejected": 0, "ResizeError": 0, "FetchFailed": 0, "Member": 2, "_flagged": 2, "failed": 1}
# The train loader's refusals: functions returning ``"reason: detail"``.
REFUSALS = ("refuse_row", "refuse_size", "_undecodable")
_CODE = re.compile(r"[a-z][a-z0-9_]*")
_SIZES = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "s": 1}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _bindings(module: str) -> dict[str, ast.expr | tuple[str, str | None]]:
    """A module's top-level names: an assigned value, or ``(module, name)`` of an import (``name`` ``None``: the module)."""
    names: dict[str, ast.expr | tuple[str, str | None]] = {}
    for node in _modules().get(module, ast.Module(body=[], type_ignores=[])).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            names[node.target.id] = node.value
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names[alias.asname or alias.name] = (full, None) if full in _modules() else (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = (alias.name, None)
    return names


def _name_values(module: str, name: str, seen: frozenset[tuple[str, str]] = frozenset()) -> set[str] | str | None:
    """The strings a module-level ``name`` holds; a module's name for a module; ``None`` when it is no string."""
    bound = _bindings(module).get(name)
    if bound is None or (module, name) in seen:
        return None
    if isinstance(bound, tuple):
        other, attr = bound
        return other if attr is None else _name_values(other, attr, seen | {(module, name)})
    return _values(module, bound, {}, seen | {(module, name)})


def _values(module: str, node: ast.expr, local: dict[str, list[ast.expr]], seen: frozenset[tuple[str, str]] = frozenset()) -> set[str] | None:
    """The strings ``node`` can be: a literal, a constant, either branch of ``a if x else b``; ``None`` for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return (_values(module, node.body, local, seen) or set()) | (_values(module, node.orelse, local, seen) or set()) or None
    if isinstance(node, ast.Name):
        if node.id in local:
            found = [_values(module, v, {}, seen) for v in local[node.id]]
            return set().union(*(f for f in found if f)) or None
        got = _name_values(module, node.id, seen)
        return got if isinstance(got, set) else None
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        other = _name_values(module, node.value.id, seen)  # a module, as in ``archive.UNSAFE_MEMBER``
        got = _name_values(other, node.attr, seen) if isinstance(other, str) else None
        return got if isinstance(got, set) else None
    return None


def _leading_code(node: ast.expr) -> str | None:
    """``unreadable`` of ``f"unreadable: {detail}"``."""
    first = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else node
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and (m := re.match(r"([a-z][a-z0-9_]*): ", first.value)):
        return m.group(1)
    return None


def _reason_args(node: ast.AST) -> list[ast.expr]:
    """The reason expressions of one node, where it makes a reject."""
    if isinstance(node, ast.Call):
        func = node.func.id if isinstance(node.func, ast.Name) else node.func.attr if isinstance(node.func, ast.Attribute) else None
        if func in SINKS:
            at = SINKS[func]
            return [k.value for k in node.keywords if k.arg == "reason"] + (
                [node.args[at]] if len(node.args) > at and not any(isinstance(a, ast.Starred) for a in node.args[: at + 1]) else []
            )
    if isinstance(node, ast.Dict):
        keys = {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)}
        if "path" in keys and "reason" in keys:
            return [keys["reason"]]
    # merge's ``why[row] = (reason, detail)``
    if (
        isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Tuple)
        and node.value.elts
        and any(isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "why" for t in node.targets)
    ):
        return [node.value.elts[0]]
    return []


class _Scan(ast.NodeVisitor):
    """One module's reject codes: each node where a reject is made, inside the functions that enclose it."""

    def __init__(self, module: str, codes: dict[str, str]) -> None:
        self.module, self.codes, self.where = module, codes, f"src/{Path(*module.split('.'))}.py"
        self.local: list[dict[str, list[ast.expr]]] = [{}]

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # A function's own assignments resolve a reason held in a variable (``reason = A if x else B``).
        assigned = {**self.local[-1]}
        for n in ast.walk(node):
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                assigned.setdefault(n.targets[0].id, []).append(n.value)
        self.local.append(assigned)
        if node.name in REFUSALS:
            for n in ast.walk(node):
                if isinstance(n, ast.Return) and n.value is not None and (code := _leading_code(n.value)):
                    self.codes.setdefault(code, f"{self.where}:{n.lineno}")
        self.generic_visit(node)
        self.local.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def generic_visit(self, node: ast.AST) -> None:
        for arg in _reason_args(node):
            for code in _values(self.module, arg, self.local[-1]) or ():
                self.codes.setdefault(code, f"{self.where}:{node.lineno}")
        super().generic_visit(node)


@cache
def written_codes() -> dict[str, str]:
    """Every reject code the steps write, with where (``path:line``) it is first made."""
    codes: dict[str, str] = {}
    for module, tree in _modules().items():
        _Scan(module, codes).visit(tree)
    for code in assess(np.zeros((0, len(METRICS)), np.float32), 1.0, 3.5, {}).reasons:
        codes.setdefault(code, "src/imgpipe/clean/quality.py (assess)")
    return codes


def _table(doc: Path, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the Markdown table of ``doc`` whose header line starts with ``header``."""
    lines = doc.read_text().splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith(header)]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _reject_rows() -> dict[str, list[str]]:
    rows = {}
    for cells in _table(STEPS_DOC, "| code | step | meaning | setting (default) |"):
        (code,) = re.findall(r"`([^`]+)`", cells[0])
        assert code not in rows, f"docs/steps.md's reject table has {code} twice"
        rows[code] = cells
    return rows


def test_the_scan_finds_the_codes_of_every_step():
    """A guard on the scan itself: a code each step is known to write."""
    found = written_codes()
    for code in ("unsafe_member", "member_too_large", "fetch_timeout", "bad_label", "sample_without_image"):
        assert code in found, f"download: {code}"
    for code in ("not_an_image", "too_large", "decoder_killed", "duplicate", "blank", "odd_aspect", "near_duplicate"):
        assert code in found, f"clean: {code}"
    for code in ("missing_image", "not_as_recorded", "bad_bbox", "resize_failed"):
        assert code in found, f"resize: {code}"
    assert {"wrong_shape", "undecodable", "unreadable", "not_as_declared"} <= set(found), "predict and train"
    assert all(_CODE.fullmatch(c) for c in found), sorted(found)


def test_every_reject_code_written_is_in_the_docs_table_and_every_row_is_written():
    written, documented = written_codes(), _reject_rows()
    missing = [f"{code} (made at {where})" for code, where in sorted(written.items()) if code not in documented]
    assert not missing, "add a row to docs/steps.md, 'Reject codes', for:\n" + "\n".join(missing)
    stale = sorted(set(documented) - set(written))
    assert not stale, f"docs/steps.md's reject table lists codes no step writes: {stale}"
    empty = [code for code, cells in documented.items() if len(cells) != 4 or not all(cells)]
    assert not empty, f"rows without a step, a meaning or a setting ('-' for none): {empty}"


def _default(text: str) -> object:
    """A documented default as a value: ``unset`` None, ``empty`` empty, ``256 MiB``, ``89,478,485``, ``jpeg,png``, ``reject``."""
    if text == "unset":
        return None
    if text == "empty":
        return ""
    if m := re.fullmatch(r"([\d,]+(?:\.\d+)?)(?: (KiB|MiB|GiB|s))?", text):
        return float(m.group(1).replace(",", "")) * _SIZES.get(m.group(2) or "s", 1)
    return text


def _same(field_default: object, documented: object) -> bool:
    if isinstance(field_default, tuple):
        return documented == ",".join(field_default) or (documented == "" and not field_default)
    if isinstance(field_default, (int, float)) and not isinstance(field_default, bool):
        return isinstance(documented, float) and documented == float(field_default)
    return field_default == documented


def test_the_settings_the_reject_table_names_exist_with_their_defaults():
    """Each setting is a field of a step's config (or a resize op); ``key`` (default) says its dataclass default."""
    fields: dict[str, list[object]] = {}
    for config in (DownloadConfig, CleanConfig, ResizeConfig):
        for f in dataclasses.fields(config):
            fields.setdefault(f.name, []).append(f.default)
    wrong = []
    for code, cells in _reject_rows().items():
        setting = cells[3]
        for key in re.findall(r"`([a-z][a-z0-9_]*)`", setting):
            if key not in fields and key not in OPS:
                wrong.append(f"{code}: {key} is no config field")
        for key, text in re.findall(r"`([a-z][a-z0-9_]*)` \(([^)]*)\)", setting):
            for default in fields.get(key, []):
                if not _same(default, _default(text)):
                    wrong.append(f"{code}: {key} defaults to {default!r}, the table says {text!r}")
    assert not wrong, "\n".join(wrong)


def test_every_resize_preset_is_documented_with_its_side():
    rows = _table(STEPS_DOC, "| preset | side | suits |")
    documented = {re.findall(r"`([^`]+)`", cells[0])[0]: int(cells[1]) for cells in rows}
    assert documented == PRESETS, "docs/steps.md's preset table is not resize.spec.PRESETS"
    assert all(cells[2] for cells in rows), "every preset says what it suits"
