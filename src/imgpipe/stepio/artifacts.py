"""What the Kubeflow components hand each other, and where each run writes.

    prefix = run_prefix(data_root, run_id, "clean"); write_step_artifact(cleaned, prefix); promote_run(data_root, run_id)

What each component shows in the UI (Metrics, HTML, the Model) is :mod:`imgpipe.stepio.publish`'s.

How it works in detail: docs/internals/kubeflow.md, "imgpipe.stepio.artifacts".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from imgpipe import contract, shutdown, storage
from imgpipe.config import config_to_dict
from imgpipe.readpolicy import ReadPolicy, ReadRefused
from imgpipe.serving import registry as modelregistry
from imgpipe.stepio import lineage
from imgpipe.stepio.publish import publish_promotion
from imgpipe.train.config import WEIGHTS_CACHE

__all__ = [
    "PIPELINE_NAME",
    "RUNS",
    "LATEST",
    "LATEST_KEYWORD",
    "BY_INPUTS",
    "check_run_id",
    "run_prefix",
    "task_prefix",
    "keyed_step",
    "weights_cache",
    "read_policy",
    "train_overrides",
    "write_step_artifact",
    "read_step_artifact",
    "committed_prefix",
    "verify_handed_on",
    "resolve_previous",
    "sources_for_latest",
    "record_latest",
    "read_latest",
    "current_model",
    "dataset_of",
    "made_from",
    "promote_run",
]

shutdown.skip_collection_at_exit()  # every component imports this module first

log = logging.getLogger(__name__)

C = TypeVar("C")

# The pipeline's name on Kubeflow (its display name, its versions' prefix).
PIPELINE_NAME = "imgpipe"
RUNS = "runs"
LATEST = "latest.json"
LATEST_KEYWORD = "latest"
# The run id a package compiled with caching hands its cacheable tasks (pipelines.options):
# each of them then writes below a prefix keyed by what it reads and how (task_prefix), so
# the output an earlier run's identical task committed, which KFP's cache hands on, is where
# it was, and a later run never claims another run's prefix.
BY_INPUTS = "by-inputs"
_KEYED = re.compile(r"in-[0-9a-f]{20}")
# A run id becomes one path segment; a placeholder that was never substituted
# ("{{$.pipeline_job_uuid}}") must fail loudly instead of becoming a directory.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Metadata the UI shows next to each step artifact (the rest is in the file).
_SUMMARY_KEYS = ("step", "inputs", "outputs", "rejected", "rejects_by_reason")


def check_run_id(run_id: str) -> str:
    """Returns ``run_id`` stripped, or raises if it cannot name a run's prefix.

    Raises:
        ValueError: For an empty id, an unsubstituted kfp placeholder or characters
            that do not belong in one path segment.
    """
    text = (run_id or "").strip()
    if "{{" in text:
        raise ValueError(
            f"run id {run_id!r} is an unsubstituted kfp placeholder: pass dsl.PIPELINE_JOB_ID_PLACEHOLDER "
            "as the whole parameter value (the backend resolves only exact placeholders)"
        )
    if not _RUN_ID.fullmatch(text):
        raise ValueError(f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-' (one path segment)")
    return text


def run_prefix(data_root: str, run_id: str, step: str) -> str:
    """The prefix ``step`` writes in run ``run_id``: ``{data_root}/runs/{run_id}/{step}``."""
    return storage.join(storage.normalize_uri(data_root), RUNS, check_run_id(run_id), step)


def task_prefix(data_root: str, run_id: str, step: str, source: Any, cfg: Any) -> str:
    """The prefix a task writes: the run's own (:func:`run_prefix`), or, for run id :data:`BY_INPUTS`, its inputs'.

    A task of a package compiled with caching gets :data:`BY_INPUTS`: its prefix is then
    ``{data_root}/runs/in-{digest}/{step}``, the digest of ``step``, ``source`` (what it reads:
    URIs, an upstream prefix) and ``cfg`` (its resolved config), so KFP's cache hit for the same
    inputs hands on an output that is still where the earlier run committed it, and a retry of
    the task continues its own prefix as before.
    """
    if check_run_id(run_id) != BY_INPUTS:
        return run_prefix(data_root, run_id, step)
    key = json.dumps({"step": step, "source": source, "config": config_to_dict(cfg)}, sort_keys=True, default=str)
    return run_prefix(data_root, f"in-{hashlib.sha256(key.encode()).hexdigest()[:20]}", step)


def keyed_step(data_root: str, prefix: str) -> str | None:
    """What follows the run folder of ``prefix`` when :func:`task_prefix` keyed it by a task's inputs
    (``train``, ``shards/00000-of-00004/clean``); ``None`` for any other prefix."""
    runs = storage.join(storage.normalize_uri(data_root), RUNS) + "/"
    rest = storage.normalize_uri(prefix)
    if not rest.startswith(runs):
        return None
    key, _, tail = rest[len(runs) :].partition("/")
    return tail if _KEYED.fullmatch(key) else None


def weights_cache(data_root: str) -> str:
    """The pretrained-weights cache every run under ``data_root`` shares: ``{data_root}/weights``."""
    return storage.join(storage.normalize_uri(data_root), WEIGHTS_CACHE)


def read_policy(data_root: str) -> ReadPolicy:
    """What a task of a run under ``data_root`` may read: :meth:`ReadPolicy.for_run` in the pod's environment."""
    return ReadPolicy.for_run(data_root)


