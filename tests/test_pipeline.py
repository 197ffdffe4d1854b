"""The pipeline: what the compiler emits (IR and Kubernetes platform spec), and a whole run through kfp.local.

The compile tests read the YAML package the way the KFP backend does and check the
DAG, images, resources, retries, caching, GPU scheduling and where the S3 credentials
come from. The local run executes the same pipeline function with
``kfp.local.SubprocessRunner(use_venv=False)`` on tiny data, against the SeaweedFS S3 server
of ``conftest.py`` and a local Ray (so it is marked ``ray``: run it inside
``scripts/in-loopback-netns``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from kfp import dsl

from imgpipe import contract, storage
from imgpipe.kfp import package as kfp_package
from imgpipe.local.run import LocalRunConfig, load_local_config, run_local
from imgpipe.remote.dispatch import remote_steps
from imgpipe.stepio import artifacts as kfp_artifacts
from imgpipe.stepio.artifacts import BY_INPUTS
from imgpipe.stepio.publish import find_confusion
from tests.helpers import deploy_guide, ir_dags

STEPS = ("download", "clean", "resize", "train")
# The tasks of the compiled DAG, by display name: resize is two tasks, one per ray_address mode,
# and train two, one per train_nodes mode; promote takes whichever train ran.
TASKS = ("download", "clean", "resize-local", "resize", "train", "train-trainjob", "promote")
REGISTRY, TAG = "registry.test/ml", "t1"


def _load(package: Path) -> tuple[dict, dict]:
    ir, platform = yaml.safe_load_all(package.read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    """The package as `imgpipe compile` writes it, with images named through the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGPIPE_REGISTRY", REGISTRY)
        mp.setenv("IMGPIPE_IMAGE_TAG", TAG)
        mp.setenv("IMGPIPE_GPU_IMAGE", "registry.test/cuda/trainer:7")
        mp.delenv("IMGPIPE_CPU_IMAGE", raising=False)
        mp.delenv("IMGPIPE_RAY_IMAGE", raising=False)
        mp.delenv(kfp_package.GPU_ENV, raising=False)
        package = kfp_package.compile_package(tmp_path_factory.mktemp("ir") / "imgpipe.yaml")
    ir, executors = _load(package)
    return ir, executors, package.read_text()


def _all_tasks(ir: dict) -> dict[str, tuple[dict, str]]:
    """Every container task, root DAG and condition branches alike: display name -> (task, executor label)."""
    found = {}
    for dag in ir_dags(ir):
        for task in dag["tasks"].values():
            component = ir["components"][task["componentRef"]["name"]]
            if "executorLabel" in component:
                found[task["taskInfo"]["name"]] = (task, component["executorLabel"])
    return found


def _tasks(ir: dict) -> dict:
    return {name: task for name, (task, _) in _all_tasks(ir).items()}


def _executor(ir: dict, name: str) -> str:
    return _all_tasks(ir)[name][1]


def _container(ir: dict, name: str) -> dict:
    return ir["deploymentSpec"]["executors"][_executor(ir, name)]["container"]


def _trigger(ir: dict, root: dict, name: str) -> str:
    """The condition under which the task ``name`` (in one branch of an If/Else) runs."""
    for group in root.values():
        if "componentRef" not in group or "dag" not in ir["components"][group["componentRef"]["name"]]:
            continue
        for branch in ir["components"][group["componentRef"]["name"]]["dag"]["tasks"].values():
            component = ir["components"][branch["componentRef"]["name"]]
            if "dag" in component and any(t["taskInfo"]["name"] == name for t in component["dag"]["tasks"].values()):
                return branch["triggerPolicy"]["condition"]
    raise AssertionError(f"no branch runs {name}")


