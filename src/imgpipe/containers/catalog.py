"""The container images of the steps: names, kinds and pins in one place.

Four kinds, all built from ``docker/Dockerfile`` with ``--build-arg KIND=<kind>``, each
installing ``imgpipe[<kind>]`` (the extras in ``pyproject.toml`` follow what the steps
of that image import):

* ``cpu``: download, clean, and ``imgpipe compile``/``submit`` (no torch, no Ray),
* ``ray``: resize on Ray Data, also the image of KubeRay clusters (no torch),
* ``gpu``: train on CUDA (torch's CUDA wheels from the package index),
* ``serve``: the promoted model behind KServe (:mod:`imgpipe.serving.runtime`; no torch, no Ray).
  No pipeline step runs in it (:data:`STEP_KINDS`): the ServingRuntime of ``k8s/serving`` does.

An image is ``{registry}/imgpipe-{kind}:{tag}``. The environment overrides it when
the pipeline is compiled (``imgpipe compile``/``submit``): ``IMGPIPE_REGISTRY``,
``IMGPIPE_IMAGE_TAG``, or a whole name per kind in ``IMGPIPE_CPU_IMAGE``,
``IMGPIPE_RAY_IMAGE``, ``IMGPIPE_GPU_IMAGE``, ``IMGPIPE_SERVE_IMAGE``. ``make images`` (``imgpipe images build``,
:mod:`imgpipe.containers.build`) builds and tags the same names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import imgpipe

__all__ = [
    "KINDS",
    "STEP_KINDS",
    "DOCKERFILE",
    "DEFAULT_REGISTRY",
    "CONSTRAINED",
    "SERVE_VENV_ONLY",
    "ImageSet",
    "image",
    "images",
    "serve_python",
    "constraints",
    "listing",
    "main",
]

DEFAULT_REGISTRY = "ghcr.io/imgpipe"
# The one Dockerfile of every kind, relative to the repository root (the build context).
DOCKERFILE = "docker/Dockerfile"
# kind -> what runs in it; the kind is also the pyproject extra the image installs.
KINDS: dict[str, str] = {
    "cpu": "download, clean, compile/submit (no torch, no Ray)",
    "ray": "resize on Ray Data; KubeRay head and workers (no torch)",
    "gpu": "train on CUDA (torch, torchvision, kornia)",
    "serve": "the promoted model on KServe: imgpipe.serving.runtime (kserve, onnxruntime; no torch, no Ray)",
}
# The kinds a compiled pipeline's steps run in (ImageSet); serve runs beside the pipeline, in KServe.
STEP_KINDS = ("cpu", "ray", "gpu")
# The packages whose versions docker/constraints.txt pins to the tested venvs': the
# direct dependencies and the transitive ones whose drift has broken us or kfp. onnxruntime:
# predict (ray image) and the serving runtime (serve image) give the same probabilities;
# fastapi and starlette: the serving runtime's 400 answers were tested on these (kserve's server).
CONSTRAINED = (
    "albumentations",
    "boto3",
    "botocore",
    "docker",
    "fastapi",
    "kfp",
    "kfp-kubernetes",
    "kfp-pipeline-spec",
    "kfp-server-api",
    "kornia",
    "kserve",
    "kubernetes",
    "matplotlib",
    "numpy",
    "onnxruntime",
    "opencv-python-headless",
    "pillow",
    "protobuf",
    "pydantic",
    "pydantic-core",
    "pyarrow",
    "pyyaml",
    "ray",
    "requests",
    "simplejpeg",
    "starlette",
    "torch",
    "torchvision",
    "tqdm",
    "urllib3",
)
# Of those, the ones only the serve venv has (make test's <venv>/serve, :func:`serve_python`), whose
# pins are its versions: kserve 0.20 needs pandas < 3, where the test venv and the step images
# have pandas 3, so kserve and the server it brings are in the serve extra's venv and image alone.
SERVE_VENV_ONLY = ("fastapi", "kserve", "starlette")


def image(kind: str, environ: Mapping[str, str] | None = None) -> str:
    """The image name of ``kind`` (``cpu``, ``ray``, ``gpu``, ``serve``), with environment overrides.

    Raises:
        ValueError: For an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}; kinds: {', '.join(KINDS)}")
    env = os.environ if environ is None else environ
    whole = env.get(f"IMGPIPE_{kind.upper()}_IMAGE", "").strip()
    if whole:
        return whole
    registry = (env.get("IMGPIPE_REGISTRY", "").strip() or DEFAULT_REGISTRY).rstrip("/")
    tag = env.get("IMGPIPE_IMAGE_TAG", "").strip() or imgpipe.__version__
    return f"{registry}/imgpipe-{kind}:{tag}"


