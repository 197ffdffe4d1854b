"""The entry point of a step run remotely (a Ray job, a KubeRay RayJob, a TrainJob's ranks): ``python -m imgpipe.remote``.

``python -m imgpipe.remote STEP '{"source": ..., "dest": ..., "config": {...}}'`` rebuilds
the step's frozen config from the JSON (:mod:`imgpipe.remote.payload`) and calls the step
function on the cluster it was started on: the job runs exactly the config its submitter
resolved, with no command line parsed in between.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from imgpipe.config import config_from_dict
from imgpipe.remote.dispatch import REMOTE_STEPS
from imgpipe.remote.payload import read_payload

__all__ = ["JOB_STEPS", "main"]


def _train() -> tuple[type, Callable[..., Any]]:
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig

    return TrainConfig, train


# What a remote job may run besides the remote-capable steps (REMOTE_STEPS): train on a
# TrainJob's nodes (every rank under torchrun, which describes the process group; rank 0 writes).
JOB_STEPS: dict[str, Callable[[], tuple[type, Callable[..., Any]]]] = {"train": _train}


def _loader(step: str) -> Callable[[], tuple[type, Callable[..., Any]]] | None:
    if step in REMOTE_STEPS:
        return REMOTE_STEPS[step].load
    return JOB_STEPS.get(step)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``STEP`` on the JSON payload; prints the step's summary.

    Raises:
        ValueError: For an unknown step or a payload that is not the JSON
            :func:`imgpipe.remote.payload.payload` makes.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    load = _loader(args[0]) if len(args) == 2 else None
    if load is None:
        raise ValueError(f"usage: python -m imgpipe.remote {{{','.join([*REMOTE_STEPS, *JOB_STEPS])}}} PAYLOAD_JSON, got {args!r}")
    step, text = args
    source, dest, values = read_payload(step, text)
    config_cls, run = load()
    report = run(source, dest, config_from_dict(config_cls, values))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
