"""The pipeline's steps, in order: each one's config, function, report, image and where it may run.

    from imgpipe.step_table import STEPS, step
    cfg = step("clean").config_class()(workers=2); report = step("clean").function()(src, dest, cfg)

Everything that lists the steps (config sections, the command line, ``imgpipe run``, reports,
remote dispatch and remote jobs, the pipeline's images) reads them here. Entries name their
parts as ``module:attribute`` and import them on demand: a step's imports are heavy (Ray,
OpenCV, torch), and this module sits below all of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Step", "STEPS", "step", "steps_where"]


@dataclass(frozen=True)
class Step:
    """One step of the pipeline.

    Attributes:
        name: The step's name: its CLI command, config section, output folder and report.
        summary: One line for ``imgpipe --help``.
        config: ``module:Class`` of its frozen config.
        function: ``module:function`` of the step, ``(source, dest, config) -> StepReport``.
        report: ``module:function`` that reports on a committed output of the step.
        image: The image kind it runs in (:data:`imgpipe.containers.catalog.KINDS`).
        ray_target: The config field naming a Ray cluster, for a step that may run on one
            (as a Ray job or a KubeRay RayJob); ``None`` runs it where its task runs.
        job: Whether ``python -m imgpipe.remote STEP`` may run it (a Ray job's driver, a
            TrainJob's node).
    """

    name: str
    summary: str
    config: str
    function: str
    report: str
    image: str
    ray_target: str | None = None
    job: bool = False

    def config_class(self) -> type:
        """The config class (imported now)."""
        return _load(self.config)

    def run(self) -> Callable[..., Any]:
        """The step function (imported now)."""
        return _load(self.function)

    def report_builder(self) -> Callable[..., Any]:
        """The report builder (imported now)."""
        return _load(self.report)


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step(
            "download",
            "pull images (archives, bucket prefixes, URI lists, WebDataset, Parquet) into object storage as Parquet",
            config="imgpipe.steps.download:DownloadConfig",
            function="imgpipe.steps.download:download",
            report="imgpipe.report.steps:download_report",
            image="cpu",
        ),
        Step(
            "clean",
            "validate, normalize, label, split and shuffle the images",
            config="imgpipe.clean.config:CleanConfig",
            function="imgpipe.steps.clean:clean",
            report="imgpipe.report.clean:clean_report",
            image="cpu",
        ),
        Step(
            "resize",
            "resize clean images to a model's input size on Ray Data",
            config="imgpipe.resize.config:ResizeConfig",
            function="imgpipe.steps.resize:resize",
            report="imgpipe.report.resize:resize_report",
            image="ray",
            ray_target="ray_address",
            job=True,
        ),
        Step(
            "train",
            "train a classifier on a committed resize output",
            config="imgpipe.train.config:TrainConfig",
            function="imgpipe.steps.train:train",
            report="imgpipe.report.steps:train_report",
            image="gpu",
            job=True,
        ),
    )
}


def step(name: str) -> Step:
    """The step called ``name``.

    Raises:
        ValueError: For another name, listing the steps.
    """
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    return STEPS[name]


def steps_where(predicate: Callable[[Step], bool]) -> dict[str, Step]:
    """The steps ``predicate`` holds for, in pipeline order."""
    return {name: s for name, s in STEPS.items() if predicate(s)}
