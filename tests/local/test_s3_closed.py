"""The local object store is its user's alone: no port or socket its ``weed server`` opened gives another
local user an object or takes one without the key, and its data directory and keys are closed to them.

The tries are another local user's (tests/kfp/intruder.py, run as ``nobody`` where the tests run as
root): at every TCP address and unix socket the store's own process listens on, found from /proc by its
pid, never a port named in advance. Each kind of try is also made with the store's keys, to show that
it would have seen an open door. Everything is the test's own store, in its own temporary directory.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgpipe import storage
from imgpipe.local.s3 import IDENTITIES, seaweedfs_server
from imgpipe.local.s3_security import SECURITY_TOML, StoreKeys
from tests.kfp import intruder

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's sockets from /proc")

BUCKET, KEY = "closed-bucket", "secret/object"
INTRUDER = Path(intruder.__file__)
# weed 4.48 writes a volume's .vif (its format version and replication, no object data) 0644
# whatever the umask; the 0700 data directory keeps it from other users.
WORLD_READABLE_BY_WEED = (".vif",)


@dataclass(frozen=True)
class Store:
    data: Path
    pid: int
    options: dict[str, str]
    keys: StoreKeys
    payload: bytes
    fids: list[str]
    admin_secret: str


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store that was started, written to and stopped with its files left open (as a store from before this rule),
    then started again: the one the tests try."""
    base = tmp_path_factory.mktemp("closed")
    # A parent every user may pass through, as a home directory often is: only the store's own modes keep them out.
    data = base / "open" / "store"
    data.parent.mkdir()
    data.parent.chmod(0o755)
    (data.parent / "canary").write_bytes(b"anyone may read this")
    (data.parent / "canary").chmod(0o644)
    with seaweedfs_server(data):
        storage.s3_client().create_bucket(Bucket=BUCKET)
    for path in [data, *data.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    payload = os.urandom(256 * 1024)
    with seaweedfs_server(data) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        storage.s3_client().put_object(Bucket=BUCKET, Key=KEY, Body=payload)
        pid = _weed_pid(data)
        options = _options(pid)
        private = Path(options["config_dir"])
        keys = StoreKeys(private, private / "ca.pem", private / "weed.pem", private / "weed.key")
        secret = json.loads((data / IDENTITIES).read_text())["identities"][0]["credentials"][0]["secretKey"]
        yield Store(data, pid, options, keys, payload, _chunk_fids(options, keys), secret)


def test_the_store_listens_only_where_it_was_told(store):
    """Each TCP port is one of the ports it was given, on 127.0.0.1; each unix socket is in its private
    directory or one of the gRPC sockets weed names by its ports in /tmp."""
    tcp, unix = _listening(store.pid)
    given = {int(v) for k, v in store.options.items() if ".port" in k and int(v) != 0}
    assert {port for _, port in tcp} == given
    assert {host for host, _ in tcp} == {"127.0.0.1"}
    private = store.keys.config_dir
    grpc_in_tmp = {f"/tmp/seaweedfs-{k.split('.')[0]}-grpc-{v}.sock" for k, v in store.options.items() if k.endswith(".port.grpc")}
    assert set(unix) <= {str(private / "filer.sock"), str(private / "s3.sock"), *grpc_in_tmp}, unix
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def test_no_port_gives_or_takes_an_object_without_the_key(store):
    tcp, _ = _listening(store.pid)
    plan = {"tcp": tcp, "unix_sockets": [], "bucket": BUCKET, "key": KEY, "fids": store.fids}
    found = _run_intruder(plan)
    assert len(found) > len(tcp) * 20, "every try was made"
    assert [f for f in found if f["got_in"]] == []
    leaked = [f for f in found if store.admin_secret in f["detail"] or "written by another" in f["detail"]]
    assert leaked == []
    # Nothing the intruder sent was stored.
    listed = storage.s3_client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert [o["Key"] for o in listed] == [KEY]

    # With the keys, the same tries get in: the probes see an open door where there is one.
    ports = {k: int(v) for k, v in store.options.items() if ".port" in k}
    tls = store.keys.client_context
    for name, port in ports.items():
        if name.endswith(".port.grpc"):
            assert intruder.h2_answers("127.0.0.1", port, tls()), f"{name} speaks gRPC to the key's holder"
    fid = store.fids[0]
    volume = intruder.http_try("127.0.0.1", ports["volume.port"], "GET", f"/{fid}", tls=tls(), headers=_bearer(store, "jwt.signing.read", fid=fid))
    assert isinstance(volume, tuple) and volume[0] == 200 and volume[1] in store.payload, volume
    filer = intruder.http_try(
        "127.0.0.1", ports["filer.port"], "GET", f"/buckets/{BUCKET}/{KEY}", tls=tls(), headers=_bearer(store, "jwt.filer_signing.read")
    )
    assert filer == (200, store.payload)
    assign = intruder.http_try("127.0.0.1", ports["master.port"], "GET", "/dir/assign", tls=tls())
    assert isinstance(assign, tuple) and assign[0] == 200 and b'"fid"' in assign[1], assign


def test_its_sockets_and_files_are_closed_to_other_users(store):
    other = _other_user()
    if other is None:
        pytest.skip("trying as another user needs root and a python3 that user may run")
    _, unix = _listening(store.pid)
    assert unix, "weed listens on unix sockets (its gRPC ones at least)"
    # The files, by a path through the open parent (a directory fd passed to the intruder, so the
    # test's own temporary directories above it stay out of the way): as another user would name them.
    parent = os.open(store.data.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        via = f"/proc/self/fd/{parent}"
        files = [f"{via}/{p.relative_to(store.data.parent)}" for p in store.data.rglob("*") if p.is_file()]
        plan = {
            "tcp": [],
            "unix_sockets": unix,
            "files": [f"{via}/canary", *files],
            "directories": [f"{via}/store", str(store.keys.config_dir)],
        }
        found = _run_intruder(plan, other, pass_fds=(parent,))
    finally:
        os.close(parent)
    assert found[len(unix)] == {"where": f"{via}/canary", "what": "read", "got_in": True, "detail": ""}, "the intruder reads what anyone may"
    assert [f for f in found if f["got_in"] and not f["where"].endswith("/canary")] == []
    assert all(intruder.unix_connects(path) for path in unix), "the store's user reaches each socket"


def test_the_data_directory_and_the_files_with_keys_are_the_users_alone(store):
    """Modes: made so by the start (the store's first run left them 0644/0755), and kept so for what weed writes."""
    assert stat.S_IMODE(store.data.stat().st_mode) == 0o700
    open_to_others = [
        f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p.relative_to(store.data)}"
        for p in store.data.rglob("*")
        if stat.S_IMODE(p.lstat().st_mode) & 0o077 and p.suffix not in WORLD_READABLE_BY_WEED
    ]
    assert open_to_others == []
    assert list(store.data.glob("*.dat")), "the store holds volumes"
    private = store.keys.config_dir
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    for name in (SECURITY_TOML, "ca.pem", "weed.pem", "weed.key"):
        assert stat.S_IMODE((private / name).stat().st_mode) == 0o600, name
    weed_files = [p for p in private.iterdir() if p.is_file() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert weed_files == [], "what weed writes in its TMPDIR (its logs) is the user's alone"


# ---- what the store's process opened, and the intruder run ----


def _weed_pid(data: Path) -> int:
    """The ``weed server`` over ``data``, a child of this process (found by its arguments, not by name alone)."""
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode().split("\0")
        if "server" in args and f"-dir={data}" in args:
            return pid
    raise AssertionError(f"no weed server over {data} among this process's children {children}")


def _options(pid: int) -> dict[str, str]:
    args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return dict(a.lstrip("-").split("=", 1) for a in args if a.startswith("-") and "=" in a)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (host-order 32-bit words, in hex)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(struct.pack("=I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _listening(pid: int) -> tuple[list[tuple[str, int]], list[str]]:
    """The TCP addresses (``(host, port)``; a wildcard one as loopback) and unix socket paths ``pid`` listens on."""
    inodes = _socket_inodes(pid)
    tcp: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # TCP_LISTEN
                host, port = fields[1].split(":")
                address = _address(host)
                tcp.add(({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address), int(port, 16)))
    unix = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in inodes and int(fields[3], 16) & 0x10000 and len(fields) > 7:  # __SO_ACCEPTCON: listening
            unix.add(fields[7])
    return sorted(tcp), sorted(unix)


def _chunk_fids(options: dict[str, str], keys: StoreKeys) -> list[str]:
    """The volume file ids of the object's chunks, from the filer's metadata (asked with the keys)."""
    port = int(options["filer.port"])
    for _ in range(50):  # the filer's entry follows the S3 answer within a moment
        answer = intruder.http_try(
            "127.0.0.1",
            port,
            "GET",
            f"/buckets/{BUCKET}/{KEY}?metadata=true",
            tls=keys.client_context(),
            headers=_bearer_from(keys, "jwt.filer_signing.read"),
        )
        if isinstance(answer, tuple) and answer[0] == 200:
            chunks = json.loads(answer[1]).get("chunks") or []
            fids = [c.get("file_id") or c.get("fileId") for c in chunks]
            if fids and all(fids):
                return fids
        time.sleep(0.1)
    raise AssertionError(f"no chunks for {KEY} in the filer: {answer}")


def _bearer(store: Store, section: str, **claims: str) -> dict[str, str]:
    return _bearer_from(store.keys, section, **claims)


def _bearer_from(keys: StoreKeys, section: str, **claims: str) -> dict[str, str]:
    """An ``Authorization`` header with an HS256 token signed by the key of ``section`` in the start's security.toml."""
    toml = (keys.config_dir / SECURITY_TOML).read_text()
    key = re.search(rf'^\[{re.escape(section)}\]\nkey = "([^"]+)"', toml, re.M).group(1)

    def part(doc: dict) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=")

    head = part({"alg": "HS256", "typ": "JWT"}) + b"." + part({**claims, "exp": int(time.time()) + 60})
    signature = base64.urlsafe_b64encode(hmac.new(key.encode(), head, hashlib.sha256).digest()).rstrip(b"=")
    return {"Authorization": "Bearer " + (head + b"." + signature).decode()}


def _other_user() -> tuple[int, int, str] | None:
    """``nobody``'s uid and gid and a python3 it may run, where this process may become it."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None
    for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if python and _runs_as(python, nobody.pw_uid, nobody.pw_gid):
            return nobody.pw_uid, nobody.pw_gid, python
    return None


def _runs_as(python: str, uid: int, gid: int) -> bool:
    try:
        done = subprocess.run(
            [python, "-c", "import http.client, ssl"], user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, timeout=30
        )
    except OSError:
        return False
    return done.returncode == 0


def _run_intruder(plan: dict, other: tuple[int, int, str] | None = None, pass_fds: tuple[int, ...] = ()) -> list[dict]:
    """The intruder's findings: run as ``other`` (given, or found), else by this process (TCP tries only: a TCP server
    cannot tell one local user from another, so only the missing key makes them another user's)."""
    other = other or _other_user()
    source = INTRUDER.read_text()  # given on the command line: the intruder may not read the test's tree
    if other is None:
        assert not plan["unix_sockets"] and not plan.get("files"), "tries that the kernel judges by user need another user"
        return intruder.attack(plan)
    uid, gid, python = other
    done = subprocess.run(
        [python, "-c", source],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
        pass_fds=pass_fds,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_intruder_reads_only_loopback_addresses():
    with pytest.raises(ValueError, match="not a loopback address"):
        intruder.attack({"tcp": [["192.0.2.1", 80]], "unix_sockets": [], "bucket": BUCKET, "key": KEY, "fids": ["1,01"]})
