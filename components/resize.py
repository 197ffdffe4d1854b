"""The resize component: the run's ``clean/`` prefix into its ``resize/`` prefix, on Ray Data or a local pool."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("ray"), install_kfp_package=False)
def resize(
    cleaned: Input[Artifact],
    data_root: str,
    run_id: str,
    resized: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    # None: ResizeConfig's default (the pipeline passes its own parameters, derived from it).
    image_size: Optional[int] = None,  # kfp reads typing.Optional, not `X | None`
    preset: str = "",
    mode: Optional[str] = None,
    train_mode: Optional[str] = None,  # the train split's mode; "" means mode's
    ray_address: Optional[str] = None,
    step_config: Optional[dict] = None,
) -> str:
    """Resizes in this pod (a process pool or a local Ray), a Ray cluster's Jobs API or a KubeRay RayJob (``ray_address``).

    The run id is the idempotency key of a remote Ray job: a retried task re-attaches
    to its job instead of starting a second one. Returns the committed prefix (what
    train takes: the pipeline picks one of two resize tasks with ``dsl.OneOf``).
    """
    from imgpipe import config
    from imgpipe.remote.dispatch import run_step
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_step_report

    named = {
        "size": image_size,
        "preset": preset or None,
        "mode": mode,
        "train_mode": train_mode or None,
        "ray_address": ray_address,
    }
    cfg = config.step_config(ResizeConfig, step_config, "resize", **named)
    source = ka.read_step_artifact(cleaned, "clean", ka.read_policy(data_root))
    dest = ka.task_prefix(data_root, run_id, "resize", source, cfg)
    done = run_step("resize", source, dest, cfg, run_id=run_id).dest
    publish_step_report(done, metrics=metrics, report=report)
    return ka.write_step_artifact(resized, done)["dest"]
