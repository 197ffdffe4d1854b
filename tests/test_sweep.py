"""The sweep: grid keys and values checked at the edge, branches and their prefixes, the compiled imgpipe-sweep pipeline.

The kfp.local run of the whole sweep is in ``tests/test_sweep_run.py`` (it starts Ray).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imgpipe import sweep
from imgpipe.cli import main
from imgpipe.kfp import package as kfp_package
from imgpipe.stepio import artifacts as kfp_artifacts
from imgpipe.sweep import (
    GRID_KEYS,
    MAX_SEEDS,
    SEEDS_KEY,
    Branch,
    branch_step,
    expand_grid,
    grid_parameters,
    load_grid_file,
    plan,
)
from tests.helpers import ir_dags

NAMED = {"model": "tiny_cnn", "epochs": 3, "batch_size": 4, "aug_policy": None, "resume": True}


# ------------------------------------------------------------------ the grid


def test_explicit_entries_then_the_product_of_the_axes():
    branches = expand_grid([{"name": "light", "policy": "basic"}, {"policy": "trivialaugment"}], {"randaugment_m": [5, 9]})
    assert [b.name for b in branches] == ["light", "b01", "b02", "b03"]
    assert [b.settings for b in branches] == [{"policy": "basic"}, {"policy": "trivialaugment"}, {"randaugment_m": 5}, {"randaugment_m": 9}]
    assert branches[0].overrides == {"aug_policy": "basic"} and branches[3].overrides == {"randaugment_m": 9}
    axes_only = expand_grid(None, {"randaugment_n": [1, 2], "randaugment_m": [5, 9, 13]})
    assert len(axes_only) == 6 and axes_only[-1].settings == {"randaugment_n": 2, "randaugment_m": 13}
    assert [b.name for b in expand_grid([{"name": "base"}, {"mixup_alpha": 0.2}])] == ["base", "b01"]


def test_values_are_coerced_through_the_config_types():
    # kfp passes JSON numbers as floats, the CLI YAML strings: both become the field's type.
    (b,) = expand_grid([{"randaugment_n": 2.0, "randaugment_m": "9", "mixup_alpha": "0.2", "switch_prob": 1}])
    assert b.settings == {"randaugment_n": 2, "randaugment_m": 9, "mixup_alpha": 0.2, "switch_prob": 1.0}
    assert type(b.settings["randaugment_n"]) is int and type(b.settings["switch_prob"]) is float


def test_an_unknown_key_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"grid\[0\]: unknown grid key 'seed'; valid keys: policy, randaugment_n") as err:
        expand_grid([{"seed": 3}])
    assert all(key in str(err.value) for key in GRID_KEYS)
    with pytest.raises(ValueError, match="unknown grid key 'learning_rate'"):
        expand_grid(None, {"learning_rate": [0.1, 0.01]})


def test_the_schedule_is_sweepable_too():
    branches = expand_grid(None, {"lr": [1e-3, 3e-4], "model": ["tiny_cnn"], "freeze_fraction": [0.0, 0.2]})
    assert len(branches) == 4 and {b.settings["lr"] for b in branches} == {1e-3, 3e-4}
    from imgpipe.sweep import plan

    items = plan("file:///data/resize", None, {"lr": [1e-3, 3e-4], "class_weights": ["none", "balanced"]}, None)
    recipes = [i["step_config"]["train"] for i in items]
    assert {(r["lr"], r["class_weights"]) for r in recipes} == {(1e-3, "none"), (1e-3, "balanced"), (3e-4, "none"), (3e-4, "balanced")}
    with pytest.raises(ValueError, match="class_weights"):
        plan("file:///data/resize", None, {"class_weights": ["inverse"]}, None)


@pytest.mark.parametrize(
    ("grid", "axes", "error", "match"),
    [
        ([{"__class__": 1}], None, ValueError, "unknown grid key '__class__'"),
        ([{1: 2}], None, ValueError, "unknown grid key 1"),
        ([{"policy": "randaugment; rm -rf /"}], None, ValueError, r"grid\[0\].policy: .* is not one of"),
        ([{"policy": "../../etc"}], None, ValueError, "is not one of"),
        ([{"randaugment_n": "2; rm -rf /"}], None, TypeError, "expected an integer"),
        ([{"randaugment_n": True}], None, TypeError, "expected an integer"),
        ([{"randaugment_n": 2.5}], None, TypeError, "expected an integer"),
        ([{"mixup_alpha": float("nan")}], None, ValueError, "not a finite number"),
        ([{"mixup_alpha": "inf"}], None, ValueError, "not a finite number"),
        ([{"mixup_alpha": {"a": 1}}], None, TypeError, "expected a number"),
        ([{"label_smoothing": [0.1]}], None, TypeError, "expected a number"),
        ([{"name": "../etc"}], None, ValueError, "branch name '../etc' must be"),
        ([{"name": "a/b"}], None, ValueError, "branch name"),
        ([{"name": ""}], None, ValueError, "branch name"),
        ([{"name": "x" * 41}], None, ValueError, "branch name"),
        ([{"name": 7}], None, ValueError, "branch name 7"),
        ([{"name": "a"}, {"name": "a"}], None, ValueError, "used more than once"),
        ([{"name": "b01"}, {}], None, ValueError, "b01 used more than once"),
        ("policy: basic", None, TypeError, "grid must be a list"),
        (["basic"], None, TypeError, r"grid\[0\] must be a mapping"),
        (None, {"randaugment_n": 3}, TypeError, "must be a list of values"),
        (None, ["randaugment_n"], TypeError, "axes must be a mapping"),
        (None, {"name": ["a"]}, ValueError, "axes cannot set 'name'"),
        ([{"randaugment_m": 5}], {"randaugment_m": [5, 9]}, ValueError, "branches b00 and b01 have the same settings"),
        ([{"randaugment_m": 5.0}, {"randaugment_m": "5"}], None, ValueError, "same settings"),
        ([], {}, ValueError, "has no branch"),
        (None, {"randaugment_n": []}, ValueError, "has no branch"),
        (None, {"randaugment_n": list(range(9)), "randaugment_m": list(range(8))}, ValueError, "72 branches, more than 64"),
    ],
)
def test_hostile_grids_are_refused_at_the_edge(grid, axes, error, match):
    with pytest.raises(error, match=match):
        expand_grid(grid, axes)


def test_branch_steps_are_safe_path_segments():
    assert branch_step("b00") == "train-b00"
    prefix = kfp_artifacts.run_prefix("s3://bucket/imgpipe", "run-1", branch_step("strong_2"))
    assert prefix == "s3://bucket/imgpipe/runs/run-1/train-strong_2"
    for hostile in ("..", ".hidden", "a/../../b", "a b", "", "x\n"):
        with pytest.raises(ValueError, match="branch name"):
            branch_step(hostile)


def test_plan_builds_every_branch_config_and_names_the_branch_it_refuses():
    items = plan(
        "s3://b/runs/r/resize",
        [{"name": "light", "policy": "basic"}],
        {"label_smoothing": [0.0, 0.1]},
        {"train": {"lr": 0.01, "seed": 7, "label_smoothing": 0.2}, "clean": {"min_side": 8}},
        **NAMED,
    )
    assert [i["branch"] for i in items] == ["light", "b01", "b02"]
    assert items[2]["resized"] == "s3://b/runs/r/resize"
    assert items[2]["step_config"] == {
        "train": {"lr": 0.01, "seed": 7, "label_smoothing": 0.1},
        "clean": {"min_side": 8},
    }, "the grid wins over the train section; the seed and the other sections are every branch's"
    assert items[0]["step_config"]["train"] == {"lr": 0.01, "seed": 7, "label_smoothing": 0.2, "aug_policy": "basic"}
    # Ranges are the config's: refused before anything trains, naming the branch.
    with pytest.raises(ValueError, match=r"branch b01: randaugment_m=31: .*randaugment_m must be an integer in \[0, 30\]"):
        plan("", None, {"randaugment_m": [9, 31]}, None, **NAMED)
    with pytest.raises(ValueError, match=r"branch b00: label_smoothing=1.0: .*label_smoothing must be a number in \[0, 1\)"):
        plan("", [{"label_smoothing": 1.0}], None, None, **NAMED)
    with pytest.raises(ValueError, match=r"mixup_prob must be a number in \[0, 1\] \(a probability\)"):
        plan("", [{"mixup_prob": 1.5}], None, None, **NAMED)
    # Settings the policy ignores would train the same recipe twice: refused.
    with pytest.raises(ValueError, match="branches b00 and b01 have the same effective recipe"):
        plan("", [{"policy": "basic", "randaugment_m": 5}, {"policy": "basic", "randaugment_m": 15}], None, None, **NAMED)
    with pytest.raises(ValueError, match="same effective recipe"):
        plan("", None, {"mixup_prob": [0.5, 1.0]}, {"train": {"mixup": 0, "cutmix": 0}}, **NAMED)
    with pytest.raises(ValueError, match="same effective recipe"):
        plan("", [{}, {"randaugment_n": 2}], None, None, **NAMED)  # 2 is every recipe's
    # 9 is the recipes' magnitude, but a 3-epoch run of medium's 50 is short: medium's short version takes 7.
    assert [i["branch"] for i in plan("", [{}, {"randaugment_m": 9}], None, None, **NAMED)] == ["b00", "b01"]
    with pytest.raises(TypeError, match=r"step_config\['train'\] must be a mapping"):
        plan("", [{}], None, {"train": [1]}, **NAMED)


def test_grid_files_and_pipeline_parameters(tmp_path: Path):
    path = tmp_path / "grid.yaml"
    path.write_text("grid:\n  - {name: base, policy: basic}\naxes:\n  randaugment_n: [1, 2]\n")
    grid, axes = load_grid_file(path)
    params = grid_parameters(grid, axes)
    assert params["grid"] == [{"name": "base", "policy": "basic"}] and params["grid_randaugment_n"] == [1, 2]
    assert set(params) == {"grid", *(f"grid_{k}" for k in GRID_KEYS), SEEDS_KEY} and params["grid_policy"] == []
    assert params[SEEDS_KEY] == 1, "one run per branch unless the grid asks for more"
    path.write_text("axes:\n  randaugment_n: [1, 2]\n  seeds: 3\n")
    assert grid_parameters(*load_grid_file(path))[SEEDS_KEY] == 3
    path.write_text("axes: {randaugment_n: [1, 2]}\nseeds: 3\n")
    with pytest.raises(ValueError, match=r"seeds goes under axes \(`axes: \{seeds: 3\}`\)"):
        load_grid_file(path)
    path.write_text("- {randaugment_m: 5}\n- {randaugment_m: 9}\n")
    assert load_grid_file(path) == ([{"randaugment_m": 5}, {"randaugment_m": 9}], {})
    path.write_text("grids: []\n")
    with pytest.raises(ValueError, match="unknown key.*grids.*keys: grid, axes"):
        load_grid_file(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_grid_file(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ seeds


def test_seeds_repeat_each_branch_with_seed_base_plus_k():
    axes = {"label_smoothing": [0.0, 0.1], SEEDS_KEY: 3}
    items = plan("s3://b/runs/r/resize", [{"name": "light", "policy": "basic"}], axes, {"train": {"seed": 7}}, **NAMED)
    names = ["light-s0", "light-s1", "light-s2", "b01-s0", "b01-s1", "b01-s2", "b02-s0", "b02-s1", "b02-s2"]
    assert [i["branch"] for i in items] == names
    assert [i["group"] for i in items] == ["light"] * 3 + ["b01"] * 3 + ["b02"] * 3
    assert [i["step_config"]["train"]["seed"] for i in items[:3]] == [7, 8, 9], "seed = base seed + k"
    assert items[4]["step_config"]["train"] == {"seed": 8, "label_smoothing": 0.0}
    assert items[3]["settings"] == items[5]["settings"] == {"label_smoothing": 0.0}, "the grid settings, not the seed"
    # The default base seed is TrainConfig's (0).
    assert [i["step_config"]["train"]["seed"] for i in plan("", [{}], {SEEDS_KEY: 2}, None, **NAMED)] == [0, 1]
    for name in (f"train-{n}" for n in names):
        assert branch_step(name.removeprefix("train-")) == name
    # One seed: the items of a sweep without seeds (names, configs, no group).
    assert plan("", None, {"lr": [1e-3, 3e-4], SEEDS_KEY: 1}, None, **NAMED) == plan("", None, {"lr": [1e-3, 3e-4]}, None, **NAMED)


@pytest.mark.parametrize(
    ("grid", "axes", "error", "match"),
    [
        ([{}], {SEEDS_KEY: 0}, ValueError, f"seeds must be from 1 to {MAX_SEEDS} runs per branch"),
        ([{}], {SEEDS_KEY: MAX_SEEDS + 1}, ValueError, f"from 1 to {MAX_SEEDS} runs .*, got {MAX_SEEDS + 1}"),
        ([{}], {SEEDS_KEY: -2}, ValueError, "seeds must be from 1"),
        ([{}], {SEEDS_KEY: [0, 1, 2]}, TypeError, "seeds is a count of runs per branch, not a list of seeds: write `seeds: 3`"),
        ([{}], {SEEDS_KEY: "three"}, TypeError, "seeds: expected an integer"),
        ([{}], {SEEDS_KEY: True}, TypeError, "seeds: expected an integer"),
        ([{}], {SEEDS_KEY: 2.5}, TypeError, "seeds: expected an integer"),
        ([{SEEDS_KEY: 2}], None, ValueError, r"grid\[0\]: seeds is set once for the whole sweep, under axes"),
        # A 40-character name is valid alone but not with the "-s0" suffix: refused, saying how short.
        ([{"name": "x" * 40}], {SEEDS_KEY: 2}, ValueError, "repeated over 2 seeds is named 'x{40}-s0'; shorten .* at most 37"),
        ([{"name": "x" * 38}], {SEEDS_KEY: 10}, ValueError, "at most 37 characters"),
    ],
)
def test_seeds_are_checked_at_the_edge(grid, axes, error, match):
    with pytest.raises(error, match=match):
        expand_grid(grid, axes)


def test_seeds_keep_the_name_rules():
    assert len(plan("", [{"name": "x" * 37}], {SEEDS_KEY: MAX_SEEDS}, None, **NAMED)) == MAX_SEEDS, "x*37 + '-s9' is 40"
    assert expand_grid([{"name": "x" * 40}], {SEEDS_KEY: 1})[0].name == "x" * 40, "no suffix with one seed"
    assert [b.name for b in expand_grid(None, {"lr": [1e-3], SEEDS_KEY: "3"})] == ["b00"], "YAML/kfp strings coerce"
    assert sweep.seed_runs("b00", 3) == ["b00-s0", "b00-s1", "b00-s2"] and sweep.seed_runs("b00", 1) == ["b00"]


# ------------------------------------------------------------------ recipe and domain


def test_recipe_and_domain_are_grid_keys():
    assert GRID_KEYS["recipe"] == "recipe" and GRID_KEYS["domain"] == "domain"
    items = plan("", None, {"recipe": ["none", "small", "auto"], "domain": ["natural", "satellite"]}, None, **NAMED)
    assert len(items) == 6
    assert items[3]["step_config"]["train"] == {"recipe": "small", "domain": "satellite"}
    assert {"recipe", "domain"} <= set(sweep.RECIPE_FIELDS), "the winner carries the recipe and domain it trained"
    with pytest.raises(ValueError, match=r"'huge' is not one of \['none', 'auto', 'small', 'medium', 'large'\]"):
        expand_grid(None, {"recipe": ["small", "huge"]})
    with pytest.raises(ValueError, match="is not one of"):
        expand_grid([{"domain": "x-ray"}])
    # What a domain or size recipe fills is compared: naming the default domain trains the same as not naming it.
    with pytest.raises(ValueError, match="branches b00 and b01 have the same effective recipe"):
        plan("", [{}, {"domain": "natural"}], None, None, **NAMED)
    with pytest.raises(ValueError, match="same effective recipe"):
        plan("", [{"recipe": "small"}, {"recipe": "small", "label_smoothing": 0.1}], None, None, **NAMED)  # small's own 0.1
    # auto picks its size recipe from the data: unknown here, so it is no repeat of a named one.
    assert len(plan("", [{"recipe": "auto"}, {"recipe": "small"}], None, None, **NAMED)) == 2


def test_branch_prefixes_come_from_the_collected_artifacts_and_match_the_plan():
    items = [{"branch": "b00"}, {"branch": "b01"}]
    art = [SimpleNamespace(metadata={"branch": b, "prefix": f"s3://x/runs/r/train-{b}"}) for b in ("b01", "b00")]
    assert sweep.branch_prefixes(items, art) == {"b00": "s3://x/runs/r/train-b00", "b01": "s3://x/runs/r/train-b01"}
    with pytest.raises(ValueError, match="not the branches planned"):
        sweep.branch_prefixes(items, art[:1])
    with pytest.raises(ValueError, match="branch name"):
        sweep.branch_prefixes(items, [SimpleNamespace(metadata={"branch": "../x", "prefix": "s3://x/y"})])


def test_every_augmentation_field_is_in_the_winners_recipe():
    from dataclasses import fields

    from imgpipe.train.augment_config import AugmentConfig
    from imgpipe.train.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    augment = {"aug_policy" if f.name == "policy" else f.name for f in fields(AugmentConfig)}
    assert set(GRID_KEYS.values()) <= names and set(sweep.RECIPE_FIELDS) <= names
    assert augment <= set(sweep.RECIPE_FIELDS), "a full run must get the winner's whole recipe"
    assert isinstance(Branch("b00", {}).label(), str)


def test_the_plan_component_takes_one_list_per_grid_key():
    from imgpipe.components.plan_sweep import plan_sweep

    params = inspect.signature(plan_sweep.python_func).parameters
    assert [p for p in params if p.startswith("grid_")] == [f"grid_{k}" for k in GRID_KEYS]
    source = inspect.getsource(plan_sweep.python_func)
    assert all(f'"{k}": grid_{k}' in source for k in GRID_KEYS), "each list reaches its own key"
    assert params[SEEDS_KEY].default == 1 and "SEEDS_KEY: seeds" in source, "the runs per branch reach plan's axes"


# ------------------------------------------------------------------ the compiled pipeline


def _load(package: Path) -> tuple[dict, dict]:
    ir, platform = yaml.safe_load_all(package.read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The sweep package as `imgpipe compile --pipeline imgpipe-sweep --parallelism 3` writes it."""
    out = tmp_path_factory.mktemp("sweep-ir") / "sweep.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGPIPE_GPU_IMAGE", "registry.test/cuda/trainer:7")
        mp.delenv(kfp_package.GPU_ENV, raising=False)
        assert main(["compile", str(out), "--pipeline", "imgpipe-sweep", "--parallelism", "3"]) == 0
    return _load(out)


