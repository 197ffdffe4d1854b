"""The ``imgpipe`` command line's arguments: every command's flags, and nothing they run.

Each step's flags come from its config dataclass (:func:`imgpipe.config_flags.add_field_flags`),
so a default changes in one place; :mod:`imgpipe.cli` runs what they ask for.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import imgpipe
from imgpipe.config_flags import add_field_flags
from imgpipe.local.names import DEFAULT_WORKDIR
from imgpipe.step_table import STEPS

__all__ = ["ENDPOINT_FLAG", "build_parser"]


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


def _workdir_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workdir", default=None, help=f"{what} (default {DEFAULT_WORKDIR})")


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


def _param_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--param KEY=VALUE``, repeatable: a pipeline parameter."""
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _kfp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="KFP API endpoint (default $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--experiment", help="experiment name (default $IMGPIPE_EXPERIMENT, else imgpipe)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (default $IMGPIPE_KFP_NAMESPACE)")
    p.add_argument("--service-account", help="service account of the run's pods (default $IMGPIPE_SERVICE_ACCOUNT)")
    _param_flag(p, "pipeline parameter (repeatable), e.g. --param data_root=s3://bucket/imgpipe")
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
    _workdir_flag(p, "kfp local outputs, the local object store, logs and copies of the results")
    p.add_argument(
        "--source",
        help="your images: a folder, an archive, a bucket prefix, WebDataset shards, Hugging Face Parquet or a "
        "uri,label list (docs/sources.md; default: generate the sample dataset)",
    )
    p.add_argument("--annotations", help="Oxford-style annotations archive (default: the sample dataset's)")
    p.add_argument("--classes", type=int, help="sample dataset breeds (default 12)")
    p.add_argument("--per-class", type=int, help="sample dataset images per breed (default 60)")
    p.add_argument("--shards", type=int, help="download and clean as this many shard tasks and a merge (default 1)")
    _param_flag(p, "pipeline parameter (repeatable), e.g. --param epochs=1; wins over --config, the step's field included (train.epochs)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any field of a config section (repeatable), e.g. --set train.lr=0.001; wins over --config",
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
    _workdir_flag(p, "for s3://imgpipe-local URIs: the --workdir of the imgpipe run that wrote them")


ENDPOINT_FLAG = "--s3-endpoint"  # the one global option that takes a value

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
    parser.add_argument(ENDPOINT_FLAG, dest="storage_endpoint", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL or AWS)")
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
    p.add_argument("uri", help="a committed output prefix: download, clean, resize, train, predict or promote")
    p.add_argument("--html", metavar="FILE", help="also write the step's HTML report (the Kubeflow UI's) to FILE")
    p.add_argument("--grid", metavar="FILE.png", help="also write a PNG grid of sample images to FILE.png")
    p.add_argument("--rows", type=int, default=10, help="rows shown per table (default 10)")
    _workdir_flag(p, "for an s3://imgpipe-local URI: the --workdir of the imgpipe run that wrote it")

    p = sub.add_parser(
        "promote",
        help="make a committed train output its dataset's latest by hand, without the promotion gate",
        description="Records the train output as the latest model of its dataset and class set (and in latest.json), "
        "as the gate does for a better model; for a model the gate would not compare, or a rollback. "
        "Writes no serving repository and registers nothing (imgpipe register does).",
    )
    p.add_argument("prefix", help="a committed train output, e.g. s3://bucket/imgpipe/runs/<run id>/train")
    p.add_argument("--data-root", help="the data root whose latest it becomes (default: the prefix's, above runs/<run id>/)")
    _workdir_flag(p, "for an s3://imgpipe-local URI: the --workdir of the imgpipe run that wrote it")

    p = sub.add_parser(
        "store",
        help="serve the local object store of imgpipe run (s3://imgpipe-local) and print its endpoint and keys",
        description="Serves the store a local run keeps under its --workdir until Ctrl-C, and prints what the AWS CLI, "
        "boto3 and pandas need to reach it. imgpipe show and predict start it by themselves for the length of the command.",
    )
    _workdir_flag(p, "the --workdir of the imgpipe run whose store to serve")

    p = sub.add_parser(
        "run",
        help="run the Kubeflow pipeline locally (kfp.local, a local S3 server, local Ray) on the sample dataset",
        description="Runs the pipeline on this machine. Settings: the defaults in code, then each --config file in "
        "order, then --param and --set (the command line wins). Everything is checked before anything starts.",
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

    p = sub.add_parser("review", help="an audit's suspects to a Label Studio project, and its reviewers' answers back as label_overrides")
    review_sub = p.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    for action, text in (
        ("publish", "put the audit's most suspect images in the project, worst first (again: new ones added, links renewed)"),
        ("import", "write the project's answers as clean's label_overrides (path,label, then who and when)"),
    ):
        r = review_sub.add_parser(action, help=text)
        r.add_argument("audit", help="a committed audit output (imgpipe audit, or the audit pipeline's)")
        if action == "import":
            r.add_argument("dest", help="where to write the overrides (a URI or path), for --set clean.label_overrides=DEST")
        r.add_argument("--label-studio", dest="label_studio", help="http(s)://host:port of Label Studio (default $LABEL_STUDIO_URL)")
        r.add_argument("--project", help="the project's title (default: one per class list, 'imgpipe label review (...)')")
        if action == "publish":
            r.add_argument("--top", type=int, default=None, help="the most suspect images to publish (default 200)")
            r.add_argument("--images", help="where the pictures go (default: the audit's sibling label-review/, same store)")
        _workdir_flag(r, "for an s3://imgpipe-local URI: the --workdir of the imgpipe run that wrote it")

    p = sub.add_parser("images", help="build the step images through a Docker-compatible engine (DOCKER_HOST)")
    images_sub = p.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    b = images_sub.add_parser("build", help="build (and push) the images from docker/Dockerfile")
    b.add_argument("kinds", nargs="*", metavar="KIND", help="cpu, ray, gpu, serve (default: all)")
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

    # --pipeline's choices import the pipeline package (stepio.artifacts, the reports, 0.12 s):
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
