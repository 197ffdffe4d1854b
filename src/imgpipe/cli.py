"""The ``imgpipe`` command line: one sub-command per step, plus the local end-to-end run.

Every step command takes ``--config FILE`` (YAML, optionally one section per step)
and ``--set key=value`` overrides; dedicated flags are shortcuts for the common
options. The resolved config is written next to each step's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import imgpipe
from imgpipe import resources, storage
from imgpipe.config import add_field_flags, flag_overrides, load_config, parse_override
from imgpipe.registry import STEPS

__all__ = ["build_parser", "main"]

log = logging.getLogger("imgpipe")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (fields, or one section per step)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (repeatable), e.g. --set max_pixels=50000000",
    )
    p.add_argument("--json", action="store_true", help="print the step report as JSON")


def _compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--caching",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="kfp caching of every task, fixed in the package (default off: scheduled retraining)",
    )
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule train on a GPU node (default: $IMGPIPE_TRAIN_GPU, else on)",
    )
    p.add_argument(
        "--train-gpus",
        type=int,
        metavar="N",
        help="GPUs of the train task, one training process each (default: $IMGPIPE_TRAIN_GPUS, else 1)",
    )


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    from imgpipe.kfp.package import PIPELINES

    p.add_argument("--pipeline", choices=PIPELINES, default=PIPELINES[0], help="which pipeline (default %(default)s)")
    p.add_argument(
        "--parallelism",
        type=int,
        help="imgpipe-sweep: branches (GPUs) training at once, fixed in the package (default 2)",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="pods download and clean run on, fixed in the package: above 1, a ParallelFor of shard tasks and a merge (default 1)",
    )


def _kfp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="KFP API endpoint (default $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--experiment", help="experiment name (default $IMGPIPE_EXPERIMENT, else imgpipe)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (default $IMGPIPE_KFP_NAMESPACE)")
    p.add_argument("--service-account", help="service account of the run's pods (default $IMGPIPE_SERVICE_ACCOUNT)")
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline parameter (repeatable), e.g. --param data_root=s3://bucket/imgpipe",
    )
    p.add_argument(
        "--params-from-env",
        action="store_true",
        help="also read IMGPIPE_PARAM_<NAME> variables as parameters (--param wins)",
    )
    p.add_argument("--package", help="a compiled package (default: compile now)")
    _compile_options(p)


def _local_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the local runs (``run``, ``sweep``)."""
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML with sections pipeline (parameters), synth, download, clean, resize, train; repeatable, "
        "a later file wins per field (e.g. configs/local.yaml, then a sweep's winner.yaml)",
    )
    p.add_argument("--data-root", help="where the steps write (default: SeaweedFS on 127.0.0.1 over WORKDIR/seaweedfs, kept from run to run)")
    p.add_argument("--workdir", default="./.data", help="kfp local outputs and copies of the results (default ./.data)")
    p.add_argument(
        "--source",
        help="your images: a folder, an archive, a bucket prefix, WebDataset shards, Hugging Face Parquet or a "
        "uri,label list (docs/sources.md; default: generate the sample dataset)",
    )
    p.add_argument("--annotations", help="Oxford-style annotations archive (default: the sample dataset's)")
    p.add_argument("--classes", type=int, help="sample dataset breeds (default 12)")
    p.add_argument("--per-class", type=int, help="sample dataset images per breed (default 60)")
    p.add_argument("--shards", type=int, help="download and clean as this many shard tasks and a merge (default 1)")
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline parameter over the local defaults (repeatable), e.g. --param epochs=1",
    )
    p.add_argument(
        "--runner",
        choices=["subprocess", "docker"],
        default="subprocess",
        help="subprocess: each step a subprocess of this Python (default, quick); docker: each step in "
        "its image as non-root through the engine DOCKER_HOST names, resize on a Ray cluster of two "
        "containers (build the images first: make images)",
    )


# Each step's flags come from its config dataclass (type, choices, default, help): a
# default changes in one place. Any other field: --set or --config.
def _synth_arguments(p: argparse.ArgumentParser) -> None:
    from imgpipe.data.synth import SynthConfig

    p.add_argument("dest", help="directory URI for images.tar.gz and annotations.tar.gz")
    add_field_flags(p, SynthConfig, ("classes", "per_class", "seed", "off_centre"))


