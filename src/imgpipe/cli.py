"""The ``imgpipe`` command line: one sub-command per step, plus the local end-to-end run.

The commands' flags are :mod:`imgpipe.cli_args`; this module runs them.

Every step command takes ``--config FILE`` (YAML, optionally one section per step)
and ``--set key=value`` overrides; dedicated flags are shortcuts for the common
options. The resolved config is written next to each step's output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from imgpipe import resources, shutdown, storage
from imgpipe.cli_args import ENDPOINT_FLAG, build_parser
from imgpipe.config import changed_fields, load_config
from imgpipe.config_flags import flag_overrides
from imgpipe.local.names import in_local_store

__all__ = ["build_parser", "main"]

log = logging.getLogger("imgpipe")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _resolved(cls: type, args: argparse.Namespace, section: str) -> Any:
    """A step command's config: defaults < ``--config`` < ``--set`` < its flags; logs what differs from the defaults."""
    cfg = load_config(cls, args.config, flag_overrides(args), section)
    changed = changed_fields(cfg)
    log.info("%s settings changed from the defaults: %s", section, ", ".join(f"{k}={v}" for k, v in changed.items()) or "none")
    return cfg


def _emit(report: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict() if hasattr(report, "to_dict") else report.__dict__, indent=2, default=str))
    else:
        print(report.summary())


def cmd_synth(args: argparse.Namespace) -> int:
    from imgpipe.data.synth import SynthConfig, generate

    _emit(generate(args.dest, _resolved(SynthConfig, args, "synth")), args.json)
    return 0


# The steps whose process never uses pandas: pyarrow would import it anyway (resources.hide_unused_module).
_WITHOUT_PANDAS = ("download", "clean")
# The commands that give Arrow the C library's allocator (resources.use_system_allocator, which
# each of their functions calls first, for kfp components too: the steps and build_report): the
# command also sets it before pyarrow is imported, so the allocations of the import itself come
# from it as well.
_SYSTEM_ALLOCATOR = ("download", "clean", "train", "show")
# The commands whose process ends without the interpreter's teardown once they return
# (shutdown.end_process, which says why and what it cost): the train step, where it was
# measured. predict loads torch too, with a Ray session beside it; it keeps Python's exit.
_NO_TEARDOWN = ("train",)


def cmd_download(args: argparse.Namespace) -> int:
    from imgpipe.steps.download import DownloadConfig, download

    if len(args.paths) < 2:
        raise ValueError("download needs at least one SOURCE and a DEST")
    *sources, dest = args.paths
    cfg = _resolved(DownloadConfig, args, "download")
    _emit(download(sources, dest, cfg, previous=args.previous), args.json)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from imgpipe.clean.config import CleanConfig
    from imgpipe.steps.clean import clean

    cfg = _resolved(CleanConfig, args, "clean")
    _emit(clean(args.source, args.dest, cfg), args.json)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from imgpipe.remote.dispatch import run_step
    from imgpipe.resize.config import ResizeConfig

    cfg = _resolved(ResizeConfig, args, "resize")
    _emit(run_step("resize", args.source, args.dest, cfg, run_id=args.run_id), args.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from imgpipe.steps.train import train
    from imgpipe.train.config import TrainConfig

    cfg = _resolved(TrainConfig, args, "train")
    _emit(train(args.data, args.out, cfg), args.json)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgpipe.steps.predict import PredictConfig, predict

    cfg = _resolved(PredictConfig, args, "predict")
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
    if args.html:
        storage.write_text(storage.normalize_uri(args.html), report.html())
        log.info("wrote %s", args.html)
    if args.grid:
        storage.write_bytes(storage.normalize_uri(args.grid), report.grid_png())
        log.info("wrote %s", args.grid)
    print(report.text(max_rows=args.rows))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Makes a committed train output its dataset's latest, without the gate (an operator's choice)."""
    from imgpipe.kfp.promote_by_hand import promote_by_hand

    done = promote_by_hand(args.prefix, args.data_root)
    print(f"{args.prefix} is now latest for {done['lineage'] or 'its data root'} (replacing {done['previous'] or 'none'}): {done['latest']}")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """Serves the local run's object store in the foreground; prints its endpoint and keys."""
    from imgpipe.local.store import serve

    return serve(args.workdir)


