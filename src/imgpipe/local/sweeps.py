"""`imgpipe sweep` and `imgpipe audit` on this machine: the sweep and audit pipelines through kfp.local.

result = run_sweep(cfg, grid=None, axes={"randaugment_magnitude": [5, 9]}); print(result.summary())
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe import contract, storage
from imgpipe.local.containers import engine_for
from imgpipe.local.run import LocalRunConfig, copy_prefix, run_pipeline, start_run
from imgpipe.steps.compare import COMPARISON_JSON

__all__ = ["SweepRunResult", "run_sweep", "AuditRunResult", "run_audit"]


@dataclass
class SweepRunResult:
    """Where a local sweep left its results.

    Attributes:
        run_id: The kfp local run id.
        prefixes: ``compare`` and ``train-{branch}`` -> committed prefix (in the store the run used).
        comparison: The compare step's ``comparison.json``.
        artifacts: kfp output name -> local file (report, metrics, winner).
        copies: Local copies (name -> file) of the comparison and the branches' metrics and
            reports, when the store was the run's own.
        seconds: Wall time of the whole run.
    """

    run_id: str
    prefixes: dict[str, str]
    comparison: dict[str, Any]
    artifacts: dict[str, str]
    copies: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The lines ``imgpipe sweep`` prints at the end: the ranking, the flags, where the winner is."""
        c = self.comparison
        key = c["ranked_by"][0]
        state = "imbalanced" if c["imbalanced"] else "balanced"
        lines = [
            f"sweep {self.run_id}: {len(c['branches'])} branches ranked by {key} (classes {state}, "
            f"largest/smallest {c['imbalance']:.2f}) in {self.seconds:.1f}s"
        ]
        for row in c["branches"]:
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "base settings"
            figures = ", ".join(
                f"{k} {row[k]:.3f}{_spread(row, k)}" for k in ("val_macro_f1", "val_pr_auc", "val_accuracy") if row.get(k) is not None
            )
            seeds = f" (mean of {row['seeds']} seeds)" if row.get("seeds", 1) > 1 else ""
            lines.append(f"{row['rank']:>3}. {row['branch']} ({settings}): {figures}{seeds}")
            lines += [f"       {f['kind']}: {f['message']}" for f in row["flags"]]
        local = self.copies or {}
        compare_prefix = self.prefixes["compare"]
        for name in ("comparison.html", "winner.yaml"):
            lines.append(f"{name + ':':17} {local.get(f'compare/{name}') or storage.join(compare_prefix, name)}")
        return "\n".join(lines)


def _spread(row: Mapping[str, Any], key: str) -> str:
    """`` ±std`` of ``key`` over a branch's seeds (compare's ``spread``), or nothing for one seed."""
    spread = (row.get("spread") or {}).get(key)
    return f" ±{spread['std']:.3f}" if spread else ""