def test_dag_runs_download_clean_resize_train_in_order(compiled):
    ir, _, _ = compiled
    root = ir["root"]["dag"]["tasks"]
    assert set(_tasks(ir)) == set(TASKS)
    assert "dependentTasks" not in root["download"]
    assert root["clean"]["dependentTasks"] == ["download"]
    branches, train_branches = sorted((name for name in root if name.startswith("condition-branches")), key=lambda n: int(n.rsplit("-", 1)[1]))
    assert root[branches]["dependentTasks"] == ["clean"] and root[train_branches]["dependentTasks"] == [branches]
    assert root["promote"]["dependentTasks"] == [train_branches]
    # Exactly one resize runs: in the pod when ray_address is "", on a Ray cluster otherwise;
    # exactly one train: in the pod when train_nodes is 1, as a TrainJob's poller otherwise.
    tasks = _tasks(ir)
    triggers = {name: _trigger(ir, root, name) for name in ("resize-local", "resize", "train", "train-trainjob")}
    assert triggers["resize-local"] == "inputs.parameter_values['pipelinechannel--ray_address'] == ''"
    assert triggers["resize"] == "!(inputs.parameter_values['pipelinechannel--ray_address'] == '')"
    assert triggers["train"] == "int(inputs.parameter_values['pipelinechannel--train_nodes']) == 1"
    assert triggers["train-trainjob"] == "!(int(inputs.parameter_values['pipelinechannel--train_nodes']) == 1)"
    assert (
        tasks["train"]["inputs"]["parameters"]["placement"]["runtimeValue"]["constant"],
        tasks["train-trainjob"]["inputs"]["parameters"]["placement"]["runtimeValue"]["constant"],
    ) == ("pod", "trainjob")
    # Each step reads the step artifact of the one before it, never a dataset artifact...
    ref = tasks["clean"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert (ref["producerTask"], ref["outputArtifactKey"]) == ("download", "dataset")
    channel = root[branches]["inputs"]["artifacts"]["pipelinechannel--clean-cleaned"]["taskOutputArtifact"]
    assert (channel["producerTask"], channel["outputArtifactKey"]) == ("clean", "cleaned")
    for step in ("resize-local", "resize"):
        assert tasks[step]["inputs"]["artifacts"]["cleaned"]["componentInputArtifact"] == "pipelinechannel--clean-cleaned"
    # ...train the committed prefix of whichever resize ran, and promote that of whichever train ran.
    resized = root[train_branches]["inputs"]["parameters"][f"pipelinechannel--{branches}-pipelinechannel--{branches}-oneof-1"]
    assert resized["taskOutputParameter"]["producerTask"] == branches and "oneof" in resized["taskOutputParameter"]["outputParameterKey"]
    trained = root["promote"]["inputs"]["parameters"]["trained"]["taskOutputParameter"]
    assert trained["producerTask"] == train_branches and "oneof" in trained["outputParameterKey"]
    # The run id reaches every step as the exact placeholder the backend substitutes.
    for step in TASKS:
        assert tasks[step]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    outputs = ir["root"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "model": "system.Model",
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
        "report": "system.HTML",
    }


def test_each_task_runs_its_kind_of_image_without_installing_anything(compiled):
    ir, _, _ = compiled
    images = {step: _container(ir, step)["image"] for step in TASKS}
    assert images == {
        "download": f"{REGISTRY}/imgpipe-cpu:{TAG}",
        "clean": f"{REGISTRY}/imgpipe-cpu:{TAG}",
        "resize-local": f"{REGISTRY}/imgpipe-ray:{TAG}",
        "resize": f"{REGISTRY}/imgpipe-ray:{TAG}",
        "train": "registry.test/cuda/trainer:7",
        "train-trainjob": "registry.test/cuda/trainer:7",
        "promote": "registry.test/cuda/trainer:7",
    }
    for task in TASKS:
        step = task.split("-")[0]
        command = " ".join(_container(ir, task)["command"])
        assert "pip install" not in command, "install_kfp_package=False: the image has kfp and imgpipe"
        # A step that may run remotely goes through the layer that decides where it runs.
        runner = {"train": "from imgpipe.remote.dispatch import", "promote": "ka.promote_run("}.get(step, f"from imgpipe.steps.{step} import")
        runner = "from imgpipe.remote.dispatch import" if step in remote_steps() else runner
        assert "kfp.dsl.executor_main" in command and runner in command
        env = {e["name"]: e["value"] for e in _container(ir, task).get("env", [])}
        assert env["PYTHONUNBUFFERED"] == "1"
    env = {e["name"]: e["value"] for e in _container(ir, "resize")["env"]}
    assert env["IMGPIPE_RAY_IMAGE"] == f"{REGISTRY}/imgpipe-ray:{TAG}", "KubeRay clusters run the resize image"


def test_resources_and_the_gpu_on_train_only(compiled):
    ir, executors, _ = compiled
    expected = {
        "download": ("1", "2", "2Gi", "4Gi"),
        "clean": ("4", "4", "8Gi", "8Gi"),
        "resize-local": ("4", "4", "8Gi", "8Gi"),  # Ray in the pod does the work
        "resize": ("250m", "1", "512Mi", "1Gi"),  # a RayJob / Ray cluster does it; the pod polls
        "train": ("8", "8", "48Gi", "48Gi"),
        "train-trainjob": ("250m", "1", "512Mi", "1Gi"),  # a TrainJob's nodes do it; the pod creates and follows it
        "promote": ("2", "4", "4Gi", "8Gi"),  # re-scores two models on the test split, on CPU
    }
    assert set(expected) == set(TASKS)
    for step, (cpu_req, cpu_lim, mem_req, mem_lim) in expected.items():
        res = _container(ir, step)["resources"]
        got = (res["resourceCpuRequest"], res["resourceCpuLimit"], res["resourceMemoryRequest"], res["resourceMemoryLimit"])
        assert got == (cpu_req, cpu_lim, mem_req, mem_lim), step
        assert ("accelerator" in res) == (step == "train"), step
    gib = {"Gi": 1, "Mi": 1 / 1024}
    shm = executors[_executor(ir, "train")]["emptyDirMounts"][0]["sizeLimit"]
    limit = _container(ir, "train")["resources"]["resourceMemoryLimit"]
    assert float(limit[:-2]) * gib[limit[-2:]] >= float(shm[:-2]) * gib[shm[-2:]] + 16, "the limit covers /dev/shm plus the process"
    accelerator = _container(ir, "train")["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1")

    train = executors[_executor(ir, "train")]
    assert train["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"}]
    for step in set(TASKS) - {"train"}:
        assert not {"tolerations", "nodeSelector", "emptyDirMounts"} & set(executors[_executor(ir, step)]), step


