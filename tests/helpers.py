"""Test helpers that build committed step outputs directly through the contract, and the download step's sources."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe import contract, resources, storage
from imgpipe import step_table as registry
from imgpipe.clean.config import CleanConfig
from imgpipe.config import config_from_dict
from imgpipe.resize.config import ResizeConfig
from imgpipe.steps.clean import clean
from imgpipe.steps.download import SHARD_SCHEMA, DownloadConfig
from imgpipe.writer import OutputWriter
from tests import imagefactory as f


def write_download_output(dest: str, members: Mapping[str, bytes], row_group_rows: int = 4, shards: int = 2) -> str:
    """Commits a download-shaped output (path, bytes, size, sha256) holding ``members``."""
    items = list(members.items())
    out = OutputWriter(dest, "download")
    out.begin()
    per = max(1, -(-len(items) // shards))
    for k in range(0, len(items), per):
        chunk = items[k : k + per]
        table = pa.table(
            {
                "path": [p for p, _ in chunk],
                "bytes": pa.array([b for _, b in chunk], pa.binary()),
                "size": pa.array([len(b) for _, b in chunk], pa.int64()),
                "sha256": [hashlib.sha256(b).hexdigest() for _, b in chunk],
            }
        )
        out.write_table(f"part-{k // per:05d}.parquet", table, row_group_size=row_group_rows)
    out.commit(inputs=len(items), rejects=[], config={"generated_by": "tests"})
    return out.dest


def as_legacy_layout(dest: str) -> str:
    """Moves a committed output's side files to where earlier versions wrote them (``manifest.json`` beside the data)."""
    for name, legacy in contract.LEGACY_NAMES.items():
        uri = storage.join(dest, name)
        if storage.exists(uri):
            storage.write_bytes(storage.join(dest, legacy), storage.read_bytes(uri))
            storage.delete(uri)
    assert not any(contract.META_DIR in o.uri for o in storage.list_objects(dest))
    return dest


# --------------------------------------------------------------------------- the download step's sources and outputs

IMAGES = {
    "cats/a.jpg": b"\xff\xd8cat-a" * 50,
    "cats/b.jpg": b"\xff\xd8cat-b" * 70,
    "dogs/c.png": b"\x89PNGdog-c" * 30,
    "dogs/d.jpg": b"\xff\xd8dog-d" * 90,
    "e.jpg": b"\xff\xd8e" * 10,
}
# Small shards and row groups so a handful of members exercise sharding and parallel writes.
FAST = DownloadConfig(shard_bytes=1500, row_group_rows=2, write_workers=2, backoff_s=0.01, timeout_s=5.0)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _add_special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``members`` (name -> bytes), in memory: a WebDataset shard, a nested archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            _add_file(tf, name, data)
    return buf.getvalue()


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", prefix: str = "./") -> Path:
    """A tar archive with a directory entry and the files under ``prefix`` (tar's own ``./``)."""
    with tarfile.open(path, mode) as tf:
        _add_special(tf, prefix + "cats", tarfile.DIRTYPE)
        for name, data in files.items():
            _add_file(tf, prefix + name, data)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cats/", b"")  # a directory entry: not an input
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_rows(dest: str) -> dict[str, dict]:
    """Every output row by path, read through the manifest; asserts paths are unique."""
    rows: dict[str, dict] = {}
    for uri in contract.data_files(dest):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        assert table.schema.equals(SHARD_SCHEMA)
        for row in table.to_pylist():
            assert row["path"] not in rows, f"duplicate row {row['path']}"
            rows[row["path"]] = row
    return rows


def rejects_by_path(dest: str) -> dict[str, tuple[str, str]]:
    table = contract.read_rejects(dest)
    return {r["path"]: (r["reason"], r["detail"]) for r in table.to_pylist()}


def assert_rows_match(dest: str, expected: dict[str, bytes]) -> None:
    rows = read_rows(dest)
    assert sorted(rows) == sorted(expected)
    for path, data in expected.items():
        assert rows[path]["bytes"] == data
        assert rows[path]["size"] == len(data)
        assert rows[path]["sha256"] == _sha(data)


def object_names(dest: str) -> list[str]:
    base = storage.normalize_uri(dest).rstrip("/") + "/"
    return [o.uri[len(base) :] for o in storage.list_objects(dest)]


# The cloud metadata ranges, spelled out here rather than taken from imgpipe.data.sources: the
# guard must hold even when the code under test gets them wrong.
_METADATA_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"))


