"""The sweep comparison's HTML page: the ranking, the flags, the validation curves, the winner's config and the rules.

    html = page(result, curves_png_bytes, winner_yaml)   # result: comparison.json's content

:func:`imgpipe.steps.compare.compare` builds the result and writes the page beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imgpipe.report import html as htmlpage

__all__ = ["CURVES_PNG", "TABLE_KEYS", "page"]

CURVES_PNG = "val_curves.png"
# The figures a branch shows, in the table and per seed.
TABLE_KEYS = ("val_macro_f1", "val_pr_auc", "val_accuracy", "val_loss", "train_loss")


def _spread_text(row: Mapping[str, Any], key: str) -> str:
    """``±std (min–max)`` of ``key`` in a seed group's row, else ``-``."""
    s = (row.get("spread") or {}).get(key)
    return "-" if s is None else f"±{s['std']:.4f} ({s['min']:.4f}–{s['max']:.4f})"


def page(result: Mapping[str, Any], curves: bytes, winner_yaml: str) -> str:
    """The comparison page: ``result`` as ``comparison.json`` holds it, the curves' PNG and ``winner.yaml``'s text."""
    keys = result["ranked_by"]
    shown = [
        {**r, "settings": ", ".join(f"{k}={v}" for k, v in r["settings"].items()), "flags": ", ".join(f["kind"] for f in r["flags"]) or "-"}
        for r in result["branches"]
    ]
    seeds = max((r.get("seeds", 1) for r in result["branches"]), default=1)
    averaged = f"the mean over {seeds} seeds of " if seeds > 1 else ""
    why = (
        f"ranked by {averaged}{keys[0]} (ties: {keys[1]}) on the last epoch; the largest validation class holds "
        f"{result['imbalance']:.2f}x the images of the smallest ({'>' if result['imbalanced'] else '<='} "
        f"{result['rules']['imbalance_ratio']}: {'imbalanced' if result['imbalanced'] else 'balanced'})"
    )
    columns = ["rank", "branch", "settings", *TABLE_KEYS, "epochs", "flags"]
    if seeds > 1:
        spread = f"{keys[0]} spread"
        shown = [{**r, spread: _spread_text(r, keys[0])} for r in shown]
        columns[4:4] = [spread, "seeds"]
    flags = [{"branch": r["branch"], "flag": f["kind"], "what it saw": f["message"]} for r in result["branches"] for f in r["flags"]]
    rules = [{"rule": k, "threshold": v} for k, v in result["rules"].items()]
    parts = [
        htmlpage.section("Ranking", htmlpage.table(shown, columns), note=why),
        htmlpage.section(
            "Flags",
            htmlpage.table(flags, ["branch", "flag", "what it saw"]) if flags else "<p>none</p>",
            note="over_regularized: lower the strength; overfitting: regularize more; under_fitted: weaken or train longer",
        ),
        htmlpage.section(
            "Validation curves", htmlpage.image(CURVES_PNG, curves), note="each branch's mean over its seeds, epoch by epoch" if seeds > 1 else ""
        ),
        htmlpage.section(
            f"Winner: {result['winner']['branch']}",
            f"<pre>{htmlpage.text(winner_yaml)}</pre>",
            note="imgpipe train DATA OUT --config winner.yaml, imgpipe run --config winner.yaml, or the pipelines' step_config parameter",
        ),
        htmlpage.section("Rules", htmlpage.table(rules, ["rule", "threshold"])),
    ]
    if seeds > 1:
        runs = [{**run, "branch": r["branch"], "run": run["branch"]} for r in result["branches"] for run in r["runs"]]
        parts.insert(
            -1,
            htmlpage.section(
                "Seeds",
                htmlpage.table(runs, ["branch", "run", "seed", *TABLE_KEYS]),
                note="every run of every branch; the ranking is on their means",
            ),
        )
    return htmlpage.page("imgpipe sweep comparison", parts)