def test_retries_with_backoff_on_data_steps_and_a_resuming_retry_on_train(compiled):
    ir, _, _ = compiled
    tasks = _tasks(ir)
    for step in ("download", "clean", "resize-local", "resize", "promote"):
        assert tasks[step]["retryPolicy"] == {
            "maxRetryCount": 3,
            "backoffDuration": "60s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "1800s",
        }, step
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == tasks["train-trainjob"]["retryPolicy"]["maxRetryCount"] == 1
    # A retried train continues its checkpoint: the component builds its config with resume on.
    assert "ka.train_overrides(" in " ".join(_container(ir, "train")["command"])
    assert kfp_artifacts.train_overrides(None, None, None, None, None)["resume"] is True


def test_s3_credentials_come_from_the_secret_never_from_literals(compiled):
    ir, executors, text = compiled
    for step in TASKS:
        platform = executors[_executor(ir, step)]
        (secret,) = [s for s in platform["secretAsEnv"] if s["secretName"] == "imgpipe-s3-credentials"]
        assert {(m["secretKey"], m["envVar"]) for m in secret["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        }
        assert secret["optional"] is False
        (config,) = platform["configMapAsEnv"]
        assert config["configMapName"] == "imgpipe-s3-config" and config["optional"] is True
        env_names = {e["name"] for e in _container(ir, step).get("env", [])}
        assert not env_names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "credentials must not be literal env"
    ray_token = [s for s in executors[_executor(ir, "resize")]["secretAsEnv"] if s["secretName"] == "imgpipe-ray-shared"]
    assert ray_token and ray_token[0]["optional"] is True
    assert not [s for s in executors[_executor(ir, "resize-local")]["secretAsEnv"] if s["secretName"] == "imgpipe-ray-shared"]
    assert "testing" not in text and "secret_access_key:" not in text.lower()


def test_every_operator_setting_the_docs_name_reaches_every_task(compiled):
    """One list (OPERATOR_SETTINGS): the docs' table of ConfigMap keys, and each task's env in the compiled package."""
    import re

    from imgpipe.pipelines.options import OPERATOR_SETTINGS

    ir, executors, _ = compiled
    for step in TASKS:
        (config,) = executors[_executor(ir, step)]["configMapAsEnv"]
        assert {(m["configMapKey"], m["envVar"]) for m in config["keyToEnv"]} == {(k, k) for k in OPERATOR_SETTINGS}, step
    deploy = deploy_guide()
    table = deploy[deploy.index("## Operator settings") :].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M)) == set(OPERATOR_SETTINGS)