def _dag_tasks(ir: dict) -> dict[str, dict]:
    """Every task of every DAG (root, conditions, loop), by task name."""
    return {name: task for dag in ir_dags(ir) for name, task in dag["tasks"].items()}


def test_the_sweep_compiles_with_the_main_pipelines_parameters_and_the_grid(compiled, tmp_path):
    from imgpipe.pipelines.imgpipe_sweep import GRID_PARAMETERS

    ir, _ = compiled
    assert ir["pipelineInfo"]["name"] == "imgpipe-sweep"
    params = ir["root"]["inputDefinitions"]["parameters"]
    main_params = kfp_package.pipeline_inputs(kfp_package.compile_package(tmp_path / "main.yaml"))
    # Each branch trains on its own pod's GPUs: train_nodes (a TrainJob the branch would wait on) is not offered.
    from imgpipe.pipelines.imgpipe_sweep import NOT_OFFERED

    assert NOT_OFFERED == ("train_nodes",)
    assert set(params) == set(main_params) - {"train_nodes"} | set(GRID_PARAMETERS) | {SEEDS_KEY}, "imgpipe's parameters, plus the grid"
    for name, spec in main_params.items():
        if name not in ("epochs", "train_nodes"):
            assert params[name].get("defaultValue") == spec.get("defaultValue"), name
    assert params["epochs"]["defaultValue"] == sweep.SWEEP_EPOCHS and "default 5" in params["epochs"]["description"]
    for name in GRID_PARAMETERS:
        assert params[name]["parameterType"] == "LIST" and params[name]["defaultValue"] == [] and params[name]["description"]
    assert {"grid_recipe", "grid_domain"} <= set(GRID_PARAMETERS)
    seeds = params[SEEDS_KEY]
    assert seeds["parameterType"] == "NUMBER_INTEGER" and seeds["defaultValue"] == 1 and "mean" in seeds["description"]
    plan_inputs = ir["root"]["dag"]["tasks"]["plan-sweep"]["inputs"]["parameters"]
    assert plan_inputs[SEEDS_KEY]["componentInputParameter"] == SEEDS_KEY, "the run parameter reaches plan"


