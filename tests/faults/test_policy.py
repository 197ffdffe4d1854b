"""Retries under a per-namespace object-store policy (SeaweedFS 4.00, as KFP 2.15/2.16 install it).

A profile's S3 key may read, write, list and delete single objects below
``mlpipeline/private/<namespace>/``, but SeaweedFS before 4.32 answers ``403
AccessDenied`` to a bulk ``DeleteObjects`` (``tests/faults/s3proxy.py`` says why, with
the upstream source). A retry of any step first clears the prefix its killed attempt
left, so with bulk deletes only every retry failed there. These tests run the claim and
a whole step's rerun through the proxy's policy mode; the kill -9, two-writers and S3
fault tests of ``make test-faults`` run through it as well.
"""

from __future__ import annotations

import threading
import time

import pytest

from imgpipe import commit, contract, storage
from tests.faults.conftest import Runner
from tests.faults.pipeline import Layout, make_source, step_args
from tests.faults.s3proxy import NAMESPACE_PREFIX, FaultProxy, PrefixPolicy, prefix_policy


@pytest.fixture
def policy_store(s3_endpoint, s3_bucket):
    """A policy-mode proxy for the test's bucket; this process's S3 client talks to it."""
    saved = storage.s3._s3_options
    with FaultProxy(s3_endpoint, policy=prefix_policy(s3_bucket)) as proxy:
        storage.configure_s3(endpoint_url=proxy.endpoint)
        storage.s3._bulk_delete_denied.clear()  # each test starts as a fresh process does
        try:
            yield proxy, f"{s3_bucket}/{NAMESPACE_PREFIX}"
        finally:
            storage.configure_s3(**saved.__dict__)
            storage.s3._bulk_delete_denied.clear()


pytestmark = pytest.mark.quick


def test_the_policy_answers_like_seaweedfs_4_00():
    policy = PrefixPolicy("mlpipeline", NAMESPACE_PREFIX)
    assert policy.denies("POST", "/mlpipeline?delete") == "bulk_delete"
    assert policy.denies("POST", "/mlpipeline?delete=") == "bulk_delete"
    assert policy.denies("DELETE", f"/mlpipeline/{NAMESPACE_PREFIX}run/clean/_SUCCESS") is None
    assert policy.denies("PUT", f"/mlpipeline/{NAMESPACE_PREFIX}a") is None
    assert policy.denies("GET", f"/mlpipeline?list-type=2&prefix={NAMESPACE_PREFIX}run%2F") is None
    assert policy.denies("GET", "/mlpipeline?list-type=2&prefix=private%2Fother%2F") == "outside_prefix"
    assert policy.denies("GET", "/mlpipeline/private/other/x") == "outside_prefix"
    assert policy.denies("PUT", "/another-bucket/private/imgpipe-dev/x") == "outside_prefix"


def test_a_retry_clears_the_killed_attempt_one_key_at_a_time(policy_store):
    proxy, root = policy_store
    dest = storage.join(root, "runs", "r1", "clean")
    commit.claim(dest, "clean")  # the first attempt, killed after writing these
    for i in range(25):
        storage.write_bytes(storage.join(dest, f"part-{i:05d}.parquet"), b"x")

    commit.claim(dest, "clean")  # the retry
    assert [o.uri[len(dest.rstrip("/")) + 1 :] for o in storage.list_objects(dest)] == [contract.OWNER]
    assert proxy.stats.denied["bulk_delete"] == 1

    storage.write_bytes(storage.join(dest, "part-00000.parquet"), b"x")
    commit.claim(dest, "clean")  # a third attempt in the same process: no second bulk try
    assert proxy.stats.denied["bulk_delete"] == 1
    assert proxy.stats.denied["outside_prefix"] == 0


def test_train_resume_keeps_its_checkpoint_and_deletes_the_rest_under_the_policy(policy_store):
    proxy, root = policy_store
    dest = storage.join(root, "runs", "r1", "train")
    commit.claim(dest, "train")
    for name in ("checkpoint.pt", "model.pt", "metrics.json"):
        storage.write_bytes(storage.join(dest, name), b"x")
    commit.claim(dest, "train", keep=("checkpoint.pt",))
    assert sorted(o.uri[len(dest.rstrip("/")) + 1 :] for o in storage.list_objects(dest)) == sorted([contract.OWNER, "checkpoint.pt"])
    assert proxy.stats.denied["bulk_delete"] == 1


def test_single_deletes_run_a_bounded_number_at_once(policy_store, monkeypatch):
    _proxy, root = policy_store
    uris = [storage.join(root, "many", f"{i:04d}") for i in range(60)]
    for uri in uris:
        storage.write_bytes(uri, b"")
    client = storage.s3_client()
    real, lock, state = client.delete_object, threading.Lock(), {"now": 0, "most": 0}

    def counting(**kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.01)
            return real(**kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(client, "delete_object", counting)
    assert storage.delete_prefix(storage.join(root, "many")) == 60
    assert storage.list_objects(storage.join(root, "many")) == []
    assert 1 < state["most"] <= storage.s3.DELETE_CONCURRENCY


def test_an_error_other_than_access_denied_still_raises(policy_store, monkeypatch):
    from botocore.exceptions import ClientError

    _proxy, root = policy_store
    storage.write_bytes(storage.join(root, "d", "a"), b"")
    client = storage.s3_client()

    def slow_down(**kwargs):
        raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "DeleteObjects")

    monkeypatch.setattr(client, "delete_objects", slow_down)
    with pytest.raises(ClientError, match="InternalError"):
        storage.delete_prefix(storage.join(root, "d"))
    assert not storage.s3._bulk_delete_denied


def test_a_rerun_of_a_step_process_under_the_policy_replaces_its_output(s3_endpoint, s3_bucket, figures):
    """``imgpipe download`` run twice into one prefix, as a pod retry does, through the policy."""
    layout = Layout(f"{s3_bucket}/{NAMESPACE_PREFIX}rerun")
    with FaultProxy(s3_endpoint, policy=prefix_policy(s3_bucket)) as proxy:
        runner = Runner(proxy.endpoint)
        make_source(runner, layout)
        first = runner.run(*step_args(layout, "download")).check()
        second = runner.run(*step_args(layout, "download")).check()
        stats = proxy.stats.as_dict()
    assert contract.verify_output(layout.prefix("download"))["step"] == "download"
    assert stats["denied_bulk_delete"] == 1, stats  # the rerun's claim; then one key at a time
    assert stats["denied_outside_prefix"] == 0, stats
    figures.update(policy="seaweedfs-4.00", seconds=[round(first.seconds, 1), round(second.seconds, 1)], **stats)
