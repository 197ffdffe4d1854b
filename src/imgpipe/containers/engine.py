"""The Docker-compatible container engine: one connection, one clear error when none answers.

The engine is whatever ``DOCKER_HOST`` names, else the default socket
(``unix:///var/run/docker.sock``): Docker, or Podman's Docker-compatible API
(``scripts/podman-service`` starts one and prints the ``DOCKER_HOST`` to export).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_SOCKET",
    "ENGINE_HELP",
    "EXIT_NO_ENGINE",
    "EngineUnavailable",
    "engine_address",
    "connect",
    "describe",
    "image_size",
]

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
# Where a user learns to start an engine; every "no engine" message names it.
ENGINE_HELP = "docs/containers.md (Podman: scripts/podman-service prints the DOCKER_HOST to export)"
# The exit code of every command that needs an engine and finds none.
EXIT_NO_ENGINE = 2


class EngineUnavailable(RuntimeError):
    """No Docker-compatible engine answers (or the ``docker`` SDK is not installed)."""

    exit_code = EXIT_NO_ENGINE


def engine_address(environ: Mapping[str, str] | None = None) -> str:
    """The engine address the ``docker`` SDK will use: ``$DOCKER_HOST`` or the default socket."""
    env = os.environ if environ is None else environ
    return env.get("DOCKER_HOST", "").strip() or DEFAULT_SOCKET


def connect(timeout_s: float = 600.0) -> Any:
    """A ``docker.DockerClient`` for the engine, checked with a ping.

    Args:
        timeout_s: Timeout of each API call (builds and long pulls stream within it).

    Raises:
        EngineUnavailable: If the SDK is missing or nothing answers at the address; the
            message names ``DOCKER_HOST`` and docs/containers.md.
    """
    address = engine_address()
    try:
        import docker
    except ImportError as exc:
        raise EngineUnavailable("the docker SDK is not installed: pip install 'imgpipe[containers]'") from exc
    try:
        client = docker.DockerClient(base_url=address, timeout=int(timeout_s))
        client.ping()
    except Exception as exc:  # DockerException, requests' ConnectionError, a bad URL...
        raise EngineUnavailable(
            f"no container engine answers at DOCKER_HOST={address} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no reply'}). Start Docker or Podman and "
            f"export DOCKER_HOST; see {ENGINE_HELP}"
        ) from exc
    return client


def describe(client: Any) -> str:
    """``"Podman Engine 4.3.1"``, ``"Docker Engine - Community 28.2.2"``: what answers."""
    version = client.version()
    for component in version.get("Components") or []:
        if "Engine" in component.get("Name", ""):
            return f"{component['Name']} {component.get('Version', '?')}"
    return f"{version.get('Platform', {}).get('Name', 'engine')} {version.get('Version', '?')}".strip()


def image_size(client: Any, name: str) -> int:
    """Uncompressed size in bytes of a local image."""
    return int(client.images.get(name).attrs.get("Size") or 0)
