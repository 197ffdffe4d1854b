"""Tier 3: a person's path through KFP's own UI (cluster/build.sh ui), in a real browser (tests/cluster/browser.py).

Upload imgpipe's compiled pipeline, start a run from the form with the parameters a person types,
watch it succeed, open each step's outputs (the HTML reports, the train step's Metrics and
ClassificationMetrics) and compare two runs. Screenshots go to ``$IMGPIPE_UI_SHOTS`` (``make ui-pictures`` publishes the
chosen ones to docs/img) or the test's own directory.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from imgpipe.data.synth import SynthConfig, generate
from tests.cluster import browser as b
from tests.cluster.conftest import kubectl_json, object_store, step_image
from tests.cluster.kfp_backend import token
from tests.cluster.test_kfp import _small_package, kfp, step_images  # noqa: F401 - fixtures
from tests.cluster.test_remote_objects import NAMESPACE, dev_overlay  # noqa: F401 - the fixture
from tests.test_manifests_security import OWNER

pytestmark = pytest.mark.cluster
SHOTS_ENV = "IMGPIPE_UI_SHOTS"
# Where the chosen screenshots are copied after a passing run (make ui-pictures: docs/img).
PICTURES_ENV = "IMGPIPE_UI_PICTURES"
RUN_TIMEOUT_S = 1500
# The screenshots docs/ shows (README.md, docs/deploy.md "What you will see"): shot -> file in docs/img.
PICTURES = {
    "run-graph": "kfp-ui-run.png",
    "clean-report": "kfp-ui-clean-report.png",
    "train-metrics": "kfp-ui-metrics.png",
    "confusion": "kfp-ui-confusion.png",
    "compare": "kfp-ui-compare.png",
}


@pytest.fixture(scope="module")
def ui(kfp) -> str:  # noqa: F811
    b.available()
    service = kubectl_json("get", "service", "-n", "kubeflow", "ml-pipeline-ui")
    base = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    health = requests.get(f"{base}/apis/v2beta1/healthz", timeout=30)
    assert health.status_code == 200 and health.json().get("apiServerReady"), health.text
    return base


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return Path(os.environ.get(SHOTS_ENV) or tmp_path_factory.mktemp("ui-shots"))


@pytest.fixture
def page(ui, shots, request):
    browser = b.Browser(ui, OWNER, NAMESPACE, shots)
    yield browser
    if request.session.testsfailed:
        print(f"UI evidence: {browser.evidence(request.node.name)}")
    browser.close()


def _upload(page: b.Browser, package: Path, name: str) -> None:
    """Pipelines, Upload pipeline, a new private pipeline from the package file; ends on the pipeline's page."""
    page.open("pipelines")
    page.wait_text("Upload pipeline")
    page.shot("pipelines")
    page.click("Upload pipeline")
    page.wait_text("Upload pipeline with the specified package")
    page.fill("Pipeline Name", name)
    page.click("Upload a file")
    page.upload(package)
    page.shot("upload")
    page.click("Create")
    page.wait_text("Create run", timeout=60)
    page.wait_text("download")
    page.shot("pipeline")


def _fill_run_form(page: b.Browser, params: dict[str, str], name: str, *, recurring: bool = False) -> None:
    """On the run form: the experiment chosen, one-off or every minute, the parameters typed, the name; then Start."""
    page.wait("the run form", lambda: any(title in page.text() for title in ("Start a new run", "Clone a run")))
    page.element("//label[starts-with(normalize-space(.), 'Experiment')]/..//button").click()
    page.wait_text("Choose an experiment")
    page.click("imgpipe")
    page.click("Use this experiment")
    if recurring:  # after the experiment: choosing one sets the form's state anew
        page.click("Recurring")
        page.wait_text("Run trigger")
        page.click("Hours")
        page.click("Minutes")
    for key, value in params.items():
        page.fill(f"{key} - ", value)
    # Last: the form writes its default name once the pipeline version has loaded.
    page.fill("Recurring run config name" if recurring else "Run name", name)
    page.shot("run-form-recurring" if recurring else "run-form")
    page.click("Start")


def _wait_for_status(page: b.Browser, status: str, timeout: float = RUN_TIMEOUT_S) -> None:
    """On a run's page: its Detail tab, reloaded until the run's Status is ``status`` (another end fails at once)."""
    page.wait("the run's page", lambda: "/runs/details/" in page.driver.current_url, timeout=60)
    page.click("Detail")

    def ended() -> bool:
        text = page.text()
        for end in ("Succeeded", "Failed", "Error", "Canceled"):
            if f"Status\n{end}" in text:
                assert end == status, f"the run ended {end}, not {status} (evidence: {page.evidence('status')})"
                return True
        return False

    def reload() -> None:
        page.driver.refresh()
        page.click("Detail")

    page.wait(f"the run's status {status}", ended, timeout=timeout, every=10, between=reload)


