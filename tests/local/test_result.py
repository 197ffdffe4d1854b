"""The end of `imgpipe run`: counts with rejects by reason, where things are, and the headline last; the report's top."""

from __future__ import annotations

from imgpipe.local.result import LocalRunResult
from imgpipe.report.training import html_report
from imgpipe.stepio.publish import with_promotion


def _result(promoted: bool) -> LocalRunResult:
    reports = {
        "download": {"inputs": 300, "outputs": 300, "rejected": 0},
        "clean": {"inputs": 300, "outputs": 229, "rejected": 71, "rejects_by_reason": {"blank": 9, "near_duplicate": 62}},
        "resize": {"inputs": 229, "outputs": 229, "rejected": 0},
        "train": {"inputs": 229, "outputs": 229, "rejected": 0, "metrics": {"val_macro_f1": 0.8, "val_accuracy": 0.81}},
    }
    reason = "macro_f1 0.912 >= the current 0.850 - 0.000" if promoted else "macro_f1 0.412 < the current 0.850 - 0.000"
    return LocalRunResult(
        run_id="r1",
        prefixes={step: f"s3://imgpipe-local/runs/r1/{step}" for step in reports},
        reports=reports,
        artifacts={"model": "/w/kfp/imgpipe/promote/model"},
        reconciled=True,
        seconds=12.3,
        promotion={"promoted": promoted, "reason": reason},
        test={"macro_f1": 0.912, "accuracy": 0.92, "images": 30},
    )


def test_the_summary_names_rejects_by_reason_and_ends_with_the_headline():
    lines = _result(promoted=False).summary().splitlines()
    assert "clean: 300 in -> 229 out, 71 rejected: 62 near_duplicate, 9 blank -> s3://imgpipe-local/runs/r1/clean" in lines
    assert any("300 source items -> 229 training images, 71 rejected: 62 near_duplicate, 9 blank (reconciled)" in line for line in lines)
    assert lines[-2] == "result: test macro-F1 0.912, accuracy 0.920 on 30 test images"
    assert lines[-1] == "promotion: NOT promoted (latest unchanged): macro_f1 0.412 < the current 0.850 - 0.000"
    assert _result(promoted=True).summary().splitlines()[-1].startswith("promotion: promoted (now latest): ")


def test_the_report_opens_with_the_result_then_the_promotion():
    page = html_report({"test": {"macro_f1": 0.5, "accuracy": 0.55, "images": 20}, "epochs": [{"epoch": 0, "train_loss": 1.0}]}, {})
    page = with_promotion(page, False, "macro_f1 0.500 < the current 0.700 - 0.000")
    body = page[page.index("</h1>") :]
    result, promotion, epochs = (body.index(h) for h in ("<h2>Result</h2>", "<h2>Promotion: not promoted</h2>", "<h2>Epochs</h2>"))
    assert result < promotion < epochs
    assert "test macro-F1 0.500, accuracy 0.550 on 20 test images" in body and "the current 0.700" in body
