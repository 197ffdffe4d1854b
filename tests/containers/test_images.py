"""What every built image must be: non-root, the kfp executor importable, only its kind's packages, in budget."""

from __future__ import annotations

import re

import pytest

from imgpipe.containers import build
from imgpipe.containers.engine import image_size

# Uncompressed budgets (docs/benchmarks.md records the sizes); gpu is reported, not capped.
BUDGET_BYTES = {"cpu": 600e6, "ray": 1.6e9}
KINDS = [pytest.param(kind, id=f"{kind}-kind") for kind in ("cpu", "ray", "gpu")]


def _run(engine, image: str, script: str) -> str:
    """The script's standard output, read once the container has exited.

    ``containers.run(..., remove=True)`` reads the log while the container may still be
    writing it; through Podman's compatible API that lost the last line of a step once
    (the clean summary after ``pid 1``). Waiting first, then reading, then removing does not.
    """
    container = engine.containers.run(image, ["sh", "-c", script], detach=True, network_mode="none")
    try:
        status = container.wait(timeout=600)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        if status != 0:
            raise AssertionError(f"{image}: the script exited {status}: {container.logs(stdout=True, stderr=True).decode()[-3000:]}")
    finally:
        container.remove(force=True)
    return out.strip()


@pytest.mark.parametrize("kind", KINDS)
def test_image_runs_as_uid_10001_with_imgpipe_and_the_kfp_executor(engine, built_images, kind):
    name = getattr(built_images, kind)
    out = _run(engine, name, 'id -u; imgpipe --version; python -c "import kfp.dsl.executor_main; print(1)"')
    assert out.splitlines() == ["10001", "imgpipe 0.1.0", "1"]
    assert engine.images.get(name).attrs["Config"]["User"] == "10001"


@pytest.mark.parametrize("kind", KINDS)
def test_build_machine_pip_settings_never_reach_the_image(engine, built_images, kind):
    out = _run(engine, getattr(built_images, kind), "ls /tmp/build-pip 2>&1; echo ${PIP_CONFIG_FILE:-unset}; pip config list")
    assert "No such file" in out and "unset" in out and "cert" not in out, out
    history = " ".join(layer.get("CreatedBy", "") for layer in engine.images.get(getattr(built_images, kind)).history())
    assert "build-pip" not in history, "only the first (discarded) stage touches the build's pip settings"


@pytest.mark.parametrize(
    ("kind", "absent", "present"),
    [
        ("cpu", ("torch", "ray", "kornia", "torchvision"), ("pyarrow", "PIL", "boto3", "kfp")),
        ("ray", ("torch", "kornia", "torchvision"), ("ray", "cv2", "kubernetes")),
        ("gpu", ("ray",), ("torch", "torchvision", "kornia", "albumentations", "matplotlib")),
    ],
    ids=["cpu-kind", "ray-kind", "gpu-kind"],
)
def test_image_carries_only_what_its_steps_import(engine, built_images, kind, absent, present):
    probe = "import importlib.util as u; print(' '.join(m for m in {} if u.find_spec(m) {} None))"
    found = _run(engine, getattr(built_images, kind), f'python -c "{probe.format(absent, "is not")}"')
    missing = _run(engine, getattr(built_images, kind), f'python -c "{probe.format(present, "is")}"')
    assert found == "" and missing == "", f"{kind}: has {found!r}, lacks {missing!r}"


@pytest.mark.parametrize("kind", KINDS)
def test_image_size_within_budget(engine, built_images, kind, record_property):
    size = image_size(engine, getattr(built_images, kind))
    record_property(f"{kind}_image_bytes", size)
    print(f"{kind} image: {size / 1e6:,.0f} MB")
    if kind in BUDGET_BYTES:
        assert size <= BUDGET_BYTES[kind], f"{kind} image is {size / 1e6:.0f} MB, budget {BUDGET_BYTES[kind] / 1e6:.0f} MB"


def test_a_base_that_cannot_be_pulled_says_how_to_bootstrap_one(engine):
    with pytest.raises(build.BaseImageUnavailable, match="imgpipe images bootstrap-base"):
        build.resolve_base(engine, "localhost/imgpipe-no-such-base:1", log=lambda _: None)


def test_a_failed_build_shows_the_failing_instruction_and_its_output(engine, built_images, tmp_path):
    # A context whose pyproject.toml is not TOML: the step that reads the requirements fails.
    # Every layer before it is in the cache from `make images`, so no network is needed.
    conf, ca, _ = build.host_pip_settings()
    broken = build.copy_context(tmp_path / "repo")
    (broken / "pyproject.toml").write_text("[project\nname = ")
    context = build.build_context(broken, (conf, ca))
    with pytest.raises(build.BuildFailed) as failure:
        build.build_image(
            engine,
            "cpu",
            build.resolve_base(engine, log=lambda _: None),
            context=context,
            tag="localhost/imgpipe-broken:test",
            log=lambda _: None,
        )
    message = str(failure.value)
    assert "building the cpu image" in message and "STEP" in message.upper()
    assert "tomllib" in message or "TOMLDecodeError" in message, message
    assert "Traceback" not in message.split("\n", 1)[0]


def test_a_step_runs_as_the_containers_main_process(engine, built_images):
    # `docker run IMAGE imgpipe clean ...` makes the step pid 1, and its workers' parent pid 1.
    script = (
        "set -e; cd /tmp; imgpipe synth file:///tmp/s --classes 2 --per-class 6 >/dev/null 2>&1; "
        "imgpipe download /tmp/s/images.tar.gz file:///tmp/d >/dev/null 2>&1; "
        "echo pid $$; exec imgpipe clean file:///tmp/d file:///tmp/c --workers 2 2>/dev/null"
    )
    out = _run(engine, built_images.cpu, script)
    counts = re.search(r"^clean: (\d+) in -> (\d+) out, (\d+) rejected", out, re.M)
    assert out.startswith("pid 1\n") and counts, out
    inputs, outputs, rejected = map(int, counts.groups())
    assert outputs >= 2 * 6 - 2 and inputs == outputs + rejected, out
