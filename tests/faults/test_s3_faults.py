"""S3 that throttles, resets connections and stalls: the outputs are byte-identical anyway."""

from __future__ import annotations

import pytest

from tests.faults.conftest import Runner
from tests.faults.pipeline import STEPS, Layout, fingerprint, make_source, run_all
from tests.faults.s3proxy import NAMESPACE_PREFIX, FaultProxy, prefix_policy

FAULT_RATE = 0.10
SEED = 1234


@pytest.mark.ray
def test_every_step_through_a_faulty_s3_matches_a_fault_free_run(s3_endpoint, s3_bucket, figures):
    clean_run = Layout(f"{s3_bucket}/fault-free")
    # Below a profile's prefix, through the SeaweedFS 4.00 policy: faults and the policy at once.
    faulty_run = Layout(f"{s3_bucket}/{NAMESPACE_PREFIX}faulty")
    direct = Runner(s3_endpoint)
    make_source(direct, clean_run)
    make_source(direct, faulty_run)
    baseline_seconds = run_all(direct, clean_run)

    policy = prefix_policy(s3_bucket)
    with FaultProxy(s3_endpoint, rate=FAULT_RATE, seed=SEED, stall_s=1.0, policy=policy) as proxy:
        faulty_seconds = run_all(Runner(proxy.endpoint), faulty_run)
        stats = proxy.stats.as_dict()

    for step in STEPS:
        assert fingerprint(faulty_run.prefix(step)) == fingerprint(clean_run.prefix(step)), step
    assert stats["faults"] >= 0.05 * stats["requests"], stats
    assert stats["retries"] >= stats["faults_slowdown"] + stats["faults_reset"] - 2, "every faulted request was retried"
    assert stats["denied_outside_prefix"] == 0, stats
    figures.update(
        policy="seaweedfs-4.00",
        fault_rate=FAULT_RATE,
        seed=SEED,
        **stats,
        seconds_fault_free={k: round(v, 1) for k, v in baseline_seconds.items()},
        seconds_with_faults={k: round(v, 1) for k, v in faulty_seconds.items()},
        identical_steps=list(STEPS),
    )
