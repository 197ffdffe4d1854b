"""The review loop for real (`make test-review`): Label Studio from PyPI on loopback with a database of
its own, a reviewer in Chromium, and the clean run after it.

A team's labels with a share flipped on purpose (a ``labels_csv`` the clean step reads) are
audited (two folds, cleanlab); ``imgpipe review publish`` puts the suspects in a project; the
reviewer signs in, goes through the tasks in Label Studio's own labelling screen and picks each
picture's true class; ``imgpipe review import`` writes the answers as ``label_overrides``; the
next clean run with them has the reviewed labels right and every other label as it was, and the
retrain (resize, train) runs on it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from imgpipe.components.publish_review import publish_review
from kfp import dsl

from imgpipe import contract, resources, storage
from imgpipe.clean.config import CleanConfig
from imgpipe.cli import main
from imgpipe.data.synth import SynthConfig, generate
from imgpipe.review.client import LabelStudio
from imgpipe.review.loop import project_title
from imgpipe.steps.audit import AuditConfig, make_folds, rank_label_issues
from imgpipe.steps.clean import clean
from imgpipe.steps.download import DownloadConfig, download
from imgpipe.steps.resize import ResizeConfig, resize
from imgpipe.steps.train import train
from imgpipe.train import outputs as train_outputs
from imgpipe.train.config import TrainConfig
from tests.steps.conftest import read_output

pytestmark = [pytest.mark.review, pytest.mark.timeout(1800), pytest.mark.usefixtures("s3_endpoint")]

USER, PASSWORD = "reviewer@example.com", "reviewer-pass-123"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the legacy API token Label Studio presets for USER
SHOTS = Path(os.environ.get("IMGPIPE_REVIEW_PICTURES", "")) if os.environ.get("IMGPIPE_REVIEW_PICTURES") else None
FLIP_EVERY = 5  # one train label in five given the next class: 20 %


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    exe = os.environ.get("IMGPIPE_LABEL_STUDIO")
    if not exe or not os.access(exe, os.X_OK):
        pytest.skip("no Label Studio: make test-review installs it (PyPI label-studio, a venv of its own)")
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("no chromium / chromium-driver: apt-get install chromium chromium-driver")
    data = tmp_path_factory.mktemp("label-studio")
    port = resources.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # its own storage: none of the run's keys
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data),
        HOME=str(data),
        LABEL_STUDIO_USERNAME=USER,
        LABEL_STUDIO_PASSWORD=PASSWORD,
        LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        COLLECT_ANALYTICS="false",
    )
    log = data / "label-studio.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400  # a first start migrates its database: about 45 s here
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "Label Studio did not start: " + log.read_text()[-2000:]
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # its own session: the server and the workers it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def noisy(s3_endpoint, tmp_path_factory):
    """A download, its true labels, the team's labels with one train image in five flipped, and the audit of them."""
    bucket = "review-live"
    storage.s3_client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/pets"
    generate(f"{root}/synth", SynthConfig(classes=3, per_class=24, seed=4, min_side=48, max_side=96, quirks=False), progress=False)
    dl = download([f"{root}/synth/images.tar.gz"], f"{root}/download", DownloadConfig())
    truth_run = clean(dl.dest, f"{root}/clean-truth", CleanConfig(workers=1))
    table = read_output(truth_run.dest)
    truth = dict(zip(table.column("path").to_pylist(), table.column("label_name").to_pylist()))
    classes = sorted(set(truth.values()))
    flip = {label: classes[(classes.index(label) + 1) % len(classes)] for label in classes}
    given = {p: flip[label] if i % FLIP_EVERY == 0 else label for i, (p, label) in enumerate(sorted(truth.items()))}
    team_labels = f"{root}/labels.csv"
    storage.write_text(team_labels, "path,label\n" + "".join(f"{p},{label}\n" for p, label in sorted(given.items())))
    team = CleanConfig(workers=1, label_source="csv", labels_csv=team_labels)
    noisy_clean = clean(dl.dest, f"{root}/clean", team)
    data = resize(noisy_clean.dest, f"{root}/resize", ResizeConfig(size=32, executor="pool")).dest
    cfg = AuditConfig(folds=2, seed=1)
    recipe = TrainConfig(model="tiny_cnn", epochs=8, batch_size=8, lr=3e-3, num_workers=0, device="cpu", predictions_probs=True)
    recipe = dataclasses.replace(recipe, mixup=0.0, cutmix=0.0, aug_policy="none")
    models = []
    with pytest.MonkeyPatch.context() as mp:  # the folds' exports are not what the audit reads
        mp.setattr(train_outputs, "_exports", lambda run: ({}, {}))
        for i, fold in enumerate(make_folds(data, f"{root}/folds", cfg)):
            train(fold, f"{root}/train-fold-{i}", recipe)
            models.append(f"{root}/train-fold-{i}")
    audit = f"{root}/audit"
    rank_label_issues(models, audit, cfg)
    return {"root": root, "download": dl.dest, "truth": truth, "given": given, "team": team, "audit": audit, "classes": classes}


