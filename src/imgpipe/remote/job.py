"""The entry point of a step run remotely (a Ray job, a KubeRay RayJob): ``python -m imgpipe.remote``.

``python -m imgpipe.remote STEP '{"source": ..., "dest": ..., "config": {...}}'`` rebuilds
the step's frozen config from the JSON (:mod:`imgpipe.remote.payload`) and calls the step
function on the cluster it was started on: the job runs exactly the config its submitter
resolved, with no command line parsed in between.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from imgpipe.config import config_from_dict
from imgpipe.remote.dispatch import REMOTE_STEPS
from imgpipe.remote.payload import read_payload

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``STEP`` on the JSON payload; prints the step's summary.

    Raises:
        ValueError: For an unknown step or a payload that is not the JSON
            :func:`imgpipe.remote.payload.payload` makes.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in REMOTE_STEPS:
        raise ValueError(f"usage: python -m imgpipe.remote {{{','.join(REMOTE_STEPS)}}} PAYLOAD_JSON, got {args!r}")
    step, text = args
    source, dest, values = read_payload(step, text)
    config_cls, run = REMOTE_STEPS[step].load()
    report = run(source, dest, config_from_dict(config_cls, values))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
