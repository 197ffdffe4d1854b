"""Figures and the HTML report with hostile class names: plain text everywhere, never markup."""

from __future__ import annotations

import pytest

from imgpipe.report import training as report

# Class names are folder and file names: whoever made the archive chose them.
HOSTILE = ["$\\foo$", "a $x^2$ b", "<script>alert(1)</script>", "\\", "$", "cat"]


def test_confusion_matrix_renders_class_names_as_plain_text():
    n = len(HOSTILE)
    png = report.confusion_matrix_png([[int(i == j) for j in range(n)] for i in range(n)], HOSTILE)
    assert png.startswith(b"\x89PNG")


@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_name_alone(name):
    assert report.confusion_matrix_png([[1, 0], [0, 1]], [name, "dog"]).startswith(b"\x89PNG")


def test_html_report_escapes_class_names():
    metrics = {
        "epochs": [{"epoch": 0, "train_loss": 1.0, "val_accuracy": 0.5, "val_per_class_recall": dict.fromkeys(HOSTILE, 0.5)}],
        "labels": HOSTILE,
        "test": {"accuracy": 0.5, "per_class_recall": dict.fromkeys(HOSTILE, 0.5)},
    }
    page = report.html_report(metrics, {})
    assert "<script>alert(1)</script>" not in page


def test_the_recipe_table_shows_only_settings_that_took_effect():
    recipe = {
        "recipe": "small",
        "reason": "40 images per class",
        "domain": "natural",
        "explicit": [],
        "from_recipe": {"aug_policy": "basic", "randaugment_n": 2, "randaugment_m": 9, "mixup": 0.0, "cutmix": 0.0, "mixup_prob": 1.0},
        "from_domain": {"hflip": True, "freeze_fraction": 0.0, "unfreeze_stages": 2},
    }
    page = report.html_report({"recipe": recipe, "config": {"epochs": 5}}, {})
    section = page[page.index("Recipe") :]
    assert "aug_policy" in section and "mixup" in section and "hflip" in section
    for inert in ("randaugment_n", "randaugment_m", "mixup_prob", "unfreeze_stages"):
        assert inert not in section, inert
    shown = report.html_report({"recipe": {**recipe, "from_recipe": {**recipe["from_recipe"], "aug_policy": "randaugment", "mixup": 0.2}}}, {})
    assert "randaugment_m" in shown and "mixup_prob" in shown
