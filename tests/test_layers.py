"""The import graph keeps the layers of docs/architecture.md: nothing imports from a layer above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "imgpipe"

# docs/architecture.md, "Layers"; a module not named here fails the test until it is placed.
LOW = {
    "storage", "config", "contract", "resources", "archive", "sources", "images", "labels", "annotations", "htmlpage",
    "phases",
}  # fmt: skip
MIDDLE = {
    "steps", "resize_spec", "train_config", "resize_ops", "loader", "partition", "evaluation", "augment",
    "augment_cpu", "models", "pretrained", "distributed", "optim", "checkpoint", "report", "step_report", "synth", "remote", "ray_jobs",
    "kuberay", "kfp_artifacts", "manifests", "sweep",
}  # fmt: skip
TOP = {"cli", "kfp_client", "local_run", "containers", "components", "pipelines"}
RANK = {**{m: 0 for m in LOW}, **{m: 1 for m in MIDDLE}, **{m: 2 for m in TOP}}


def _modules() -> list[tuple[str, Path]]:
    found = [(p.relative_to(SRC).parts[0].removesuffix(".py"), p) for p in SRC.rglob("*.py") if p.name != "__init__.py"]
    found += [("components", p) for p in (ROOT / "components").glob("*.py")]
    found += [("pipelines", p) for p in (ROOT / "pipelines").glob("*.py")]
    return found


def _imported(path: Path) -> set[str]:
    """First names under ``imgpipe`` that ``path`` imports, at any depth (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "imgpipe":
                names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("imgpipe.")}
    return names


@pytest.mark.parametrize(("owner", "path"), _modules(), ids=lambda v: str(v).rsplit("/", 2)[-1] if isinstance(v, Path) else v)
def test_no_import_from_a_higher_layer(owner, path):
    assert owner in RANK, f"{path} is in no layer: place it in docs/architecture.md and in this test"
    upward = sorted(m for m in _imported(path) if RANK.get(m, -1) > RANK[owner])
    assert not upward, f"{path.relative_to(ROOT)} ({owner}) imports {upward} from a higher layer"
