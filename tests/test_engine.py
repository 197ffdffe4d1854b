"""Commands that need a container engine fail with one clear line and exit code 2 when none answers."""

from __future__ import annotations

import pytest

from imgpipe.cli import main
from imgpipe.containers.engine import EXIT_NO_ENGINE, EngineUnavailable, connect, engine_address


@pytest.fixture
def no_engine(tmp_path, monkeypatch):
    address = f"unix://{tmp_path}/nothing-listens.sock"
    monkeypatch.setenv("DOCKER_HOST", address)
    return address


def test_engine_address_is_docker_host_else_the_default_socket():
    assert engine_address({"DOCKER_HOST": "unix:///run/podman/podman.sock"}) == "unix:///run/podman/podman.sock"
    assert engine_address({}) == "unix:///var/run/docker.sock"


def test_connect_names_docker_host_and_the_containers_guide(no_engine):
    with pytest.raises(EngineUnavailable) as failure:
        connect()
    assert f"DOCKER_HOST={no_engine}" in str(failure.value)
    assert "docs/containers.md" in str(failure.value)


@pytest.mark.parametrize(
    "argv",
    [["images", "build", "cpu"], ["images", "bootstrap-base"], ["run", "--runner", "docker"]],
    ids=["images-build", "bootstrap-base", "run-docker"],
)
def test_no_engine_is_one_clear_error_with_exit_code_2(no_engine, argv, capsys, tmp_path):
    if argv[0] == "run":
        argv = [*argv, "--workdir", str(tmp_path / "work")]
    assert main(argv) == EXIT_NO_ENGINE == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"DOCKER_HOST={no_engine}" in err and "docs/containers.md" in err
    assert not (tmp_path / "work").exists(), "no work starts before the engine answers"


def test_docker_runner_refuses_a_local_data_root(capsys, tmp_path):
    assert main(["run", "--runner", "docker", "--data-root", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert "needs an S3 data root" in capsys.readouterr().err
