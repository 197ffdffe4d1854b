"""The entry point of a step run remotely (a Ray job, a KubeRay RayJob): its resolved config as JSON.

``python -m imgpipe.remote STEP '{"source": ..., "dest": ..., "config": {...}}'`` rebuilds
the step's frozen config from the JSON (:func:`imgpipe.config.config_from_dict`, the
same checks as every config) and calls the step function: the job runs exactly the
config its submitter resolved, with no command line parsed in between.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from imgpipe.config import config_from_dict, config_to_dict

__all__ = ["STEPS", "payload", "main"]


def _resize() -> tuple[type, Callable[..., Any]]:
    from imgpipe.steps.resize import ResizeConfig, resize

    return ResizeConfig, resize


# The steps that run remotely: name -> (config class, step function), imported on demand.
STEPS: dict[str, Callable[[], tuple[type, Callable[..., Any]]]] = {"resize": _resize}


def payload(source: str, dest: str, cfg: Any) -> str:
    """The JSON argument of :func:`main` for one run of a step."""
    return json.dumps({"source": source, "dest": dest, "config": config_to_dict(cfg)}, sort_keys=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``STEP`` on the JSON payload; prints the step's summary.

    Raises:
        ValueError: For an unknown step or a payload that is not the JSON :func:`payload` makes.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in STEPS:
        raise ValueError(f"usage: python -m imgpipe.remote {{{','.join(STEPS)}}} PAYLOAD_JSON, got {args!r}")
    step, text = args
    try:
        body = json.loads(text)
        source, dest, values = body["source"], body["dest"], body["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"imgpipe.remote {step}: the payload must be a JSON object with source, dest, config: {exc}") from exc
    config_cls, run = STEPS[step]()
    report = run(source, dest, config_from_dict(config_cls, values))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
