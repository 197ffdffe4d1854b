"""The docs name only paths that exist, and the README stays a short front door.

Every repository path README.md and docs/*.md name, in backticks or as a link, must exist: a
path from the repository root (``src/imgpipe/storage/s3.py``, ``k8s/base/``), one inside the package
(``data/readers/factory.py``, as docs/architecture.md writes them), or a doc beside the doc.
Paths a run writes (``bench/results/``, ``out/``) are not looked for, nor upstream paths cited
from another project that happen to share a first folder name with ours (:data:`UPSTREAM`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "imgpipe"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {".ci"}
PACKAGE_DIRS = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("_")}
GENERATED = ("bench/results/", "out/")
# Cited upstream paths whose first folder is also one of ours (Kubeflow's components/ and manifests/,
# kfp's SDK, a KFP API resource).
UPSTREAM = (
    "components/profile-controller",
    "manifests/kustomize/",
    "manifests/base/",
    "manifests/overlays/",
    "kfp/dsl/",
    "kfp/compiler/",
    "kfp/client/",
    "pipelines/versions",
)
README_MAX_LINES = 250


def _named(doc: Path) -> list[tuple[int, str, bool]]:
    """``(line, token, is a link)`` of every path-like token."""
    found = []
    for n, line in enumerate(doc.read_text().splitlines(), start=1):
        tokens = [(t, False) for t in re.findall(r"`([^`\s]+)`", line)] + [(t, True) for t in re.findall(r"\]\(([^)#\s]+)", line)]
        for token, link in tokens:
            if token.startswith(("http", "mailto")) or any(c in token for c in "<>{}*$") or ".." in token:
                continue
            found.append((n, token.split(":")[0], link))
    return found


def _candidates(doc: Path, token: str, link: bool) -> list[Path] | None:
    """Where ``token`` would be, or ``None`` when it is no repository path of ours."""
    path = token.rstrip("/")
    first = path.split("/")[0]
    if token.startswith(GENERATED) or token.startswith(UPSTREAM):
        return None
    if first in TOP:
        base = [ROOT / path]
    elif first in PACKAGE_DIRS and "/" in path:
        base = [PACKAGE / path]
    elif link:
        base = [doc.parent / path]
    else:
        return None
    # `steps/train.evaluate_saved`, `steps/promote`: a module, named with or without a member.
    module = re.sub(r"\.[A-Za-z_]\w*$", "", path)
    return [*base, *(b.parent / f"{Path(module).name}.py" for b in base)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc):
    missing = [
        f"{doc.relative_to(ROOT)}:{n}: {token}"
        for n, token, link in _named(doc)
        if (c := _candidates(doc, token, link)) is not None and not any(p.exists() for p in c)
    ]
    assert not missing, "docs name paths that do not exist:\n" + "\n".join(missing)


def test_the_readme_is_a_short_front_door_and_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    guides = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\(docs/([a-z-]+\.md)\)", readme))
    assert guides <= linked, f"README.md links no {sorted(guides - linked)}"


def _command_examples(doc: Path) -> list[str]:
    """Every ``imgpipe COMMAND ...`` a doc shows: lines of its code blocks and inline code spans."""
    text = doc.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if (m := re.search(r"(?:^|[\s;&|(])(imgpipe\s+-?-?[a-z].*)$", line.strip())) is not None:
                found.append(m.group(1))
    found += re.findall(r"`(imgpipe [^`]+)`", re.sub(r"\s+", " ", text))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_a_doc_shows_has_the_flags_it_uses(doc):
    """Each example's command and every ``--flag`` it uses exist in the real CLI parser (a removed flag fails here)."""
    from imgpipe.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    common = {o for a in parser._actions for o in a.option_strings}
    wrong = []
    for example in _command_examples(doc):
        words = re.sub(r"\s#.*$", "", example).split()
        name = words[1]
        if name.startswith("-"):
            options, rest = common, words[1:]
        elif name in commands.choices:
            command = commands.choices[name]
            nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            if nested and len(words) > 2 and words[2] in nested[0].choices:  # an action: imgpipe images build, imgpipe review publish
                command = nested[0].choices[words[2]]
            options, rest = common | {o for a in command._actions for o in a.option_strings}, words[2:]
        else:
            if not (name.isupper() or name.startswith("<")):  # a placeholder such as STEP or <step>
                wrong.append(f"no command {name!r}: {example}")
            continue
        used = [flag for w in rest for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", w)]
        wrong += [f"{flag} is no option of imgpipe {name}: {example}" for flag in used if flag not in options]
    assert not wrong, "\n".join(wrong)


# A page a person can find an answer in (issue 86): split a longer one by what a reader comes for.
PAGE_LINES = 425


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_is_too_long_to_find_an_answer_in(doc):
    lines = len(doc.read_text().splitlines())
    assert lines <= PAGE_LINES, f"{doc.relative_to(ROOT)} has {lines} lines: split it by what a reader comes for (docs/deploy/, docs/internals/)"
