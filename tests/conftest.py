"""Shared fixtures: a real S3 API server on 127.0.0.1 and per-test buckets/prefixes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Upstream schemas the manifests are validated against (origin and license: tests/schemas/README.md).
SCHEMAS = ROOT / "tests" / "schemas"

# Ray binds the machine's external interface even when told 127.0.0.1, so tests that start
# Ray run only inside scripts/in-loopback-netns (which `make test` uses), or where that
# wrapper found no namespace support and said so by setting IMGPIPE_RAY_OUTSIDE_NETNS.
RAY_ALLOWED = os.environ.get("IMGPIPE_IN_NETNS") == "1" or os.environ.get("IMGPIPE_RAY_OUTSIDE_NETNS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips ``@pytest.mark.ray`` tests, with the reason, outside the loopback-only namespace."""
    if RAY_ALLOWED:
        return
    skip = pytest.mark.skip(reason="starts Ray: run under scripts/in-loopback-netns (make test does)")
    for item in items:
        if "ray" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """Starts moto's S3 server as a separate process on 127.0.0.1 and points boto3 at it.

    The same server ``imgpipe run`` uses as its local object store: it speaks the real S3
    HTTP API, so tests exercise signing, multipart uploads, pagination and pyarrow's own
    S3 client, not an in-process patch.
    """
    from imgpipe.local_run import moto_s3_server

    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 server; returns ``s3://name``."""
    from imgpipe import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.S3Backend.client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["file", "s3"])
def any_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage root on each backend: a local directory and a bucket on the local S3 server."""
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/root"


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    """The vendored upstream schemas (Argo Workflows, KubeRay CRDs): the repository stands alone."""
    return SCHEMAS