def forbid_metadata_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Makes every socket connection to a link-local (cloud metadata) address fail the test.

    Patches ``socket.socket.connect``/``connect_ex``, which every Python HTTP client ends
    in, so a bug cannot send a request off the machine: the attempt raises AssertionError
    (not OSError, which a retry loop would swallow) and is recorded in the returned list.
    """
    attempts: list[object] = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(address: object) -> None:
        if isinstance(address, tuple) and _is_metadata(str(address[0])):
            attempts.append(address)
            raise AssertionError(f"the test tried to connect to {address}, a cloud metadata address")

    def guarded_connect(sock: socket.socket, address: object) -> None:
        refuse(address)
        return connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: object) -> int:
        refuse(address)
        return connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    return attempts


def _is_metadata(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _METADATA_NETWORKS)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return resources.free_port()


def torchrun_two_ranks(script: Path, tmp_path: Path, timeout: float) -> list[dict]:
    """Runs ``script`` on 2 CPU ranks with torchrun (gloo, loopback); returns each rank's ``rank{r}.json``.

    The script writes ``{tmp_path}/rank{rank}.json``; a failed run fails the test with its stderr.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


# --------------------------------------------------------------------------- the resize step's input: a small clean output

CLASSES = ["Abyssinian", "beagle", "Persian"]


def clean_members() -> dict[str, bytes]:
    """Small, varied inputs: sizes, an extreme aspect ratio, grey, PNG, EXIF-rotated."""
    members = {f"images/{name}_{i}.jpg": f.jpeg(60 + 7 * i, 40 + 5 * c, seed=10 * c + i) for c, name in enumerate(CLASSES) for i in range(1, 7)}
    members["images/beagle_20.jpg"] = f.encode(f.photo(600, 40, seed=20), "JPEG", quality=90)
    members["images/Persian_21.jpg"] = f.grayscale_jpeg(21)
    members["images/Persian_22.png"] = f.png_in_jpg(22)
    members["images/Abyssinian_23.jpg"] = f.exif_rotated_jpeg(6, seed=23)
    members["images/Abyssinian_24.jpg"] = f.encode(f.photo(1200, 900, seed=24), "JPEG", quality=90)
    return members


def build_clean(root: str) -> str:
    download = write_download_output(storage.join(root, "download"), clean_members())
    dest = storage.join(root, "clean")
    report = clean(download, dest, CleanConfig(workers=1, seed=3, rows_per_shard=8, row_group_rows=4))
    assert report.rejected == 0 and report.outputs == len(clean_members())
    return dest


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


# --------------------------------------------------------------------------- a step job: its entrypoint, and the output its driver commits


def parse_entrypoint(entrypoint: str) -> tuple[str, str, str, ResizeConfig]:
    """What the job's ``python -m imgpipe.remote`` makes of an entrypoint: step, source, dest, config."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "imgpipe.remote"], entrypoint
    step, text = argv[3:]
    body = json.loads(text)
    return step, body["source"], body["dest"], config_from_dict(registry.step(step).config_class(), body["config"])


def commit_like_the_job(entrypoint: str) -> None:
    """Does what the job's driver would: a committed resize output with the entrypoint's config."""
    step, source, dest, cfg = parse_entrypoint(entrypoint)
    out = OutputWriter(dest, step)
    out.begin()
    out.commit(inputs=0, rejects=[], config=cfg, upstream={"source": storage.normalize_uri(source)})


def resident_mapped_kib(under: Path) -> tuple[int, int]:
    """Files under ``under`` this process has mapped, and the KiB of their pages resident in it (the kernel's ``/proc/self/smaps``)."""
    files, kib, inside = set(), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            name = line.split()[-1] if len(line.split()) >= 6 else ""
            inside = name.startswith(str(under))
            if inside:
                files.add(name)
        elif inside and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return len(files), kib


def deploy_guide() -> str:
    """The whole cluster guide: docs/deploy.md and its parts in docs/deploy/, as one text."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    return "\n".join(p.read_text() for p in [docs / "deploy.md", *sorted((docs / "deploy").glob("*.md"))])


def ir_dags(ir: Mapping) -> list[dict]:
    """Every DAG of a compiled pipeline's IR: the root's, then each condition's and loop's."""
    return [ir["root"]["dag"], *(c["dag"] for c in ir["components"].values() if "dag" in c)]
