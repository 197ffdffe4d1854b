"""The container suite: real images, real containers, through the engine DOCKER_HOST names.

Every test here is marked ``containers``. Without an engine they are skipped with one
line saying why; ``make test-containers`` sets ``IMGPIPE_REQUIRE_ENGINE=1``, which turns
that into a failure. The images must be built first (``make images``).
"""

from __future__ import annotations

import os

import pytest

from imgpipe.containers.catalog import ImageSet
from imgpipe.containers.engine import EngineUnavailable, connect

REQUIRE_ENGINE = os.environ.get("IMGPIPE_REQUIRE_ENGINE") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/containers/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.containers)


def _unavailable(reason: str) -> None:
    if REQUIRE_ENGINE:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def engine():
    """A docker SDK client of the engine; skips (or fails under make test-containers) without one."""
    try:
        client = connect()
    except EngineUnavailable as exc:
        _unavailable(f"no container engine: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def built_images(engine) -> ImageSet:
    """The three step images, which must already be in the engine (make images)."""
    import docker

    names = ImageSet.from_env()
    missing = []
    for kind in ("cpu", "ray", "gpu"):
        try:
            engine.images.get(getattr(names, kind))
        except docker.errors.ImageNotFound:
            missing.append(getattr(names, kind))
    if missing:
        _unavailable(f"images not built: {', '.join(missing)} (run make images)")
    return names
