"""The container images of the steps: names and tags in one place.

Three kinds, one Dockerfile each in ``docker/``:

* ``cpu``: download and clean (``docker/cpu.Dockerfile``),
* ``ray``: resize on Ray Data, also the image of KubeRay clusters (``docker/ray.Dockerfile``),
* ``gpu``: train on CUDA (``docker/gpu.Dockerfile``).

An image is ``{registry}/imgpipe-{kind}:{tag}``. The environment overrides it when
the pipeline is compiled (``imgpipe compile``/``submit``): ``IMGPIPE_REGISTRY``,
``IMGPIPE_IMAGE_TAG``, or a whole name per kind in ``IMGPIPE_CPU_IMAGE``,
``IMGPIPE_RAY_IMAGE``, ``IMGPIPE_GPU_IMAGE``. ``make images`` builds and tags the same
names (``python -m components.images build``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import imgpipe

__all__ = [
    "KINDS",
    "DEFAULT_REGISTRY",
    "CONSTRAINED",
    "ImageSet",
    "image",
    "images",
    "build_commands",
    "constraints",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = "ghcr.io/imgpipe"
# kind -> Dockerfile, relative to the repository root (the build context).
KINDS: dict[str, str] = {
    "cpu": "docker/cpu.Dockerfile",
    "ray": "docker/ray.Dockerfile",
    "gpu": "docker/gpu.Dockerfile",
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
    "pillow",
    "protobuf",
    "pyarrow",
    "pyyaml",
    "ray",
    "requests",
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


def build_commands(
    kinds: Sequence[str] = tuple(KINDS), *, push: bool = False, environ: Mapping[str, str] | None = None
) -> list[list[str]]:
    """The ``docker`` commands that build (and optionally push) each image from the repo root."""
    commands = []
    for kind in kinds:
        name = image(kind, environ)
        commands.append(["docker", "build", "--file", KINDS[kind], "--tag", name, "."])
        if push:
            commands.append(["docker", "push", name])
    return commands


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def constraints(packages: Sequence[str] = CONSTRAINED) -> str:
    """``docker/constraints.txt`` from the installed versions (local labels such as ``+cu132`` dropped).

    Raises:
        metadata.PackageNotFoundError: If a constrained package is not installed here.
    """
    lines = [
        "# Generated from the tested venv by `python -m components.images constraints > docker/constraints.txt`.",
        "# Every image installs imgpipe with `pip install -c docker/constraints.txt .`; tests/test_docker.py",
        "# checks that these pins are the versions the test suite ran with.",
    ]
    for name in sorted(packages, key=_canonical):
        version = metadata.version(name).split("+", 1)[0]
        lines.append(f"{_canonical(name)}=={version}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m components.images {list,build,constraints}``."""
    parser = argparse.ArgumentParser(prog="python -m components.images", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print kind, Dockerfile and image name of each image")
    b = sub.add_parser("build", help="docker build (and push) the images, from the repository root")
    b.add_argument("kinds", nargs="*", metavar="KIND", help=f"which images (default: all of {', '.join(KINDS)})")
    b.add_argument("--push", action="store_true", help="push after building")
    b.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    sub.add_parser("constraints", help="print docker/constraints.txt from this environment")
    args = parser.parse_args(argv)
    if args.command == "list":
        for kind, dockerfile in KINDS.items():
            print(f"{kind}\t{dockerfile}\t{image(kind)}")
        return 0
    if args.command == "constraints":
        sys.stdout.write(constraints())
        return 0
    for command in build_commands(args.kinds or list(KINDS), push=args.push):
        print("+", shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
