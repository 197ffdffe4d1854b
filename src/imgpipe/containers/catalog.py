"""The container images of the steps: names, kinds and pins in one place.

Three kinds, all built from ``docker/Dockerfile`` with ``--build-arg KIND=<kind>``, each
installing ``imgpipe[<kind>]`` (the extras in ``pyproject.toml`` follow what the steps
of that image import):

* ``cpu``: download, clean, and ``imgpipe compile``/``submit`` (no torch, no Ray),
* ``ray``: resize on Ray Data, also the image of KubeRay clusters (no torch),
* ``gpu``: train on CUDA (torch's CUDA wheels from the package index).

An image is ``{registry}/imgpipe-{kind}:{tag}``. The environment overrides it when
the pipeline is compiled (``imgpipe compile``/``submit``): ``IMGPIPE_REGISTRY``,
``IMGPIPE_IMAGE_TAG``, or a whole name per kind in ``IMGPIPE_CPU_IMAGE``,
``IMGPIPE_RAY_IMAGE``, ``IMGPIPE_GPU_IMAGE``. ``make images`` (``imgpipe images build``,
:mod:`imgpipe.containers.build`) builds and tags the same names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata

import imgpipe

__all__ = [
    "KINDS",
    "DOCKERFILE",
    "DEFAULT_REGISTRY",
    "CONSTRAINED",
    "ImageSet",
    "image",
    "images",
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
}
# The packages whose versions docker/constraints.txt pins to the tested venv's: the
# direct dependencies and the transitive ones whose drift has broken us or kfp.
CONSTRAINED = (
    "albumentations",
    "boto3",
    "botocore",
    "docker",
    "kfp",
    "kfp-kubernetes",
    "kfp-pipeline-spec",
    "kfp-server-api",
    "kornia",
    "kubernetes",
    "matplotlib",
    "numpy",
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
    "torch",
    "torchvision",
    "tqdm",
    "urllib3",
)


def image(kind: str, environ: Mapping[str, str] | None = None) -> str:
    """The image name of ``kind`` (``cpu``, ``ray``, ``gpu``), with environment overrides.

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
    """The three images one compiled pipeline uses."""

    cpu: str
    ray: str
    gpu: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ImageSet:
        """Reads the names now (at compile time), with the environment's overrides."""
        return cls(**{kind: image(kind, environ) for kind in KINDS})


def images(environ: Mapping[str, str] | None = None) -> ImageSet:
    """Shorthand for :meth:`ImageSet.from_env`."""
    return ImageSet.from_env(environ)


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def constraints(packages: Sequence[str] = CONSTRAINED) -> str:
    """``docker/constraints.txt`` from the installed versions (local labels such as ``+cu132`` dropped).

    Raises:
        metadata.PackageNotFoundError: If a constrained package is not installed here.
    """
    lines = [
        "# Generated from the tested venv by `python -m imgpipe.containers.catalog constraints > docker/constraints.txt`.",
        "# Every image installs imgpipe with `pip install -c docker/constraints.txt .`; tests/test_docker.py",
        "# checks that these pins are the versions the test suite ran with.",
    ]
    for name in sorted(packages, key=_canonical):
        version = metadata.version(name).split("+", 1)[0]
        lines.append(f"{_canonical(name)}=={version}")
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
    sub.add_parser("constraints", help="print docker/constraints.txt from this environment")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(listing()))
        return 0
    sys.stdout.write(constraints())
    return 0


if __name__ == "__main__":
    sys.exit(main())
