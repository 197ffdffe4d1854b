"""The compare step on hand-built branch outputs: ranking, the imbalance switch, flags with their numbers, the winner.

Each branch is a committed train output written here (``metrics.json`` with a history
made on purpose, a manifest with its resolved config), so every rule is checked on
numbers chosen to sit on one side of its threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imgpipe import commit, contract, storage, writer
from imgpipe.config import config_to_dict, load_config, step_config
from imgpipe.contract import StepReport
from imgpipe.report.comparison import CURVES_PNG
from imgpipe.steps import compare as cmp
from imgpipe.steps import compare_rules as rules
from imgpipe.steps.compare import CompareConfig, compare
from imgpipe.steps.compare_rules import BranchResult, class_collapse, diagnose, rank, trend, under_fitting
from imgpipe.sweep import RECIPE_FIELDS
from imgpipe.train.config import TrainConfig
from imgpipe.train.recipes import resolve as resolve_recipe
from imgpipe.train.selection import imbalance

LABELS = ["a", "b", "c"]
BALANCED = [[8, 1, 1], [1, 8, 1], [1, 1, 8]]  # 10 validation images per class
IMBALANCED = [[8, 1, 1], [1, 8, 1], [1, 1, 4]]  # 10, 10, 6: ratio 1.67 > 1.5


def history(train_loss, val_acc, val_loss=None, f1=None, pr_auc=None):
    """Per-epoch records as train writes them (epoch 0-based)."""
    n = len(train_loss)
    val_loss = val_loss or [1.0] * n
    f1 = f1 or val_acc
    pr_auc = pr_auc or val_acc
    return [
        {"epoch": i, "train_loss": train_loss[i], "val_accuracy": val_acc[i], "val_loss": val_loss[i], "val_macro_f1": f1[i], "val_pr_auc": pr_auc[i]}
        for i in range(n)
    ]


def write_branch(root: str, name: str, epochs: list[dict], confusion=BALANCED, data="file:///data/resize", **settings) -> str:
    """A committed train output holding ``epochs`` as its metrics and TrainConfig(**settings) as its config."""
    prefix = storage.join(root, f"train-{name}")
    attempt = commit.claim(prefix, "train")
    metrics = {"epochs": epochs, "labels": LABELS, "val_confusion": confusion}
    body = json.dumps(metrics).encode()
    storage.write_bytes(storage.join(prefix, contract.METRICS), body)
    report = StepReport(step="train", dest=prefix, inputs=1, outputs=1, rejected=0, files=[writer.entry_for_bytes(contract.METRICS, body)])
    cfg, _ = resolve_recipe(TrainConfig(model="tiny_cnn", device="cpu", **settings), [100] * len(LABELS))  # as train writes it: resolved
    commit.publish(prefix, "train", attempt, commit.manifest_body(report, cfg, {"source": data, "step": "resize"}))
    return prefix


def result(name, epochs):
    return rules.BranchResult(name, f"file:///x/{name}", {}, epochs, {})


# ------------------------------------------------------------------ rules on their own


def test_imbalance_is_largest_over_smallest_class_with_images():
    assert imbalance([10, 10, 6]) == pytest.approx(10 / 6)
    assert imbalance([10, 0, 5]) == 2.0, "a class without validation images is left out"
    assert imbalance([7]) == 1.0
    assert cmp.class_counts({"val_confusion": IMBALANCED}) == [10, 10, 6]
    with pytest.raises(ValueError, match="no val_confusion"):
        cmp.class_counts({})


def test_ranking_uses_macro_f1_then_accuracy_or_pr_auc_then_macro_f1():
    a = result("a", history([1.0], [0.70], f1=[0.60], pr_auc=[0.90]))
    b = result("b", history([1.0], [0.65], f1=[0.65], pr_auc=[0.80]))
    c = result("c", history([1.0], [0.75], f1=[0.60], pr_auc=[0.85]))
    assert [r.name for r in rank([a, b, c], cmp.ranking_keys(False))] == ["b", "c", "a"], "F1, ties by accuracy"
    assert [r.name for r in rank([a, b, c], cmp.ranking_keys(True))] == ["a", "c", "b"], "PR-AUC when imbalanced"
    old = result("old", [{"epoch": 0, "train_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.5}])
    with pytest.raises(ValueError, match="branch old has no val_pr_auc"):
        rank([a, old], cmp.ranking_keys(True))


def test_an_over_regularized_branch_built_on_purpose_is_flagged_with_its_numbers():
    # Training loss keeps falling (1.4 -> 1.1 over epochs 3-5) while validation accuracy drops
    # from its best 0.55 to 0.50; training loss stays above validation loss (heavy augmentation).
    epochs = history([2.0, 1.6, 1.4, 1.25, 1.1], [0.30, 0.45, 0.55, 0.54, 0.50], val_loss=[1.9, 1.5, 1.2, 1.05, 1.0])
    flag = diagnose(epochs, CompareConfig())
    assert flag is not None and flag.kind == "over_regularized"
    n = flag.numbers
    assert n["epochs"] == [3, 4, 5]
    assert (n["train_loss_first"], n["train_loss_last"]) == (1.4, 1.1)
    assert n["train_loss_drop"] == pytest.approx(0.3 / 1.4)
    assert (n["val_acc_best_before"], n["val_acc_last"]) == (0.55, 0.50)
    assert n["val_acc_gain"] == pytest.approx(-0.05)
    assert n["train_val_loss_ratio"] == pytest.approx(1.1)
    assert "21.4%" in flag.message and "-0.050" in flag.message and "lower its strength" in flag.message


def test_the_same_trend_with_train_loss_below_val_loss_is_overfitting():
    epochs = history([2.0, 1.6, 1.4, 1.25, 1.1], [0.30, 0.45, 0.55, 0.54, 0.50], val_loss=[1.9, 1.5, 1.5, 1.6, 1.8])
    flag = diagnose(epochs, CompareConfig())
    assert flag.kind == "overfitting" and flag.numbers["train_val_loss_ratio"] == pytest.approx(1.1 / 1.8)
    assert "regularize more" in flag.message


@pytest.mark.parametrize(
    ("train_loss", "val_acc", "flagged"),
    [
        ([1.4, 1.25, 1.1], [0.55, 0.552, 0.553], True),  # stalled: +0.001 <= 0.005
        ([1.4, 1.25, 1.1], [0.55, 0.56, 0.57], False),  # still learning: +0.010
        ([1.4, 1.38, 1.35], [0.55, 0.54, 0.50], False),  # loss fell 3.6% < 5%: not "falling"
        ([1.4, 1.1], [0.55, 0.50], False),  # two epochs: too few to read a trend
    ],
)
def test_the_trend_thresholds(train_loss, val_acc, flagged):
    epochs = history(train_loss, val_acc, val_loss=[0.5] * len(train_loss))
    assert (diagnose(epochs, CompareConfig()) is not None) is flagged
    if len(train_loss) < rules.TREND_WINDOW:
        assert trend(epochs, CompareConfig()) is None


def test_an_under_fitted_branch_is_flagged_relative_to_the_winner():
    winner = result("w", history([1.0, 0.8], [0.6, 0.70]))
    weak = result("weak", history([1.5, 1.2], [0.5, 0.60]))  # 1.5x the loss, 0.10 below
    mixed = result("mixed", history([1.5, 1.2], [0.6, 0.68]))  # the same loss (mixing raises it), 0.02 below
    flag = under_fitting(weak, winner, CompareConfig())
    assert flag.kind == "under_fitted"
    assert flag.numbers["train_loss_ratio"] == pytest.approx(1.5) and flag.numbers["val_acc_gap"] == pytest.approx(0.10)
    assert "1.50x the winner's" in flag.message
    assert under_fitting(mixed, winner, CompareConfig()) is None
    assert under_fitting(winner, winner, CompareConfig()) is None


def test_thresholds_are_checked():
    for bad in ({"imbalance_ratio": 0.5}, {"trend_window": 1}, {"min_train_loss_drop": 1.0}, {"underfit_loss_ratio": 0.9}):
        with pytest.raises(ValueError):
            CompareConfig(**bad)


# ------------------------------------------------------------------ the step


@pytest.fixture
def root(tmp_path: Path) -> str:
    return "file://" + str(tmp_path / "runs" / "r1")


def test_compare_ranks_flags_writes_and_commits(root):
    branches = {
        "light": write_branch(
            root, "light", history([1.2, 0.9, 0.7], [0.5, 0.6, 0.66], f1=[0.5, 0.6, 0.64]), aug_policy="basic", mixup=0.0, cutmix=0.0
        ),
        "strong": write_branch(
            root, "strong", history([2.0, 1.6, 1.4], [0.5, 0.62, 0.70], f1=[0.5, 0.6, 0.69]), randaugment_n=3, randaugment_m=15, crop_scale=(0.2, 1.0)
        ),
        "stalled": write_branch(
            root, "stalled", history([2.4, 2.0, 1.8], [0.4, 0.5, 0.48], val_loss=[1.4, 1.3, 1.3], f1=[0.4, 0.5, 0.47]), randaugment_m=25
        ),
    }
    settings = {"strong": {"randaugment_n": 3, "randaugment_m": 15}}
    report = compare(branches, storage.join(root, "compare"), settings=settings)

    assert report.ranking == ["strong", "light", "stalled"] and report.ranked_by == ("val_macro_f1", "val_accuracy")
    manifest = contract.read_manifest(report.dest, expect_step="compare")
    assert manifest["extra"]["winner"] == "strong"
    assert manifest["upstream"]["branches"]["light"] == branches["light"]
    result = json.loads(storage.read_bytes(storage.join(report.dest, cmp.COMPARISON_JSON)))
    rows = {r["branch"]: r for r in result["branches"]}
    assert result["imbalanced"] is False and result["class_counts"] == [10, 10, 10]
    assert rows["strong"]["settings"] == {"randaugment_n": 3, "randaugment_m": 15}
    assert [f["kind"] for f in rows["stalled"]["flags"]] == ["over_regularized", "under_fitted"]
    assert rows["stalled"]["flags"][0]["numbers"]["val_acc_gain"] == pytest.approx(-0.02)
    assert not rows["strong"]["flags"] and not rows["light"]["flags"]
    page = storage.read_bytes(storage.join(report.dest, cmp.COMPARISON_HTML)).decode()
    for text in ("Ranking", "stalled", "over_regularized", "Validation curves", "data:image/png;base64", "randaugment_m: 15"):
        assert text in page, text
    assert storage.read_bytes(storage.join(report.dest, CURVES_PNG)).startswith(b"\x89PNG")


def test_imbalanced_classes_switch_the_ranking_to_pr_auc(root):
    # "calibrated" has the lower macro-F1 but ranks the rare class's images better (higher PR-AUC).
    f1_first = history([1.0, 0.9, 0.8], [0.7] * 3, f1=[0.6, 0.65, 0.70], pr_auc=[0.7, 0.72, 0.74])
    ap_first = history([1.0, 0.9, 0.8], [0.7] * 3, f1=[0.6, 0.64, 0.66], pr_auc=[0.7, 0.76, 0.80])
    for confusion, winner, key in ((BALANCED, "sharp", "val_macro_f1"), (IMBALANCED, "calibrated", "val_pr_auc")):
        run = f"{root}-{key}"
        branches = {"sharp": write_branch(run, "sharp", f1_first, confusion), "calibrated": write_branch(run, "calibrated", ap_first, confusion)}
        report = compare(branches, storage.join(run, "compare"))
        assert (report.ranking[0], report.ranked_by[0]) == (winner, key)


def test_the_winners_config_round_trips_into_a_full_run(root, tmp_path):
    from imgpipe.kfp import package as kfp_package

    recipe = {
        "aug_policy": "trivialaugment",
        "mixup": 0.4,
        "cutmix": 0.0,
        "mixup_prob": 0.5,
        "label_smoothing": 0.1,
        "crop_scale": (0.25, 1.0),
        "randaugment_n": 1,
    }
    branches = {"only": write_branch(root, "only", history([1.0, 0.9, 0.8], [0.5, 0.6, 0.7]), **recipe)}
    report = compare(branches, storage.join(root, "compare"))
    resolved, _ = resolve_recipe(TrainConfig(model="tiny_cnn", **recipe), [100] * len(LABELS))
    expected = {k: v for k, v in config_to_dict(resolved).items() if k in RECIPE_FIELDS and v is not None}
    assert report.winner == {"train": expected} and set(expected) == set(RECIPE_FIELDS) - {"lr"}, "lr unset: the full run's own lr_base rule"
    assert "null" not in storage.read_bytes(storage.join(report.dest, cmp.WINNER_YAML)).decode(), "a run parameter carries no null"

    winner = tmp_path / "winner.yaml"
    winner.write_bytes(storage.read_bytes(storage.join(report.dest, cmp.WINNER_YAML)))
    # imgpipe train --config winner.yaml (with the run's other flags)
    cfg = load_config(TrainConfig, winner, {"model": "tiny_cnn", "epochs": 30}, "train")
    assert {k: getattr(cfg, k) for k in RECIPE_FIELDS} == {**expected, "crop_scale": (0.25, 1.0), "lr": None, "policy_exclude": ()}
    assert cfg.epochs == 30, "the winner carries the recipe, not the sweep's short epochs"
    # the main pipeline's step_config parameter, as `imgpipe submit --param step_config="$(cat winner.yaml)"` passes it
    package = kfp_package.compile_package(tmp_path / "imgpipe.yaml")
    typed = kfp_package.parse_params({"data_root": "s3://b/p", "step_config": winner.read_text()}, package)
    assert typed["step_config"] == yaml.safe_load(winner.read_text()) == {"train": {**expected, "crop_scale": [0.25, 1.0]}}
    built = step_config(TrainConfig, typed["step_config"], "train", model="tiny_cnn")
    assert built.mixup_prob == 0.5 and built.aug_policy == "trivialaugment"


def test_compare_refuses_branches_of_different_data_and_overlapping_dest(root):
    a = write_branch(root, "a", history([1.0], [0.5]))
    b = write_branch(root, "b", history([1.0], [0.5]), data="file:///other/resize")
    with pytest.raises(ValueError, match="different data"):
        compare({"a": a, "b": b}, storage.join(root, "compare"))
    with pytest.raises(ValueError, match="overlap"):
        compare({"a": a}, storage.join(a, "compare"))
    with pytest.raises(ValueError, match="at least one branch"):
        compare({}, storage.join(root, "compare"))


def test_publish_comparison_fills_the_kfp_artifacts(root, tmp_path):
    from types import SimpleNamespace

    from imgpipe.stepio.publish import publish_comparison

    class Metrics(SimpleNamespace):
        def log_metric(self, key, value):
            self.logged[key] = value

    branches = {n: write_branch(root, n, history([1.0, 0.9, 0.8], [0.5, 0.6, acc], f1=[0.5, 0.6, acc])) for n, acc in (("a", 0.7), ("b", 0.6))}
    report = compare(branches, storage.join(root, "compare"))
    art = {name: SimpleNamespace(path=str(tmp_path / "kfp" / name), metadata={}) for name in ("report", "winner")}
    metrics = Metrics(logged={})
    publish_comparison(report.dest, report=art["report"], metrics=metrics, winner=art["winner"])
    assert "Ranking" in Path(art["report"].path).read_text()
    assert yaml.safe_load(Path(art["winner"].path).read_text()) == report.winner
    assert art["winner"].metadata["branch"] == "a" and art["winner"].metadata["ranked_by"] == "val_macro_f1"
    assert art["winner"].metadata["step_config"] == report.winner
    assert metrics.logged["winner_val_macro_f1"] == pytest.approx(0.7)
    assert metrics.logged["b_val_macro_f1"] == pytest.approx(0.6) and metrics.logged["branches"] == 2.0


def test_a_class_whose_recall_collapses_in_one_branch_is_named():
    def branch(name, recall, kept_epoch=None):
        history = [{"epoch": 0, "val_per_class_recall": {"a": 0.9, "b": 0.9, "c": 0.9}}, {"epoch": 1, "val_per_class_recall": recall}]
        return BranchResult(name, f"file:///x/{name}", {}, history, {}, kept_epoch=kept_epoch)

    strong = branch("strong", {"a": 0.9, "b": 0.05, "c": 0.8})
    mild = branch("mild", {"a": 0.8, "b": 0.7, "c": 0.8})
    flag = class_collapse(strong, [strong, mild], CompareConfig())
    assert flag is not None and flag.kind == "class_collapse" and set(flag.numbers["classes"]) == {"b"}
    assert "b (0.05 here, 0.70 in another branch)" in flag.message
    assert class_collapse(mild, [strong, mild], CompareConfig()) is None
    # The kept epoch's recall counts, not the last one's.
    assert class_collapse(branch("early", {"a": 0.9, "b": 0.0, "c": 0.8}, kept_epoch=0), [mild], CompareConfig()) is None
    with pytest.raises(ValueError, match="collapsed_recall"):
        CompareConfig(collapsed_recall=0.6, collapse_reference=0.5)


# ------------------------------------------------------------------ seeds


def write_seeds(root: str, branch: str, f1s: list[float], **settings) -> dict[str, str]:
    """``branch`` run once per value of ``f1s`` (seed k for the k-th), as a sweep with seeds writes them."""
    return {
        f"{branch}-s{k}": write_branch(root, f"{branch}-s{k}", history([1.0, 0.9, 0.8], [0.5, 0.6, f1], f1=[0.5, 0.6, f1]), seed=k, **settings)
        for k, f1 in enumerate(f1s)
    }


def test_seeds_rank_branches_by_the_mean_and_show_the_spread(root, tmp_path):
    from imgpipe.stepio.publish import publish_comparison

    # "lucky" has the best single run (0.80) but the lower mean (0.68); "steady" wins on the mean (0.71).
    runs = {**write_seeds(root, "lucky", [0.80, 0.62, 0.62], aug_policy="basic"), **write_seeds(root, "steady", [0.70, 0.71, 0.72], randaugment_m=5)}
    groups = {run: run.rsplit("-s", 1)[0] for run in runs}
    report = compare(runs, storage.join(root, "compare"), groups=groups)

    assert report.ranking == ["steady", "lucky"] and report.extra["seeds"] == 3
    result = json.loads(storage.read_bytes(storage.join(report.dest, cmp.COMPARISON_JSON)))
    rows = {r["branch"]: r for r in result["branches"]}
    steady = rows["steady"]
    assert steady["val_macro_f1"] == pytest.approx(0.71) and steady["seeds"] == 3
    assert steady["spread"]["val_macro_f1"] == pytest.approx({"std": 0.01, "min": 0.70, "max": 0.72})
    assert [(r["branch"], r["seed"]) for r in steady["runs"]] == [("steady-s0", 0), ("steady-s1", 1), ("steady-s2", 2)]
    assert steady["prefix"] == runs["steady-s0"], "the base seed's run"
    assert rows["lucky"]["spread"]["val_macro_f1"]["max"] == pytest.approx(0.80)
    # The winner's recipe never carries the seed; the manifest's lineage lists every run.
    assert "seed" not in report.winner["train"] and report.winner["train"]["randaugment_m"] == 5
    winner_yaml = storage.read_bytes(storage.join(report.dest, cmp.WINNER_YAML)).decode()
    assert "seed:" not in winner_yaml and "over 3 seeds, std 0.0100, 0.7000-0.7200" in winner_yaml
    manifest = contract.read_manifest(report.dest, expect_step="compare")
    assert manifest["upstream"]["branches"] == runs and manifest["inputs"] == 6
    page = storage.read_bytes(storage.join(report.dest, cmp.COMPARISON_HTML)).decode()
    for text in ("the mean over 3 seeds of val_macro_f1", "val_macro_f1 spread", "±0.0100 (0.7000–0.7200)", "Seeds", "lucky-s2"):
        assert text in page, text

    # The Kubeflow Metrics: the mean as before, the spread beside it (the compare component logs both).
    class Metrics(SimpleNamespace):
        def log_metric(self, key, value):
            self.logged[key] = value

    art = {name: SimpleNamespace(path=str(tmp_path / "kfp" / name), metadata={}) for name in ("report", "winner")}
    metrics = Metrics(logged={})
    published = publish_comparison(report.dest, report=art["report"], metrics=metrics, winner=art["winner"])
    spread = cmp.spread_metrics(published)
    assert metrics.logged["steady_val_macro_f1"] == pytest.approx(0.71) and art["winner"].metadata["branch"] == "steady"
    assert spread["steady_val_macro_f1_std"] == pytest.approx(0.01) and spread["lucky_val_macro_f1_min"] == pytest.approx(0.62)
    assert set(spread) == {f"{b}_val_macro_f1_{s}" for b in ("steady", "lucky") for s in ("std", "min", "max")}


def test_without_seeds_the_comparison_has_no_spread(root):
    runs = {n: write_branch(root, n, history([1.0, 0.9], [0.5, acc])) for n, acc in (("a", 0.7), ("b", 0.6))}
    result = json.loads(storage.read_bytes(storage.join(compare(runs, storage.join(root, "compare")).dest, cmp.COMPARISON_JSON)))
    assert not any({"seeds", "spread", "runs"} & set(row) for row in result["branches"]) and cmp.spread_metrics(result) == {}


def test_seed_groups_average_the_curves_and_the_recall_a_collapse_reads():
    def run(name, seed, recall_b, f1):
        epochs = [
            {"epoch": 0, "val_macro_f1": 0.5, "val_per_class_recall": {"a": 0.9, "b": 0.9}},
            {"epoch": 1, "val_macro_f1": f1, "val_per_class_recall": {"a": 0.9, "b": recall_b}},
        ]
        return BranchResult(name, f"file:///x/{name}", {}, epochs, {"seed": seed})

    # Class b collapses in every seed of "strong", in one seed only of "unlucky": the mean recall decides.
    strong = [run("strong-s0", 0, 0.05, 0.6), run("strong-s1", 1, 0.0, 0.5), run("strong-s2", 2, 0.1, 0.55)]
    unlucky = [run("unlucky-s1", 1, 1.0, 0.7), run("unlucky-s0", 0, 0.0, 0.6)]
    groups = rules.group_seeds([*strong, *unlucky], {r.name: r.name.rsplit("-s", 1)[0] for r in (*strong, *unlucky)})
    by_name = {g.name: g for g in groups}
    assert [r.name for r in by_name["unlucky"].runs] == ["unlucky-s0", "unlucky-s1"], "lowest seed first"
    assert by_name["strong"].class_recall()["b"] == pytest.approx(0.05)
    assert by_name["unlucky"].history[1]["val_macro_f1"] == pytest.approx(0.65) and by_name["unlucky"].history[1]["epoch"] == 1
    flag = class_collapse(by_name["strong"], groups, CompareConfig())
    assert flag is not None and set(flag.numbers["classes"]) == {"b"}
    assert class_collapse(by_name["unlucky"], groups, CompareConfig()) is None, "one seed's collapse, mean 0.5"
    with pytest.raises(ValueError, match="run strong-s0 belongs to no branch"):
        rules.group_seeds(strong, {"strong-s1": "strong"})
    with pytest.raises(ValueError, match="repeat a seed"):
        rules.group_seeds([strong[0], run("strong-s9", 0, 0.1, 0.5)], {"strong-s0": "strong", "strong-s9": "strong"})


def test_the_compare_component_groups_the_plans_seeds_and_logs_the_spread(tmp_path, monkeypatch):
    from imgpipe.components.compare import compare as component
    from kfp import dsl

    from imgpipe.sweep import plan

    monkeypatch.setenv("IMGPIPE_SOURCE_LOCAL", "1")  # the data root is local: the operator allows it
    data_root = "file://" + str(tmp_path / "store")
    items = plan("", None, {"randaugment_m": [5, 13], "seeds": 2}, None, model="tiny_cnn")
    scores = {"b00-s0": 0.70, "b00-s1": 0.72, "b01-s0": 0.80, "b01-s1": 0.50}  # b01: best run, lower mean
    trained = []
    for item in items:
        run, seed = item["branch"], item["step_config"]["train"]["seed"]
        prefix = write_branch(
            f"{data_root}/runs/r1",
            run,
            history([1.0, 0.9, 0.8], [0.5, 0.6, scores[run]], f1=[0.5, 0.6, scores[run]]),
            seed=seed,
            randaugment_m=item["settings"]["randaugment_m"],
        )
        trained.append(SimpleNamespace(metadata={"branch": run, "prefix": prefix}))

    def artifact(cls, name):
        return cls(name=name, uri=str(tmp_path / "kfp" / name))

    outs = {
        "comparison": artifact(dsl.Artifact, "comparison"),
        "report": artifact(dsl.HTML, "report"),
        "metrics": artifact(dsl.Metrics, "metrics"),
        "winner": artifact(dsl.Artifact, "winner"),
    }
    component.python_func(branches=items, trained=trained, data_root=data_root, run_id="r1", **outs)
    logged = outs["metrics"].metadata
    assert outs["winner"].metadata["branch"] == "b00" and logged["branches"] == 2.0
    assert logged["b00_val_macro_f1"] == pytest.approx(0.71) and logged["b01_val_macro_f1_std"] == pytest.approx(0.2121, abs=1e-4)
    assert (logged["b01_val_macro_f1_min"], logged["b01_val_macro_f1_max"]) == pytest.approx((0.50, 0.80))
    assert "seed" not in outs["winner"].metadata["step_config"]["train"]
