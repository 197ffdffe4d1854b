"""Test helpers that build committed step outputs directly through the contract."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pytest

from imgpipe import contract, resources, storage
from imgpipe.writer import OutputWriter


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