def _open_artifact(page: b.Browser, name: str, task: str, timeout: float = 90) -> str:
    """Opens the graph's artifact node ``name`` whose upstream task is ``task``; returns its Visualization's text.

    The graph draws its nodes before their metadata (MLMD, through the UI's server) has come: a
    node clicked too early says "Content is not available yet", so each is clicked until it says more.
    """
    literal = f"//*[normalize-space(text())='{name}']"

    def upstream_of(node) -> str:
        before = page.text()
        page.press(node)  # a node under the side panel too
        for tab in page.driver.find_elements("xpath", "//button[normalize-space(.)='Artifact Info']"):
            page.driver.execute_script("arguments[0].click();", tab)  # the panel keeps the tab shown last
        deadline = time.monotonic() + 10  # the panel shows the node clicked before until this one's metadata comes
        while time.monotonic() < deadline and (page.text() == before or "Upstream Task Name\n" not in page.text()):
            time.sleep(0.5)
        text = page.text()
        return text.split("Upstream Task Name\n", 1)[1].split("\n", 1)[0] if "Upstream Task Name\n" in text else ""

    def found() -> bool:
        return any(upstream_of(node) == task for node in page.driver.find_elements("xpath", literal))

    page.wait(f"artifact {name} of task {task} on the graph", found, timeout=timeout, every=2)
    page.click("Visualization")
    page.wait(f"{name}'s visualization", lambda: len(_panel(page)) > 80, timeout=60)
    time.sleep(1)  # an iframe's document fills in after its frame is shown
    return _panel(page)


def _panel(page: b.Browser) -> str:
    """The side panel's text, with the text of any HTML it shows in an iframe."""
    text = page.text()
    for frame in page.driver.find_elements("tag name", "iframe"):
        page.driver.switch_to.frame(frame)
        try:
            text += "\n" + page.driver.find_element("tag name", "body").text
        finally:
            page.driver.switch_to.default_content()
    return text[text.find("Visualization") :]


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)  # two runs
def test_a_person_uploads_the_pipeline_runs_it_from_the_form_and_reads_its_outputs(page, step_images, tmp_path):  # noqa: F811
    package = _small_package(tmp_path / "imgpipe.yaml")
    name = f"imgpipe-ui-{uuid.uuid4().hex[:6]}"
    with object_store(tmp_path, NAMESPACE):
        root = f"s3://mlpipeline/private/{NAMESPACE}/ui-{uuid.uuid4().hex[:8]}"
        generate(f"{root}/synth", SynthConfig(classes=3, per_class=24, seed=0, min_side=64, max_side=160), progress=False)
        _upload(page, package, name)
        params = {
            "data_root": root,
            "source_uri": f"{root}/synth/images.tar.gz",
            "annotations_uri": "",  # the synthetic set's labels are in its file names
            "ray_address": "",  # resize in its pod (the default, kuberay, is test_kfp.py's)
            "epochs": "2",
            "image_size": "64",
            "model": "resnet18",
            "batch_size": "16",
            "train_nodes": "1",
        }
        page.click("Create run")
        _fill_run_form(page, params, f"{name}-first")
        _wait_for_status(page, "Succeeded")
        page.shot("run-detail")
        page.click("Graph")
        page.wait_text("promote")
        page.shot("run-graph")
        # Each step's outputs, opened as a person opens them: the artifact's node, then its Visualization.
        shown = _open_artifact(page, "report", "clean")
        assert "imgpipe clean output" in shown and "reject" in shown.lower(), shown[:2000]
        page.shot("clean-report")
        shown = _open_artifact(page, "report", "download")
        assert "imgpipe download output" in shown, shown[:2000]
        shown = _open_artifact(page, "metrics", "promote")
        assert "macro_f1" in shown and "promoted" in shown, shown[:2000]
        page.shot("train-metrics")
        shown = _open_artifact(page, "confusion", "promote")
        assert "Confusion Matrix" in shown and "True label" in shown, shown[:2000]
        for label in ("Abyssinian", "Bengal"):  # the class names, not indices
            assert label in shown, shown[:2000]
        page.shot("confusion")

        # A second run, cloned from the first with fewer epochs, and the two compared.
        page.click("Clone run")
        _fill_run_form(page, {"epochs": "1"}, f"{name}-second")
        _wait_for_status(page, "Succeeded")
        page.open("runs")
        for run in (f"{name}-first", f"{name}-second"):
            row = f"//*[normalize-space(text())='{run}']/ancestor::*[.//input[@type='checkbox']][1]"
            page.element(row)
            page.driver.execute_script("arguments[0].click();", page.driver.find_element("xpath", f"{row}//input[@type='checkbox']"))
        page.click("Compare runs")
        page.wait_text("Scalar Metrics", timeout=60)
        # Each run's train and promote Metrics, side by side: the first asked for 2 epochs (1 where its
        # validation reached its ceiling, which stops a run early), the clone 1.
        side_by_side = re.compile(r"epochs_run ([12]) \1 1 1(?!\d)")
        page.wait("both runs' Metrics side by side", lambda: side_by_side.search(page.text()) is not None, timeout=60)
        assert any(line.startswith("test_macro_f1 ") and len(line.split()) == 5 for line in page.text().splitlines()), page.text()[-3000:]
        scalar = page.element("//*[normalize-space(text())='Scalar Metrics']")
        page.driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", scalar)
        page.shot("compare")
    if os.environ.get(PICTURES_ENV):
        b.publish(page.shots, PICTURES, Path(os.environ[PICTURES_ENV]))


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_recurring_run_made_in_the_form_is_fired_by_the_controller(page, kfp, tmp_path):  # noqa: F811
    """Every minute, with a source that is not there (so no run holds the node for long): KFP's
    ScheduledWorkflow controller starts runs of it, which the Runs list shows and which open."""
    owner = token("default-editor", NAMESPACE)
    auth = {"Authorization": f"Bearer {owner}"}
    name = f"imgpipe-ui-{uuid.uuid4().hex[:6]}"
    config = f"{name}-every-minute"
    _upload(page, _small_package(tmp_path / "imgpipe.yaml"), name)
    missing = f"s3://mlpipeline/private/{NAMESPACE}/{name}/none.tar.gz"
    page.click("Create run")
    params = {"data_root": f"s3://mlpipeline/private/{NAMESPACE}/{name}", "source_uri": missing, "annotations_uri": "", "ray_address": ""}
    _fill_run_form(page, params, config, recurring=True)
    try:
        page.wait("the recurring run's page", lambda: "/recurringrun/details/" in page.driver.current_url, timeout=60)
        page.shot("recurring-run")
        page.open("runs")
        # The controller names each run it starts after the recurring run (shortened, then numbered).
        started = f"//a[starts-with(normalize-space(.), '{name}-every')]"
        runs = page.wait(
            f"a run started by {config}", lambda: page.driver.find_elements("xpath", started), timeout=240, every=10, between=page.driver.refresh
        )
        runs[-1].click()  # the first one started
        page.wait("the run's graph", lambda: "/runs/details/" in page.driver.current_url and "download" in page.text(), timeout=60)
        page.shot("recurring-run-fired")
    finally:
        listed = requests.get(f"{kfp}/apis/v2beta1/recurringruns", headers=auth, params={"namespace": NAMESPACE}, timeout=30).json()
        for rr in listed.get("recurringRuns", []):
            if rr["display_name"] == config:
                requests.delete(f"{kfp}/apis/v2beta1/recurringruns/{rr['recurring_run_id']}", headers=auth, timeout=30)
                runs = requests.get(
                    f"{kfp}/apis/v2beta1/runs", headers=auth, params={"namespace": NAMESPACE, "experiment_id": rr["experiment_id"]}, timeout=30
                )
                for run in runs.json().get("runs", []):
                    if run.get("recurring_run_id") == rr["recurring_run_id"] and run.get("state") not in ("SUCCEEDED", "FAILED", "CANCELED"):
                        requests.post(f"{kfp}/apis/v2beta1/runs/{run['run_id']}:terminate", headers=auth, timeout=30)


