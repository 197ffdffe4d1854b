"""The plan component of the sweep: the grid checked and expanded into the branches the ``ParallelFor`` runs."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from typing import Optional

from kfp import dsl

from imgpipe.containers.catalog import image


# The gpu image: checking a branch's TrainConfig needs torchvision's model list. No GPU is asked for.
@dsl.component(base_image=image("gpu"), install_kfp_package=False)
def plan_sweep(
    resized: str,
    grid: list,
    # One list of values per grid key (imgpipe.sweep.GRID_KEYS; a test keeps them in step).
    grid_policy: list,
    grid_randaugment_n: list,
    grid_randaugment_m: list,
    grid_mixup_alpha: list,
    grid_cutmix_alpha: list,
    grid_mixup_prob: list,
    grid_switch_prob: list,
    grid_label_smoothing: list,
    grid_lr: list,
    grid_weight_decay: list,
    grid_epochs: list,
    grid_model: list,
    grid_freeze_fraction: list,
    grid_class_weights: list,
    grid_recipe: list,
    grid_domain: list,
    # Runs per branch, seed = base seed + k (imgpipe.sweep.SEEDS_KEY); 1: each branch once.
    seeds: int = 1,
    # The typed train parameters, as the train component takes them (None: TrainConfig's default).
    model_name: Optional[str] = None,  # kfp reads typing.Optional, not `X | None`
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    aug_policy: Optional[str] = None,
    pretrained: Optional[str] = None,  # "" means none (a pipeline parameter's empty default)
    recipe: Optional[str] = None,
    domain: Optional[str] = None,
    step_config: Optional[dict] = None,
) -> list:
    """The sweep's branches: ``grid`` entries times the product of the ``grid_*`` lists, each config checked.

    Returns one item per branch and seed (``branch``, ``resized``, ``settings``,
    ``step_config``, and ``group`` with ``seeds`` above 1): the loop's tasks take
    everything from the item and the run parameters.
    """
    from imgpipe.stepio.artifacts import train_overrides
    from imgpipe.sweep import SEEDS_KEY, plan

    axes = {
        "policy": grid_policy,
        "randaugment_n": grid_randaugment_n,
        "randaugment_m": grid_randaugment_m,
        "mixup_alpha": grid_mixup_alpha,
        "cutmix_alpha": grid_cutmix_alpha,
        "mixup_prob": grid_mixup_prob,
        "switch_prob": grid_switch_prob,
        "label_smoothing": grid_label_smoothing,
        "lr": grid_lr,
        "weight_decay": grid_weight_decay,
        "epochs": grid_epochs,
        "model": grid_model,
        "freeze_fraction": grid_freeze_fraction,
        "class_weights": grid_class_weights,
        "recipe": grid_recipe,
        "domain": grid_domain,
        SEEDS_KEY: seeds,
    }
    # A branch trains in its own pod: one node (the sweep does not offer train_nodes).
    return plan(resized, grid, axes, step_config, **train_overrides(model_name, epochs, batch_size, aug_policy, pretrained, 1, recipe, domain))