class Reviewer:
    """A person in Label Studio's own screens: signs in, labels tasks in its labelling stream."""

    def __init__(self, url: str, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000", "--hide-scrollbars"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.url, self.shots = url, shots
        shots.mkdir(parents=True, exist_ok=True)

    def wait(self, what: str, found, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = found()
            except Exception:  # noqa: BLE001 - the page is still changing
                got = None
            if got:
                return got
            time.sleep(0.3)
        self.shot("stuck")
        raise AssertionError(f"Label Studio's page did not show {what} in {timeout:.0f} s ({self.driver.current_url})")

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def sign_in(self) -> None:
        self.driver.get(self.url + "/user/login/")
        self.wait("the sign-in form", lambda: self.driver.find_element("css selector", "input[name=email]")).send_keys(USER)
        self.driver.find_element("css selector", "input[name=password]").send_keys(PASSWORD)
        self.driver.find_element("css selector", "button[type=submit], input[type=submit]").click()
        self.wait("the signed-in home", lambda: "/user/login" not in self.driver.current_url)

    def label_stream(self, project: int, answer, tasks: int) -> list[str]:
        """Goes through ``tasks`` tasks in the labelling stream; ``answer(path)`` is the class to pick. Returns the paths seen."""
        self.driver.get(f"{self.url}/projects/{project}/data?labeling=1")
        seen: list[str] = []
        for i in range(tasks):

            def current_path() -> str | None:
                # The interface's <Header value="$path"/>: an h3 above the task's context line.
                texts = [h.text for h in self.driver.find_elements("css selector", "h3") if h.text.startswith("images/")]
                return texts[0] if texts and texts[0] not in seen else None

            path = self.wait("the next task's picture and path", current_path)
            seen.append(path)
            choice = self.wait(
                f"the choice {answer(path)}",
                lambda path=path: self.driver.find_element("xpath", f"//label[.//input[@name={answer(path)!r}]]"),
            )
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", choice)
            choice.click()
            if i == 0:
                self.shot("review-task")
            submit = self.wait("the Submit button", lambda: self.driver.find_element("xpath", "//button[normalize-space(.)='Submit']"))
            submit.click()
        return seen

    def close(self) -> None:
        self.driver.quit()


def test_three_labels_corrected_in_the_browser_reach_the_next_clean_run(label_studio, noisy, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    audit, truth, given = noisy["audit"], noisy["truth"], noisy["given"]
    assert main(["review", "publish", audit, "--label-studio", label_studio, "--top", "8"]) == 0
    ls = LabelStudio(label_studio, TOKEN)
    project = ls.find_project(project_title(noisy["classes"]))
    published = [t["data"]["path"] for t in sorted(ls.tasks(project), key=lambda t: t["data"]["rank"])]
    assert len(published) == 8
    flipped = [p for p in published if given[p] != truth[p]]
    assert len(flipped) >= 3, f"the audit's 8 most suspect hold {len(flipped)} of the planted flips"
    # Again, as the audit pipeline's publish-review task does it: nothing duplicated, the links renewed.
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio)  # what the Secret names: the one place the token may go
    said = publish_review.python_func(dsl.Artifact(uri=audit, metadata={"prefix": audit}), noisy["root"], label_studio, 8)
    assert "0 task(s) added, 8 link(s) renewed" in said, said
    assert len(ls.tasks(project)) == 8

    reviewer = Reviewer(label_studio, SHOTS or tmp_path / "shots")
    try:
        reviewer.sign_in()
        corrected = [p for p in published if p in flipped][:3]
        # The reviewer puts right the first three flips it meets and keeps every other label it sees.
        todo = published[: published.index(corrected[-1]) + 1]
        seen = reviewer.label_stream(project, lambda p: truth[p] if p in corrected else given[p], len(todo))
    finally:
        reviewer.close()
    assert sorted(seen) == sorted(todo)

    overrides = f"{noisy['root']}/label_overrides.csv"
    assert main(["review", "import", audit, overrides, "--label-studio", label_studio]) == 0
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(overrides).decode())))
    assert {r["path"]: r["label"] for r in rows} == {p: truth[p] for p in corrected}
    assert {r["annotator"] for r in rows} == {USER} and all(r["previous_label"] == given[r["path"]] for r in rows)

    # The next run: the team's labels, with the review's overrides.
    after = clean(noisy["download"], f"{noisy['root']}/clean-after-review", dataclasses.replace(noisy["team"], label_overrides=overrides))
    assert after.extra["label_overrides"]["applied"] == 3
    table = read_output(after.dest)
    labels = dict(zip(table.column("path").to_pylist(), table.column("label_name").to_pylist()))
    assert {p: labels[p] for p in corrected} == {p: truth[p] for p in corrected}
    assert all(labels[p] == given[p] for p in labels if p not in corrected), "no other label changed"
    assert contract.is_committed(after.dest)

    # The retrain: the next run's resize and train on the reviewed labels.
    resized = resize(after.dest, f"{noisy['root']}/resize-after-review", ResizeConfig(size=32, executor="pool"))
    model = f"{noisy['root']}/train-after-review"
    train(resized.dest, model, TrainConfig(model="tiny_cnn", epochs=2, batch_size=8, num_workers=0, device="cpu"))
    manifest = contract.read_manifest(model, expect_step="train")
    assert manifest["upstream"]["source"] == resized.dest and contract.is_committed(model)