def _task_logs(page: b.Browser, task: str) -> str:
    """On a run's graph: the task node ``task`` opened, its Logs tab's text (the pod's log, as the UI's server reads it)."""
    page.click("Graph")
    page.press(page.element(f"//*[normalize-space(text())='{task}']", timeout=120))
    page.click("Logs", timeout=60)
    return page.text()


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_a_failed_steps_reason_is_in_its_logs_tab(page, kfp, tmp_path):  # noqa: F811
    """A run started from the form with a source that is not there: its download step fails, and the
    Logs tab of the step's node shows imgpipe's one line saying which source is missing."""
    step_image("cpu")  # download's, the one step that runs
    name = f"imgpipe-ui-{uuid.uuid4().hex[:6]}"
    with object_store(tmp_path, NAMESPACE):
        root = f"s3://mlpipeline/private/{NAMESPACE}/{name}"
        _upload(page, _small_package(tmp_path / "imgpipe.yaml"), name)
        page.click("Create run")
        _fill_run_form(page, {"data_root": root, "source_uri": f"{root}/none.tar.gz", "annotations_uri": "", "ray_address": ""}, f"{name}-missing")
        page.wait("the run's page", lambda: "/runs/details/" in page.driver.current_url, timeout=60)
        run_id = page.driver.current_url.rsplit("/", 1)[-1]
        try:
            reason = f"download source {root}/none.tar.gz does not exist (no such object)"
            # The first attempt fails within a minute; its retries (60 s apart) keep the run going, and
            # each attempt's pod is the one MLMD names (the launcher's pre-publish), so its log is shown.
            page.wait(
                "the step's reason in its Logs tab",
                lambda: reason in _task_logs(page, "download"),
                timeout=600,
                every=10,
                between=page.driver.refresh,
            )
            page.shot("failed-step-logs")
        finally:
            owner = {"Authorization": f"Bearer {token('default-editor', NAMESPACE)}"}
            requests.post(f"{kfp}/apis/v2beta1/runs/{run_id}:terminate", headers=owner, timeout=30)
