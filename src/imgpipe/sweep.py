"""The augmentation sweep: a grid of training settings, its branches, and what its components share.

    items = plan(resized, grid, axes, step_config, model="resnet18")   # one loop item per branch and seed

How it works in detail: docs/internals/steps.md, "imgpipe.sweep".
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from imgpipe import config, storage
from imgpipe.config import coerce, read_config_file
from imgpipe.train import recipes
from imgpipe.train.augment_config import AugmentConfig
from imgpipe.train.config import TrainConfig

__all__ = [
    "SWEEP_PIPELINE_NAME",
    "GRID_KEYS",
    "NAME_KEY",
    "SEEDS_KEY",
    "MAX_SEEDS",
    "RECIPE_FIELDS",
    "SWEEP_EPOCHS",
    "MAX_BRANCHES",
    "BRANCH_STEP_PREFIX",
    "Branch",
    "check_branch_name",
    "branch_step",
    "branch_config",
    "check_seeds",
    "seed_runs",
    "expand_grid",
    "load_grid_file",
    "grid_parameters",
    "checked_branches",
    "plan",
    "branch_prefixes",
]

log = logging.getLogger(__name__)

# The sweep pipeline's name on Kubeflow (pipelines/imgpipe_sweep.py); here so that naming it needs no kfp.
SWEEP_PIPELINE_NAME = "imgpipe-sweep"
# Grid key -> the TrainConfig field it sets. The sweepable part of the augmentation recipe:
# RandAugment's policy, N and M; MixUp/CutMix alphas and probabilities (timm's names:
# mixup_alpha, cutmix_alpha, prob, switch_prob in timm data/mixup.py Mixup); label smoothing;
# and the training schedule around it: learning rate, weight decay, epochs, the model, the
# linear-probe-then-unfreeze schedule (epochs with a frozen backbone) and class weights; and
# the named settings that fill the fields a branch leaves unset (imgpipe.train.recipes): the
# size recipe and the image domain.
GRID_KEYS: dict[str, str] = {
    "policy": "aug_policy",
    "randaugment_n": "randaugment_n",
    "randaugment_m": "randaugment_m",
    "mixup_alpha": "mixup",
    "cutmix_alpha": "cutmix",
    "mixup_prob": "mixup_prob",
    "switch_prob": "mixup_switch_prob",
    "label_smoothing": "label_smoothing",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "epochs": "epochs",
    "model": "model",
    "freeze_fraction": "freeze_fraction",
    "class_weights": "class_weights",
    "recipe": "recipe",
    "domain": "domain",
}
# The optional branch name in an explicit grid entry.
NAME_KEY = "name"
# The repeat axis in ``axes`` (and the sweep pipeline's parameter): runs per branch, seed = base seed + k.
SEEDS_KEY = "seeds"
# More runs per branch than this multiplies the GPUs for little: the spread of a mean over
# N seeds shrinks as 1/sqrt(N), so 10 already resolves what 20 would.
MAX_SEEDS = 10
# Run k of a branch repeated over seeds is `{branch}-s{k}`.
_SEED_SUFFIX = "-s"
# The TrainConfig fields of the whole augmentation recipe: what the winner's config carries
# (the grid's fields and the rest of AugmentConfig's, under their TrainConfig names).
# epochs is left out even when swept: a sweep's runs are short on purpose, and a full run sets
# its own (the ranking still shows what each branch trained).
RECIPE_FIELDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *(f for f in GRID_KEYS.values() if f != "epochs"),
            *("aug_policy" if f.name == "policy" else f.name for f in fields(AugmentConfig)),
        ]
    )
)
# Short runs: a sweep ranks settings, the winner then trains in full.
SWEEP_EPOCHS = 5
# More branches than this is a typo in the axes (a product grows fast), not a sweep.
MAX_BRANCHES = 64
# A branch's train output is the run's step `train-{branch}`.
BRANCH_STEP_PREFIX = "train-"
# One path segment without dots (no '..'), short enough to read in a table.
_NAME_LENGTH = 40
_BRANCH_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{_NAME_LENGTH - 1}}}")
_FILE_KEYS = ("grid", "axes")


@dataclass(frozen=True)
class Branch:
    """One point of the grid.

    Attributes:
        name: Its name, a path segment (``b00``, ``b01``, ... unless the grid names it).
        settings: Grid key -> value (coerced), in the grid's key order.
    """

    name: str
    settings: dict[str, Any]

    @property
    def overrides(self) -> dict[str, Any]:
        """The TrainConfig fields this branch sets."""
        return {GRID_KEYS[k]: v for k, v in self.settings.items()}

    def label(self) -> str:
        """``name: key=value, ...`` for tables and logs."""
        return f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())


def check_branch_name(name: Any) -> str:
    """Returns ``name`` if it can name a branch's output (one path segment), else raises.

    Raises:
        ValueError: For anything but 1-40 letters, digits, ``_`` and ``-`` starting with a letter or digit.
    """
    if not isinstance(name, str) or not _BRANCH_NAME.fullmatch(name):
        raise ValueError(f"branch name {name!r} must be 1-{_NAME_LENGTH} letters, digits, '_' or '-', starting with a letter or digit")
    return name


def branch_step(name: str) -> str:
    """The run-prefix step of branch ``name``: ``train-{name}`` (checked)."""
    return BRANCH_STEP_PREFIX + check_branch_name(name)


def branch_config(cfg: TrainConfig) -> TrainConfig:
    """A branch's train config: a branch that diverges ends normally, marked (``diverged_fails`` off).

    Compare ranks it last and never picks it, and the other branches' results stand; a
    diverged branch failing its task would fail the loop and the whole sweep.
    """
    return dataclasses.replace(cfg, diverged_fails=False)


def check_seeds(value: Any) -> int:
    """Returns the runs per branch ``value`` asks for (the sweep's ``seeds``), else raises.

    Raises:
        TypeError: For anything but an integer (a list of seeds included: seeds is a count).
        ValueError: Outside 1 to :data:`MAX_SEEDS`.
    """
    if isinstance(value, (list, tuple)):
        raise TypeError(f"{SEEDS_KEY} is a count of runs per branch, not a list of seeds: write `{SEEDS_KEY}: {len(value) or 3}` under axes")
    seeds = coerce(SEEDS_KEY, value, int)
    if not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"{SEEDS_KEY} must be from 1 to {MAX_SEEDS} runs per branch (the sweep trains seeds times the branches), got {seeds}")
    return seeds


def seed_runs(name: str, seeds: int) -> list[str]:
    """The run names of branch ``name`` over ``seeds`` seeds: ``[name]`` for one, else ``{name}-s{k}`` for k = 0, 1, ...

    Raises:
        ValueError: If a run name breaks :func:`check_branch_name` (a branch name too long for the suffix).
    """
    if seeds == 1:
        return [check_branch_name(name)]
    runs = [f"{name}{_SEED_SUFFIX}{k}" for k in range(seeds)]
    for run in runs:
        try:
            check_branch_name(run)
        except ValueError:
            room = _NAME_LENGTH - (len(runs[-1]) - len(name))
            raise ValueError(
                f"branch {name!r} repeated over {seeds} seeds is named {run!r}; shorten the branch name to at most {room} characters"
            ) from None
    return runs


_HINTS = typing.get_type_hints(TrainConfig)


def _value(where: str, key: Any, value: Any) -> Any:
    if key == SEEDS_KEY:
        raise ValueError(f"{where}: {SEEDS_KEY} is set once for the whole sweep, under axes (`axes: {{{SEEDS_KEY}: 3}}`), not per branch")
    if key not in GRID_KEYS:
        raise ValueError(f"{where}: unknown grid key {key!r}; valid keys: {', '.join(GRID_KEYS)} (and {NAME_KEY!r} in grid entries)")
    coerced = coerce(f"{where}.{key}", value, _HINTS[GRID_KEYS[key]])
    if isinstance(coerced, float) and not math.isfinite(coerced):
        raise ValueError(f"{where}.{key}: {value!r} is not a finite number")
    return coerced


def _entries(grid: Any) -> list[tuple[str | None, dict[str, Any]]]:
    if grid is None:
        return []
    if not isinstance(grid, (list, tuple)):
        raise TypeError(f"grid must be a list of mappings (one per branch), got {type(grid).__name__}")
    entries = []
    for i, entry in enumerate(grid):
        if not isinstance(entry, Mapping):
            raise TypeError(f"grid[{i}] must be a mapping of grid keys, got {entry!r}")
        name = check_branch_name(entry[NAME_KEY]) if NAME_KEY in entry else None
        entries.append((name, {k: _value(f"grid[{i}]", k, v) for k, v in entry.items() if k != NAME_KEY}))
    return entries


def _axes(axes: Any) -> dict[str, list[Any]]:
    if axes is None:
        return {}
    if not isinstance(axes, Mapping):
        raise TypeError(f"axes must be a mapping of grid key -> list of values, got {type(axes).__name__}")
    out = {}
    for key, values in axes.items():
        if key == SEEDS_KEY:
            continue  # a count, not values to cross: _seeds
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"axes.{key} must be a list of values, got {values!r}")
        if key == NAME_KEY:
            raise ValueError(f"axes cannot set {NAME_KEY!r}; name the entries of grid instead")
        if values:  # an empty axis is "not swept" (the pipeline's grid_* parameters default to [])
            out[key] = [_value(f"axes.{key}[{i}]", key, v) for i, v in enumerate(values)]
    return out


def _seeds(axes: Any) -> int:
    """The runs per branch ``axes`` asks for (:data:`SEEDS_KEY`, default 1)."""
    return check_seeds(axes[SEEDS_KEY]) if isinstance(axes, Mapping) and SEEDS_KEY in axes else 1


def expand_grid(grid: Sequence[Mapping[str, Any]] | None = None, axes: Mapping[str, Any] | None = None) -> list[Branch]:
    """The branches of a grid: the explicit entries, then every point of the axes' product.

    Args:
        grid: Explicit branches, each a mapping of grid keys (:data:`GRID_KEYS`) and an
            optional ``name``.
        axes: Grid key -> the values to sweep; their cartesian product, in key order. And
            optionally :data:`SEEDS_KEY` -> runs per branch (checked here, names included;
            :func:`plan` makes the runs).

    Returns:
        The branches in order, named as the grid names them, else ``bNN`` after their position.

    Raises:
        ValueError: On an unknown key (naming the valid ones), a value the field's type
            refuses, a non-finite number, a bad or repeated name, two branches with the
            same settings, no branch at all, more than :data:`MAX_BRANCHES`, ``seeds``
            outside 1 to :data:`MAX_SEEDS` or a name too long for its seed suffix.
        TypeError: On a grid that is not a list of mappings, axes not lists, or ``seeds`` not an integer.
    """
    entries, axes_values, seeds = _entries(grid), _axes(axes), _seeds(axes)
    points = [dict(zip(axes_values, combo)) for combo in itertools.product(*axes_values.values())] if axes_values else []
    count = len(entries) + len(points)
    if count == 0:
        raise ValueError("the grid has no branch: give grid entries, axes values, or both")
    if count > MAX_BRANCHES:
        raise ValueError(f"the grid has {count} branches, more than {MAX_BRANCHES}; sweep fewer values at once")
    named = [*entries, *((None, point) for point in points)]
    branches = [Branch(name or f"b{i:02d}", settings) for i, (name, settings) in enumerate(named)]
    names = [b.name for b in branches]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"branch name(s) {', '.join(repeated)} used more than once; names must be unique")
    _check_distinct([(b.name, b.settings) for b in branches], "the same settings")
    for b in branches:
        seed_runs(b.name, seeds)
    return branches


def _check_distinct(named: Sequence[tuple[str, Any]], what: str) -> None:
    """Refuses two branches that would train alike: the sweep would spend a GPU on a repeat."""
    seen: dict[str, str] = {}
    for name, value in named:
        parts = value if isinstance(value, tuple) else (value,)
        key = repr([sorted(v.items()) if isinstance(v, Mapping) else v for v in parts])
        if key in seen:
            raise ValueError(f"branches {seen[key]} and {name} have {what}; drop one of them")
        seen[key] = name


def load_grid_file(path: str | Path) -> tuple[list[Any], dict[str, Any]]:
    """Reads a grid YAML: a mapping with ``grid`` (a list) and/or ``axes`` (a mapping), or a bare list.

    Returns:
        ``(grid, axes)`` as written; :func:`expand_grid` checks them.

    Raises:
        ValueError: For a missing file or top-level keys other than ``grid`` and ``axes``
            (``seeds`` among them: it goes under ``axes``).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"grid file {p} does not exist")
    doc = config.load_yaml(p.read_text(), f"grid file {p}")
    if isinstance(doc, list):
        return doc, {}
    doc = read_config_file(p)  # a mapping, or a clear error
    unknown = sorted(set(doc) - set(_FILE_KEYS))
    if SEEDS_KEY in unknown:
        raise ValueError(f"grid file {p}: {SEEDS_KEY} goes under axes (`axes: {{{SEEDS_KEY}: {doc[SEEDS_KEY]}}}`), as the repeat axis")
    if unknown:
        raise ValueError(f"grid file {p}: unknown key(s) {', '.join(map(str, unknown))}; keys: {', '.join(_FILE_KEYS)}")
    return list(doc.get("grid") or []), dict(doc.get("axes") or {})