def train_overrides(
    model_name: str | None,
    epochs: int | None,
    batch_size: int | None,
    aug_policy: str | None,
    pretrained: str | None,
    nodes: int | None = None,
    recipe: str | None = None,
    domain: str | None = None,
) -> dict[str, Any]:
    """TrainConfig fields from the train component's typed inputs (as the sweep's plan takes them too).

    ``model_name`` is ``model`` (the component's ``model`` is its Model output); an empty
    ``pretrained`` (the pipeline parameter's default) means none, and so does ``epochs`` 0
    (the recipe's); ``resume`` is on: a run's
    prefix is its own, so a first attempt starts fresh and a retry continues.
    """
    return {
        "model": model_name,
        "epochs": epochs or None,
        "batch_size": batch_size,
        "aug_policy": aug_policy or None,
        "pretrained": pretrained or None,
        "resume": True,
        "nodes": nodes,
        "recipe": recipe or None,
        "domain": domain or None,
    }


def write_step_artifact(artifact: Any, prefix: str, **metadata: Any) -> dict[str, Any]:
    """Fills a step's output artifact from its committed output prefix.

    The artifact file holds the step's ``manifest.json``; its metadata holds
    ``prefix`` (what the next step reads), the counts, and ``metadata``.

    Returns:
        The manifest.

    Raises:
        UncommittedOutputError: If ``prefix`` is not committed (the step did not finish).
    """
    prefix = storage.normalize_uri(prefix)
    manifest = contract.read_manifest(prefix)
    storage.write_json(artifact.path, manifest)
    artifact.metadata.update({k: manifest.get(k) for k in _SUMMARY_KEYS})
    artifact.metadata.update(prefix=prefix, **metadata)
    return manifest


def committed_prefix(prefix: str, expect_step: str, policy: ReadPolicy | None = None) -> str:
    """``prefix`` normalized, once it is checked to hold a committed output of ``expect_step``.

    What a step takes when its upstream hands it the prefix as a plain parameter (the
    resize branches do: kfp selects one branch's *parameter* output with ``dsl.OneOf``).

    Raises:
        ValueError: If ``prefix`` is empty, another step's output or outside ``policy``.
        UncommittedOutputError: If it is not committed.
    """
    if not (prefix or "").strip():
        raise ValueError(f"no {expect_step} output prefix was handed over")
    if policy is not None:
        policy.check(f"the {expect_step} output handed over", prefix)
    contract.read_manifest(prefix, expect_step=expect_step)
    return storage.normalize_uri(prefix)