def test_caching_is_decided_when_compiling(compiled, tmp_path):
    ir, _, _ = compiled
    assert all(_tasks(ir)[s]["cachingOptions"] == {} for s in TASKS), "off by default (scheduled retraining)"
    cached, _ = _load(kfp_package.compile_package(tmp_path / "cached.yaml", caching=True))
    cacheable = [s for s in TASKS if s != "promote"]
    assert all(_tasks(cached)[s]["cachingOptions"] == {"enableCache": True} for s in cacheable)
    assert _tasks(cached)["promote"]["cachingOptions"] == {}, "promote moves latest.json: never a cache hit"


def test_a_cached_build_keys_task_prefixes_by_inputs(compiled, tmp_path):
    """KFP resolves the run id before it computes a cache key: a task that took it could never hit."""

    def run_ids(ir):
        return {s: _tasks(ir)[s]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] for s in TASKS}

    job = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assert set(run_ids(compiled[0]).values()) == {job}
    cached, _ = _load(kfp_package.compile_package(tmp_path / "cached.yaml", caching=True))
    assert run_ids(cached) == {**{s: BY_INPUTS for s in TASKS}, "promote": job}
    # KFP 2.17 leaves a branch whose task was a hit RUNNING: a never-cached task after it completes it.
    verifiers = [t for dag in ir_dags(cached) for t in dag["tasks"].values() if t["componentRef"]["name"].startswith("comp-verify-output")]
    assert len(verifiers) == 4 and all(t["cachingOptions"] == {} for t in verifiers), verifiers
    fed = {t["inputs"]["parameters"]["prefix"]["taskOutputParameter"]["producerTask"] for t in verifiers}
    assert {re.sub(r"-\d+$", "", f) for f in fed} == {"resize", "train"} and len(fed) == 4, fed
    assert not [n for n in _tasks(compiled[0]) if n.startswith("verify-output")], "a build without caching needs none"


def test_cpu_only_build_drops_the_gpu_scheduling(tmp_path, monkeypatch):
    monkeypatch.setenv(kfp_package.GPU_ENV, "false")
    ir, executors = _load(kfp_package.compile_package(tmp_path / "cpu.yaml"))
    for step in ("train", "train-trainjob"):
        assert "accelerator" not in _container(ir, step)["resources"]
        assert not {"tolerations", "nodeSelector"} & set(executors[_executor(ir, step)])
        assert executors[_executor(ir, step)]["secretAsEnv"], "credentials stay"
    env = {e["name"]: e["value"] for e in _container(ir, "train-trainjob")["env"]}
    assert "gpu" not in env["IMGPIPE_TRAINJOB_NODE_RESOURCES"] and env["IMGPIPE_TRAINJOB_POD"] == "{}", "nor do the TrainJob's nodes"


