"""The promotion gate: a new model replaces the current one only if it is at least as good on the same test images.

:func:`promote` compares the candidate (a committed train output) with the current model
(the one ``latest.json`` names) like for like: both are scored by one evaluation
(:func:`imgpipe.train.saved.evaluate_saved`: the same code, fp32, batch and no TTA) on the
candidate's **test** split, never on a validation split a model was selected on, and only
on the test images the current model neither trained nor validated on (by sha256: the
disjoint part, whose size the decision reports; fewer than ``min_images`` is no
comparison). The metric is the one the candidate's run ranked its epochs by. Models whose
recorded preprocessing differs are not compared, nor is a current model that cannot be
loaded or scored: each is a decision with its reason, never a crash.

The decision is a committed output of its own (``promotion.json``, ``promotion.html``);
the caller records the run as ``latest`` only when it says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from imgpipe import commit, contract, storage, writer
from imgpipe.config import check_numbers, config_to_yaml
from imgpipe.contract import StepReport
from imgpipe.readpolicy import ReadPolicy
from imgpipe.report import html as htmlpage
from imgpipe.serving import triton as serving
from imgpipe.train.card import preprocessing_mismatch, read_card
from imgpipe.train.partition import describe_split, read_split_columns, split_names
from imgpipe.train.scores import confusion_scores

__all__ = ["PromoteConfig", "Decision", "promote", "read_decision"]

log = logging.getLogger(__name__)

EVALUATION = "evaluate_saved: fp32, batch 64, the evaluation view, no TTA"


@dataclass(frozen=True)
class PromoteConfig:
    """Settings of the promotion gate.

    Attributes:
        tolerance: How far (absolute) below the current model's score the candidate may be
            and still be promoted; 0 asks for at least the same score.
        split: The split both models are scored on: ``test`` only (a model's validation
            split chose its epoch; scoring it there is not like for like).
        min_images: The fewest test images a comparison may rest on, once the images the
            current model trained or validated on are left out.
    """

    tolerance: float = 0.0
    split: str = "test"
    min_images: int = 20

    def __post_init__(self) -> None:
        check_numbers(self)
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"tolerance is a difference of scores in [0, 1], got {self.tolerance}")
        if self.split != "test":
            raise ValueError(
                f"split must be test, got {self.split!r}: a model's epoch was selected on its validation split, "
                "so scoring it there favours it; the gate scores both models on the candidate's test split"
            )
        if isinstance(self.min_images, bool) or not isinstance(self.min_images, int) or self.min_images < 1:
            raise ValueError(f"min_images must be an integer >= 1, got {self.min_images!r}")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate becomes the current model, on which numbers.

    Attributes:
        promoted: The verdict.
        reason: Why, in one sentence with both numbers.
        metric: The metric compared (``macro_f1`` or ``pr_auc``).
        candidate: The candidate's score on the split.
        current: The current model's score there, ``None`` when there is none or it could not be scored.
        candidate_prefix: The candidate's train output.
        current_prefix: The current model's train output, if any.
        split: The split compared on.
        images: Images of the split both were scored on.
        images_digest: sha256 over the split's images' sha256 values, in order.
        tolerance: The tolerance applied.
        overlap: Test images the current model trained or validated on (left out), ``None``
            when there is no current model or its data could not be read.
        evaluation: How both models were scored.
        trained_score: The candidate's own test score from its run (for reference only).
        serving: The Triton model repository written for a promoted model (KServe's
            ``storageUri``, :mod:`imgpipe.serving.triton`); ``None`` when not promoted or it has no ONNX export.
    """

    promoted: bool
    reason: str
    metric: str
    candidate: float | None
    current: float | None
    candidate_prefix: str
    current_prefix: str | None
    split: str
    images: int
    images_digest: str
    tolerance: float
    overlap: int | None = None
    evaluation: str = EVALUATION
    trained_score: float | None = None
    serving: str | None = None

    def summary(self) -> str:
        return f"promotion: {'promoted' if self.promoted else 'NOT promoted'}: {self.reason}"