def run_sweep(cfg: LocalRunConfig, grid: Sequence[Mapping[str, Any]] | None, axes: Mapping[str, Sequence[Any]] | None) -> SweepRunResult:
    """Runs the sweep pipeline through ``kfp.local`` on the run's data; returns the comparison.

    Every branch's config is checked (:func:`imgpipe.sweep.plan`) before anything runs.
    ``epochs`` is the sweep's default (:data:`imgpipe.sweep.SWEEP_EPOCHS`) unless the
    parameters or the ``train`` section set it.

    Raises:
        ValueError, TypeError: For a grid or a branch config that is refused.
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    from imgpipe import sweep

    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    if "epochs" not in cfg.params:
        arguments.pop("epochs")  # the laptop run's 2 epochs are too few to read a trend from
    named = {
        "model": arguments.get("model"),
        "epochs": arguments.get("epochs"),
        "batch_size": arguments.get("batch_size"),
        "aug_policy": arguments.get("aug_policy"),
        "resume": True,
    }
    sweep.plan("", grid, axes, arguments["step_config"], **named)  # the edge: fail before any data moves
    arguments.update(sweep.grid_parameters(grid, axes))
    with contextlib.ExitStack() as stack:
        client = engine_for(cfg.runner, cfg.data_root, stack)
        data_root, own_store, runner = start_run(cfg, stack, workdir, arguments, client)
        outputs = run_pipeline(workdir, arguments, runner, sweep=True)
        compare_prefix, run_id, manifest = _committed(outputs, "winner", "compare")
        prefixes = {"compare": compare_prefix}
        prefixes.update({sweep.branch_step(b): p for b, p in manifest["upstream"]["branches"].items()})
        comparison = json.loads(storage.read_bytes(storage.join(compare_prefix, COMPARISON_JSON)))
        copies = _copy_sweep(prefixes, workdir / "runs" / run_id) if own_store else {}
    return SweepRunResult(
        run_id=run_id,
        prefixes=prefixes,
        comparison=comparison,
        artifacts={name: artifact.path for name, artifact in outputs.items()},
        copies=copies,
        seconds=round(time.monotonic() - started, 1),
    )


@dataclass
class AuditRunResult:
    """Where a local label audit left its results.

    Attributes:
        run_id: The kfp local run id.
        prefix: The committed audit output (in the store the run used).
        manifest: Its manifest (counts in ``extra``).
        copies: Local copies of the audit's files, when the store was the run's own.
        seconds: Wall time of the whole run.
    """

    run_id: str
    prefix: str
    manifest: dict[str, Any]
    copies: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The lines ``imgpipe audit`` prints at the end."""
        extra = self.manifest.get("extra") or {}
        lines = [
            f"audit {self.run_id}: {extra.get('issues')} of {extra.get('images')} train images have a suspect label "
            f"({extra.get('folds')} folds, cleanlab {extra.get('filter_by')}) in {self.seconds:.1f}s"
        ]
        worst = list((extra.get("by_class") or {}).items())[:5]
        if worst:
            lines.append("most suspects in: " + ", ".join(f"{c} ({n})" for c, n in worst))
        from imgpipe.steps.audit import LABEL_ISSUES, LABEL_ISSUES_HTML, LABEL_OVERRIDES

        for name in (LABEL_ISSUES_HTML, LABEL_OVERRIDES, LABEL_ISSUES):
            lines.append(f"{name + ':':22} {self.copies.get(name) or storage.join(self.prefix, name)}")
        lines.append("review label_overrides.csv, then clean with --set label_overrides=<its URI>")
        return "\n".join(lines)


def run_audit(cfg: LocalRunConfig, folds: int | None = None) -> AuditRunResult:
    """Runs the audit pipeline through ``kfp.local`` on the run's data (K folds of its train split).

    Raises:
        RuntimeError: If a step fails (kfp.local raises) or the local S3 server cannot start.
    """
    started = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    arguments = cfg.pipeline_arguments()
    if folds is not None:
        arguments["folds"] = folds
    with contextlib.ExitStack() as stack:
        client = engine_for(cfg.runner, cfg.data_root, stack)
        data_root, own_store, runner = start_run(cfg, stack, workdir, arguments, client)
        outputs = run_pipeline(workdir, arguments, runner, audit=True)
        prefix, run_id, manifest = _committed(outputs, "overrides", "audit")
        copies = copy_prefix(prefix, workdir / "runs" / run_id / "audit") if own_store else {}
    return AuditRunResult(run_id=run_id, prefix=prefix, manifest=manifest, copies=copies, seconds=round(time.monotonic() - started, 1))


def _copy_sweep(prefixes: Mapping[str, str], dest: Path) -> dict[str, str]:
    """The comparison whole, and each branch's small files (not its weights and checkpoint)."""
    copies = {f"compare/{k}": v for k, v in copy_prefix(prefixes["compare"], dest / "compare").items()}
    for step, prefix in prefixes.items():
        if step == "compare":
            continue
        for name in (contract.METRICS, contract.REPORT, contract.CONFIG):
            target = dest / step / name
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(storage.join(prefix, name), target)
            copies[f"{step}/{name}"] = str(target)
    return copies


def _committed(outputs: Mapping[str, Any], name: str, step: str) -> tuple[str, str, dict[str, Any]]:
    """The committed prefix the pipeline output ``name`` names, its run id (``<root>/<run>/<step>``) and its manifest."""
    prefix = storage.normalize_uri(outputs[name].metadata["prefix"])
    return prefix, prefix.rstrip("/").split("/")[-2], contract.read_manifest(prefix, expect_step=step)
