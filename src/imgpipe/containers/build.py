"""Building the step images through the engine's API (``make images``, ``imgpipe images build``).

Every kind builds from ``docker/Dockerfile`` with ``--build-arg KIND=<kind>`` and
``BASE_IMAGE``. The build context is made here, not by the engine: only the files the
Dockerfile copies (:data:`CONTEXT`), plus ``docker/build-pip/`` holding *this* machine's
pip index settings and CA bundle, so a build behind a mirror or a TLS-inspecting proxy
works. The Dockerfile uses that folder in its first stage only; the final image copies
the virtual environment built there and never the settings.

The base image is ``$IMGPIPE_BASE_IMAGE`` or the official ``python:3.11-slim-bookworm``.
Where it is neither present nor pullable (no registry access, as on air-gapped
builders), an equivalent is built from Debian packages with ``mmdebstrap`` (Python 3.11,
``python3-venv``, CA certificates), imported as :data:`BOOTSTRAP_BASE`, and used; the
build says so.

Builds run with the host's network (``network_mode="host"``): pip inside the build
reaches the index exactly as it does here.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.containers.catalog import DOCKERFILE, KINDS, image

__all__ = [
    "ROOT",
    "CONTEXT",
    "DEFAULT_BASE",
    "BOOTSTRAP_BASE",
    "BASE_ENV",
    "BaseImageUnavailable",
    "BuildFailed",
    "BuildResult",
    "host_pip_settings",
    "copy_context",
    "build_context",
    "resolve_base",
    "bootstrap_base",
    "build_image",
    "push_image",
    "build_images",
]

ROOT = Path(__file__).resolve().parents[3]
# What the Dockerfile copies (and nothing else is sent); .dockerignore says the same for
# a plain `docker build`.
CONTEXT = (
    "pyproject.toml",
    "README.md",
    "src",
    "components",
    "pipelines",
    "docker/Dockerfile",
    "docker/constraints.txt",
    "docker/build-pip/pip.conf",
    # The target of the package-data symlink src/imgpipe/manifests/rayjob-resize.yaml (this
    # context sends the file there too; a plain `docker build` sends the link).
    "k8s/ray/rayjob-resize.yaml",
)
PIP_DIR = "docker/build-pip"
# Where the Dockerfile's first stage puts docker/build-pip/.
PIP_DIR_IN_BUILD = "/tmp/build-pip"
DEFAULT_BASE = "docker.io/library/python:3.11-slim-bookworm"
BOOTSTRAP_BASE = "localhost/imgpipe-base:py311-bookworm"
BASE_ENV = "IMGPIPE_BASE_IMAGE"
DEBIAN_SUITE = "bookworm"  # python3 is 3.11 there, like DEFAULT_BASE
_SKIP_PARTS = ("__pycache__", ".egg-info", ".pytest_cache")
_PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy")
_FAILURE_LINES = 60

Log = Callable[[str], None]


class BaseImageUnavailable(RuntimeError):
    """The base image can neither be found, pulled nor bootstrapped here."""


class BuildFailed(RuntimeError):
    """A build instruction failed; the message holds that instruction and its output."""


@dataclass(frozen=True)
class BuildResult:
    """One built image.

    Attributes:
        kind: ``cpu``, ``ray`` or ``gpu``.
        image: The tag it was built as.
        base: The base image it was built on.
        seconds: Wall time of the build.
        size_bytes: Uncompressed size.
        cached_steps: Instructions the engine took from its cache.
        steps: Instructions in all (all stages).
    """

    kind: str
    image: str
    base: str
    seconds: float
    size_bytes: int
    cached_steps: int
    steps: int

    def summary(self) -> str:
        """One line for the build log."""
        return (
            f"{self.kind}: {self.image} {self.size_bytes / 1e6:,.0f} MB in {self.seconds:.0f} s "
            f"({self.cached_steps}/{self.steps} steps from cache) on {self.base}"
        )


# ----------------------------------------------------------------------------------------
# The build context.


def _pip_config_values() -> dict[str, str]:
    """``pip config list`` of this interpreter (files and PIP_* variables), as key -> value."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False)
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            # "global.index-url='https://...'" or ":env:.cert='/etc/...'": the last part is the key.
            values[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    return values


def host_pip_settings(values: dict[str, str] | None = None) -> tuple[str, bytes | None, list[str]]:
    """The pip.conf and CA bundle of this machine, as a build can use them.

    Only ``http(s)`` indexes travel: ``file://`` indexes and local ``find-links`` name
    folders of this machine that a build container does not have.

    Args:
        values: ``pip config`` values (default: this interpreter's).

    Returns:
        The pip.conf text, the CA bundle's bytes (``None`` when pip uses its own), and
        notes on what was left out.
    """
    values = _pip_config_values() if values is None else values
    lines = ["# Generated by imgpipe images build from the build machine's pip settings.", "[global]"]
    notes: list[str] = []
    for key in _PIP_KEYS:
        if key not in values:
            continue
        items = values[key].split()
        if key.endswith("index-url"):
            kept = [u for u in items if u.startswith(("http://", "https://"))]
            notes += [f"left out {key} {u} (not reachable from a build container)" for u in items if u not in kept]
            items = kept
        if items:
            lines.append(f"{key} = {' '.join(items)}")
    if values.get("find-links"):
        notes.append(f"left out find-links {values['find-links']} (a folder of this machine)")
    ca = None
    cert = values.get("cert") or os.environ.get("PIP_CERT")
    if cert and Path(cert).is_file():
        ca = Path(cert).read_bytes()
        lines.append(f"cert = {PIP_DIR_IN_BUILD}/ca.crt")
    return "\n".join(lines) + "\n", ca, notes


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _context_files(root: Path) -> Iterable[Path]:
    for entry in CONTEXT:
        path = root / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                rel = file.relative_to(root).as_posix()
                skip = any(p in rel for p in _SKIP_PARTS) or ".tmp-" in file.name or file.suffix in (".pyc", ".so")
                if file.is_file() and not skip:
                    yield file
        else:
            raise FileNotFoundError(f"the build context needs {entry}, missing under {root}")


def copy_context(dest: Path, root: Path = ROOT) -> Path:
    """Copies the files a build sends (:data:`CONTEXT`) to ``dest``; returns ``dest``.

    For builds from altered sources (a benchmark's source change, a test's broken file).
    """
    for path in _context_files(root):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


def build_context(root: Path = ROOT, pip_settings: tuple[str, bytes | None] | None = None) -> bytes:
    """The build context as an uncompressed tar: :data:`CONTEXT` plus ``docker/build-pip/``.

    Entries have mtime 0 and root ownership, so the same sources give the same context
    (and the engine's layer cache hits).

    Args:
        root: The repository root.
        pip_settings: pip.conf text and CA bundle (default: :func:`host_pip_settings`).
    """
    conf, ca = pip_settings if pip_settings is not None else host_pip_settings()[:2]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # at rest: an image's build context, in memory
        for path in _context_files(root):
            name = path.relative_to(root).as_posix()
            if name == f"{PIP_DIR}/pip.conf":
                continue  # replaced by this machine's settings below
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            _add_bytes(tar, name, path.read_bytes(), mode)
        _add_bytes(tar, f"{PIP_DIR}/pip.conf", conf.encode())
        if ca is not None:
            _add_bytes(tar, f"{PIP_DIR}/ca.crt", ca)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------
# The base image.


def _present(client: Any, name: str) -> bool:
    import docker

    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def _pull(client: Any, name: str) -> str | None:
    """Pulls ``name``; returns why it failed, or ``None``."""
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    try:
        for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                return str(event["error"])
    except Exception as exc:  # APIError, connection errors: the registry is out of reach
        return f"{type(exc).__name__}: {exc}"
    return None if _present(client, name) else "the engine reported no error but has no such image"


def bootstrap_base(client: Any, name: str = BOOTSTRAP_BASE, suite: str = DEBIAN_SUITE, log: Log = print) -> str:
    """Builds a Python base image from Debian packages with ``mmdebstrap`` and imports it as ``name``.

    Debian's ``python3`` with ``python3-venv`` and CA certificates, documentation and
    locales left out: about 180 MB, in about 40 s.

    Raises:
        BaseImageUnavailable: If ``mmdebstrap`` is missing or fails.
    """
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise BaseImageUnavailable(
            f"cannot bootstrap {name}: mmdebstrap is not installed (Debian/Ubuntu: apt-get install mmdebstrap), "
            f"or give a base image that has python3 and python3-venv: --base IMAGE or ${BASE_ENV}"
        )
    with tempfile.TemporaryDirectory(prefix="imgpipe-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        command = [
            tool,
            "--quiet",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            '--aptopt=APT::Install-Recommends "false"',
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
            suite,
            str(rootfs),
        ]
        log(f"base: building {name} from Debian {suite} packages with mmdebstrap")
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BaseImageUnavailable(
                f"mmdebstrap failed (exit {result.returncode}) while bootstrapping {name}:\n"
                + "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
            )
        # The API's `repo` may carry the tag (Podman ignores a separate `tag` on import).
        client.api.import_image(src=str(rootfs), repository=name, changes=['CMD ["python3"]'])
        if not _present(client, name):
            raise BaseImageUnavailable(f"the engine imported the bootstrapped base but has no image {name}")
        log(f"base: {name} imported ({rootfs.stat().st_size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
    return name


def resolve_base(client: Any, requested: str | None = None, *, bootstrap: bool = True, log: Log = print) -> str:
    """The base image to build on, present in the engine by the time this returns.

    ``requested`` (or ``$IMGPIPE_BASE_IMAGE``, else :data:`DEFAULT_BASE`) if it is there
    or can be pulled; otherwise the Debian-built :data:`BOOTSTRAP_BASE` (reused if
    present, bootstrapped if not) when ``bootstrap`` allows.

    Raises:
        BaseImageUnavailable: Saying how to bootstrap one.
    """
    name = requested or os.environ.get(BASE_ENV, "").strip() or DEFAULT_BASE
    if _present(client, name):
        return name
    log(f"base: pulling {name}")
    why = _pull(client, name)
    if why is None:
        return name
    hint = (
        f"the base image {name} cannot be pulled ({why.splitlines()[0][:300]}). Bootstrap an equivalent "
        f"from Debian packages with `imgpipe images bootstrap-base` (needs mmdebstrap: apt-get install "
        f"mmdebstrap) and build with --base {BOOTSTRAP_BASE}, or name a reachable image with --base IMAGE "
        f"or ${BASE_ENV}"
    )
    if not bootstrap or name != DEFAULT_BASE:
        # An image the user named is what they want: no silent substitute.
        raise BaseImageUnavailable(hint)
    log(f"base: {name} cannot be pulled ({why.splitlines()[0][:200]}); using {BOOTSTRAP_BASE}, built from Debian packages")
    if _present(client, BOOTSTRAP_BASE):
        return BOOTSTRAP_BASE
    try:
        return bootstrap_base(client, log=log)
    except BaseImageUnavailable as exc:
        raise BaseImageUnavailable(f"{hint}\n{exc}") from exc


# ----------------------------------------------------------------------------------------
# Building.


_STEP = re.compile(r"^(\[\d+/\d+\] )?(STEP|Step) \d+/\d+ ?:")


def _is_step(line: str) -> bool:
    # Podman/Buildah print "[1/3] STEP 3/9: RUN ...", Docker's classic builder "Step 3/20 : RUN ...".
    return bool(_STEP.match(line))


def _is_cache_hit(line: str) -> bool:
    return line.startswith(("--> Using cache", " ---> Using cache"))


def build_image(
    client: Any, kind: str, base: str, *, context: bytes, tag: str | None = None, no_cache: bool = False, log: Log = print
) -> BuildResult:
    """Builds one kind from ``docker/Dockerfile`` and tags it.

    Raises:
        ValueError: For an unknown kind.
        BuildFailed: With the failing instruction and the last lines of its output.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}; kinds: {', '.join(KINDS)}")
    tag = tag or image(kind)
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=_FAILURE_LINES)
    step, steps, cached = "", 0, 0
    events = client.api.build(
        fileobj=io.BytesIO(context),
        custom_context=True,
        dockerfile=DOCKERFILE,
        tag=tag,
        buildargs={"KIND": kind, "BASE_IMAGE": base},
        network_mode="host",
        rm=True,
        forcerm=True,
        pull=False,
        nocache=no_cache,
        decode=True,
    )
    for event in events:
        if "error" in event:
            output = "\n".join(tail)
            raise BuildFailed(f"building the {kind} image ({tag}) failed at {step or 'the start'}:\n{output}\n{event['error'].strip()}")
        for line in str(event.get("stream", "")).splitlines():
            line = line.rstrip()
            if _is_step(line):
                step, steps = line, steps + 1
                tail.clear()
                log(f"{kind}: {line}")
            elif _is_cache_hit(line):
                cached += 1
            if line:
                tail.append(line)
    from imgpipe.containers.engine import image_size

    return BuildResult(kind, tag, base, round(time.monotonic() - started, 1), image_size(client, tag), cached, steps)


def push_image(client: Any, name: str, log: Log = print) -> None:
    """Pushes ``name`` to its registry.

    Raises:
        RuntimeError: With the registry's error.
    """
    repository, _, tag = name.rpartition(":")
    log(f"push: {name}")
    for event in client.images.push(repository, tag=tag, stream=True, decode=True):
        if "error" in event:
            raise RuntimeError(f"pushing {name} failed: {event['error']}")


def build_images(
    kinds: Sequence[str] = tuple(KINDS),
    *,
    base: str | None = None,
    bootstrap: bool = True,
    push: bool = False,
    no_cache: bool = False,
    root: Path = ROOT,
    client: Any = None,
    log: Log = print,
) -> list[BuildResult]:
    """Builds (and optionally pushes) the images of ``kinds`` on one resolved base.

    Raises:
        EngineUnavailable: If no engine answers.
        BaseImageUnavailable: If no base image can be had.
        BuildFailed: If a build fails.
    """
    from imgpipe.containers.engine import connect, describe

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown image kind(s) {', '.join(unknown)}; kinds: {', '.join(KINDS)}")
    client = client or connect()
    log(f"engine: {describe(client)}")
    conf, ca, notes = host_pip_settings()
    for note in notes:
        log(f"pip: {note}")
    context = build_context(root, (conf, ca))
    resolved = resolve_base(client, base, bootstrap=bootstrap, log=log)
    results = []
    for kind in kinds or tuple(KINDS):
        result = build_image(client, kind, resolved, context=context, no_cache=no_cache, log=log)
        log(result.summary())
        if push:
            push_image(client, result.image, log=log)
        results.append(result)
    return results