def _download_arguments(p: argparse.ArgumentParser) -> None:
    from imgpipe.data.readers.factory import SUPPORTED
    from imgpipe.steps.download import DownloadConfig

    p.description = f"Each SOURCE is {SUPPORTED}: told apart by its URI, then by its content."
    p.add_argument("paths", nargs="+", metavar="SOURCE... DEST", help="one or more sources, then the output prefix")
    p.add_argument("--previous", help="an earlier download output over the same prefix or URI list: fetch only what is new or changed")
    add_field_flags(p, DownloadConfig, ("sha256", "fetch_workers", "label_key", "class_names", "image_column", "label_column"))


def _clean_arguments(p: argparse.ArgumentParser) -> None:
    from imgpipe.clean.config import CleanConfig

    p.add_argument("source", help="committed download output prefix")
    p.add_argument("dest", help="output prefix")
    add_field_flags(
        p,
        CleanConfig,
        ("grayscale", "split", "seed", "label_source", "labels_csv", "split_from", "min_images_per_class", "min_images_per_split", "workers"),
    )


def _resize_arguments(p: argparse.ArgumentParser) -> None:
    from imgpipe.resize.config import ResizeConfig

    p.add_argument("source", help="committed clean output prefix")
    p.add_argument("dest", help="output prefix")
    add_field_flags(p, ResizeConfig, ("size", "mode", "train_mode", "preset", "format", "ops", "ray_address", "executor"), flags={"ops": "--op"})
    p.add_argument(
        "--run-id",
        help="with a remote --ray-address: retries with the same run id re-attach to the job instead of running it twice (default: $IMGPIPE_RUN_ID)",
    )


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from imgpipe.train.config import TrainConfig

    p.add_argument("data", help="committed resize output prefix")
    p.add_argument("out", help="output prefix: model.pt, metrics, figures, report, checkpoint")
    fields = ("model", "recipe", "domain", "epochs", "batch_size", "lr", "device", "aug_policy", "aug_device", "mixup", "cutmix")
    fields += ("hflip", "weights", "pretrained", "freeze_fraction", "backbone_lr_mult", "num_workers", "seed", "resume")
    add_field_flags(p, TrainConfig, fields, flags={"num_workers": "--workers"})


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    from imgpipe.steps.predict import PredictConfig

    p.add_argument("model", help="a train output prefix (model.json, model.onnx)")
    p.add_argument("data", help="a committed download, clean or resize output, or a folder or archive of images")
    p.add_argument("dest", help="output prefix: predictions.parquet, rejects, manifest")
    add_field_flags(p, PredictConfig, ("batch_size", "actors", "threads", "top_k", "splits", "ray_address", "tta"))


_ENDPOINT_FLAG = "--s3-endpoint"  # the one global option that takes a value

_STEP_ARGUMENTS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "synth": ("generate an Oxford-IIIT-Pet-shaped sample dataset (offline)", _synth_arguments),
    "download": (STEPS["download"].summary, _download_arguments),
    "clean": (STEPS["clean"].summary, _clean_arguments),
    "resize": (STEPS["resize"].summary, _resize_arguments),
    "train": (STEPS["train"].summary, _train_arguments),
    "predict": ("run a trained model's ONNX export over images on Ray Data", _predict_arguments),
}


