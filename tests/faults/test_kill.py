"""``kill -9`` of each step at seeded random points, and during its commit, then a rerun."""

from __future__ import annotations

import random
import re
import time

import pytest

from imgpipe import contract, storage
from tests.faults.conftest import Runner, kill_hard
from tests.faults.pipeline import STEP_ARGS, STEPS, fingerprint, reference_run
from tests.faults.s3proxy import NAMESPACE_PREFIX, FaultProxy, prefix_policy

SEED = 9
RANDOM_POINTS = 4  # per step, plus one while the manifest is being written: five in all
# The upload of the step's own manifest: the commit is under way, _SUCCESS not yet written.
COMMIT_REQUEST = "/killed/{step}/" + re.escape(contract.MANIFEST) + "$"


def _check_after_kill(dest: str, reference: dict) -> str:
    """Readers accept the prefix only if the kill came after the commit, and then it is whole."""
    if contract.is_committed(dest):
        assert fingerprint(dest) == reference, "a committed output is complete"
        return "committed"
    with pytest.raises(contract.UncommittedOutputError):
        contract.read_manifest(dest)
    return "refused"


def _rerun_matches(runner: Runner, args: list[str], dest: str, reference: dict) -> None:
    runner.run(*args).check()
    assert fingerprint(dest) == reference


@pytest.mark.ray
@pytest.mark.parametrize("policy", [None, "seaweedfs-4.00"])
def test_kill_9_anywhere_leaves_nothing_readable_half_written(s3_endpoint, s3_bucket, figures, policy):
    """With ``policy``, every kill, rerun and commit goes through the proxy's policy mode."""
    rng = random.Random(SEED)
    root = storage.join(s3_bucket, NAMESPACE_PREFIX) if policy else s3_bucket
    runner, reference, seconds = reference_run(s3_endpoint, root)
    rows = {}
    with FaultProxy(s3_endpoint, policy=prefix_policy(s3_bucket) if policy else None) as proxy:
        via_proxy = Runner(proxy.endpoint, tag=runner.tag)
        if policy:
            runner = via_proxy
        for step in STEPS:
            dest = storage.join(root, "killed", step)
            args = STEP_ARGS[step](reference.input_of(step), dest)
            expected = fingerprint(reference.prefix(step))
            outcomes = []
            for _ in range(RANDOM_POINTS):
                at = rng.uniform(0.2, 1.0) * seconds[step]
                proc = runner.start(*args)
                time.sleep(at)
                kill_hard(proc)
                proc.wait()
                assert not runner.wait_no_leftovers(), f"{step}: processes outlived the kill at {at:.1f} s"
                outcomes.append((round(at, 1), _check_after_kill(dest, expected)))
                _rerun_matches(runner, args, dest, expected)
            proxy.hold(COMMIT_REQUEST.format(step=step))
            proc = via_proxy.start(*args)
            assert proxy.held.wait(timeout=600), f"{step} never wrote its manifest"
            kill_hard(proc)
            proc.wait()
            proxy.release()
            assert not runner.wait_no_leftovers(), f"{step}: processes outlived the kill during commit"
            outcomes.append(("commit", _check_after_kill(dest, expected)))
            _rerun_matches(runner, args, dest, expected)
            rows[step] = {"uninterrupted_s": round(seconds[step], 1), "kills": outcomes}
    figures.update(seed=SEED, policy=policy, steps=rows, leftover_processes=0, **proxy.stats.as_dict())