def verify_handed_on(prefix: str, step: str, data_root: str) -> str:
    """What KFP's cache handed on for ``step`` (a task's prefix parameter), checked to be committed.

    Raises:
        ValueError: If it holds no committed output of ``step`` any more (deleted since the
            run that made it), naming what to do; ``ReadRefused`` if it is outside the run's policy.
    """
    try:
        return committed_prefix(prefix, step, read_policy(data_root))
    except contract.UncommittedOutputError as exc:
        raise ValueError(
            f"the {step} output {prefix} that this run was handed (KFP's cache, from an earlier run) is no longer committed: "
            "submit a package compiled without --caching, or delete that output's cached execution"
        ) from exc


def read_step_artifact(artifact: Any, expect_step: str, policy: ReadPolicy | None = None) -> str:
    """The committed prefix an upstream step artifact points at.

    Raises:
        ValueError: If the artifact names no prefix, points at another step's output or
            outside ``policy``.
        UncommittedOutputError: If the prefix is no longer committed.
    """
    prefix = (artifact.metadata or {}).get("prefix")
    if not prefix:
        try:
            prefix = json.loads(Path(artifact.path).read_text()).get("dest")
        except (OSError, ValueError) as exc:
            raise ValueError(f"step artifact {artifact.path} has no 'prefix' metadata and no readable manifest") from exc
    if not prefix:
        raise ValueError(f"step artifact {artifact.path} names no output prefix")
    if policy is not None:
        policy.check(f"the {expect_step} step artifact", prefix)
    contract.read_manifest(prefix, expect_step=expect_step)
    return storage.normalize_uri(prefix)


def read_latest(data_root: str, key: str | None = None) -> dict[str, Any] | None:
    """The record of the last promoted run under ``data_root`` (of the lineage ``key`` when given), or ``None``.

    Raises:
        ValueError: If the record is not a JSON object (naming the file, not its content).
    """
    root = storage.normalize_uri(data_root)
    return lineage.read_record(lineage.record_uri(root, key) if key else storage.join(root, LATEST))


def _lineage_record(data_root: str, key: str | None = None, sources: list[str] | None = None) -> dict[str, Any] | None:
    """The record the gate (``key``) or an incremental run (``sources``) continues; ``latest.json`` when neither is known.

    A lineage with no record of its own falls back to ``latest.json`` only when that record names
    no dataset (written before lineages) or names this one: never to another dataset's model.
    """
    if key is None and sources is None:
        return read_latest(data_root)
    own = read_latest(data_root, key) if key else lineage.newest_for_sources(data_root, sources or [])
    if own is not None:
        return own
    root = read_latest(data_root)
    dataset = (root or {}).get("dataset")
    if root is None or dataset is None:
        return root
    same = dataset.get("key") == key if key else dataset.get("sources") == sources
    return root if same else None


def _latest_prefix(data_root: str, step: str, policy: ReadPolicy | None, record: Mapping[str, Any] | None) -> str | None:
    """The ``step`` prefix a latest ``record`` names, checked against ``policy`` (the run's by default)."""
    prefix = ((record or {}).get("prefixes") or {}).get(step)
    if not prefix:
        return None
    if not isinstance(prefix, str):
        raise ValueError(f"latest.json under {data_root} names a {step} prefix that is not a URI")
    return (policy or read_policy(data_root)).check(f"latest.json's {step} prefix", prefix)


def record_latest(data_root: str, run_id: str, prefixes: Mapping[str, str], dataset: Mapping[str, Any] | None = None, **more: Any) -> str:
    """Records ``prefixes`` (step -> prefix) as the last promoted run; returns the record's URI.

    With ``dataset`` (``key``, ``sources``, ``classes``) the record is also its lineage's
    (:mod:`imgpipe.stepio.lineage`), written first: ``latest.json`` names the newest promotion of any
    lineage. Each file is written once, atomically, so a reader sees the previous record or this one.
    """
    record = {
        "run_id": check_run_id(run_id),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),  # orders a lineage's records
        "prefixes": {k: storage.normalize_uri(v) for k, v in prefixes.items()},
        **({"dataset": dict(dataset)} if dataset else {}),
        **more,
    }
    if dataset:
        storage.write_json(lineage.record_uri(data_root, str(dataset["key"])), record)
    uri = storage.join(storage.normalize_uri(data_root), LATEST)
    storage.write_json(uri, record)
    return uri