def _local_config(args: argparse.Namespace) -> Any:
    """The :class:`~imgpipe.local.run.LocalRunConfig` of ``run``/``sweep``'s options: defaults < ``--config`` < ``--param``/``--set``."""
    from imgpipe.local.run import load_local_config

    return load_local_config(
        args.config or None,
        params=args.params,
        sets=args.overrides,
        data_root=args.data_root,
        workdir=args.workdir,
        source=args.source,
        annotations=args.annotations,
        classes=args.classes,
        per_class=args.per_class,
        runner=args.runner,
        shards=getattr(args, "shards", None),
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Runs the pipeline through kfp.local; prints per-step counts and where the results are."""
    from imgpipe.local.run import run_local

    result = run_local(_local_config(args), verbose=args.verbose)
    print(result.summary())
    return 0 if result.reconciled else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    """Runs the sweep pipeline through kfp.local; prints the ranking, the flags and where the winner's config is."""
    from imgpipe.local.sweeps import run_sweep
    from imgpipe.sweep import load_grid_file

    grid, axes = load_grid_file(args.grid)
    print(run_sweep(_local_config(args), grid, axes).summary())
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from imgpipe.serving.registry import register_model

    got = register_model(args.prefix, args.version, args.registry, args.name)
    print(f"{'registered' if got['created'] else 'already registered'}: {got['name']} version {got['version']} -> {got['uri']}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Runs the audit pipeline through kfp.local; prints how many labels are suspect and where the review files are."""
    from imgpipe.local.sweeps import run_audit

    print(run_audit(_local_config(args), folds=args.folds).summary())
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """Publishes an audit's suspects to Label Studio, or imports its reviewers' answers (:mod:`imgpipe.review.loop`)."""
    from imgpipe.review import loop
    from imgpipe.review.client import TOKEN_ENV, URL_ENV, LabelStudio

    url = args.label_studio or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"no Label Studio: pass --label-studio http://host:port or set ${URL_ENV}")
    ls = LabelStudio(url, os.environ.get(TOKEN_ENV, ""))
    if args.review_command == "publish":
        print(loop.publish(args.audit, ls, title=args.project, top=args.top or loop.TOP, images=args.images).summary())
        return 0
    review = loop.import_review(args.audit, ls, args.dest, title=args.project)
    print(f"{review.summary()}; overrides in {args.dest}: imgpipe run --set clean.label_overrides={args.dest}")
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
    "store": cmd_store,
    "promote": cmd_promote,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "audit": cmd_audit,
    "review": cmd_review,
    "register": cmd_register,
    "images": cmd_images,
    "compile": cmd_compile,
    "submit": cmd_submit,
    "schedule": cmd_schedule,
}


# Commands handed output URIs: one in the local run's bucket reaches (or starts) its store for the command.
_REACH_LOCAL_STORE = ("download", "clean", "resize", "train", "predict", "show", "register", "promote", "review")


def _store_for(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """The local run's store while the command runs, when it names an ``s3://imgpipe-local`` URI."""
    if args.command not in _REACH_LOCAL_STORE or not any(in_local_store(v) for v in vars(args).values()):
        return contextlib.nullcontext()
    from imgpipe.local.store import reachable

    return reachable(vars(args).values(), getattr(args, "workdir", None), endpoint=args.storage_endpoint)


def _command_named(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, or ``None`` when unsure (then every step's flags are built).

    The first word that is neither an option nor the value of ``--s3-endpoint`` (or an
    abbreviation of it) names it. A word that names no command means unsure, which costs
    only the imports: argparse then reports what is wrong.
    """
    words = iter(argv)
    for word in words:
        if len(word) > 2 and ENDPOINT_FLAG.startswith(word):  # argparse takes abbreviations
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


class _QuietKfp(logging.Filter):
    """Drops the kfp SDK's INFO records, which it logs on the root logger: a refusal stays one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_kfp = record.name == "root" and f"{os.sep}kfp{os.sep}" in record.pathname  # imgpipe's own modules log by name
        return record.levelno >= logging.WARNING or not from_kfp


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
    shutdown.skip_collection_at_exit()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # every record on the terminal through the one redaction
        handler.addFilter(storage.RedactingFilter())
    if not args.verbose:  # "Found credentials in environment variables" on every start says nothing to act on
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:  # the kfp SDK's root-logger chatter ("Failed to automatically set namespace.")
            handler.addFilter(_QuietKfp())
    if args.storage_endpoint:
        storage.configure_endpoint(args.storage_endpoint)
    try:
        with _store_for(args):
            code = COMMANDS[args.command](args)
    except Exception as exc:
        known = isinstance(exc, (ValueError, TypeError, OSError, RuntimeError, TimeoutError))
        line = storage.explain(exc) or (str(exc) if known else None)
        if args.verbose or line is None:
            raise
        # A user's mistake, a store that refuses or does not answer, or a failed remote run
        # (Ray job, KFP run): one clear line and a non-zero exit, no traceback (-v shows it).
        # One line, never a terminal's colour codes (kfp colours task names in its errors).
        print(f"imgpipe {args.command}: error: {storage.redact_text(_ANSI.sub('', line))}", file=sys.stderr)
        return 2
    if whole_process and args.command in _NO_TEARDOWN:
        shutdown.end_process(code)  # returns only while another thread runs
    return code


if __name__ == "__main__":
    sys.exit(main())