def _metric(metrics: dict[str, Any]) -> str:
    """The test metric matching the key the run ranked its epochs by."""
    ranked = (metrics.get("selection") or {}).get("ranked_by") or ["val_macro_f1"]
    return str(ranked[0]).removeprefix("val_")


def _test_hashes(data: str, split: str) -> list[str]:
    """The sha256 of every image of ``split``, in file order (the evaluation's row indexes)."""
    info = describe_split(data, split, contract.read_manifest(data))
    return [str(h) for h in read_split_columns(info, ["sha256"]).column("sha256").to_pylist()]


def _seen_by(model_card: dict[str, Any], policy: ReadPolicy) -> set[str]:
    """The sha256 of the images a model trained and validated on (its data's train and val splits).

    Raises:
        Exception: Whatever reading that data raises (the caller records it); ``ReadRefused``
            if the card names data outside ``policy``.
    """
    data = policy.check("the current model's card data.uri", model_card["data"]["uri"])
    manifest = contract.read_manifest(data)
    seen: set[str] = set()
    for split in ("train", "val"):
        if split in split_names(data, manifest):
            seen.update(str(h) for h in read_split_columns(describe_split(data, split, manifest), ["sha256"]).column("sha256").to_pylist())
    return seen


def _score(result: Any, keep: np.ndarray, metric: str, classes: int) -> float:
    """``metric`` of an evaluation over the rows ``keep`` (row indexes of the split)."""
    rows = result.rows
    at = np.isin(rows.index, keep)
    labels, probs = rows.label[at].astype(np.int64), rows.probs[at]
    if metric == "pr_auc":
        from imgpipe.train.evaluation import (
            macro_average_precision,  # torch: only where models are scored
        )

        return float(macro_average_precision(probs, labels)[0])
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, probs.argmax(axis=1)), 1)
    accuracy, macro_f1, _ = confusion_scores(confusion)
    return float(accuracy if metric == "accuracy" else macro_f1)


