"""What a local run (``imgpipe run``) left, read from the store while it is up, and the lines it prints at the end.

    result = collect_result(run_id, data_root, outputs, shards=1, copies={}, seconds=12.3); print(result.summary())

The summary: per-step counts with rejects by reason, where things are, then the headline (test score, promotion).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe import contract, storage
from imgpipe.data.sharding import Shard
from imgpipe.local.progress import rejects_line
from imgpipe.step_table import STEPS
from imgpipe.stepio.shards import SHARDS_DIR

__all__ = ["LocalRunResult", "collect_result", "headline"]


@dataclass
class LocalRunResult:
    """Where a local run left its results.

    Attributes:
        run_id: The kfp local run id (the ``runs/{run_id}/`` segment of every prefix).
        prefixes: Step name -> committed output prefix (in the store the run used).
        reports: Step name -> its manifest.
        artifacts: kfp output name -> local file (model, metrics, confusion, report).
        metadata: kfp output name -> the artifact's metadata (metrics, confusion matrix).
        copies: Local copies of the train output, when the store was the run's own.
        promotion: The promotion gate's decision (:class:`imgpipe.steps.promote.Decision` as a dict).
        reconciled: Whether every source item ended in exactly one place.
        seconds: Wall time of the whole run.
        test: The model's scores on the test split (``metrics.json``'s ``test``), when it has one.
        store_dir: The local object store's data directory when the store was the run's own (``""`` otherwise).
    """

    run_id: str
    prefixes: dict[str, str]
    reports: dict[str, dict[str, Any]]
    artifacts: dict[str, str]
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    reconciled: bool = False
    seconds: float = 0.0
    promotion: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    store_dir: str = ""

    def summary(self) -> str:
        """The lines ``imgpipe run`` prints at the end; the headline (test score, promotion) last."""
        r = self.reports
        lines = [f"{step}: {rejects_line(m)} -> {self.prefixes[step]}" for step, m in r.items()]
        dl, cl, rs = r["download"], r["clean"], r["resize"]
        rejected = {}
        for m in (dl, cl, rs):
            for reason, n in (m.get("rejects_by_reason") or {}).items():
                rejected[reason] = rejected.get(reason, 0) + int(n)
        total = {"rejected": dl["rejected"] + cl["rejected"] + rs["rejected"], "rejects_by_reason": rejected}
        lines.append(
            f"\nrun {self.run_id} finished in {self.seconds:.1f}s: {dl['inputs']} source items -> "
            f"{rs['outputs']} training images, {rejects_line(total)} ({'reconciled' if self.reconciled else 'NOT RECONCILED'})"
        )
        local = self.copies or {}
        for name in (contract.REPORT, contract.MODEL, contract.METRICS):
            lines.append(f"{name + ':':14} {local.get(name) or storage.join(self.prefixes['train'], name)}")
        lines.append(f"{'kfp outputs:':14} {Path(self.artifacts['model']).parents[1]} (model, metrics, confusion, report)")
        if self.store_dir:  # the run's own store stopped with it; these start it again
            workdir = Path(self.store_dir).parent
            lines.append(f"{'open:':14} imgpipe show --workdir {workdir} {self.prefixes['train']} (any prefix above; starts the store)")
            lines.append(f"{'':14} imgpipe store --workdir {workdir} (serves it; prints the endpoint and keys for pandas, boto3, aws)")
        lines += headline(self.test, (r.get("train") or {}).get("metrics") or {}, self.promotion)
        return "\n".join(lines)


def headline(test: dict[str, Any] | None, final: dict[str, Any], promotion: dict[str, Any] | None) -> list[str]:
    """The run's result in two lines: the model's score (test, else validation) and the promotion verdict with its reason."""
    lines = []
    if test and test.get("macro_f1") is not None:
        lines.append(f"\nresult: test macro-F1 {test['macro_f1']:.3f}, accuracy {test['accuracy']:.3f} on {test['images']} test images")
    elif final.get("val_macro_f1") is not None:
        lines.append(f"\nresult: validation macro-F1 {final['val_macro_f1']:.3f}, accuracy {final['val_accuracy']:.3f} (no test split)")
    if promotion is not None:
        verdict = "promoted (now latest)" if promotion["promoted"] else "NOT promoted (latest unchanged)"
        lines.append(f"promotion: {verdict}: {promotion['reason']}")
    return lines


def collect_result(run_id: str, data_root: str, outputs: dict[str, Any], *, shards: int, copies: dict[str, str], seconds: float) -> LocalRunResult:
    """Reads a finished run's manifests, test scores and promotion decision from the store (it must still be up)."""
    prefixes = {step: storage.join(data_root, "runs", run_id, step) for step in STEPS}
    if shards > 1:
        prefixes["download"] = storage.join(data_root, "runs", run_id, SHARDS_DIR)
    reports = {step: _report(step, prefix, shards) for step, prefix in prefixes.items()}
    dl, cl, rs = reports["download"], reports["clean"], reports["resize"]
    reconciled = dl["inputs"] == cl["outputs"] + cl["rejected"] + dl["rejected"] and rs["inputs"] == cl["outputs"]
    metrics = json.loads(storage.read_bytes(storage.join(prefixes["train"], contract.METRICS)))
    return LocalRunResult(
        run_id=run_id,
        prefixes=prefixes,
        reports=reports,
        artifacts={name: artifact.path for name, artifact in outputs.items()},
        metadata={name: dict(artifact.metadata) for name, artifact in outputs.items()},
        copies=copies,
        reconciled=reconciled,
        seconds=seconds,
        promotion=decision(storage.join(data_root, "runs", run_id, "promote")),
        test=metrics.get("test") or None,
    )


def _report(step: str, prefix: str, shards: int) -> dict[str, Any]:
    """A step's manifest; a sharded run's download is its shards' downloads, counted together."""
    if step != "download" or shards == 1:
        return contract.read_manifest(prefix, expect_step=step)
    parts = [contract.read_manifest(storage.join(prefix, Shard(i, shards).name, "download"), expect_step=step) for i in range(shards)]
    by_reason: dict[str, int] = {}
    for m in parts:
        for reason, n in (m.get("rejects_by_reason") or {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + int(n)
    counts = {k: sum(int(m[k]) for m in parts) for k in ("inputs", "outputs", "rejected")}
    return {"step": step, "shards": shards, **counts, "rejects_by_reason": by_reason}


def decision(prefix: str) -> dict[str, Any] | None:
    """The promotion decision of a run, when the gate committed one."""
    from imgpipe.steps.promote import read_decision

    if not contract.is_committed(prefix):
        return None
    return dataclasses.asdict(read_decision(prefix))
