"""Shared fixtures: a real S3 API server on 127.0.0.1 and per-test buckets/prefixes."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# albumentations asks PyPI for a newer version on import unless told not to; a test module
# may import it before imgpipe's modules set this (tests send nothing off the machine).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
# Upstream schemas the manifests are validated against (origin and license: tests/schemas/README.md).
SCHEMAS = ROOT / "tests" / "schemas"

# Ray binds the machine's external interface even when told 127.0.0.1, so tests that start
# Ray run only inside scripts/in-loopback-netns (which `make test` uses), or where that
# wrapper found no namespace support and said so by setting IMGPIPE_RAY_OUTSIDE_NETNS.
RAY_ALLOWED = os.environ.get("IMGPIPE_IN_NETNS") == "1" or os.environ.get("IMGPIPE_RAY_OUTSIDE_NETNS") == "1"


# The test files that take longest (seconds of `make test`, 2026-11-25), longest first: given
# to the two xdist workers first (`--dist loadfile` hands files out in collection order), so
# that the run ends on short files rather than one worker finishing a minute-long one alone.
LONGEST_FIRST = (
    "tests/steps/test_train_weights.py",
    "tests/steps/test_train.py",
    "tests/test_pipeline.py",
    "tests/remote/test_trainjob.py",
    "tests/test_sharded_pipeline.py",
    "tests/steps/test_predict_preprocessing.py",
    "tests/test_output_readers.py",
    "tests/steps/test_resize_end_to_end.py",
    "tests/train/test_normalization.py",
    "tests/test_sources_end_to_end.py",
    "tests/steps/test_audit.py",
    "tests/remote/test_ray_jobs_head.py",
    "tests/remote/test_ranks.py",
    "tests/steps/test_train_transfer.py",
    "tests/train/test_evaluation.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Orders the longest files first (:data:`LONGEST_FIRST`); skips ``ray`` tests, with the reason, outside the loopback-only namespace."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix(), len(rank)))  # stable
    if RAY_ALLOWED:
        return
    skip = pytest.mark.skip(reason="starts Ray: run under scripts/in-loopback-netns (make test does)")
    for item in items:
        if "ray" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _one_onnx_registry_per_worker() -> None:
    """torch's ONNX exporter, with its table of ATen translations built once per test process.

    ``torch.onnx.export(dynamo=True)`` rebuilds that table from onnxscript's torchlib on every
    call (about 1.2 s of a 2.5 s export of tiny_cnn). A pod exports once; the suite exports
    after every train() it runs. The table is only read when no custom translation table is
    given, which imgpipe never gives, so one per process changes no export.
    """
    import functools

    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # another torch: exports just take longer
        return
    build = _registration.ONNXRegistry.from_torchlib
    _registration.ONNXRegistry.from_torchlib = staticmethod(functools.cache(build))


@pytest.fixture(autouse=True)
def _s3_options_restored() -> Iterator[None]:
    """Each test starts with the S3 options the one before it found (``storage.configure_s3``'s process-wide state).

    A step's task adopts its driver's storage settings (``storage.use_settings``), pinning the
    endpoint it resolved: right in a worker process, a leak when a test runs the task in the
    test process. Left pinned, every later test of that worker talks to that endpoint, whatever
    server it starts (a moto or SeaweedFS server's own keys then meet another server).
    """
    from imgpipe.storage import s3

    saved = s3._s3_options
    yield
    if s3._s3_options != saved:
        s3.configure(**saved.__dict__)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Starts SeaweedFS (``weed server -s3``, the store Kubeflow ships) on 127.0.0.1 and points boto3 at it.

    The same server ``imgpipe run`` uses as its local object store: it speaks the real S3
    HTTP API, so tests exercise signing, multipart uploads, pagination and pyarrow's own
    S3 client, not an in-process patch. Its data lives in this session's temporary directory.
    """
    from imgpipe.local.s3 import seaweedfs_server

    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def moto_bucket() -> str:
    """A bucket on moto's S3 server, for what SeaweedFS refuses to store (tests/moto_s3.py names each use)."""
    from imgpipe import storage
    from tests.moto_s3 import moto_s3_server

    with moto_s3_server():
        storage.s3_client().create_bucket(Bucket="moto-test")
        yield "s3://moto-test"


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 server; returns ``s3://name``."""
    from imgpipe import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["file", "s3"])
def any_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage root on each backend: a local directory and a bucket on the local S3 server."""
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/root"


@pytest.fixture
def no_exports(monkeypatch):
    """Trains without the ONNX and TorchScript exports, for tests that check neither (1-5 s a run).

    An export failure is never fatal (``train.outputs._exports`` records it), so leaving them
    out changes nothing a test of training asserts; tests/train/test_export.py, predict,
    promote, serving and the kfp.local runs keep the real exports.
    """
    from imgpipe.train import outputs

    monkeypatch.setattr(outputs, "_exports", lambda run: ({}, {}))


@pytest.fixture(scope="module")
def ray_session(s3_endpoint):
    """One small local Ray per test module; the steps must reuse it, not stop it.

    Its workers take the S3 endpoint and credentials from the environment they start in,
    as a pod's do: the local S3 server's settings must be there first, or a module run on
    its own (no earlier test started the server) gets ACCESS_DENIED in an S3 test. Tests
    that use it are marked ``ray`` (run under scripts/in-loopback-netns).
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def hf_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real Hugging Face ``datasets`` library, offline, its caches under ``tmp_path``.

    The offline switches and cache paths are set before ``datasets`` is imported (it reads
    them once, datasets 5.2.0 src/datasets/config.py) and patched into its config should an
    earlier test have imported it; a connection to anything but loopback fails the test.
    Pass ``cache_dir=tmp_path / ...`` to ``load_dataset`` as well.
    """
    home = tmp_path / "hf-home"
    env = {
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and not _is_loopback(str(address[0])):
            raise AssertionError(f"a test with the datasets library tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    return datasets


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    """The vendored upstream schemas (Argo Workflows, KubeRay CRDs): the repository stands alone."""
    return SCHEMAS
