"""The local object store: SeaweedFS (`weed server -s3`) on 127.0.0.1, as `imgpipe run` and the tests start it."""

from __future__ import annotations

import os
import stat

import boto3
import pytest
from botocore.exceptions import ClientError

from imgpipe import storage
from imgpipe.kfp.local_s3 import ADMIN_USER, IDENTITIES, S3Identity, local_s3_server, seaweedfs_server, weed_binary


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