def decide(candidate: str, current: str | None, cfg: PromoteConfig | None = None, device: str = "auto", policy: ReadPolicy | None = None) -> Decision:
    """The verdict on ``candidate`` against ``current`` (see the module docstring).

    ``policy`` (a pipeline task's :class:`~imgpipe.readpolicy.ReadPolicy`; the CLI's trusts
    everything) bounds what the cards name: a current model outside it is not promoted against.

    Raises:
        ValueError: If the candidate has no test split to be scored on.
    """
    from imgpipe.train.saved import evaluate_saved  # torch: only where models are scored

    cfg = cfg or PromoteConfig()
    policy = policy or ReadPolicy.trusted()
    candidate = storage.normalize_uri(candidate)
    contract.read_manifest(candidate, expect_step="train")
    metrics = json.loads(storage.read_bytes(storage.join(candidate, contract.METRICS)))
    card = read_card(candidate)
    metric = _metric(metrics)
    trained = (metrics.get("test") or {}).get(metric)
    if metrics.get("diverged") or card.get("diverged"):
        # Never scored: weights from a run whose loss blew up are no candidate, whatever a test split says of them.
        summary = (metrics.get("divergence") or card.get("divergence") or {}).get("events") or [{}]
        where = summary[-1]
        at = f" in epoch {where['epoch'] + 1} at step {where['step'] + 1} (lr {where['lr']:.3g})" if "epoch" in where else ""
        return Decision(
            promoted=False,
            reason=f"not promoted: the candidate's training diverged{at}; train it again with a lower learning rate",
            metric=metric,
            candidate=None,
            current=None,
            candidate_prefix=candidate,
            current_prefix=None if current is None else storage.redact_uri(current),
            split=cfg.split,
            images=0,
            images_digest="",
            tolerance=cfg.tolerance,
            trained_score=None,
        )
    data = policy.check("the candidate's card data.uri", card["data"]["uri"])
    if "test" not in split_names(data, contract.read_manifest(data)):
        raise ValueError(f"{candidate} trained on {data}, which has no test split: it cannot be gated")
    hashes = _test_hashes(data, cfg.split)
    digest = hashlib.sha256("".join(hashes).encode()).hexdigest()
    classes = len(card["classes"])
    ours_eval = evaluate_saved(candidate, data, cfg.split, device=device)
    every = np.arange(len(hashes))
    base = {
        "metric": metric,
        "candidate_prefix": candidate,
        "split": cfg.split,
        "images_digest": digest,
        "tolerance": cfg.tolerance,
        "trained_score": None if trained is None else float(trained),
    }
    if current is None:
        ours = _score(ours_eval, every, metric, classes)
        return Decision(
            promoted=True,
            reason=f"the first model: {metric} {ours:.4f} on {len(hashes)} {cfg.split} images",
            candidate=ours,
            current=None,
            current_prefix=None,
            images=len(hashes),
            **base,
        )
    try:
        shown = storage.normalize_uri(current)
    except ValueError:  # refused below, as a decision
        shown = storage.redact_uri(current)

    def refused(why: str, images: int = len(hashes), overlap: int | None = None) -> Decision:
        return Decision(
            promoted=False,
            reason=why,
            candidate=_score(ours_eval, every, metric, classes),
            current=None,
            current_prefix=shown,
            images=images,
            overlap=overlap,
            **base,
        )

    try:
        current = policy.check("latest.json's train prefix", current)
        their_card = read_card(current, card["classes"])
        mismatch = preprocessing_mismatch(card.get("preprocessing"), their_card.get("preprocessing"))
        if mismatch and card.get("preprocessing") is not None and their_card.get("preprocessing") is not None:
            return refused(
                f"not promoted: the models' preprocessing differs ({mismatch}), so no test set scores both alike; "
                "promote by hand if the change is intended"
            )
        try:
            seen, unchecked = _seen_by(their_card, policy), ""
        except Exception as exc:  # noqa: BLE001 - its data deleted or moved: say so, and compare on every test image
            seen, unchecked = (
                set(),
                f" (overlap unchecked: the current model's training data {their_card['data']['uri']} cannot be read, {type(exc).__name__})",
            )
        keep = np.array([i for i, h in enumerate(hashes) if h not in seen], np.int64)
        overlap = None if unchecked else len(hashes) - len(keep)
        if len(keep) < cfg.min_images:
            return refused(
                f"not promoted: the current model trained or validated on {overlap} of the {len(hashes)} test "
                f"images; the {len(keep)} left are fewer than {cfg.min_images} to compare on",
                len(keep),
                overlap,
            )
        theirs_eval = evaluate_saved(current, data, cfg.split, device=device)
    except Exception as exc:  # noqa: BLE001 - any failure to load or score the current model is a decision, not a crash
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return refused(f"current model cannot be scored: not promoted, reason {detail}; promote by hand if intended")
    ours, value = _score(ours_eval, keep, metric, classes), _score(theirs_eval, keep, metric, classes)
    promoted = ours >= value - cfg.tolerance
    verdict = "at least" if ours >= value else ("within the tolerance of" if promoted else "below")
    left_out = f", leaving out {overlap} the current model trained or validated on" if overlap else unchecked
    reason = (
        f"{metric} {ours:.4f} is {verdict} the current model's {value:.4f} on the same {len(keep)} {cfg.split} images"
        f"{left_out}, both scored by one evaluation" + (f" (tolerance {cfg.tolerance:g})" if cfg.tolerance else "")
    )
    return Decision(
        promoted=promoted, reason=reason, candidate=ours, current=value, current_prefix=current, images=len(keep), overlap=overlap, **base
    )


