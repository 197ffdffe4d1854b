"""Promoting by hand: an operator makes a committed train output its dataset's ``latest``, without the gate.

    imgpipe promote s3://bucket/imgpipe/runs/r7/train          # data root: the prefix's, above runs/<id>/

The gate (:func:`imgpipe.stepio.artifacts.promote_run`) promotes only a model at least as good as
its dataset's current one on the same test images; a person may know better (a model of a new
class set that should serve, a rollback). This records the choice where the gate would have: the
lineage's record and ``latest.json``, marked ``by_hand``, with the model it replaced. It writes
no serving repository and registers nothing (``imgpipe register`` does).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from imgpipe import contract, storage
from imgpipe.readpolicy import SOURCE_LOCAL_ENV, ReadPolicy
from imgpipe.stepio import artifacts as ka

__all__ = ["promote_by_hand"]

log = logging.getLogger(__name__)


def _data_root_of(prefix: str) -> str:
    parts = prefix.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[1] != ka.RUNS:
        raise ValueError(f"{prefix} is not below <data root>/{ka.RUNS}/<run id>/: pass --data-root, the root whose latest it becomes")
    return parts[0]


def promote_by_hand(prefix: str, data_root: str | None = None) -> dict[str, Any]:
    """Records the committed train output ``prefix`` as its dataset's latest under ``data_root``.

    Returns:
        ``latest`` (the record's URI), ``lineage`` (its key, or ``None`` for a model whose data
        names no download), ``previous`` (the train output it replaced, or ``None``) and ``run_id``.

    Raises:
        ValueError: If ``prefix`` is not a committed train output below ``data_root``, or cannot be placed under one.
        UncommittedOutputError: If it is not committed.
    """
    prefix = storage.normalize_uri(prefix)
    root = storage.normalize_uri(data_root) if data_root else _data_root_of(prefix)
    # The operator's own command, not a pod's: a local data root counts as the run's would with local sources allowed.
    policy = ReadPolicy.for_run(root, {**os.environ, SOURCE_LOCAL_ENV: "1"})
    policy.check("the train output to promote", prefix)
    contract.read_manifest(prefix, expect_step="train")
    run_id = prefix.rstrip("/").rsplit("/", 2)[-2] if prefix.startswith(root.rstrip("/") + f"/{ka.RUNS}/") else "by-hand"
    upstream = ka.made_from(prefix, policy)
    dataset = ka.dataset_of({**upstream, "train": prefix}, prefix, policy)
    key = dataset["key"] if dataset else None
    previous = ka.current_model(root, policy, key)
    uri = ka.record_latest(root, run_id, {**upstream, "train": prefix}, dataset, by_hand=True, replaced=previous)
    log.info("promoted by hand: %s is now latest for %s (was %s)", prefix, key or root, previous)
    return {"latest": uri, "lineage": key, "previous": previous, "run_id": run_id}