@dataclass(frozen=True)
class ImageSet:
    """The three images one compiled pipeline uses (:data:`STEP_KINDS`)."""

    cpu: str
    ray: str
    gpu: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ImageSet:
        """Reads the names now (at compile time), with the environment's overrides."""
        return cls(**{kind: image(kind, environ) for kind in STEP_KINDS})


def images(environ: Mapping[str, str] | None = None) -> ImageSet:
    """Shorthand for :meth:`ImageSet.from_env`."""
    return ImageSet.from_env(environ)


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def serve_python(environ: Mapping[str, str] | None = None) -> Path:
    """The serve venv's python: ``$IMGPIPE_SERVE_PYTHON``, else ``serve/bin/python`` in this venv (``make test`` builds it)."""
    env = os.environ if environ is None else environ
    return Path(env.get("IMGPIPE_SERVE_PYTHON") or Path(sys.prefix) / "serve" / "bin" / "python")


def installed_versions(names: Sequence[str], python: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The installed version of each of ``names`` (local labels such as ``+cu132`` dropped), here or in ``python``'s venv.

    Raises:
        metadata.PackageNotFoundError: If one is not installed here.
        RuntimeError: If ``python`` cannot run, or lacks one.
    """
    if python is None:
        return {name: metadata.version(name).split("+", 1)[0] for name in names}
    code = "import json, sys; from importlib import metadata; print(json.dumps({n: metadata.version(n) for n in sys.argv[1:]}))"
    try:
        result = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise RuntimeError(f"{python}: {exc} (make test builds the serve venv)") from None
    if result.returncode != 0:
        raise RuntimeError(f"{python} cannot tell the versions of {', '.join(names)}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return {name: version.split("+", 1)[0] for name, version in json.loads(result.stdout).items()}


def constraints(packages: Sequence[str] = CONSTRAINED, serve: str | os.PathLike[str] | None = None) -> str:
    """``docker/constraints.txt`` from the installed versions: :data:`SERVE_VENV_ONLY` from the serve venv's (``serve``).

    Raises:
        metadata.PackageNotFoundError: If a constrained package is not installed here.
        RuntimeError: If the serve venv cannot be asked (:func:`installed_versions`).
    """
    lines = [
        "# Generated from the tested venvs by `python -m imgpipe.containers.catalog constraints > docker/constraints.txt`",
        "# (kserve, fastapi, starlette: the serve venv's, make test's .venv/serve). Every image installs imgpipe with",
        "# `pip install -c docker/constraints.txt .`; tests/test_docker.py checks that these pins are the versions the tests ran with.",
    ]
    serve_only = [name for name in packages if name in SERVE_VENV_ONLY]
    versions = installed_versions([name for name in packages if name not in SERVE_VENV_ONLY])
    if serve_only:
        versions |= installed_versions(serve_only, serve_python() if serve is None else serve)
    for name in sorted(packages, key=_canonical):
        lines.append(f"{_canonical(name)}=={versions[name]}")
    return "\n".join(lines) + "\n"


def listing(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per kind: kind, image name, what runs in it (tab-separated)."""
    return [f"{kind}\t{image(kind, environ)}\t{what}" for kind, what in KINDS.items()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imgpipe.containers.catalog {list,constraints}`` (building: ``imgpipe images build``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imgpipe.containers.catalog", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print kind, image name and what runs in it")
    sub.add_parser("constraints", help="print docker/constraints.txt from this venv and the serve venv ($IMGPIPE_SERVE_PYTHON)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(listing()))
        return 0
    sys.stdout.write(constraints())
    return 0


if __name__ == "__main__":
    sys.exit(main())