def resolve_previous(
    data_root: str, previous: str, policy: ReadPolicy | None = None, step: str = "clean", sources: list[str] | None = None
) -> str | None:
    """The previous output of ``step`` (clean, or download) an incremental run compares against.

    Args:
        data_root: The pipeline's data root.
        previous: ``""`` (a full run), ``"latest"`` (the output of the last successful run
            recorded under ``data_root``; a full run if there is none yet) or the URI of a
            committed clean output (for ``download``: the download output it was made from).
        policy: What the run may read (:func:`read_policy` of ``data_root`` by default).
        step: ``clean`` or ``download``.
        sources: The run's dataset (:func:`imgpipe.stepio.lineage.dataset_sources`): ``latest`` is
            then that dataset's newest promoted run, never another dataset's.

    Raises:
        ValueError: If an explicit URI is not a committed clean output; ``ReadRefused``
            if it, the prefix ``latest.json`` names or the one its manifest names, is outside ``policy``.
    """
    text = (previous or "").strip()
    if not text:
        return None
    policy = policy or read_policy(data_root)
    if text == LATEST_KEYWORD:
        prefix = _latest_prefix(data_root, step, policy, _lineage_record(data_root, sources=sources))
        if not prefix:
            log.info("incremental: no previous %s recorded under %s; processing everything", step, data_root)
            return None
        if not contract.is_committed(prefix):
            log.warning("incremental: the recorded previous %s output %s is gone; processing everything", step, prefix)
            return None
        return storage.normalize_uri(prefix)
    text = policy.check("previous_run_prefix", text)
    manifest = contract.read_manifest(text, expect_step="clean")
    if step == "clean":
        return text
    source = str((manifest.get("upstream") or {}).get("source") or "")
    source = policy.check("previous_run_prefix's download", source)  # read back from storage: untrusted
    if not contract.is_committed(source):
        log.warning("incremental: the download output %s of %s is gone; fetching everything", source, text)
        return None
    contract.read_manifest(source, expect_step=step)
    return source


def sources_for_latest(previous: str, dataset: Any, policy: ReadPolicy) -> list[str] | None:
    """The run's dataset (:mod:`imgpipe.stepio.lineage`) when ``previous`` is ``latest``, read from the download
    step artifact ``dataset``; ``None`` otherwise (nothing is read)."""
    if (previous or "").strip() != LATEST_KEYWORD:
        return None
    return lineage.sources_of_downloads([read_step_artifact(dataset, "download", policy)])


def current_model(data_root: str, policy: ReadPolicy | None = None, key: str | None = None) -> str | None:
    """The train output ``latest.json`` (the lineage ``key``'s record when given) names as the current model, if it is still there.

    Raises:
        ReadRefused: If ``latest.json`` names one outside ``policy`` (the run's by default).
    """
    prefix = _latest_prefix(data_root, "train", policy, _lineage_record(data_root, key=key))
    if prefix and not contract.is_committed(prefix):
        log.warning("promotion: the current model %s recorded in latest.json is gone; the candidate is the first", prefix)
        return None
    return prefix or None


# What a train output is made from, nearest first: each manifest's upstream names the next.
_UPSTREAM = ("resize", "clean", "download")


def made_from(trained: str, policy: ReadPolicy) -> dict[str, str]:
    """The committed prefixes ``trained`` was made from, by step, read back from the manifests' ``upstream``.

    The chain ends where a manifest names no single source (a clean output merged from shards).

    Raises:
        ReadRefused: If a manifest names a prefix outside ``policy`` (read back from storage: untrusted).
        ValueError: If the prefix it names is not a committed output of the step before.
    """
    found: dict[str, str] = {}
    manifest = contract.read_manifest(trained)
    for step in _UPSTREAM:
        source = (manifest.get("upstream") or {}).get("source")
        if not isinstance(source, str) or not source:
            break
        source = policy.check(f"the {step} prefix a manifest names", source)
        manifest = contract.read_manifest(source, expect_step=step)
        found[step] = storage.normalize_uri(source)
    return found