def test_compiling_is_deterministic(compiled, tmp_path, monkeypatch):
    _, _, text = compiled
    monkeypatch.setenv("IMGPIPE_REGISTRY", REGISTRY)
    monkeypatch.setenv("IMGPIPE_IMAGE_TAG", TAG)
    monkeypatch.setenv("IMGPIPE_GPU_IMAGE", "registry.test/cuda/trainer:7")
    monkeypatch.delenv(kfp_package.GPU_ENV, raising=False)
    again = kfp_package.compile_package(tmp_path / "again.yaml")
    assert again.read_text() == text, "same code and options must give the same version name"


def test_kfps_own_compile_command_finds_the_one_default_pipeline(compiled, tmp_path):
    """``kfp dsl compile --py pipelines/imgpipe_pipeline.py`` collects the module's one pipeline, built on first use."""
    from imgpipe.pipelines import imgpipe_pipeline as module
    from kfp import compiler
    from kfp.cli.compile_ import collect_pipeline_or_component_from_module

    pipeline = collect_pipeline_or_component_from_module(module)
    assert pipeline is module.imgpipe_pipeline and pipeline.name == kfp_package.PIPELINE_NAME
    out = tmp_path / "by-kfp.yaml"
    compiler.Compiler().compile(pipeline, package_path=str(out))
    assert next(yaml.safe_load_all(out.read_text()))["pipelineInfo"] == compiled[0]["pipelineInfo"]


def test_typed_parameters_default_to_their_config_field_and_say_so(compiled):
    from imgpipe.pipelines.imgpipe_pipeline import PARAMETER_FIELDS, parameter_default

    from imgpipe.config_flags import field_default

    params = compiled[0]["root"]["inputDefinitions"]["parameters"]
    for name, (cls, field) in PARAMETER_FIELDS.items():
        value = field_default(cls, field)
        # Every parameter has a value: KFP's driver refuses a null one where a dsl.If branch takes it
        # (tests/cluster/test_kfp.py ran into it). An unset field is "" for text and 0 for a number.
        assert "defaultValue" in params[name], name
        unset = "" if params[name]["parameterType"] == "STRING" else 0
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else (unset if value is None else value)
        assert params[name]["defaultValue"] == shown == parameter_default(name), name
        assert f"{cls.__name__}.{field}" in params[name]["description"], name
    assert all(spec.get("description") for spec in params.values()), "every run parameter is described in the UI"
    assert params["step_config"]["defaultValue"] == {}, "no parameter is null at run time"


def test_the_parameters_table_shows_the_compiled_defaults(compiled):
    import re

    params = compiled[0]["root"]["inputDefinitions"]["parameters"]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", (Path(__file__).parents[1] / "docs" / "parameters.md").read_text(), re.M)
    shown = {name: value for name, value in rows if name in params}
    assert len(shown) >= 14, shown
    for name, value in shown.items():
        default = params[name].get("defaultValue", {} if name == "step_config" else "(empty)")  # optional, unset
        expected = (
            json.dumps(default)
            if isinstance(default, dict)
            else str(default).lower()
            if isinstance(default, bool)
            else str(default).removesuffix(".0")
        )
        assert value.strip('"') == expected.strip('"'), f"docs/parameters.md says {name} defaults to {value}, the package {default!r}"


def test_components_take_typed_parameters_as_optional(compiled):
    # None means the step config's default: a default is written once, in the config.
    comps = compiled[0]["components"]
    inputs = {k: v for c in comps.values() for k, v in c.get("inputDefinitions", {}).get("parameters", {}).items()}
    for name in ("grayscale", "split", "seed", "image_size", "mode", "train_mode", "model_name", "epochs", "batch_size", "aug_policy", "pretrained"):
        assert inputs[name].get("isOptional") and "defaultValue" not in inputs[name], name


