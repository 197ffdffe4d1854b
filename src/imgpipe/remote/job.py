"""The entry point of a step run remotely (a Ray job, a KubeRay RayJob, a TrainJob's ranks): ``python -m imgpipe.remote``.

``python -m imgpipe.remote STEP '{"source": ..., "dest": ..., "config": {...}}'`` rebuilds
the step's frozen config from the JSON (:mod:`imgpipe.remote.payload`) and calls the step
function on the cluster it was started on: the job runs exactly the config its submitter
resolved, with no command line parsed in between.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from imgpipe.config import config_from_dict
from imgpipe.remote.payload import read_payload
from imgpipe.step_table import Step, steps_where

__all__ = ["job_steps", "main"]


def job_steps() -> dict[str, Step]:
    """The steps ``python -m imgpipe.remote`` runs: a Ray job's driver, a TrainJob's node (every rank under torchrun)."""
    return steps_where(lambda s: s.job)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``STEP`` on the JSON payload; prints the step's summary.

    Raises:
        ValueError: For an unknown step or a payload that is not the JSON
            :func:`imgpipe.remote.payload.payload` makes.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    entry = job_steps().get(args[0]) if len(args) == 2 else None
    if entry is None:
        raise ValueError(f"usage: python -m imgpipe.remote {{{','.join(job_steps())}}} PAYLOAD_JSON, got {args!r}")
    step, text = args
    source, dest, values = read_payload(step, text)
    report = entry.run()(source, dest, config_from_dict(entry.config_class(), values))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
