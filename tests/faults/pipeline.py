"""download -> clean -> resize -> train on the sample set, each step its own ``imgpipe`` process."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from imgpipe import contract, storage, writer
from tests.faults.conftest import Runner

STEPS = ("download", "clean", "resize", "train")
# Small enough for a few seconds a step on 2 cores; deterministic on the CPU.
SYNTH = ("--classes", "3", "--per-class", "8", "--seed", "4")
STEP_ARGS = {
    "download": lambda src, dest: ["download", src, dest],
    "clean": lambda src, dest: ["clean", src, dest, "--workers", "2"],
    "resize": lambda src, dest: ["resize", src, dest, "--size", "32"],
    "train": lambda src, dest: [
        "train",
        src,
        dest,
        "--model",
        "tiny_cnn",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--set",
        "max_steps_per_epoch=3",
        "--set",
        "deterministic=true",
    ],
}
# train's report, metrics and config carry timings; its model is what must be identical.
_COMPARED_TRAIN_FILES = ("model.pt",)


@dataclass(frozen=True)
class Layout:
    """Where one run of the four steps reads and writes."""

    root: str

    def source(self) -> str:
        return storage.join(self.root, "synth", "images.tar.gz")

    def prefix(self, step: str) -> str:
        return storage.join(self.root, step)

    def input_of(self, step: str) -> str:
        i = STEPS.index(step)
        return self.source() if i == 0 else self.prefix(STEPS[i - 1])


def step_args(layout: Layout, step: str) -> list[str]:
    return STEP_ARGS[step](layout.input_of(step), layout.prefix(step))


def make_source(runner: Runner, layout: Layout) -> None:
    runner.run("synth", storage.join(layout.root, "synth"), *SYNTH).check()


def run_all(runner: Runner, layout: Layout) -> dict[str, float]:
    """Runs the four steps in order; returns seconds per step."""
    seconds = {}
    for step in STEPS:
        seconds[step] = runner.run(*step_args(layout, step)).check().seconds
    return seconds


def reference_run(endpoint: str, bucket: str) -> tuple[Runner, Layout, dict[str, float]]:
    """The uninterrupted run every fault test compares with: its runner, layout and seconds per step."""
    runner, layout = Runner(endpoint), Layout(f"{bucket}/reference")
    make_source(runner, layout)
    return runner, layout, run_all(runner, layout)


def fingerprint(prefix: str) -> dict:
    """What must be byte-identical between two runs of a step: data files and rejects."""
    manifest = contract.verify_output(prefix)
    files = manifest["files"]
    if manifest["step"] == "train":
        files = [f for f in files if f["name"] in _COMPARED_TRAIN_FILES]
    rejects = hashlib.sha256(storage.read_bytes(storage.join(prefix, contract.REJECTS))).hexdigest() if manifest["step"] != "train" else None
    return {
        # Files written by workers carry their attempt in the name (writer.attempt_name).
        "files": [(writer.unscoped_name(f["name"]), f["rows"], f["bytes"], f["sha256"]) for f in files],
        "rejects": rejects,
        "counts": (manifest["inputs"], manifest["outputs"], manifest["rejected"]),
    }
