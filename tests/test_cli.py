"""The command line, end to end on tiny generated data."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from imgpipe import contract, storage
from imgpipe.cli import _command_named, build_parser, main
from imgpipe.stepio import artifacts as kfp_artifacts


def test_parser_is_reusable():
    parser = build_parser(add_help=False)
    args = parser.parse_args(["clean", "a", "b", "--split", "0.7,0.2,0.1", "--set", "seed=4"])
    assert args.command == "clean" and args.split == "0.7,0.2,0.1" and args.overrides == ["seed=4"]


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "out", "--classes", "3", "--off-centre"],
        ["download", "a", "b", "dest", "--sha256", "0" * 64],
        ["clean", "a", "b", "--workers", "2", "--set", "seed=4", "--json"],
        ["resize", "a", "b", "--op", "grayscale", "--mode", "pad", "--run-id", "r1"],
        ["train", "a", "b", "--epochs", "2", "--workers", "3"],
        ["show", "uri", "--rows", "3"],
    ],
)
def test_a_command_parses_as_with_every_flag_built(argv):
    for prefix in ([], ["-v"], ["--s3-endpoint", "http://127.0.0.1:9"], ["--s3", "http://127.0.0.1:9"]):
        words = prefix + argv
        assert _command_named(words) == argv[0]
        assert build_parser(only=_command_named(words)).parse_args(words) == build_parser().parse_args(words)


@pytest.mark.parametrize("argv", [[], ["--help"], ["bogus", "x"], ["--s3-endpoint"], ["-v", "--version"]])
def test_no_command_named_builds_every_flag(argv):
    assert _command_named(argv) is None


def test_a_step_command_imports_only_its_step():
    # A fresh interpreter: this one has imported everything already.
    code = (
        "import sys\n"
        "from imgpipe.cli import _command_named, build_parser\n"
        "build_parser(only=_command_named(['clean', 'a', 'b'])).parse_args(['clean', 'a', 'b'])\n"
        "unwanted = ('requests', 'imgpipe.steps.download', 'imgpipe.remote.ray_jobs', 'imgpipe.kfp.package', 'torch', 'ray')\n"
        "print(sorted(m for m in unwanted if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_synth_download_clean_commands(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["synth", str(root / "synth"), "--classes", "3", "--per-class", "5", "--seed", "1"]) == 0
    assert main(["download", str(root / "synth" / "images.tar.gz"), str(root / "dl")]) == 0
    assert (
        main(
            [
                "clean",
                str(root / "dl"),
                str(root / "clean"),
                "--seed",
                "2",
                "--set",
                "workers=1",
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["step"] == "clean" and report["inputs"] == report["outputs"] + report["rejected"]
    dl = contract.read_manifest(str(root / "dl"))
    assert dl["outputs"] == report["inputs"]
    cfg = storage.read_bytes(storage.join(str(root / "clean"), contract.CONFIG)).decode()
    assert "seed: 2" in cfg and "workers: 1" in cfg


def test_user_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["clean", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgpipe clean: error:") and "_SUCCESS" in err
    assert main(["clean", "a", "b", "--set", "bogus=1"]) == 2
    assert "unknown CleanConfig option" in capsys.readouterr().err


def test_show_summarizes_each_committed_output(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["synth", str(root / "synth"), "--classes", "3", "--per-class", "5", "--seed", "1"]) == 0
    assert main(["download", str(root / "synth" / "images.tar.gz"), str(root / "dl")]) == 0
    assert main(["clean", str(root / "dl"), str(root / "clean"), "--set", "workers=1"]) == 0
    capsys.readouterr()

    assert main(["show", str(root / "dl")]) == 0
    out = capsys.readouterr().out
    manifest = contract.read_manifest(str(root / "dl"))
    assert out.startswith(f"imgpipe download output: {manifest['dest']}")
    assert manifest["extra"]["sources"][0]["sha256"] in out and "Sample members" in out

    html, grid = tmp_path / "clean.html", tmp_path / "clean.png"
    assert main(["show", str(root / "clean"), "--rows", "3", "--html", str(html), "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    clean_manifest = contract.read_manifest(str(root / "clean"))
    for reason, count in clean_manifest["rejects_by_reason"].items():
        assert re.search(rf"^{reason} +{count}$", out, re.MULTILINE), reason
    assert "Images per class and split" in out and "Sample rows" in out and "... " in out
    assert "<h2>Images per class</h2>" in html.read_text() and grid.read_bytes().startswith(b"\x89PNG")


def test_show_refuses_an_uncommitted_prefix_in_one_line(tmp_path, capsys):
    storage.write_bytes(storage.join(str(tmp_path / "half"), contract.MANIFEST), b'{"step": "clean"}')
    assert main(["show", str(tmp_path / "half")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("imgpipe show: error:") and "is not a committed step output" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


TINY_RUN = """
resize: {size: 32}
train: {model: tiny_cnn, epochs: 1, batch_size: 4, num_workers: 0, aug_policy: basic, mixup: 0.0, cutmix: 0.0}
"""


def tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RUN)
    return str(path)


@pytest.mark.ray
@pytest.mark.slow  # the whole pipeline again: test_pipeline.py's kfp.local run covers it in make test
def test_run_reconciles_end_to_end(tmp_path, capsys):
    rc = main(
        [
            "run",
            "--data-root",
            str(tmp_path / "d"),
            "--workdir",
            str(tmp_path / "w"),
            "--classes",
            "3",
            "--per-class",
            "6",
            "--config",
            tiny_config(tmp_path),
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out
    assert "reconciled" in out and "NOT RECONCILED" not in out
    assert "model.pt:" in out and "report.html:" in out
    # For people: a line per step and the summary; kfp's own output (executor inputs) in the log.
    steps = [line.split()[0] for line in captured.err.splitlines() if " done in " in line]
    assert {"download", "clean", "resize", "train", "promote"} <= set(steps), captured.err
    assert len((out + captured.err).splitlines()) < 60 and "executorInput" not in out + captured.err
    (log,) = (tmp_path / "w" / "logs").glob("run-*.log")
    assert "Executing task" in log.read_text()
    # `run` executes the Kubeflow pipeline: outputs are under runs/<kfp run id>/, recorded in latest.json.
    prefixes = kfp_artifacts.read_latest(str(tmp_path / "d"))["prefixes"]
    assert contract.read_manifest(prefixes["train"], expect_step="train")["outputs"] > 0
    clean_manifest = contract.read_manifest(prefixes["clean"], expect_step="clean")
    assert clean_manifest["outputs"] >= 3 * 6 - 3


@pytest.mark.ray
@pytest.mark.slow  # a whole `imgpipe run` first; resize itself: tests/steps/test_resize_end_to_end.py
def test_resize_command(tmp_path, capsys):
    root = tmp_path / "data"
    assert (
        main(
            [
                "run",
                "--data-root",
                str(root),
                "--workdir",
                str(tmp_path / "w"),
                "--classes",
                "2",
                "--per-class",
                "8",
                "--config",
                tiny_config(tmp_path),
            ]
        )
        == 0
    )
    clean_out = kfp_artifacts.read_latest(str(root))["prefixes"]["clean"]
    rc = main(
        [
            "resize",
            clean_out,
            str(root / "r64"),
            "--size",
            "64",
            "--format",
            "jpeg",
            "--op",
            "equalize",
            "--json",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.rindex('{\n  "step"') :])
    assert report["step"] == "resize" and report["outputs"] == 16
    manifest = contract.read_manifest(str(root / "r64"), expect_step="resize")
    assert manifest["config"]["size"] == 64 and manifest["config"]["ops"] == ["equalize"]

    # show works on resize and train outputs too; train's page is its own report.html.
    html = tmp_path / "r64.html"
    assert main(["show", str(root / "r64"), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^size +64$", out, re.MULTILINE) and re.search(r"^ops +equalize$", out, re.MULTILINE)
    assert "<h2>Before and after</h2>" in html.read_text()
    train_out = kfp_artifacts.read_latest(str(root))["prefixes"]["train"]
    assert main(["show", train_out, "--html", str(tmp_path / "train.html")]) == 0
    assert "Final metrics" in capsys.readouterr().out
    assert (tmp_path / "train.html").read_bytes() == storage.read_bytes(f"{train_out}/report.html")


def test_the_clean_command_never_imports_pandas(tmp_path):
    """pyarrow would import pandas (0.3 s a process) where installed; the step images have none."""
    from tests import imagefactory as f
    from tests.helpers import write_download_output

    source = write_download_output(
        str(tmp_path / "dl"), {f"images/{c}_{i}.jpg": f.jpeg(80, 60, seed=i + 9 * len(c)) for c in ("Persian", "beagle") for i in range(2)}
    )
    # As the `imgpipe` command calls it: main() with the process's own arguments.
    code = (
        "import sys\n"
        "from imgpipe.cli import main\n"
        f"sys.argv = ['imgpipe', 'clean', {source!r}, {str(tmp_path / 'clean')!r}, '--workers', '2', '--set', 'min_images_per_split=0']\n"
        "rc = main()\n"
        "print('pandas' in sys.modules, rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stderr[-2000:]
    assert contract.read_manifest(str(tmp_path / "clean"))["outputs"] == 4


def test_hide_unused_module_answers_as_if_it_were_not_installed():
    code = (
        "import sys\n"
        "from imgpipe import resources\n"
        "print(resources.hide_unused_module('pandas'), resources.hide_unused_module('pandas'))\n"
        "try:\n"
        "    import pandas.core\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('refused', exc.name)\n"
        "import json\n"
        "print(resources.hide_unused_module('json'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split("\n")[:3] == ["True True", "refused pandas", "False"], out


def test_the_clean_command_allocates_arrow_memory_from_the_c_library():
    """mimalloc keeps segments per thread: 46 MB of clean's peak at 128k images (docs/benchmarks.md, "Scale")."""
    code = (
        "import os, sys\n"
        "os.environ.pop('ARROW_DEFAULT_MEMORY_POOL', None)\n"
        "from imgpipe.cli import main\n"
        "sys.argv = ['imgpipe', 'clean', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "import pyarrow as pa\n"
        "print('pool', pa.default_memory_pool().backend_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "pool system", out


def test_the_cpu_images_command_line_builds_without_the_other_images_packages():
    # The cpu image has the core dependencies only: `imgpipe --version` there builds every
    # command's flags (docker/Dockerfile runs it), so no step module may import these at the top.
    code = (
        "from imgpipe import resources\n"
        "for m in ('cv2', 'torch', 'torchvision', 'ray', 'matplotlib', 'albumentations', 'kornia', 'onnx',"
        " 'onnxruntime', 'cleanlab', 'model_registry', 'pandas'):\n"
        "    assert resources.hide_unused_module(m), m\n"
        "from imgpipe.cli import build_parser\n"
        "build_parser()\n"
        "import imgpipe.stepio.artifacts, imgpipe.steps.audit, imgpipe.steps.promote, imgpipe.steps.predict\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)


def test_a_store_that_refuses_or_does_not_answer_is_one_line_naming_what_to_check(s3_bucket, tmp_path, capsys, monkeypatch):
    """Against the real SeaweedFS: a missing bucket, wrong keys, and an endpoint where nothing listens."""
    assert main(["download", "s3://no-such-bucket-here/images/", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgpipe download: error:") and err.count("\n") == 1, err
    assert "does not exist" in err and "--s3-endpoint" in err, err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.configure_s3()  # a fresh client with the wrong key
    try:
        assert main(["download", f"{s3_bucket}/images/", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "access denied" in err and "AWS_SECRET_ACCESS_KEY" in err and err.count("\n") == 1, err
    finally:
        monkeypatch.undo()
        storage.configure_s3()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    previous = storage.configure_s3().endpoint_url  # None: the environment's, which later tests repoint
    try:
        assert main(["--s3-endpoint", closed, "download", f"{s3_bucket}/images/", str(tmp_path / "out")]) == 2
    finally:
        storage.configure_endpoint(previous)
    err = capsys.readouterr().err
    assert "does not answer" in err and closed in err and err.count("\n") == 1, err


def test_the_kfp_sdks_info_lines_stay_off_the_terminal_and_its_warnings_do_not():
    """kfp logs on the root logger ("Failed to automatically set namespace." on every multi-user call):
    a refusal stays one line (tests/cluster/test_kfp_old.py against the real KFP 2.5.0)."""
    import logging
    import os

    from imgpipe.cli import _QuietKfp

    def record(level: int, path: str, name: str = "root") -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, "message", None, None)

    kfp_file = os.path.join("site-packages", "kfp", "client", "client.py")
    assert not _QuietKfp().filter(record(logging.INFO, kfp_file))
    assert _QuietKfp().filter(record(logging.WARNING, kfp_file))
    ours = os.path.join("src", "imgpipe", "kfp", "client.py")
    assert _QuietKfp().filter(record(logging.INFO, ours, "imgpipe.kfp.client")), "imgpipe's own kfp modules still say what they do"
