"""Clean's decode pool: sized by the memory limit; a killed or hung decoder costs one image, a killed step leaves no worker."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from imgpipe import contract, resources
from imgpipe.clean import decode as clean_decode
from imgpipe.clean import pool as clean_pool
from imgpipe.clean.config import CleanConfig
from imgpipe.data.images import decode_bytes
from imgpipe.steps.clean import clean
from tests import imagefactory as f
from tests.helpers import write_download_output
from tests.steps.conftest import good_members, read_output


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren: a forkserver's workers too)."""
    import os

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parents[int(entry)] = int(fields[1])
            except OSError:
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_pool_workers_exit_when_clean_is_killed(tmp_path, backend, request):
    """``kill -9`` of ``imgpipe clean`` while its pool decodes: no worker may outlive it (fork and forkserver)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = "file://" + str(tmp_path / "store") if backend == "file" else request.getfixturevalue("s3_bucket") + "/kill"
    # Seconds of decoding after the pool starts, however fast the rest of the step gets:
    # exact copies are rejected only after their full decode, so few pictures suffice, and
    # CMYK ones take Pillow's decode and a re-encode (a plain JPEG's reduced decode is too quick).
    pictures = [f.encode(f.photo(640, 480, seed=i).convert("CMYK"), "JPEG", quality=90) for i in range(8)]
    members = {f"images/Abyssinian_{i}.jpg": pictures[i % 8] for i in range(1000)}
    source = write_download_output(f"{root}/download", members, row_group_rows=8, shards=4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgpipe.cli", "clean", source, f"{root}/clean", "--workers", "2"],
        # A step killed with SIGKILL cannot remove its scratch folder: keep it in tmp_path.
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 60
        while len(workers := _descendants(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the pool never started"
            time.sleep(0.05)
        time.sleep(0.5)  # decoding under way
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while (left := {p for p in workers if _running(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid in left}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"{len(left)} pool process(es) outlived the killed step: {names}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not contract.is_committed(f"{root}/clean")


# ----------------------------------------------------------------------------------------
# Memory: workers and a per-image budget from the memory limit; a killed decoder costs one image.


@pytest.mark.parametrize("memory", [None, 64 << 20, 1 << 30, 700 << 20, 64 << 30])
def test_decode_pool_fits_the_memory(memory):
    pool = clean_pool.decode_pool(8, memory)
    if memory is None:
        assert (pool.workers, pool.max_decode_bytes) == (8, None)
        return
    usable = memory * (1 - clean_pool._MEMORY_HEADROOM)
    per_worker = clean_pool._WORKER_BASE_BYTES + clean_pool._MIN_IMAGE_BYTES
    assert 1 <= pool.workers <= 8 and pool.memory == memory
    assert pool.workers == 1 or pool.workers * per_worker <= usable
    assert pool.workers == 8 or (pool.workers + 1) * per_worker > usable, "as many as the memory holds"
    share = int(usable) // pool.workers
    # Each image gets the worker's share less its base, or half the share when that is less.
    assert pool.max_decode_bytes == max(share - clean_pool._WORKER_BASE_BYTES, share // 2)
    assert memory < 1 << 30 or pool.max_decode_bytes >= clean_pool._MIN_IMAGE_BYTES


def test_memory_limit_caps_workers_and_rejects_an_image_over_its_budget(tmp_path, monkeypatch):
    members = good_members(2)
    members["images/beagle_50.png"] = f.png_bomb(4000)  # 16 MP: 160 MB to decode as RGB
    need = decode_bytes(Image.open(io.BytesIO(members["images/beagle_50.png"])))
    src = write_download_output(str(tmp_path / "dl"), members, row_group_rows=2)
    monkeypatch.setattr(resources, "available_cpus", lambda root=None: 8)
    monkeypatch.setattr(resources, "memory_limit", lambda root=None: 700 << 20)
    dest = str(tmp_path / "clean")
    report = clean(src, dest, CleanConfig(min_images_per_split=0))  # six images: no val split
    pool = report.extra["decode_pool"]
    assert pool == contract.read_manifest(dest)["extra"]["decode_pool"]
    assert pool["memory"] == 700 << 20 and pool["workers"] == 2, "8 CPUs, but memory for 2 workers"
    assert clean_pool._MIN_IMAGE_BYTES <= pool["max_decode_bytes"] < need
    (reject,) = contract.read_rejects(dest).to_pylist()
    assert (reject["path"], reject["reason"]) == ("images/beagle_50.png", "too_large")
    assert f"({pool['max_decode_bytes']} bytes)" in reject["detail"]
    assert report.inputs == len(members) == report.outputs + 1


def _kill_when_decoding(monkeypatch, victims: list[bytes], once_flag: Path | None = None) -> None:
    """Makes a pool worker SIGKILL itself when it decodes a victim (as the OOM killer would).

    With ``once_flag``, only the first time. Never in the test's own process.
    """
    test_pid, real = os.getpid(), clean_decode.validate_and_normalize

    def decode(data, **kwargs):
        if data in victims and os.getpid() != test_pid and not (once_flag and once_flag.exists()):
            if once_flag:
                once_flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, **kwargs)

    monkeypatch.setattr(clean_decode, "validate_and_normalize", decode)


@pytest.mark.parametrize("again", [True, False], ids=["dies-again-alone", "dies-once"])
def test_a_killed_decoder_costs_one_image_not_the_step(tmp_path, monkeypatch, again):
    members = good_members(4)
    # Two victims in different row groups (tasks), when each dies again; one when not.
    victims = ["images/Bengal_1.jpg", "images/Siamese_3.jpg"] if again else ["images/Siamese_3.jpg"]
    src = write_download_output(str(tmp_path / "dl"), members, row_group_rows=2)
    once = None if again else tmp_path / "killed-once"
    _kill_when_decoding(monkeypatch, [members[v] for v in victims], once)
    before = _descendants(os.getpid())
    dest = str(tmp_path / "clean")
    report = clean(src, dest, CleanConfig(workers=2))

    assert contract.is_committed(dest)
    assert report.inputs == len(members) == report.outputs + report.rejected
    rejects = contract.read_rejects(dest).to_pylist()
    kept = read_output(dest).column("path").to_pylist()
    assert sorted(read_output(dest).column("order").to_pylist()) == list(range(len(kept)))
    if again:
        assert sorted((r["path"], r["reason"]) for r in rejects) == [(v, "decoder_killed") for v in victims]
        assert all("SIGKILL" in r["detail"] and "memory" in r["detail"] for r in rejects)
        assert set(kept) == set(members) - set(victims)
    else:
        assert once.exists(), "the worker was killed once"
        assert rejects == [] and set(kept) == set(members)
    deadline = time.monotonic() + 10
    while (left := _descendants(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, "a decode process outlived the step"


def test_workers_dying_outside_any_decode_fail_the_step_after_few_restarts(tmp_path, monkeypatch):
    src = write_download_output(str(tmp_path / "dl"), good_members(2), row_group_rows=2)
    test_pid = os.getpid()

    def die_in_workers(self):
        if os.getpid() != test_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(clean_decode.ShardBuckets, "flush", die_in_workers)
    starts = []
    real_run_pool = clean_pool._run_pool
    monkeypatch.setattr(clean_pool, "_run_pool", lambda *a: starts.append(1) or real_run_pool(*a))
    with pytest.raises(RuntimeError, match="outside (any image|the) decode"):
        clean(src, str(tmp_path / "clean"), CleanConfig(workers=2))
    # A worker the pool ended mid-decode names an image; run alone, it dies outside the decode.
    assert 1 <= len(starts) <= clean_pool._MAX_BARREN_RESTARTS + 1
    assert not contract.is_committed(str(tmp_path / "clean"))


def test_a_decode_that_hangs_costs_one_image_after_the_time_limit(tmp_path, monkeypatch):
    """A decoder stuck on a hostile file (a C loop no signal handler interrupts) is killed from outside."""
    members = good_members(4)
    victim = "images/Siamese_3.jpg"
    src = write_download_output(str(tmp_path / "dl"), members, row_group_rows=2)
    test_pid, real = os.getpid(), clean_decode.validate_and_normalize

    def decode(data, **kwargs):
        if data == members[victim] and os.getpid() != test_pid:
            time.sleep(3600)
        return real(data, **kwargs)

    monkeypatch.setattr(clean_decode, "validate_and_normalize", decode)
    before = _descendants(os.getpid())
    # Without the limit this would hang until pytest's own timeout: the reject proves the kill.
    report = clean(src, str(tmp_path / "clean"), CleanConfig(workers=2, image_timeout_s=0.5))
    rejects = contract.read_rejects(str(tmp_path / "clean")).to_pylist()
    assert [(r["path"], r["reason"]) for r in rejects] == [(victim, "decode_timeout")]
    assert "image_timeout_s=0.5" in rejects[0]["detail"]
    assert report.inputs == len(members) == report.outputs + 1
    deadline = time.monotonic() + 10
    while (left := _descendants(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left


def test_image_timeout_must_not_be_negative():
    with pytest.raises(ValueError, match="image_timeout_s"):
        CleanConfig(image_timeout_s=-1)