def test_the_pipeline_chooses_the_train_split_mode_apart(compiled):
    from imgpipe.pipelines.imgpipe_pipeline import DEFAULT_RESIZE_TRAIN_MODE, PARAMETER_FIELDS

    from imgpipe.config_flags import field_default
    from imgpipe.resize.config import ResizeConfig
    from imgpipe.resize.spec import MODES

    ir = compiled[0]
    param = ir["root"]["inputDefinitions"]["parameters"]["resize_train_mode"]
    assert param["defaultValue"] == DEFAULT_RESIZE_TRAIN_MODE and param["parameterType"] == "STRING"
    assert "train split" in param["description"] and "whole" in param["description"]
    assert DEFAULT_RESIZE_TRAIN_MODE in (*MODES, "")
    # On purpose not the config's default: the CLI keeps training on centre crops.
    assert "resize_train_mode" not in PARAMETER_FIELDS and field_default(ResizeConfig, "train_mode") is None
    tasks = _tasks(ir)
    for step in ("resize-local", "resize"):
        channel = tasks[step]["inputs"]["parameters"]["train_mode"]["componentInputParameter"]
        assert channel == "pipelinechannel--resize_train_mode", step


def test_the_resize_component_refuses_a_hostile_train_mode():
    from imgpipe.components.resize import resize

    # The config is built (and checked) before anything is read or written.
    for hostile in ("whole; rm -rf /", "../../whole", "whole\n"):
        with pytest.raises((ValueError, TypeError), match=r"train_mode: .* is not one of \['short-side-crop', 'fixed', 'pad', 'whole'\]"):
            resize.python_func(cleaned=None, data_root="file:///nowhere", run_id="r", resized=None, metrics=None, report=None, train_mode=hostile)


def test_pretrained_is_a_run_parameter_that_reaches_train(compiled):
    ir = compiled[0]
    param = ir["root"]["inputDefinitions"]["parameters"]["pretrained"]
    assert param["parameterType"] == "STRING" and param["defaultValue"] == "" and "torchvision" in param["description"]
    for step in ("train", "train-trainjob"):  # each inside its branch, through the branch's channel
        assert _tasks(ir)[step]["inputs"]["parameters"]["pretrained"]["componentInputParameter"] == "pipelinechannel--pretrained"


def test_the_train_component_refuses_a_hostile_pretrained_name():
    from imgpipe.components.train import train

    # The config is built (and checked) before anything is read, written or downloaded.
    for hostile in ("../../weights/evil", "IMAGENET1K_V1/../../x", "DEFAULT; rm -rf /"):
        with pytest.raises(ValueError, match=r"is not a weights name of resnet18; choose one of: IMAGENET1K_V1, DEFAULT"):
            train.python_func(
                resized="file:///nowhere/resize",
                data_root="file:///nowhere",
                run_id="r",
                trained=None,
                model=None,
                metrics=None,
                confusion=None,
                report=None,
                model_name="resnet18",
                pretrained=hostile,
            )


def test_the_pipeline_compiles_without_torch_opencv_or_ray(tmp_path):
    # The cpu image (no torch, no OpenCV, no Ray) runs `imgpipe submit`, which compiles.
    script = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "cv2", "ray", "kornia", "albumentations"):
            raise ImportError(f"{{name}} is not installed in the cpu image")