def _html(decision: Decision) -> str:
    rows = [
        {"model": "candidate", "prefix": decision.candidate_prefix, decision.metric: decision.candidate},
        {"model": "current", "prefix": decision.current_prefix or "(none)", decision.metric: decision.current},
    ]
    verdict = "promoted" if decision.promoted else "not promoted"
    parts = [
        htmlpage.section(f"Verdict: {verdict}", note=decision.reason),
        htmlpage.section(
            f"Scores on the candidate's {decision.split} split ({decision.images} images)", htmlpage.table(rows, ["model", decision.metric, "prefix"])
        ),
    ]
    return htmlpage.page("imgpipe promotion", parts)


def promote(
    candidate: str,
    current: str | None,
    dest: str,
    cfg: PromoteConfig | None = None,
    device: str = "auto",
    policy: ReadPolicy | None = None,
    before_commit: Callable[[Decision], None] | None = None,
) -> Decision:
    """Decides on ``candidate`` and commits the decision to ``dest``.

    Args:
        candidate: The new run's committed train output.
        current: The current model's train output (``latest.json``), or ``None``.
        dest: Output prefix of the decision; replaced.
        cfg: Tolerance and split.
        device: Where the current model is re-evaluated.
        policy: What the cards may name (:func:`decide`); everything when ``None``.
        before_commit: Called with the decision before anything is written (the pipeline
            registers a promoted model there); what it raises leaves ``dest`` untouched.

    Raises:
        ValueError: If a promoted model's ONNX export is one KServe's Triton cannot load
            (:func:`imgpipe.serving.triton.check_loadable`), before anything is registered or written.
    """
    cfg = cfg or PromoteConfig()
    started = time.monotonic()
    dest = storage.normalize_uri(dest)
    commit.check_disjoint(dest, [candidate] + ([current] if current else []), "promote")
    decision = decide(candidate, current, cfg, device, policy)
    # Before the registry hears of it: a model Triton cannot load is refused with nothing registered.
    repository = _serving_files(decision.candidate_prefix) if decision.promoted else {}
    if before_commit is not None:
        before_commit(decision)
    attempt = commit.claim(dest, "promote")
    if repository:
        decision = replace(decision, serving=storage.join(dest, serving.REPOSITORY))
    outputs = {
        contract.PROMOTION_JSON: json.dumps(asdict(decision), indent=2),
        contract.PROMOTION_HTML: _html(decision),
        contract.CONFIG: config_to_yaml(cfg),
        **{f"{serving.REPOSITORY}/{name}": data for name, data in repository.items()},
    }
    files = sorted((writer.write_entry(dest, name, data) for name, data in outputs.items()), key=lambda f: f.name)
    body = StepReport(
        step="promote",
        dest=dest,
        inputs=1,
        outputs=1,
        rejected=0,
        files=files,
        seconds=round(time.monotonic() - started, 3),
        extra={"decision": asdict(decision)},
    )
    upstream = {"step": "train", "candidate": decision.candidate_prefix, "current": decision.current_prefix}
    commit.publish(dest, "promote", attempt, commit.manifest_body(body, cfg, upstream))
    log.info("%s", decision.summary())
    return decision


def _serving_files(candidate: str) -> dict[str, bytes]:
    """The Triton model repository of a promoted candidate (:func:`imgpipe.serving.triton.repository_files`); none without an ONNX export."""
    card = read_card(candidate)
    onnx = card["files"].get("onnx")
    if not onnx:
        log.warning("promote: %s has no ONNX export (%s); no serving repository is written", candidate, card.get("export_failures"))
        return {}
    return serving.repository_files(card, storage.read_bytes(storage.join(candidate, onnx)))


def read_decision(prefix: str) -> Decision:
    """The decision a committed promote output holds."""
    contract.read_manifest(prefix, expect_step="promote")
    return Decision(**json.loads(storage.read_bytes(storage.join(prefix, contract.PROMOTION_JSON))))
