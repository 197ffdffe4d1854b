"""What a remote step receives: its source, destination and resolved config as one JSON argument.

The submitter (:mod:`imgpipe.remote.ray_jobs`, :mod:`imgpipe.remote.kuberay`) builds the
job's command line with :func:`step_entrypoint`; on the cluster :mod:`imgpipe.remote.job`
reads it back with :func:`read_payload` and rebuilds the step's frozen config
(:func:`imgpipe.config.config_from_dict`, the same checks as every config): the job runs
exactly the config its submitter resolved, with no command line parsed in between.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from imgpipe.config import config_to_dict

__all__ = ["payload", "read_payload", "step_entrypoint"]


def payload(source: str, dest: str, cfg: Any) -> str:
    """The JSON argument of ``python -m imgpipe.remote STEP PAYLOAD`` for one run of a step."""
    return json.dumps({"source": source, "dest": dest, "config": config_to_dict(cfg)}, sort_keys=True)


def read_payload(step: str, text: str) -> tuple[str, str, dict[str, Any]]:
    """``(source, dest, config values)`` from :func:`payload`'s JSON.

    Raises:
        ValueError: For anything but the JSON object :func:`payload` makes.
    """
    try:
        body = json.loads(text)
        source, dest, values = body["source"], body["dest"], body["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"imgpipe.remote {step}: the payload must be a JSON object with source, dest, config: {exc}") from exc
    if not isinstance(source, str) or not isinstance(dest, str) or not isinstance(values, dict):
        raise ValueError(f"imgpipe.remote {step}: source and dest must be strings and config a mapping")
    return source, dest, values


def step_entrypoint(step: str, source: str, dest: str, cfg: Any) -> str:
    """The shell command that runs ``step`` with ``cfg`` on the cluster (:mod:`imgpipe.remote.job`).

    The resolved config travels whole, as JSON, so the job runs exactly it, whatever
    the image's defaults.
    """
    return shlex.join(["python", "-m", "imgpipe.remote", step, payload(source, dest, cfg)])
