"""Two attempts of one step writing one prefix at once: exactly one consistent output.

The first attempt is held at its manifest upload (its data files written, its commit
under way) while a second attempt of the same step and prefix starts and claims the
prefix: a KFP retry of a pod that still runs. Then the first is let go.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from imgpipe import contract, storage
from tests.faults.conftest import Runner
from tests.faults.pipeline import STEP_ARGS, STEPS, fingerprint, reference_run
from tests.faults.s3proxy import NAMESPACE_PREFIX, FaultProxy, prefix_policy

OVERTAKEN = "another attempt"


def _attempt(dest: str) -> str | None:
    try:
        return json.loads(storage.read_bytes(storage.join(dest, contract.OWNER)))["attempt"]
    except FileNotFoundError:
        return None


def _wait_for_claim(dest: str, other_than: str | None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _attempt(dest) in (None, other_than):
        assert time.monotonic() < deadline, "the second attempt never claimed the prefix"
        time.sleep(0.05)


@pytest.mark.ray
@pytest.mark.parametrize("policy", [None, "seaweedfs-4.00"])
def test_two_writers_of_each_step_leave_one_consistent_output(s3_endpoint, s3_bucket, figures, policy):
    """With ``policy``, both attempts go through the proxy's policy mode."""
    root = storage.join(s3_bucket, NAMESPACE_PREFIX) if policy else s3_bucket
    runner, reference, _ = reference_run(s3_endpoint, root)
    rows = {}
    with FaultProxy(s3_endpoint, policy=prefix_policy(s3_bucket) if policy else None) as proxy:
        held_runner = Runner(proxy.endpoint, tag=runner.tag)
        if policy:
            runner = held_runner
        for step in STEPS:
            dest = storage.join(root, "two-writers", step)
            args = STEP_ARGS[step](reference.input_of(step), dest)
            proxy.hold(rf"/two-writers/{step}/{re.escape(contract.MANIFEST)}$")
            started = time.monotonic()
            first = held_runner.start(*args)
            assert proxy.held.wait(timeout=600), f"{step}: the first attempt never committed"
            first_attempt = _attempt(dest)
            second = runner.start(*args)
            _wait_for_claim(dest, first_attempt)
            proxy.release()
            a, b = runner.finish(first, started), runner.finish(second, started)
            assert a.returncode != 0 and OVERTAKEN in a.stderr, a.stderr[-2000:]
            assert b.returncode == 0, b.stderr[-2000:]
            assert fingerprint(dest) == fingerprint(reference.prefix(step)), f"{step}: the committed output is whole"
            assert contract.read_manifest(dest)["attempt"] == _attempt(dest) != first_attempt
            assert not runner.wait_no_leftovers()
            rows[step] = {"first_attempt_exit": a.returncode, "second_attempt_exit": b.returncode, "committed_by": "second"}
    figures.update(policy=policy, steps=rows, **proxy.stats.as_dict())