def test_branches_fan_out_under_a_parallelism_limit(compiled):
    ir, executors = compiled
    root = ir["root"]["dag"]["tasks"]
    loop_name, loop = next((n, t) for n, t in root.items() if "parameterIterator" in t)
    # kfp sdk/python/kfp/compiler/pipeline_spec_builder.py: ParallelFor(parallelism=3) -> iteratorPolicy.
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--plan-sweep-Output"}
    assert loop["dependentTasks"] == ["plan-sweep"]
    assert root["plan-sweep"]["dependentTasks"] == ["condition-branches-1"], "planned once resize committed"
    assert {"download", "clean", "plan-sweep", "compare"} <= set(root)
    assert root["compare"]["dependentTasks"] == sorted([loop_name, "plan-sweep"])
    assert root["compare"]["inputs"]["artifacts"]["trained"]["taskOutputArtifact"]["producerTask"] == loop_name
    # The branch's train task takes the prefix, name and config from the loop item, nothing from a task.
    train = ir["components"][root[loop_name]["componentRef"]["name"]]["dag"]["tasks"]["train"]
    inputs = train["inputs"]["parameters"]
    for key in ("resized", "branch", "step_config"):
        assert inputs[key]["parameterExpressionSelector"] == f'parseJson(string_value)["{key}"]', key
    assert not any("taskOutputParameter" in v for v in inputs.values())
    assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # Only the branches ask for a GPU; plan and compare run in the gpu image without one.
    containers = ir["deploymentSpec"]["executors"]
    assert containers[train["componentRef"]["name"].replace("comp-", "exec-")]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    for task in ("plan-sweep", "compare"):
        label = root[task]["componentRef"]["name"].replace("comp-", "exec-")
        assert "accelerator" not in containers[label]["container"]["resources"], task
        assert containers[label]["container"]["image"] == "registry.test/cuda/trainer:7"
        assert executors[label]["secretAsEnv"], "the S3 credentials come from the Secret"