def dataset_of(made_from: Mapping[str, str], trained: str, policy: ReadPolicy) -> dict[str, Any] | None:
    """The lineage of the train output ``trained`` (:mod:`imgpipe.stepio.lineage`): key, sources and classes.

    ``None`` for a model whose data names no download (an output made by hand): such models share
    the data root's one ``latest.json``, as before lineages.

    Raises:
        ReadRefused: If a manifest on the way names a prefix outside ``policy``.
    """
    from imgpipe.train.card import read_card

    try:
        sources = lineage.sources_of(made_from, policy)
        classes = [str(c) for c in read_card(trained)["classes"]]
    except ReadRefused:
        raise
    except (ValueError, FileNotFoundError) as exc:
        log.info("promotion: %s; the model is compared with the data root's latest.json", exc)
        return None
    return {"key": lineage.lineage_key(sources, classes), "sources": sources, "classes": classes}


def promote_run(
    data_root: str,
    run_id: str,
    tolerance: float = 0.0,
    train_step: str = "train",
    *,
    metrics: Any = None,
    report: Any = None,
    policy: ReadPolicy | None = None,
    candidate: str | None = None,
) -> Any:
    """The promotion gate for a finished run (:mod:`imgpipe.steps.promote`): records it in ``latest.json`` only if promoted.

    The current model is the one its dataset and class set last promoted (:func:`dataset_of`),
    never another dataset's in the same data root.

    The decision is committed to ``{data_root}/runs/{run_id}/promote/``, promoted or not,
    and shown in the task's ``metrics`` and ``report`` artifacts when given (:func:`imgpipe.stepio.publish.publish_promotion`).
    What ``latest.json`` and the current model's card name must pass ``policy`` (the run's by default).
    A promoted model is registered (:func:`imgpipe.serving.registry.register_promoted`) before the
    decision is committed and ``latest.json`` moves: a registration that fails fails the task
    with nothing promoted (unless the operator made the registry optional).

    ``candidate``, when given (what the train task handed on), must be this run's train prefix.

    Returns:
        The :class:`imgpipe.steps.promote.Decision`.

    Raises:
        ValueError: If ``candidate`` names another prefix than the run's own train output.
    """
    from imgpipe.steps.promote import PromoteConfig, promote

    policy = policy or read_policy(data_root)
    own = run_prefix(data_root, run_id, train_step)
    trained = own if candidate is None else storage.normalize_uri(candidate)
    if trained != own and keyed_step(data_root, trained) != train_step:
        raise ValueError(f"the train task handed on {candidate}, not this run's train output {own} (nor one keyed by its inputs)")
    prefixes = {**made_from(trained, policy), train_step: trained}
    dataset = dataset_of(prefixes, trained, policy)
    key = dataset["key"] if dataset else None
    try:
        current = current_model(data_root, policy, key)
    except ReadRefused:  # never probed; the gate refuses it again, as a decision rather than a failed run
        current = _latest_prefix(data_root, "train", ReadPolicy.trusted(), _lineage_record(data_root, key=key))

    def register(decision: Any) -> None:  # before the decision is committed and latest.json moves
        if decision.promoted:
            modelregistry.register_promoted(prefixes[train_step], check_run_id(run_id))

    decision = promote(
        prefixes[train_step],
        current,
        run_prefix(data_root, run_id, "promote"),
        PromoteConfig(tolerance=tolerance),
        policy=policy,
        before_commit=register,
    )
    if decision.promoted:
        served = {"serving": decision.serving} if decision.serving else {}  # KServe's storageUri (imgpipe.serving.triton)
        upstream = {s: prefixes[s] for s in _UPSTREAM if s in prefixes}
        record_latest(data_root, run_id, {**upstream, "train": prefixes[train_step], **served}, dataset)
    else:
        log.warning("%s; latest.json still names %s", decision.summary(), decision.current_prefix)
    if metrics is not None and report is not None:
        publish_promotion(decision, metrics=metrics, report=report)
    return decision
