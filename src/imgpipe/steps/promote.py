"""The promotion gate: a new model replaces the current one only if it is at least as good on the same test images.

A scheduled retraining run that finishes is not thereby better. :func:`promote` compares
the candidate (a committed train output) with the current model (the one ``latest.json``
names, :mod:`imgpipe.kfp.artifacts`) on **the candidate's test split**: the candidate's
own test metric, from its run, against the current model re-evaluated there
(:func:`imgpipe.steps.train.evaluate_saved`), on the metric the candidate's run ranked
its epochs by (macro-F1, or PR-AUC when the classes are imbalanced;
:mod:`imgpipe.train.selection`). The candidate is promoted when it scores at least the
current model's figure minus ``tolerance``; the first model promotes itself. A model that
cannot be compared (other classes or channels, no test split) is not promoted: the
decision says why, and nothing is compared silently.

The decision is a committed output of its own (``promotion.json``, ``promotion.html``);
the caller records the run as ``latest`` only when it says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from imgpipe import contract, storage
from imgpipe.config import config_to_yaml
from imgpipe.contract import StepReport
from imgpipe.report import html as htmlpage
from imgpipe.train.partition import describe_split, read_split_columns

__all__ = ["PROMOTION_JSON", "PROMOTION_HTML", "PromoteConfig", "Decision", "promote", "read_decision"]

log = logging.getLogger(__name__)

PROMOTION_JSON = "promotion.json"
PROMOTION_HTML = "promotion.html"


@dataclass(frozen=True)
class PromoteConfig:
    """Settings of the promotion gate.

    Attributes:
        tolerance: How far (absolute) below the current model's score the candidate may be
            and still be promoted; 0 asks for at least the same score.
        split: The split both models are scored on (the candidate's data).
    """

    tolerance: float = 0.0
    split: str = "test"

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"tolerance is a difference of scores in [0, 1], got {self.tolerance}")
        if self.split not in ("val", "test"):
            raise ValueError(f"split must be val or test, got {self.split!r}")


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

    def summary(self) -> str:
        return f"promotion: {'promoted' if self.promoted else 'NOT promoted'}: {self.reason}"


def _metric(metrics: dict[str, Any]) -> str:
    """The test metric matching the key the run ranked its epochs by."""
    ranked = (metrics.get("selection") or {}).get("ranked_by") or ["val_macro_f1"]
    return str(ranked[0]).removeprefix("val_")


def _images_digest(data: str, split: str) -> tuple[int, str]:
    """How many images the split has, and a digest of their sha256 values in file order."""
    info = describe_split(data, split, contract.read_manifest(data))
    digest = hashlib.sha256()
    for sha in read_split_columns(info, ["sha256"]).column("sha256").to_pylist():
        digest.update(sha.encode())
    return info.num_samples, digest.hexdigest()


def decide(candidate: str, current: str | None, cfg: PromoteConfig | None = None, device: str = "auto") -> Decision:
    """The verdict on ``candidate`` against ``current`` (see the module docstring).

    Raises:
        ValueError: If the candidate has no ``split`` metrics (it trained without that split).
    """
    from imgpipe.steps.train import evaluate_saved  # torch: only where a current model is scored

    cfg = cfg or PromoteConfig()
    candidate = storage.normalize_uri(candidate)
    contract.read_manifest(candidate, expect_step="train")
    metrics = json.loads(storage.read_bytes(storage.join(candidate, contract.METRICS)))
    card = json.loads(storage.read_bytes(storage.join(candidate, contract.MODEL_CARD)))
    metric = _metric(metrics)
    scores = metrics.get(cfg.split) if cfg.split == "test" else {k.removeprefix("val_"): v for k, v in (metrics.get("kept") or {}).items()}
    if not scores or scores.get(metric) is None:
        raise ValueError(f"{candidate} has no {cfg.split} {metric}: it cannot be gated on its {cfg.split} split")
    ours = float(scores[metric])
    data = card["data"]["uri"]
    images, digest = _images_digest(data, cfg.split)
    base = {"metric": metric, "candidate": ours, "candidate_prefix": candidate, "split": cfg.split,
            "images": images, "images_digest": digest, "tolerance": cfg.tolerance}  # fmt: skip
    if current is None:
        return Decision(promoted=True, reason=f"the first model: {metric} {ours:.4f} on {images} {cfg.split} images", current=None, current_prefix=None, **base)
    current = storage.normalize_uri(current)
    try:
        theirs = evaluate_saved(current, data, cfg.split, device=device)
    except ValueError as exc:
        reason = f"the current model {current} cannot be scored on the candidate's {cfg.split} images ({exc}); promote it by hand if that is intended"
        return Decision(promoted=False, reason=reason, current=None, current_prefix=current, **base)
    if theirs.images != images:
        raise RuntimeError(f"scored the current model on {theirs.images} images of a split of {images}")
    value = float(getattr(theirs, metric))
    promoted = ours >= value - cfg.tolerance
    verdict = "at least" if ours >= value else ("within the tolerance of" if promoted else "below")
    reason = (f"{metric} {ours:.4f} is {verdict} the current model's {value:.4f} on the same {images} {cfg.split} images"
              + (f" (tolerance {cfg.tolerance:g})" if cfg.tolerance else ""))  # fmt: skip
    return Decision(promoted=promoted, reason=reason, current=value, current_prefix=current, **base)


def _html(decision: Decision) -> str:
    rows = [
        {"model": "candidate", "prefix": decision.candidate_prefix, decision.metric: decision.candidate},
        {"model": "current", "prefix": decision.current_prefix or "(none)", decision.metric: decision.current},
    ]
    verdict = "promoted" if decision.promoted else "not promoted"
    parts = [htmlpage.section(f"Verdict: {verdict}", note=decision.reason),
             htmlpage.section(f"Scores on the candidate's {decision.split} split ({decision.images} images)",
                              htmlpage.table(rows, ["model", decision.metric, "prefix"]))]  # fmt: skip
    return htmlpage.page("imgpipe promotion", parts)


def promote(candidate: str, current: str | None, dest: str, cfg: PromoteConfig | None = None, device: str = "auto") -> Decision:
    """Decides on ``candidate`` and commits the decision to ``dest``.

    Args:
        candidate: The new run's committed train output.
        current: The current model's train output (``latest.json``), or ``None``.
        dest: Output prefix of the decision; replaced.
        cfg: Tolerance and split.
        device: Where the current model is re-evaluated.
    """
    cfg = cfg or PromoteConfig()
    started = time.monotonic()
    dest = storage.normalize_uri(dest)
    contract.check_disjoint(dest, [candidate] + ([current] if current else []), "promote")
    decision = decide(candidate, current, cfg, device)
    attempt = contract.claim(dest, "promote")
    outputs = {
        PROMOTION_JSON: json.dumps(asdict(decision), indent=2).encode(),
        PROMOTION_HTML: _html(decision).encode(),
        contract.CONFIG: config_to_yaml(cfg).encode(),
    }
    files = sorted((contract.write_entry(dest, name, data) for name, data in outputs.items()), key=lambda f: f.name)
    body = StepReport(step="promote", dest=dest, inputs=1, outputs=1, rejected=0, files=files,
                      seconds=round(time.monotonic() - started, 3), extra={"decision": asdict(decision)})  # fmt: skip
    upstream = {"step": "train", "candidate": decision.candidate_prefix, "current": decision.current_prefix}
    contract.publish(dest, "promote", attempt, contract.manifest_body(body, cfg, upstream))
    log.info("%s", decision.summary())
    return decision


def read_decision(prefix: str) -> Decision:
    """The decision a committed promote output holds."""
    contract.read_manifest(prefix, expect_step="promote")
    return Decision(**json.loads(storage.read_bytes(storage.join(prefix, PROMOTION_JSON))))
