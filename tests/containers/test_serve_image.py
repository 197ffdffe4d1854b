"""The serve image (``make images`` builds it): what KServe runs for the ServingRuntime imgpipe-onnx."""

from __future__ import annotations

import pytest

from imgpipe.containers.catalog import image
from tests.containers.conftest import _unavailable
from tests.containers.test_images import _run


@pytest.fixture(scope="module")
def serve_image(engine) -> str:
    import docker

    name = image("serve")
    try:
        engine.images.get(name)
    except docker.errors.ImageNotFound:
        _unavailable(f"image not built: {name} (run make images)")
    return name


def test_the_serve_image_runs_the_runtime_as_uid_10001_without_torch_or_ray(engine, serve_image):
    probe = (
        "import importlib.util as u; "
        "print('has', *[m for m in ('torch', 'ray') if u.find_spec(m)], "
        "'lacks', *[m for m in ('kserve', 'onnxruntime', 'cv2') if not u.find_spec(m)])"
    )
    out = _run(engine, serve_image, f'id -u; python -c "{probe}"')
    assert out.splitlines() == ["10001", "has lacks"], out
    assert engine.images.get(serve_image).attrs["Config"]["User"] == "10001"


def test_the_serve_image_refuses_an_empty_model_directory_in_one_line(engine, serve_image):
    script = "python -m imgpipe.serving.runtime --model_name=m --model_dir=/tmp --enable_grpc=false 2>&1; echo exit $?"
    out = _run(engine, serve_image, script)
    assert out.splitlines() == [
        "imgpipe.serving.runtime: /tmp must hold one imgpipe model (model.json and its ONNX), in it or in one subfolder; it holds none",
        "exit 1",
    ]