def test_the_sweep_compiles_without_torch(tmp_path):
    import subprocess
    import sys

    script = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "cv2", "ray", "kornia", "albumentations", "matplotlib"):
            raise ImportError(f"{{name}} is not installed in the cpu image")
sys.meta_path.insert(0, Refuse())
from imgpipe.kfp import client as kfp_client
from imgpipe.kfp import package as kfp_package
kfp_package.compile_package({str(tmp_path / "s.yaml")!r}, pipeline="imgpipe-sweep")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_compile_options_are_checked():
    with pytest.raises(ValueError, match="unknown pipeline 'imgpipe-sweeps'"):
        kfp_package.compile_package("unused.yaml", pipeline="imgpipe-sweeps")
    with pytest.raises(ValueError, match="parallelism bounds the branches of imgpipe-sweep"):
        kfp_package.compile_package("unused.yaml", parallelism=2)
    from imgpipe.pipelines import SweepOptions

    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="parallelism must be an integer >= 1"):
            SweepOptions(parallelism=bad)


def test_submit_checks_the_grid_before_contacting_a_server(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("axes: {randaugment_n: [1, 2], seed: [1]}\n")
    # Fails on the grid, at the edge: no host is configured, so reaching the server would fail otherwise.
    assert main(["submit", "--pipeline", "imgpipe-sweep", "--grid", str(grid), "--param", "data_root=s3://b/x"]) == 2
    assert "unknown grid key 'seed'" in capsys.readouterr().err
    assert main(["submit", "--grid", str(grid)]) == 2
    assert "--grid is a parameter of --pipeline imgpipe-sweep" in capsys.readouterr().err


def test_a_winner_file_layers_over_the_run_config(tmp_path):
    from imgpipe.local.run import load_local_config

    run, winner = tmp_path / "run.yaml", tmp_path / "winner.yaml"
    run.write_text("pipeline: {epochs: 2}\ntrain: {lr: 0.002, aug_policy: basic, mixup: 0.0}\n")
    winner.write_text("# a comment\ntrain: {aug_policy: randaugment, randaugment_m: 13, mixup: 0.2}\n")
    cfg = load_local_config([run, winner])
    assert cfg.params == {"epochs": 2}
    assert cfg.step_config["train"] == {"lr": 0.002, "aug_policy": "randaugment", "randaugment_m": 13, "mixup": 0.2}
    winner.write_text("train: [1]\n")
    with pytest.raises(ValueError, match="section 'train' must hold a mapping"):
        load_local_config([run, winner])


@pytest.mark.parametrize("name", ["randaugment", "mixing"])
def test_the_example_grids_plan_on_the_local_config(name):
    root = Path(__file__).parents[1] / "configs"
    train = yaml.safe_load((root / "local.yaml").read_text())["train"]
    items = plan("", *load_grid_file(root / "sweeps" / f"{name}.yaml"), {"train": train}, **NAMED)
    assert 5 <= len(items) <= 8, "a small grid: each branch is a training run"


def test_each_branch_gets_the_run_parameters_the_main_pipelines_train_gets(compiled, tmp_path):
    ir, _ = compiled
    main_ir, _ = _load(kfp_package.compile_package(tmp_path / "main.yaml"))

    def from_parameters(task: dict) -> dict[str, str]:
        inputs = task["inputs"]["parameters"].items()
        return {
            k: v["componentInputParameter"].removeprefix("pipelinechannel--")
            for k, v in inputs
            if "componentInputParameter" in v and "parameterExpressionSelector" not in v
        }

    main_train = from_parameters(_dag_tasks(main_ir)["train"])
    branch_train = from_parameters(_dag_tasks(ir)["train"])
    assert main_train.pop("step_config") == "step_config", "a branch takes its own, from the plan"
    assert main_train.pop("train_nodes") == "train_nodes", "a branch trains in its pod: the sweep does not offer it"
    assert "oneof" in main_train.pop("resized"), "the main train takes whichever resize ran; a branch, the plan's item"
    assert "train_nodes" not in branch_train and "promotion_tolerance" not in main_train, "promote is a task of its own"
    assert main_train.items() <= branch_train.items(), "typed train parameters reach every branch"
    plan_inputs = from_parameters(ir["root"]["dag"]["tasks"]["plan-sweep"])
    assert main_train.keys() - {"data_root"} <= plan_inputs.keys(), "plan checks the config the branches build"


def test_the_sweep_summary_shows_each_branchs_spread_over_seeds():
    from imgpipe.local.sweeps import SweepRunResult

    row = {
        "rank": 1,
        "branch": "ra",
        "settings": {"randaugment_m": 9},
        "flags": [],
        "seeds": 3,
        "val_macro_f1": 0.61,
        "val_accuracy": 0.7,
        "spread": {"val_macro_f1": {"std": 0.021, "min": 0.59, "max": 0.63}},
    }
    single = {**row, "rank": 2, "branch": "base", "seeds": 1, "spread": {}}
    comparison = {"ranked_by": ["val_macro_f1"], "imbalanced": False, "imbalance": 1.0, "branches": [row, single]}
    result = SweepRunResult("r1", {"compare": "file:///tmp/x/compare"}, comparison, {})
    lines = result.summary().splitlines()
    assert "val_macro_f1 0.610 ±0.021" in lines[1] and "(mean of 3 seeds)" in lines[1]
    assert "±" not in lines[2] and "seeds" not in lines[2]