sys.meta_path.insert(0, Refuse())
from imgpipe.kfp import client as kfp_client
from imgpipe.kfp import package as kfp_package
kfp_package.compile_package({str(tmp_path / "p.yaml")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "p.yaml").is_file()


def test_local_run_config_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pipeline: {epochs: 1}\nsynth: {classes: 3, off_centre: true}\ntrain: {max_steps_per_epoch: 2}\n")
    cfg = load_local_config(path, per_class=5)
    assert (cfg.classes, cfg.per_class, cfg.off_centre) == (3, 5, True)
    assert load_local_config(None).off_centre is False
    args = cfg.pipeline_arguments()
    assert args["epochs"] == 1 and args["ray_address"] == ""
    assert args["step_config"]["train"]["max_steps_per_epoch"] == 2
    assert args["step_config"]["train"]["num_workers"] == 0, "local defaults stay unless overridden"
    path.write_text("pipelin: {}\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_local_config(path)
    path.write_text("synth: {off_center: true}\n")
    with pytest.raises(ValueError, match="unknown key.*off_center.*off_centre"):
        load_local_config(path)


@pytest.mark.ray
def test_whole_pipeline_through_kfp_local_on_the_local_s3_server(s3_bucket, tmp_path):
    cfg = LocalRunConfig(
        data_root=f"{s3_bucket}/imgpipe",
        workdir=str(tmp_path / "work"),
        classes=3,
        per_class=6,
        params={"image_size": 32, "model": "tiny_cnn", "epochs": 1, "batch_size": 4},
        step_config={"clean": {"workers": 1}, "train": {"max_steps_per_epoch": 2, "device": "cpu"}},
    )
    result = run_local(cfg)

    assert result.reconciled, result.summary()
    for step in STEPS:
        prefix = result.prefixes[step]
        assert prefix == f"{s3_bucket}/imgpipe/runs/{result.run_id}/{step}"
        assert contract.read_manifest(prefix, expect_step=step)["step"] == step
    reports = result.reports
    assert reports["clean"]["inputs"] == reports["download"]["outputs"]
    assert reports["resize"]["inputs"] == reports["clean"]["outputs"] > 0
    assert reports["train"]["inputs"] == reports["resize"]["outputs"], "train accounts for every row"
    assert reports["train"]["extra"]["model"] == "tiny_cnn"

    # The kfp artifacts: files under the local pipeline root, not the data.
    model = torch.load(result.artifacts["model"], map_location="cpu", weights_only=True)
    assert model["model_name"] == "tiny_cnn" and len(model["labels"]) == 3
    assert result.metadata["model"]["model_uri"] == f"{result.prefixes['train']}/model.pt"
    assert {"val_accuracy", "train_loss", "epochs_run"} <= set(result.metadata["metrics"])
    html = Path(result.artifacts["report"]).read_text()
    assert "<html" in html.lower() and "data:image/png;base64" in html
    history = json.loads(storage.read_bytes(f"{result.prefixes['train']}/metrics.json"))
    found = find_confusion(history)
    # A matrix in metrics.json (the train step's test confusion) reaches the UI artifact, and
    # only then: an empty artifact means train wrote none (see imgpipe.stepio.publish.find_confusion).
    shown = result.metadata["confusion"].get("confusionMatrix")
    assert (found is None) == (shown is None)
    if found is not None:
        assert [r["row"] for r in shown["rows"]] == found[1]
    for path in result.artifacts.values():
        assert Path(path).resolve().is_relative_to((tmp_path / "work" / "kfp").resolve())
    # Every step shows what it did in the UI: a Metrics and an HTML artifact per task
    # (kfp.local names a task's folder after its component: resize-local runs as "resize").
    for step in STEPS:
        (executor,) = (tmp_path / "work" / "kfp").glob(f"*/{step}/executor_output.json")
        produced = json.loads(executor.read_text())["artifacts"]
        metrics = produced["metrics"]["artifacts"][0]["metadata"]
        assert metrics and (step == "train" or metrics["outputs"] == reports[step]["outputs"]), step
        page = Path(produced["report"]["artifacts"][0]["uri"]).read_text()
        assert page.startswith("<!doctype html>") and len(page.encode()) < 2 << 20, step

    latest = kfp_artifacts.read_latest(f"{s3_bucket}/imgpipe")
    assert latest["run_id"] == result.run_id and latest["prefixes"]["clean"] == result.prefixes["clean"]
    summary = result.summary()
    assert "reconciled" in summary and f"report.html:   {result.prefixes['train']}/report.html" in summary
    assert not result.copies, "an existing store keeps its results; nothing is copied"