def build_parser(add_help: bool = True, only: str | None = None) -> argparse.ArgumentParser:
    """Builds the argument parser (reusable by other entry points, as torchvision does).

    Args:
        add_help: Whether the parser has ``-h``.
        only: The command about to run: the other steps' flags are left out, so that
            ``imgpipe clean`` does not import the download, resize and train modules
            (0.07 s of a pod's start). ``None`` builds every step's flags.
    """
    parser = argparse.ArgumentParser(
        prog="imgpipe",
        description="Image-dataset preparation and training: download -> clean -> resize -> train.",
        add_help=add_help,
    )
    parser.add_argument(_ENDPOINT_FLAG, dest="storage_endpoint", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"imgpipe {imgpipe.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Building a step's flags imports its module: another command leaves them out.
    for name, (help_text, add_arguments) in _STEP_ARGUMENTS.items():
        p = sub.add_parser(name, help=help_text)
        if only in (None, name):
            add_arguments(p)
            _common(p)

    p = sub.add_parser("show", help="summarize a committed step output: counts, rejects, classes, sample rows")
    p.add_argument("uri", help="a committed download, clean, resize or train output prefix")
    p.add_argument("--html", metavar="FILE", help="also write the step's HTML report (the Kubeflow UI's) to FILE")
    p.add_argument("--grid", metavar="FILE.png", help="also write a PNG grid of sample images to FILE.png")
    p.add_argument("--rows", type=int, default=10, help="rows shown per table (default 10)")

    p = sub.add_parser(
        "run",
        help="run the Kubeflow pipeline locally (kfp.local, a local S3 server, local Ray) on the sample dataset",
    )
    _local_run_options(p)

    p = sub.add_parser(
        "sweep",
        help="run the augmentation sweep pipeline locally (as run does): one short training per grid branch, ranked",
    )
    p.add_argument("grid", help="grid YAML: 'grid' (a list of branches of grid keys) and/or 'axes' (key: [values])")
    _local_run_options(p)

    p = sub.add_parser("register", help="register a train output's ONNX export in Kubeflow's Model Registry")
    p.add_argument("prefix", help="a committed train output (model.json, model.onnx)")
    p.add_argument("--version", required=True, help="the version's name (unique within the model), e.g. the run id")
    p.add_argument("--registry", help="http(s)://host[:port] of the registry (default $IMGPIPE_MODEL_REGISTRY)")
    p.add_argument("--name", help="the registered model (default $IMGPIPE_REGISTERED_MODEL or imgpipe-classifier)")

    p = sub.add_parser(
        "audit",
        help="run the label audit pipeline locally (as run does): K-fold training, cleanlab's suspected label errors",
    )
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds (default: AuditConfig's, 5)")
    _local_run_options(p)

    p = sub.add_parser("images", help="build the step images through a Docker-compatible engine (DOCKER_HOST)")
    images_sub = p.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    b = images_sub.add_parser("build", help="build (and push) the images from docker/Dockerfile")
    b.add_argument("kinds", nargs="*", metavar="KIND", help="cpu, ray, gpu (default: all)")
    b.add_argument(
        "--base",
        help="base image with python3 and python3-venv (default: $IMGPIPE_BASE_IMAGE, "
        "else python:3.11-slim-bookworm, else one bootstrapped from Debian packages)",
    )
    b.add_argument(
        "--no-bootstrap", dest="bootstrap", action="store_false", help="fail instead of bootstrapping a base image when the default cannot be pulled"
    )
    b.add_argument("--no-cache", action="store_true", help="build every layer anew")
    b.add_argument("--push", action="store_true", help="push each image after building it")
    images_sub.add_parser("list", help="print kind, image name and what runs in it")
    images_sub.add_parser("bootstrap-base", help="build the Debian-based Python base image with mmdebstrap")

    # --pipeline's choices import the pipeline package (kfp.artifacts, the reports, 0.12 s):
    # a step command leaves them out as it leaves out the other steps' flags.
    p = sub.add_parser("compile", help="compile the Kubeflow pipeline (or the sweep) to a YAML package")
    p.add_argument("out", help="package path, e.g. out/imgpipe.yaml")
    _compile_options(p)
    if only in (None, "compile"):
        _pipeline_options(p)

    p = sub.add_parser("submit", help="upload the pipeline version (idempotently) and start a run on Kubeflow Pipelines")
    _kfp_options(p)
    if only in (None, "submit"):
        _pipeline_options(p)
    p.add_argument("--grid", help="with --pipeline imgpipe-sweep: a grid YAML, checked here and passed as the grid parameters")
    p.add_argument("--run-name", help="run display name; a run of that name in the experiment is re-attached to")
    p.add_argument("--wait", action="store_true", help="wait for the run to end; fail unless it succeeds")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait with --wait (default 21600)")

    p = sub.add_parser("schedule", help="create a KFP recurring run of the pipeline (cron: 6 fields, seconds first)")
    p.add_argument("--cron", required=True, help='e.g. "0 0 3 * * *" = 03:00:00 every day')
    p.add_argument("--name", default="imgpipe-retrain", help="schedule name (one per experiment)")
    p.add_argument("--replace", action="store_true", help="replace a schedule of that name with another version or cron")
    _kfp_options(p)
    return parser


def _emit(report: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict() if hasattr(report, "to_dict") else report.__dict__, indent=2, default=str))
    else:
        print(report.summary())


def cmd_synth(args: argparse.Namespace) -> int:
    from imgpipe.data.synth import SynthConfig, generate

    _emit(generate(args.dest, load_config(SynthConfig, args.config, flag_overrides(args), "synth")), args.json)
    return 0


# The steps whose process never uses pandas: pyarrow would import it anyway (resources.hide_unused_module).
_WITHOUT_PANDAS = ("download", "clean")
# The steps whose threads encode Parquet row groups of megabytes at once: pyarrow's default
# allocator (mimalloc) keeps segments per thread, 46 MB of clean's peak at 128k images against
# the C library's allocator, at the same speed (docs/benchmarks.md, "Scale"). Arrow reads the
# setting when it first allocates, so it is set before pyarrow is imported.
_SYSTEM_ALLOCATOR = ("download", "clean")


def cmd_download(args: argparse.Namespace) -> int:
    from imgpipe.steps.download import DownloadConfig, download

    if len(args.paths) < 2:
        raise ValueError("download needs at least one SOURCE and a DEST")
    *sources, dest = args.paths
    cfg = load_config(DownloadConfig, args.config, flag_overrides(args), "download")
    _emit(download(sources, dest, cfg, previous=args.previous), args.json)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from imgpipe.clean.config import CleanConfig
    from imgpipe.steps.clean import clean

    cfg = load_config(CleanConfig, args.config, flag_overrides(args), "clean")
    _emit(clean(args.source, args.dest, cfg), args.json)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from imgpipe.remote.dispatch import run_step
    from imgpipe.resize.config import ResizeConfig

    cfg = load_config(ResizeConfig, args.config, flag_overrides(args), "resize")
    _emit(run_step("resize", args.source, args.dest, cfg, run_id=args.run_id), args.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, flag_overrides(args), "train")
    _emit(train(args.data, args.out, cfg), args.json)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgpipe.steps.predict import PredictConfig, predict

    cfg = load_config(PredictConfig, args.config, flag_overrides(args), "predict")
    report = predict(args.model, args.data, args.dest, cfg)
    _emit(report, args.json)
    for split, score in sorted((report.extra.get("scores") or {}).items()):
        print(f"{split}: accuracy {score['accuracy']:.4f}, macro-F1 {score['macro_f1']:.4f} on {score['images']} images")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Prints what a committed output holds; writes its HTML report and a sample grid on request."""
    from imgpipe.report.steps import build_report

    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {args.rows}")
    report = build_report(args.uri)
    for path, content in ((args.html, lambda: report.html().encode("utf-8")), (args.grid, report.grid_png)):
        if path:
            storage.write_bytes(storage.normalize_uri(path), content())
            log.info("wrote %s", path)
    print(report.text(max_rows=args.rows))
    return 0


def _local_config(args: argparse.Namespace) -> Any:
    """The :class:`~imgpipe.kfp.local_run.LocalRunConfig` of ``run``/``sweep``'s options."""
    from imgpipe.kfp.local_run import load_local_config

    cfg = load_local_config(
        args.config or None,
        data_root=args.data_root,
        workdir=args.workdir,
        source=args.source,
        annotations=args.annotations,
        classes=args.classes,
        per_class=args.per_class,
        runner=args.runner,
        shards=getattr(args, "shards", None),
    )
    if args.params:
        cfg = dataclasses.replace(cfg, params={**cfg.params, **dict(parse_override(p) for p in args.params)})
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    """Runs the pipeline through kfp.local; prints per-step counts and where the results are."""
    from imgpipe.kfp.local_run import run_local

    result = run_local(_local_config(args), verbose=args.verbose)
    print(result.summary())
    return 0 if result.reconciled else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    """Runs the sweep pipeline through kfp.local; prints the ranking, the flags and where the winner's config is."""
    from imgpipe.kfp.local_sweeps import run_sweep
    from imgpipe.sweep import load_grid_file

    grid, axes = load_grid_file(args.grid)
    print(run_sweep(_local_config(args), grid, axes).summary())
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from imgpipe.modelregistry import register_model

    got = register_model(args.prefix, args.version, args.registry, args.name)
    print(f"{'registered' if got['created'] else 'already registered'}: {got['name']} version {got['version']} -> {got['uri']}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Runs the audit pipeline through kfp.local; prints how many labels are suspect and where the review files are."""
    from imgpipe.kfp.local_sweeps import run_audit

    print(run_audit(_local_config(args), folds=args.folds).summary())
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    """Builds, lists or bootstraps the step images (:mod:`imgpipe.containers.build`)."""
    from imgpipe.containers.catalog import KINDS, listing

    if args.images_command == "list":
        print("\n".join(listing()))
        return 0
    from imgpipe.containers import build, engine

    if args.images_command == "bootstrap-base":
        print(build.bootstrap_base(engine.connect()))
        return 0
    build.build_images(  # logs each image's size and build time
        args.kinds or tuple(KINDS), base=args.base, bootstrap=args.bootstrap, push=args.push, no_cache=args.no_cache
    )
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from imgpipe.kfp import package as kfp_package

    path = kfp_package.compile_package(
        args.out,
        caching=args.caching,
        gpu=args.gpu,
        pipeline=args.pipeline,
        parallelism=args.parallelism,
        train_gpus=args.train_gpus,
        shards=args.shards,
    )
    print(f"{path}: version {kfp_package.version_name(path, args.pipeline)}, caching {'on' if args.caching else 'off'}")
    return 0


def _target(args: argparse.Namespace) -> Any:
    from imgpipe.kfp import client as kfp_client

    return kfp_client.Target(args.host, args.experiment, args.namespace, args.service_account)


def cmd_submit(args: argparse.Namespace) -> int:
    from imgpipe.kfp import client as kfp_client
    from imgpipe.kfp import package as kfp_package

    params: dict[str, Any] = kfp_package.collect_params(args.params, from_env=args.params_from_env)
    if args.grid:
        from imgpipe.sweep import SWEEP_PIPELINE_NAME, grid_parameters, load_grid_file

        if args.pipeline != SWEEP_PIPELINE_NAME:
            raise ValueError(f"--grid is a parameter of --pipeline {SWEEP_PIPELINE_NAME}")

        params.update({k: json.dumps(v) for k, v in grid_parameters(*load_grid_file(args.grid)).items()})
    result = kfp_client.submit(
        params,
        target=_target(args),
        run_name=args.run_name,
        package=args.package,
        caching=args.caching,
        gpu=args.gpu,
        wait=args.wait,
        timeout_s=args.timeout,
        pipeline=args.pipeline,
        parallelism=args.parallelism,
        shards=args.shards,
    )
    verb = "started" if result.created else "attached to"
    print(f"{verb} run {result.run_id} of {result.version_name}" + (f": {result.state}" if result.state else ""))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from imgpipe.kfp import client as kfp_client
    from imgpipe.kfp import package as kfp_package

    result = kfp_client.schedule(
        args.cron,
        kfp_package.collect_params(args.params, from_env=args.params_from_env),
        target=_target(args),
        name=args.name,
        package=args.package,
        caching=args.caching,
        gpu=args.gpu,
        replace=args.replace,
    )
    state = "created" if result.created else "unchanged"
    print(f"recurring run {args.name} ({result.recurring_run_id}) {state}: {result.cron!r} -> {result.version_name}")
    return 0


COMMANDS = {
    "synth": cmd_synth,
    "download": cmd_download,
    "clean": cmd_clean,
    "resize": cmd_resize,
    "train": cmd_train,
    "predict": cmd_predict,
    "show": cmd_show,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "audit": cmd_audit,
    "register": cmd_register,
    "images": cmd_images,
    "compile": cmd_compile,
    "submit": cmd_submit,
    "schedule": cmd_schedule,
}


def _command_named(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, or ``None`` when unsure (then every step's flags are built).

    The first word that is neither an option nor the value of ``--s3-endpoint`` (or an
    abbreviation of it) names it. A word that names no command means unsure, which costs
    only the imports: argparse then reports what is wrong.
    """
    words = iter(argv)
    for word in words:
        if len(word) > 2 and _ENDPOINT_FLAG.startswith(word):  # argparse takes abbreviations
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imgpipe`` command."""
    whole_process = argv is None  # the `imgpipe` command, not a caller in a longer-lived process
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_named(argv)
    # Before the parser imports the step's config (and with it pyarrow).
    if whole_process and command in _WITHOUT_PANDAS:
        resources.hide_unused_module("pandas")
    if whole_process and command in _SYSTEM_ALLOCATOR:
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    args = build_parser(only=command).parse_args(argv)
    resources.skip_collection_at_exit()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.storage_endpoint:
        storage.configure_endpoint(args.storage_endpoint)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        known = isinstance(exc, (ValueError, TypeError, OSError, RuntimeError, TimeoutError))
        line = storage.explain(exc) or (str(exc) if known else None)
        if args.verbose or line is None:
            raise
        # A user's mistake, a store that refuses or does not answer, or a failed remote run
        # (Ray job, KFP run): one clear line and a non-zero exit, no traceback (-v shows it).
        print(f"imgpipe {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