def grid_parameters(grid: Sequence[Mapping[str, Any]] | None, axes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sweep pipeline's grid parameters for a grid: ``grid``, one ``grid_<key>`` list per grid key, and ``seeds``.

    Raises:
        ValueError, TypeError: As :func:`checked_branches`: the grid is checked here, at the
            edge, by the same check :func:`plan` runs (each branch's whole train config).
    """
    checked_branches(grid, axes, None)
    seeds = _seeds(axes)
    axes = dict(axes or {})
    lists = {f"grid_{k}": list(axes.get(k) or []) for k in GRID_KEYS}
    return {"grid": [dict(e) for e in grid or []], **lists, SEEDS_KEY: seeds}


def plan(
    resized: str,
    grid: Sequence[Mapping[str, Any]] | None,
    axes: Mapping[str, Any] | None,
    step_config: Mapping[str, Any] | None,
    **named: Any,
) -> list[dict[str, Any]]:
    """The items the sweep's ``ParallelFor`` runs: one per branch and seed, its whole train config checked.

    Each branch's ``step_config`` is the pipeline's with the branch's overrides laid
    over its ``train`` section, so they win over both the typed parameters and the
    section; everything else (seed included) is the same for every branch. With
    ``seeds`` N above 1 each branch becomes N items, ``{branch}-s{k}`` with the train
    section's ``seed`` set to the branch config's seed + k and ``group`` naming the branch
    (what compare averages over); with one seed the items are the branches as they are.

    Args:
        resized: The committed resize prefix every branch trains on (carried in the
            items, so the loop's tasks take nothing but the item and run parameters).
        grid: Explicit branches (:func:`expand_grid`).
        axes: Swept values per grid key, and optionally ``seeds``.
        step_config: The pipeline's ``step_config`` parameter.
        named: The typed train parameters (``model``, ``epochs``, ...), as the train
            component passes them.

    Returns:
        ``[{"branch", "resized", "settings", "step_config"}, ...]``, plus ``group`` with
        more than one seed.

    Raises:
        ValueError, TypeError: As :func:`expand_grid`, or when a branch's config is
            refused (the message names the branch).
    """
    # (branch, the settings it trains with): "recipes" would hide the recipes module here.
    items, trained_as = [], []
    seeds = _seeds(axes)
    for branch, own, cfg in checked_branches(grid, axes, step_config, **named):
        runs = seed_runs(branch.name, seeds)
        if seeds == 1:  # the branch as it is: the items (and so the run prefixes) of a sweep without seeds
            items.append({"branch": branch.name, "resized": resized, "settings": branch.settings, "step_config": own})
        else:
            for k, run in enumerate(runs):
                # Explicit randomness: run k's every stream starts from the branch's seed + k (TrainConfig.seed).
                repeat = {**own, "train": {**own["train"], "seed": cfg.seed + k}}
                items.append({"branch": run, "resized": resized, "settings": branch.settings, "step_config": repeat, "group": branch.name})
        trained_as.append((branch.name, _trained_as(cfg)))
        log.info("sweep: branch %s -> %s", branch.label(), trained_as[-1][1])
    _check_distinct(trained_as, "the same effective recipe (a grid value that the policy ignores?)")
    return items


def checked_branches(
    grid: Sequence[Mapping[str, Any]] | None,
    axes: Mapping[str, Any] | None,
    step_config: Mapping[str, Any] | None,
    **named: Any,
) -> list[tuple[Branch, dict[str, Any], TrainConfig]]:
    """Each branch of the grid with its ``step_config`` and its whole train config, checked.

    The one check of a grid: the submitter's early check (:func:`grid_parameters`) and the
    pipeline's plan (:func:`plan`) both run it, so neither lets through what the other refuses.

    Raises:
        ValueError, TypeError: As :func:`expand_grid`, or when a branch's config is refused
            (the message names the branch).
    """
    sections = dict(step_config or {})
    base = sections.get("train") or {}
    if not isinstance(base, Mapping):
        raise TypeError(f"step_config['train'] must be a mapping of TrainConfig fields, got {base!r}")
    out = []
    for branch in expand_grid(grid, axes):
        own = {**sections, "train": {**base, **branch.overrides}}
        try:
            cfg = config.step_config(TrainConfig, own, "train", **named)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"branch {branch.label()}: {exc}") from None
        out.append((branch, own, cfg))
    return out


def _trained_as(cfg: TrainConfig) -> tuple[dict[str, Any], ...]:
    """What ``cfg`` trains (:func:`_effective` of :func:`_resolved`), under each size recipe it may get.

    ``recipe: auto`` picks its size recipe from the train split, unknown here: the branch
    trains as one of ``small``, ``medium`` and ``large``, and two ``auto`` branches repeat
    each other only when they train alike under all three.
    """
    if cfg.recipe != "auto":
        return (_effective(_resolved(cfg)),)
    return tuple(_effective(_resolved(dataclasses.replace(cfg, recipe=name))) for name in recipes.SIZE_RECIPES)


def _resolved(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe (and epochs) ``cfg`` trains, the fields its size recipe and domain fill included (``cfg`` names one)."""
    cfg, _ = recipes.resolve(cfg)
    return {k: getattr(cfg, k) for k in (*RECIPE_FIELDS, "epochs")}


def _effective(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` without the fields its other fields make inert, so that branches training alike compare equal.

    RandAugment's N and M act only under policy ``randaugment`` (``augment_cpu.py``,
    ``augment.py``); the mixing probabilities only with an alpha above 0, and the
    MixUp/CutMix switch only with both (``augment.MixupCutmix``). A field still unset
    (``None``, under ``recipe: auto``) makes nothing inert: its value is not known yet.
    """
    out = dict(recipe)
    if out["aug_policy"] not in ("randaugment", None):
        out.pop("randaugment_n"), out.pop("randaugment_m")
    if out["mixup"] is None or out["cutmix"] is None:
        return out
    mixing = [out["mixup"] > 0, out["cutmix"] > 0]
    if not any(mixing):
        out.pop("mixup_prob")
    if not all(mixing):
        out.pop("mixup_switch_prob")
    return out


def branch_prefixes(branches: Sequence[Mapping[str, Any]], trained: Sequence[Any], policy: Any = None) -> dict[str, str]:
    """Branch name -> its committed train prefix, from the plan and the collected step artifacts.

    Args:
        branches: The plan's items (:func:`plan`).
        trained: The branches' train step artifacts (``metadata``: ``branch``, ``prefix``).
        policy: A :class:`imgpipe.readpolicy.ReadPolicy` every prefix must pass.

    Raises:
        ValueError: If a planned branch has no artifact, or an artifact names no planned
            branch or a prefix outside ``policy``.
    """
    found = {}
    for artifact in trained:
        meta = artifact.metadata or {}
        name = check_branch_name(meta.get("branch"))
        prefix = str(meta.get("prefix") or "")
        found[name] = policy.check(f"branch {name}'s train artifact", prefix) if policy is not None else storage.normalize_uri(prefix)
    planned = [b["branch"] for b in branches]
    if sorted(found) != sorted(planned):
        raise ValueError(f"the branches trained ({', '.join(sorted(found))}) are not the branches planned ({', '.join(planned)})")
    return {name: found[name] for name in planned}
