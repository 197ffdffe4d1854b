"""The train component: the run's ``resize/`` prefix into a model, metrics and a report."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Metrics, Model, Output

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("gpu"), install_kfp_package=False)
def train(
    resized: str,
    data_root: str,
    run_id: str,
    trained: Output[Artifact],
    model: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    # None: TrainConfig's default (the pipeline passes its own parameters, derived from it).
    model_name: Optional[str] = None,  # kfp reads typing.Optional, not `X | None`
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    aug_policy: Optional[str] = None,
    pretrained: Optional[str] = None,  # "" means none (a pipeline parameter's empty default)
    train_nodes: Optional[int] = None,  # more than 1: a Kubeflow Trainer TrainJob
    recipe: Optional[str] = None,  # TrainConfig.recipe (auto: from the train split's images per class)
    domain: Optional[str] = None,  # TrainConfig.domain
    step_config: Optional[dict] = None,
    branch: str = "",
    placement: str = "",
) -> str:
    """Trains on the resize output at ``resized`` (a committed prefix); returns the committed train prefix.

    One process per GPU of the pod (``imgpipe compile --train-gpus N``); with ``train_nodes`` above 1
    a Kubeflow Trainer TrainJob of that many such nodes, which this task creates and follows.
    ``placement`` is what the pipeline compiled the task for (``pod``: with GPUs; ``trainjob``:
    a poller without any); a config that asks otherwise is refused. Rank 0 writes.

    ``resume`` is on: the prefix is the run's own, so a first attempt starts fresh and a
    retried attempt continues from the checkpoint of the failed one. A sweep's branch
    (``branch``, :mod:`imgpipe.sweep`) writes the run's ``train-{branch}`` prefix instead.
    The promotion gate is the next task's (``components/promote.py``).
    """
    from imgpipe import config
    from imgpipe.remote.dispatch import run_train
    from imgpipe.stepio import artifacts as ka
    from imgpipe.stepio.publish import publish_training
    from imgpipe.sweep import branch_config, branch_step
    from imgpipe.train.config import TrainConfig

    policy = ka.read_policy(data_root)  # weights, weights_cache and the data lie below data_root
    named = ka.train_overrides(model_name, epochs, batch_size, aug_policy, pretrained, train_nodes, recipe, domain)
    cfg = config.step_config(TrainConfig, step_config, "train", policy=policy, **named, weights_cache=ka.weights_cache(data_root))
    cfg = branch_config(cfg) if branch else cfg  # a diverged branch is compare's to rank last, not a failed sweep
    data = ka.committed_prefix(resized, "resize", policy)
    out = ka.task_prefix(data_root, run_id, branch_step(branch) if branch else "train", data, cfg)
    result = run_train(data, out, cfg, run_id=run_id, placement=placement)  # the pod's GPUs, or a TrainJob of cfg.nodes nodes
    publish_training(result.dest, model=model, metrics=metrics, classification=confusion, report=report)
    return ka.write_step_artifact(trained, result.dest, branch=branch)["dest"]
