"""What the tasks of a sharded download + clean do in their pods (``PipelineOptions.shards`` above 1).

    clean_prefix = prepare_shard({"index": 2, "count": 8}, source_uri, data_root, run_id)
    merged = merge_shards([clean_prefix, ...], data_root, run_id)

Shard ``i`` of ``n`` downloads its share of the sources (:mod:`imgpipe.data.sharding`) into
``{data_root}/runs/{run}/shards/{i:05d}-of-{n:05d}/download/`` and cleans it into ``.../clean/``
in the same pod; the merge (:func:`imgpipe.steps.merge.merge`) writes ``runs/{run}/clean/``,
which resize reads as it reads an unsharded run's. With ``previous_run_prefix`` a shard
fetches only what changed since the previous run's same shard (same shard count), and every
shard skips the images the previous run's clean output holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from imgpipe import config, contract, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.contract import StepReport
from imgpipe.data.sharding import Shard
from imgpipe.data.sources import SourcePolicy
from imgpipe.readpolicy import ReadPolicy, ReadRefused
from imgpipe.stepio import artifacts as ka
from imgpipe.stepio import lineage

__all__ = ["SHARDS_DIR", "shard_items", "shard_prefix", "clean_config", "prepare_shard", "merge_shards"]

log = logging.getLogger(__name__)

# The folder of a run that holds its shards' own outputs.
SHARDS_DIR = "shards"


def shard_items(count: int) -> list[dict[str, int]]:
    """The items of the pipeline's ``ParallelFor``: one per shard."""
    return [Shard(i, count).as_dict() for i in range(Shard(0, count).count)]


def _shard(item: Any) -> Shard:
    """A loop item back into a :class:`Shard`, checked (it arrives as JSON)."""
    if not isinstance(item, Mapping) or set(item) != {"index", "count"}:
        raise ValueError(f"a shard item must be {{'index': i, 'count': n}}, got {item!r}")
    # A loop item travels as a protobuf Struct, whose numbers are doubles: 2 arrives as 2.0.
    index, count = (int(v) if isinstance(v, float) and v.is_integer() else v for v in (item["index"], item["count"]))
    return Shard(index, count)


def shard_prefix(data_root: str, run_id: str, shard: Shard, step: str, source: Any, cfg: Any) -> str:
    """Where ``step`` (download, annotations, clean) of ``shard`` writes in run ``run_id`` (:func:`imgpipe.stepio.artifacts.task_prefix`)."""
    return ka.task_prefix(data_root, run_id, f"{SHARDS_DIR}/{shard.name}/{step}", source, cfg)


def clean_config(
    data_root: str, step_config: dict | None, *, policy: ReadPolicy, annotations: str | None, previous: str | None, **named: Any
) -> CleanConfig:
    """The clean config of a shard and of the merge: the run's parameters, as the clean task makes it."""
    return config.step_config(CleanConfig, step_config, "clean", policy=policy, annotations=annotations, skip_hashes_from=previous, **named)


def _previous_download(previous_clean: str | None, shard: Shard, policy: ReadPolicy) -> str | None:
    """The previous run's download of the same shard, when that run was sharded alike (else ``None``: fetch everything)."""
    if not previous_clean:
        return None
    run_dir = storage.normalize_uri(previous_clean).rstrip("/").rsplit("/", 1)[0]
    prefix = storage.join(run_dir, SHARDS_DIR, shard.name, "download")
    try:
        prefix = policy.check("previous_run_prefix's shard download", prefix)
    except ReadRefused:
        return None
    if not contract.is_committed(prefix):
        log.info("incremental: %s has no download of shard %s; this shard fetches everything", run_dir, shard.name)
        return None
    manifest = contract.read_manifest(prefix, expect_step="download")
    if (manifest.get("extra") or {}).get("shard") != shard.as_dict():
        log.info("incremental: %s was sharded otherwise; shard %s fetches everything", run_dir, shard.name)
        return None
    return prefix


def prepare_shard(
    item: Any,
    source_uri: str,
    data_root: str,
    run_id: str,
    *,
    source_sha256: str = "",
    annotations_uri: str = "",
    annotations_sha256: str = "",
    previous_run_prefix: str = "",
    step_config: dict | None = None,
    **named: Any,
) -> StepReport:
    """Downloads and cleans one shard's share of the sources; returns the shard's clean report.

    The URIs are run parameters: they get the pod's source policy, as the download task's do.
    """
    from imgpipe.steps.clean import clean
    from imgpipe.steps.download import DownloadConfig, download

    shard = _shard(item)
    policy = ka.read_policy(data_root)
    sources = SourcePolicy.from_env()

    def fetch(uri: str, sha256: str, step: str, previous: str | None = None, part: Shard | None = None) -> str:
        cfg = config.step_config(DownloadConfig, step_config, "download", sha256=[sha256] if sha256 else None)
        return download(
            [uri], shard_prefix(data_root, run_id, shard, step, [uri, previous], cfg), cfg, policy=sources, previous=previous, shard=part
        ).dest

    annotations = fetch(annotations_uri, annotations_sha256, "annotations") if annotations_uri else None
    previous = ka.resolve_previous(data_root, previous_run_prefix, policy, sources=lineage.dataset_sources([source_uri]))
    images = fetch(source_uri, source_sha256, "download", _previous_download(previous, shard, policy), shard)
    cfg = clean_config(data_root, step_config, policy=policy, annotations=annotations, previous=previous, **named)
    return clean(images, shard_prefix(data_root, run_id, shard, "clean", images, cfg), cfg, whole=False)


def merge_shards(
    shards: Sequence[str], data_root: str, run_id: str, *, previous_run_prefix: str = "", step_config: dict | None = None, **named: Any
) -> StepReport:
    """Merges the shards' clean outputs into ``runs/{run}/clean/``; every prefix must be one of this run's shards."""
    from imgpipe.steps.merge import merge

    policy = ka.read_policy(data_root)
    if isinstance(shards, str) or not isinstance(shards, Sequence) or not shards:
        raise ValueError(f"merge_shards needs the list of the shards' clean prefixes, got {shards!r}")
    for prefix in shards:
        if not isinstance(prefix, str) or not _is_shard_of(data_root, run_id, prefix):
            raise ValueError(f"{prefix!r} is not a shard of run {run_id} (below {ka.run_prefix(data_root, run_id, SHARDS_DIR)})")
    sources = lineage.sources_of_cleans(shards, policy) if previous_run_prefix.strip() == ka.LATEST_KEYWORD else None
    previous = ka.resolve_previous(data_root, previous_run_prefix, policy, sources=sources)
    cfg = clean_config(data_root, step_config, policy=policy, annotations=None, previous=previous, **named)
    ordered = sorted(storage.normalize_uri(p) for p in shards)
    return merge(ordered, ka.task_prefix(data_root, run_id, "clean", ordered, cfg), cfg)


def _is_shard_of(data_root: str, run_id: str, prefix: str) -> bool:
    """Whether ``prefix`` is a shard's clean output of run ``run_id``.

    For :data:`~imgpipe.stepio.artifacts.BY_INPUTS`: of any run, in a folder keyed by its inputs.
    """
    prefix = storage.normalize_uri(prefix)
    if ka.check_run_id(run_id) != ka.BY_INPUTS:
        return prefix.startswith(ka.run_prefix(data_root, run_id, SHARDS_DIR).rstrip("/") + "/")
    return (ka.keyed_step(data_root, prefix) or "").startswith(f"{SHARDS_DIR}/")
