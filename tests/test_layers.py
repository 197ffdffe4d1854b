"""The import graph keeps the layers of docs/architecture.md, and has no cycle.

Every module of ``src/imgpipe`` (and the installed ``components``/``pipelines``) is placed
in a layer by its dotted name: low (storage, config, the data formats), middle (steps and
what they are made of), top (where and how steps run: CLI, Kubeflow, remote execution).
Nothing imports from a layer above its own, and the graph of all imports, lazy ones inside
functions included, has no cycle at all: a new circle fails here, whatever its layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "imgpipe"

# docs/architecture.md, "Layers". A module's layer is that of the longest prefix named here;
# a module no prefix covers fails the test until it is placed.
LOW = {
    "storage",
    "config",
    "config_flags",
    "contract",
    "commit",
    "writer",
    "parquet",
    "resources",
    "shutdown",
    "pools",
    "phases",
    "data",
    "report.html",
    "remote.targets",
    "raysession",
    "remote.payload",
    "remote.kube",
    "remote.attempts",
    "remote.rayjob_spec",
    "remote.trainjob_spec",
    "readpolicy",
    "step_table",
    "outcome",
}
MIDDLE = {
    "steps",
    "clean",
    "resize",
    "train",
    "report",
    "remote.ray_jobs",
    "remote.kuberay",
    "remote.trainjob",
    "remote.runner",
    "stepio",
    "serving",
    "sweep",
    "review",
}
TOP = {"cli", "cli_args", "kfp", "local", "remote", "containers", "components", "pipelines", "serving.runtime"}
RANK = {**{m: 0 for m in LOW}, **{m: 1 for m in MIDDLE}, **{m: 2 for m in TOP}}


def _module_name(path: Path, base: Path, prefix: str) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts] if prefix else parts)


def _modules() -> dict[str, Path]:
    """Dotted names below ``imgpipe`` (``train.loader``, ``components.clean``) -> file."""
    found = {_module_name(p, SRC, ""): p for p in SRC.rglob("*.py")}
    found.update({_module_name(p, ROOT / "components", "components"): p for p in (ROOT / "components").glob("*.py")})
    found.update({_module_name(p, ROOT / "pipelines", "pipelines"): p for p in (ROOT / "pipelines").glob("*.py")})
    return {name: path for name, path in found.items() if name}


MODULES = _modules()


def _target(dotted: str) -> str | None:
    """The module an ``imgpipe.X.Y`` import names: the longest known prefix."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in MODULES:
            return name
    return None


def imports_of(path: Path) -> set[str]:
    """Modules of imgpipe that ``path`` imports, at any depth (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "imgpipe":
            base = node.module.removeprefix("imgpipe").lstrip(".")
            for alias in node.names:
                # `from imgpipe.train import loader` imports a module; `from imgpipe.x import f` a name in x.
                names.add(_target(f"{base}.{alias.name}".lstrip(".")) or _target(base))
        elif isinstance(node, ast.Import):
            names |= {_target(a.name.removeprefix("imgpipe.")) for a in node.names if a.name.startswith("imgpipe.")}
    return {n for n in names if n}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        rank = RANK.get(".".join(parts[:end]))
        if rank is not None:
            return rank
    return None


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m))
def test_no_import_from_a_higher_layer(module):
    rank = layer_of(module)
    assert rank is not None, f"{module} is in no layer: place it in docs/architecture.md and in this test"
    upward = sorted(m for m in GRAPH[module] if (layer_of(m) or 0) > rank)
    assert not upward, f"{MODULES[module].relative_to(ROOT)} (layer {rank}) imports {upward} from a higher layer"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_import_graph_has_no_cycle():
    cycles = [group for group in strongly_connected(GRAPH) if len(group) > 1]
    assert not cycles, "modules that import each other (lazy imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [g for g in strongly_connected(graph) if len(g) > 1] == [["a", "b", "c"]]


# Rooms: a module's first name below imgpipe (``train``, ``serving``, ``local``, ``cli``). Rooms that
# import each other (a circle of rooms, though no circle of modules) need some imports to climb back
# up whichever way the rooms are stacked: the fewest such imports is the number kept here, and may
# only go down (docs/architecture.md, "Rooms"). Issue 86 found 6; these 4 remain, each a room-level
# import of a lower-level module of a higher room (train.card, train.recipes, steps.train).
CLIMBING_ROOM_IMPORTS = 4


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, imported in graph.items():
        rooms.setdefault(module.split(".")[0], set()).update(m.split(".")[0] for m in imported)
    return {room: deps - {room} for room, deps in rooms.items()}


def fewest_climbing(graph: dict[str, set[str]]) -> int:
    """The fewest edges of ``graph`` that point upward in the best top-to-bottom order of its nodes.

    Each circle of nodes alone (the rest can always be stacked), by dynamic programming over
    its subsets: the nodes placed so far sit above, and a node placed next climbs once for each
    of them it imports.
    """
    total = 0
    for group in strongly_connected(graph):
        if len(group) < 2:
            continue
        index = {node: i for i, node in enumerate(group)}
        imports = [sum(1 << index[d] for d in graph[node] if d in index) for node in group]
        best = [0] + [len(group) ** 2] * ((1 << len(group)) - 1)
        for placed in range(1 << len(group)):
            for i in range(len(group)):
                if not placed >> i & 1:
                    nxt = placed | 1 << i
                    best[nxt] = min(best[nxt], best[placed] + bin(imports[i] & placed).count("1"))
        total += best[-1]
    return total


def test_rooms_climb_back_up_no_more_than_before():
    climbing = fewest_climbing(room_graph(GRAPH))
    assert climbing <= CLIMBING_ROOM_IMPORTS, (
        f"the rooms now need {climbing} imports that climb back up (was {CLIMBING_ROOM_IMPORTS}): "
        "a new import from a low module into a room that imports it back"
    )


def test_the_climb_count_sees_a_circle_of_rooms():
    assert fewest_climbing({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == 1
    assert fewest_climbing({"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}) == 3
    assert fewest_climbing({"a": {"b"}, "b": set()}) == 0


# Modules that may name a storage scheme besides storage itself: the local S3 server that
# `imgpipe run` starts (its process and its keys), and the policy of where a download may fetch from.
SCHEME_EXCEPTIONS = {
    "storage",
    "storage.base",
    "storage.local",
    "storage.s3",
    "local.run",
    "local.s3",
    "local.s3_security",
    "local.weed",
    "local.names",
    "local.store",
    "data.sources",
}
_SCHEME_WORDS = {"s3", "s3://", "file://"}


def scheme_mentions(path: Path) -> list[str]:
    """Names and string constants in code (docstrings aside) that know a storage scheme."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        literal = isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        if literal and node.value in _SCHEME_WORDS:
            found.append(f"line {node.lineno}: {node.value!r}")
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name is None and isinstance(node, ast.alias):
            name = node.asname or node.name
        if name and "s3" in name.lower():
            found.append(f"line {getattr(node, 'lineno', '?')}: {name}")
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in SCHEME_EXCEPTIONS and not m.startswith(("components", "pipelines"))))
def test_no_module_outside_storage_names_a_storage_scheme(module):
    assert not scheme_mentions(MODULES[module]), f"{module} knows a storage scheme: adding one would touch it"


def test_the_scheme_check_sees_names_and_literals():
    probe = ROOT / "src" / "imgpipe" / "storage" / "s3.py"
    assert any("S3Options" in m for m in scheme_mentions(probe))
