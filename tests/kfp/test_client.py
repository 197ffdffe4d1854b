"""submit and schedule against a fake of the KFP v2beta1 REST API (tests/kfp/fake_kfp.py), each KFP release Kubeflow ships.

The fake implements only what ``kfp.Client`` calls for these two commands, records every request
(the tests assert on the bodies kfp's generated client actually sends), refuses what a multi-user
server refuses, authorizes each call against the rendered RBAC, and is held to the API server's
Swagger document of 2.15.0 and of 2.16.0 (tests/kfp/contract.py): every test runs against both.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from imgpipe.kfp import client as kfp_client
from imgpipe.kfp import connect as kfp_connect
from imgpipe.kfp import cron as kfp_cron
from imgpipe.kfp import package as kfp_package
from imgpipe.kfp.client import Target
from tests import rbac
from tests.kfp.contract import VERSIONS
from tests.kfp.fake_kfp import API, FakeKfp, serve


@pytest.fixture(params=VERSIONS)
def kfp_server(request) -> Iterator[tuple[str, FakeKfp]]:
    with serve(request.param) as served:
        yield served


@pytest.fixture(autouse=True)
def _clean_kfp_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        kfp_connect.HOST_ENV,
        kfp_connect.TOKEN_ENV,
        kfp_connect.SA_TOKEN_PATH_ENV,
        kfp_client.EXPERIMENT_ENV,
        kfp_client.NAMESPACE_ENV,
        kfp_client.SERVICE_ACCOUNT_ENV,
        kfp_package.GPU_ENV,
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # kfp.Client's context file


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline compiled once (caching off, GPU on)."""
    return kfp_package.compile_package(tmp_path_factory.mktemp("pkg") / "imgpipe.yaml", caching=False, gpu=True)


PARAMS = ["data_root=s3://bucket/imgpipe", "epochs=3", "grayscale=true", "split=0.7,0.2,0.1", 'step_config={"train": {"lr": 0.0003}}']
TYPED = {"data_root": "s3://bucket/imgpipe", "epochs": 3, "grayscale": True, "split": "0.7,0.2,0.1", "step_config": {"train": {"lr": 0.0003}}}


def test_submit_uploads_pipeline_and_version_once_and_creates_runs(kfp_server, package):
    host, fake = kfp_server
    target = Target(host=host, experiment="nightly", service_account="default-editor")
    first = kfp_client.submit(PARAMS, target=target, package=package)
    second = kfp_client.submit(PARAMS, target=target, package=package)

    version = f"imgpipe-{kfp_package.package_digest(package)}"
    assert first.version_name == second.version_name == version
    assert len(fake.posted("/pipelines/upload")) == 1, "the pipeline is created once"
    assert [r.query["name"] for r in fake.posted("/pipelines/upload_version")] == [version], "the version once"
    uploaded = fake.posted("/pipelines/upload_version")[0]
    assert uploaded.query["pipelineid"] == first.pipeline_id
    ir, platform = yaml.safe_load_all(uploaded.body["uploadfile"])
    assert ir["pipelineInfo"]["name"] == "imgpipe" and "kubernetes" in platform["platforms"]
    assert [e["display_name"] for e in fake.experiments] == ["nightly"]
    assert first.run_id != second.run_id and first.created and second.created

    body = fake.posted("/runs")[0].body
    assert body["experiment_id"] == first.experiment_id
    assert body["pipeline_version_reference"] == {"pipeline_id": first.pipeline_id, "pipeline_version_id": first.version_id}
    assert "pipeline_spec" not in body, "runs reference the uploaded version, not an inline spec"
    assert body["runtime_config"]["parameters"] == TYPED
    assert body["service_account"] == "default-editor"
    assert body["display_name"].startswith(version)
    assert fake.requests[0].path == API + "/healthz"


def test_a_different_package_is_a_new_version_of_the_same_pipeline(kfp_server, package, tmp_path):
    host, fake = kfp_server
    cached = kfp_package.compile_package(tmp_path / "cached.yaml", caching=True, gpu=True)
    a = kfp_client.submit(PARAMS, target=Target(host=host), package=package)
    b = kfp_client.submit(PARAMS, target=Target(host=host), package=cached)
    assert a.pipeline_id == b.pipeline_id and a.version_id != b.version_id
    assert len(fake.posted("/pipelines/upload")) == 1 and len(fake.posted("/pipelines/upload_version")) == 2


def test_submit_with_a_run_name_reattaches_and_waits(kfp_server, package):
    host, fake = kfp_server
    target = Target(host=host)
    first = kfp_client.submit(PARAMS, target=target, package=package, run_name="imgpipe-retrain-1718000000", wait=True, poll_s=0)
    again = kfp_client.submit(PARAMS, target=target, package=package, run_name="imgpipe-retrain-1718000000", wait=True, poll_s=0)
    assert len(fake.posted("/runs")) == 1, "a retried submitter must not start a second run"
    assert (first.created, again.created) == (True, False)
    assert first.run_id == again.run_id and again.state == "SUCCEEDED"
    assert any(r.method == "GET" and r.path == f"{API}/runs/{first.run_id}" for r in fake.requests)


def test_submit_wait_raises_when_the_run_fails(kfp_server, package):
    host, fake = kfp_server
    fake.run_state = "FAILED"
    with pytest.raises(RuntimeError, match="ended FAILED"):
        kfp_client.submit(PARAMS, target=Target(host=host), package=package, wait=True, poll_s=0)


def test_submit_params_from_the_environment_and_sa_token(kfp_server, package, tmp_path, monkeypatch):
    host, fake = kfp_server
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    monkeypatch.setenv(kfp_connect.HOST_ENV, host)
    monkeypatch.setenv(kfp_connect.SA_TOKEN_PATH_ENV, str(token))
    monkeypatch.setenv(kfp_client.EXPERIMENT_ENV, "from-env")
    monkeypatch.setenv("IMGPIPE_PARAM_DATA_ROOT", "s3://env-bucket/x")
    monkeypatch.setenv("IMGPIPE_PARAM_PREVIOUS_RUN_PREFIX", "latest")
    monkeypatch.setenv("IMGPIPE_PARAM_EPOCHS", "2")
    params = kfp_package.params_from_env()
    assert params == {"data_root": "s3://env-bucket/x", "epochs": "2", "previous_run_prefix": "latest"}
    kfp_client.submit(params, package=package)
    assert fake.posted("/runs")[0].body["runtime_config"]["parameters"] == {
        "data_root": "s3://env-bucket/x",
        "epochs": 2,
        "previous_run_prefix": "latest",
    }
    assert fake.experiments[0]["display_name"] == "from-env"
    assert {r.headers.get("authorization") for r in fake.requests} == {"Bearer projected-sa-token"}


def test_schedule_creates_one_recurring_run_with_the_cron(kfp_server, package):
    host, fake = kfp_server
    target = Target(host=host, experiment="retrain")
    params = ["data_root=s3://bucket/imgpipe", "previous_run_prefix=latest"]
    made = kfp_client.schedule("0 0 3 * * *", params, target=target, package=package)
    same = kfp_client.schedule("0  0 3 * * *", params, target=target, package=package)
    assert made.created and not same.created and made.recurring_run_id == same.recurring_run_id
    assert len(fake.posted("/recurringruns")) == 1

    body = fake.posted("/recurringruns")[0].body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["mode"] == "ENABLE"
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["pipeline_version_reference"] == {"pipeline_id": made.pipeline_id, "pipeline_version_id": made.version_id}
    assert body["runtime_config"]["parameters"] == {"data_root": "s3://bucket/imgpipe", "previous_run_prefix": "latest"}
    assert body["display_name"] == "imgpipe-retrain"

    with pytest.raises(ValueError, match="--replace"):
        kfp_client.schedule("0 30 2 * * *", params, target=target, package=package)
    swapped = kfp_client.schedule("0 30 2 * * *", params, target=target, package=package, replace=True)
    assert swapped.created and [r["trigger"]["cron_schedule"]["cron"] for r in fake.recurring] == ["0 30 2 * * *"]
    assert any(r.method == "DELETE" and r.path == f"{API}/recurringruns/{made.recurring_run_id}" for r in fake.requests)


def test_schedule_refuses_a_five_field_cron_before_any_request(kfp_server, package):
    host, fake = kfp_server
    with pytest.raises(ValueError, match=r"5 fields.*'0 0 3 \* \* \*'"):
        kfp_client.schedule("0 3 * * *", ["data_root=s3://b"], target=Target(host=host), package=package)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("epoch=3", r"unknown pipeline parameter 'epoch' \(did you mean 'epochs'\?\)"),
        ("model=resnet19", r"train: unknown model 'resnet19' \(did you mean 'resnet18'\?\)"),
        ("preset=resnett", r"resize: unknown preset 'resnett' \(did you mean 'resnet'\?\)"),
        ("epochs=-1", r"train: epochs must be an integer"),
        ('step_config={"train": {"epoch": 3}}', r"train: unknown TrainConfig option\(s\) epoch \(did you mean 'epochs'\?\)"),
        ('step_config={"trian": {}}', r"unknown section\(s\) trian \(did you mean 'train'\?\)"),
        ("source_uri=ftp://host/images.tar", r"parameter source_uri ftp://host/images.tar: unsupported scheme 'ftp'"),
    ],
)
def test_submit_and_schedule_check_every_step_config_before_any_request(kfp_server, package, param, message):
    host, fake = kfp_server
    with pytest.raises(ValueError, match=message):
        kfp_client.submit(["data_root=s3://b/imgpipe", param], target=Target(host=host), package=package)
    with pytest.raises(ValueError, match=message):
        kfp_client.schedule("0 0 3 * * *", ["data_root=s3://b/imgpipe", param], target=Target(host=host), package=package)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 0 3 * *", "5 fields"),
        ("0 0 3 * * * *", "7 field"),
        ("60 0 3 * * *", "second 60 is outside 0-59"),
        ("0 0 24 * * *", "hour 24 is outside 0-23"),
        ("0 ? 3 * * *", "'?' is only valid"),
        ("0 0 3 * FOO *", "month 'FOO' is not a number"),
        ("0 0 5-3 * * *", "runs backwards"),
        ("0 */0 * * * *", "step must be >= 1"),
        ("0 0 3 1,,2 * *", "is not"),
    ],
)
def test_validate_cron_says_what_is_wrong(cron, message):
    with pytest.raises(ValueError, match=message):
        kfp_cron.validate_cron(cron)


@pytest.mark.parametrize("cron", ["0 0 3 * * *", "*/30 * * * * ?", "0 0 9 ? * MON-FRI", "0 15 1,13 1-15/2 JAN-JUN 0"])
def test_validate_cron_accepts_six_field_expressions(cron):
    assert kfp_cron.validate_cron(cron) == cron


def test_parse_params_types_and_refusals(package):
    assert kfp_package.parse_params(PARAMS, package) == TYPED
    assert kfp_package.parse_params({"data_root": "s3://b", "epochs": 2}, package) == {"data_root": "s3://b", "epochs": 2}
    with pytest.raises(ValueError, match="unknown pipeline parameter 'epoch'"):
        kfp_package.parse_params(["data_root=s3://b", "epoch=3"], package)
    with pytest.raises(ValueError, match="missing required pipeline parameter.*data_root"):
        kfp_package.parse_params(["epochs=3"], package)
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        kfp_package.parse_params(["data_root=s3://b", "epochs=many"], package)
    with pytest.raises(ValueError, match="key=value"):
        kfp_package.parse_params(["data_root"], package)


def test_connect_needs_a_host():
    with pytest.raises(ValueError, match="KF_PIPELINES_ENDPOINT"):
        kfp_connect.connect(None)


# ----------------------------------------------------------------------------------------
# Multi-user Kubeflow: the profile namespace is a first-class setting.


def test_the_fake_refuses_what_a_multi_user_server_refuses(kfp_server):
    import requests

    host, fake = kfp_server
    fake.multi_user = fake.require_namespace_for_pipelines = True
    answer = requests.post(f"{host}{API}/experiments", json={"display_name": "x"}, timeout=10)
    assert answer.status_code == 400 and "empty namespace in multi-user mode" in answer.json()["message"]
    answer = requests.post(f"{host}{API}/runs", json={"display_name": "r"}, timeout=10)
    assert answer.status_code == 400 and "Experiment id can not be empty" in answer.json()["message"]
    answer = requests.post(f"{host}{API}/pipelines/upload?name=p", files={"uploadfile": b"x"}, timeout=10)
    assert answer.status_code == 400 and answer.text == "Invalid input error: Namespace is required for pipeline operations\n", "http.Error's text"


def test_multi_user_submit_keeps_pipeline_experiment_and_runs_in_the_namespace(kfp_server, package):
    host, fake = kfp_server
    fake.multi_user = fake.require_namespace_for_pipelines = True
    fake.pipelines.append({"pipeline_id": "p-shared", "display_name": "imgpipe", "namespace": ""})  # someone else's
    target = Target(host=host, experiment="nightly", namespace="team-a", service_account="default-editor")
    first = kfp_client.submit(PARAMS, target=target, package=package)
    again = kfp_client.submit(PARAMS, target=target, package=package)
    assert [r.query.get("namespace") for r in fake.posted("/pipelines/upload")] == ["team-a"], "one namespaced pipeline"
    assert len(fake.posted("/pipelines/upload_version")) == 1, "the version once: found again by name in the namespace"
    assert first.pipeline_id == again.pipeline_id != "p-shared", "a shared pipeline of that name is not ours"
    assert [(e["display_name"], e["namespace"]) for e in fake.experiments] == [("nightly", "team-a")]
    namespaces = {e["experiment_id"]: e["namespace"] for e in fake.experiments}
    assert {namespaces[r["experiment_id"]] for r in fake.runs} == {"team-a"} and len(fake.runs) == 2, "a run is its experiment's"


def test_multi_user_schedule_lands_in_the_namespace(kfp_server, package):
    host, fake = kfp_server
    fake.multi_user = True
    made = kfp_client.schedule("0 0 3 * * *", ["data_root=s3://b"], target=Target(host=host, namespace="team-a"), package=package)
    assert made.created and [r["namespace"] for r in fake.recurring] == ["team-a"]
    assert [p["namespace"] for p in fake.pipelines] == ["team-a"]


def test_multi_user_without_a_namespace_says_how_to_set_one_before_uploading(kfp_server, package, monkeypatch):
    host, fake = kfp_server
    fake.multi_user = True
    with pytest.raises(ValueError, match=r"multi-user.*--namespace.*IMGPIPE_KFP_NAMESPACE"):
        kfp_client.submit(PARAMS, target=Target(host=host), package=package)
    assert not fake.posted("/pipelines/upload") and not fake.posted("/experiments")
    monkeypatch.setenv(kfp_client.NAMESPACE_ENV, "team-b")
    kfp_client.submit(PARAMS, target=Target(host=host), package=package)
    assert fake.experiments[0]["namespace"] == "team-b"


def test_runs_in_a_namespace_default_to_imgpipes_own_service_account(monkeypatch):
    """The RayJob Role is bound to that account only (k8s/base); default-editor cannot create RayJobs."""
    import yaml

    from imgpipe.kfp import client as kfp_client
    from tests.conftest import ROOT

    monkeypatch.delenv(kfp_client.SERVICE_ACCOUNT_ENV, raising=False)
    monkeypatch.delenv(kfp_client.NAMESPACE_ENV, raising=False)
    account = yaml.safe_load((ROOT / "k8s/base/serviceaccount-pipeline.yaml").read_text())["metadata"]["name"]
    assert account == kfp_client.PIPELINE_SERVICE_ACCOUNT
    assert Target(host="h", namespace="team-a").resolved().service_account == account
    assert Target(host="h").resolved().service_account is None, "single-user: the server's default"
    assert Target(host="h", namespace="team-a", service_account="other").resolved().service_account == "other"


# ----------------------------------------------------------------------------------------
# Permissions: the fake authorizes like multi-user KFP, against the Roles as rendered.

RETRAIN_ACCOUNT = "imgpipe-retrain"  # k8s/base/serviceaccount-retrain.yaml: the CronWorkflow's submitter


@pytest.fixture(scope="module")
def team_a_rbac(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """k8s/base as ``kubectl kustomize`` renders it into the profile namespace ``team-a``."""
    return rbac.render(rbac.K8S / "base", tmp_path_factory.mktemp("rbac"), namespace="team-a")


@pytest.fixture
def as_retrain_submitter(kfp_server, tmp_path, monkeypatch, team_a_rbac):
    """The retraining CronWorkflow's submitter: its projected token, its namespace, the Roles in force."""
    host, fake = kfp_server
    fake.multi_user = fake.require_namespace_for_pipelines = True
    fake.authorizer = rbac.Authorizer(team_a_rbac)
    token = tmp_path / "token"
    token.write_text(rbac.service_account_token("team-a", RETRAIN_ACCOUNT))
    monkeypatch.setenv(kfp_connect.SA_TOKEN_PATH_ENV, str(token))
    return host, fake


def retrain_submit(host: str, package: Path, name: str = "imgpipe-retrain-1718000000") -> kfp_client.Submitted:
    """What the CronWorkflow runs: `imgpipe submit --params-from-env --run-name {{workflow.name}} --wait`."""
    target = Target(host=host, experiment="imgpipe-retrain", namespace="team-a")
    return kfp_client.submit(PARAMS, target=target, package=package, run_name=name, wait=True, poll_s=0)


def kfp_rules(docs: list[dict], role: str) -> set[tuple[str, str]]:
    (found,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == role]
    return {(r, v) for rule in found["rules"] if "pipelines.kubeflow.org" in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_the_retrain_role_grants_exactly_what_the_submitter_calls(as_retrain_submitter, package, team_a_rbac):
    """A first submit (creates pipeline, version, experiment, run) and a retried one (re-attaches)."""
    host, fake = as_retrain_submitter
    first = retrain_submit(host, package)
    again = retrain_submit(host, package)
    assert first.created and not again.created and again.run_id == first.run_id
    used = {(r.resource, r.verb) for r in fake.reviews}
    granted = kfp_rules(team_a_rbac, "imgpipe-retrain")
    assert used == granted, f"the Role grants {sorted(granted - used)} unused, lacks {sorted(used - granted)}"
    assert {r.namespace for r in fake.reviews} == {"team-a"}
    assert not {resource for resource, _ in granted if "/" in resource}, "versions are authorized as `pipelines`"


@pytest.mark.parametrize(
    ("resource", "verb"),
    [
        ("pipelines", "list"),
        ("pipelines", "create"),
        ("experiments", "list"),
        ("experiments", "create"),
        ("runs", "list"),
        ("runs", "create"),
        ("runs", "get"),
    ],
)
def test_each_permission_of_the_retrain_role_is_needed(resource, verb, as_retrain_submitter, package, team_a_rbac):
    """Without one verb the submitter stops at that call with one line naming it, no traceback."""
    host, fake = as_retrain_submitter
    fake.authorizer = rbac.Authorizer(rbac.without_verb(team_a_rbac, "imgpipe-retrain", resource, verb))
    with pytest.raises(RuntimeError) as caught:
        retrain_submit(host, package)
    message = str(caught.value)
    assert f"service account team-a/{RETRAIN_ACCOUNT} may not {verb} {resource}.pipelines.kubeflow.org in namespace team-a" in message
    assert message.startswith("Kubeflow Pipelines refused to ") and "k8s/base/role-retrain.yaml" in message
    assert "\n" not in message, "one line"


def test_a_refused_version_upload_names_pipelines_not_versions(as_retrain_submitter, package, team_a_rbac, tmp_path):
    """With the pipeline there already, the refused call is the version upload: HTTP 400, as the server answers it."""
    host, fake = as_retrain_submitter
    fake.pipelines.append({"pipeline_id": "p-team-a", "display_name": "imgpipe", "namespace": "team-a"})
    fake.authorizer = rbac.Authorizer(rbac.without_verb(team_a_rbac, "imgpipe-retrain", "pipelines", "create"))
    with pytest.raises(
        RuntimeError,
        match=r"refused to upload version imgpipe-\w+ of pipeline 'imgpipe' \(HTTP 400 'Failed to create a pipeline version'"
        r".*may not create pipelines\.pipelines\.kubeflow\.org in namespace team-a",
    ):
        retrain_submit(host, package)
    assert fake.reviews[-1] == rbac.Request("create", "pipelines.kubeflow.org", "pipelines", "team-a")


def test_the_fake_answers_a_refusal_as_the_api_server_does(kfp_server, team_a_rbac):
    import requests

    host, fake = kfp_server
    fake.multi_user, fake.authorizer = True, rbac.Authorizer(team_a_rbac)
    default_editor = {"Authorization": "Bearer " + rbac.service_account_token("team-a", "default-editor")}
    answer = requests.get(f"{host}{API}/experiments", params={"namespace": "team-a"}, headers=default_editor, timeout=10)
    assert answer.status_code == 403
    body = answer.json()
    assert body["code"] == 7 and "User 'system:serviceaccount:team-a:default-editor' is not authorized" in body["message"]
    assert "Verb:list,Group:pipelines.kubeflow.org,Version:v1beta1,Resource:experiments," in body["message"]
    answer = requests.post(
        f"{host}{API}/pipelines/upload", params={"name": "p", "namespace": "team-a"}, files={"uploadfile": b"x"}, headers=default_editor, timeout=10
    )
    assert answer.status_code == 400 and answer.json()["error_message"] == "Failed to create a pipeline"
    answer = requests.get(f"{host}{API}/experiments", params={"namespace": "team-a"}, timeout=10)
    assert answer.status_code == 401 and answer.json()["code"] == 16, "no token: no identity"
    retrain = {"Authorization": "Bearer " + rbac.service_account_token("team-a", RETRAIN_ACCOUNT)}
    assert requests.get(f"{host}{API}/experiments", params={"namespace": "team-a"}, headers=retrain, timeout=10).status_code == 200


def test_a_user_without_jobs_rights_is_told_so_by_schedule(kfp_server, package, tmp_path, monkeypatch, team_a_rbac):
    """`imgpipe schedule` as the retraining account: its Role has no `jobs`, the line says which verb."""
    host, fake = kfp_server
    fake.multi_user, fake.authorizer = True, rbac.Authorizer(team_a_rbac)
    token = tmp_path / "token"
    token.write_text(rbac.service_account_token("team-a", RETRAIN_ACCOUNT))
    monkeypatch.setenv(kfp_connect.SA_TOKEN_PATH_ENV, str(token))
    with pytest.raises(
        RuntimeError,
        match=r"refused to look for recurring run 'imgpipe-retrain' \(HTTP 403 PermissionDenied\): "
        r"service account team-a/imgpipe-retrain may not list jobs\.pipelines\.kubeflow\.org in namespace team-a",
    ):
        kfp_client.schedule("0 0 3 * * *", ["data_root=s3://b"], target=Target(host=host, namespace="team-a"), package=package)


def test_a_failed_run_says_which_task_failed_and_why():
    from types import SimpleNamespace as NS

    from imgpipe.kfp.run_end import run_failure

    def task(name: str, state: str = "FAILED", error: object = None) -> NS:
        return NS(task_id=name, state=state, display_name=name, error=error)

    # As KFP 2.17's API lists a run whose train step failed: Argo's nodes around the step, no errors.
    scaffold = [task(n) for n in ("root", "executor", "executor(0)", "condition-branches-4", "condition-6", "imgpipe-lkpsv")]
    run = NS(run_details=NS(task_details=[*scaffold, task("train-2"), task("download", "SUCCEEDED")]), error=None)
    said = run_failure(run, "team", pod_reason=lambda namespace, workflow: "")  # the log unreadable
    assert said.startswith(": train-2 failed; its own reason is the last line of its log"), said
    assert "workflows.argoproj.io/workflow=imgpipe-lkpsv" in said
    err = NS(message="clean kept no image from 2 input(s)\ntraceback ...")
    run = NS(run_details=NS(task_details=[*scaffold, task("clean", error=err)]), error=None)
    assert run_failure(run) == ": clean failed: clean kept no image from 2 input(s)"
    assert run_failure(NS(run_details=None, error=NS(message="the driver refused it"))) == ": the driver refused it"
    assert run_failure(NS(run_details=NS(task_details=[]), error=None)) == ""
    # Where the pod's log can be read, its last line is the reason.
    asked = []
    read = run_failure(run_with_train_failed := NS(run_details=NS(task_details=[*scaffold, task("train-2")]), error=None), "team",
                       pod_reason=lambda namespace, workflow: asked.append((namespace, workflow)) or "MLMD is down")  # fmt: skip
    assert read == ": train-2 failed: MLMD is down" and asked == [("team", "imgpipe-lkpsv")], run_with_train_failed


# The end of a step pod's log as KFP 2.17's launcher and Argo's wrapper leave it (tests/cluster).
_IMGPIPE_FAILED = """\
Traceback (most recent call last):
  File "/opt/venv/lib/python3.11/site-packages/imgpipe/data/readers/factory.py", line 184, in _spool_object
FileNotFoundError: download source s3://mlpipeline/x/none.tar.gz does not exist (no such object)
E1128 00:45:39.612319      15 launcher_v2.go:449] Component failed to execute successfully: exit status 1
I1128 00:45:39.633577      15 object_store.go:231] uploadFile(localFilePath="/minio/x", blobFilePath="download/x")
I1128 00:45:39.655330      15 launcher_v2.go:206] publish success.
F1128 00:45:39.663615      15 main.go:59] failed to execute component: exit status 1
time="2026-11-28T00:45:39.988Z" level=info msg="sub-process exited" argo=true error="<nil>"
Error: exit status 1
"""
_MLMD_DOWN = """\
I1128 01:20:40.000000      16 launcher_v2.go:150] hello
F1128 01:20:43.397147      16 main.go:59] failed to execute component: failed to pre-publish Pod info to ML Metadata: rpc error
time="2026-11-28T01:20:43.792Z" level=info msg="sub-process exited" argo=true error="<nil>"
Error: exit status 1
"""


def test_a_failed_pods_reason_is_the_line_its_log_ends_with_past_the_launchers_wrapping():
    from types import SimpleNamespace as NS

    from imgpipe.kfp.pod_reason import failed_pod_reason, last_line

    assert last_line(_IMGPIPE_FAILED) == "FileNotFoundError: download source s3://mlpipeline/x/none.tar.gz does not exist (no such object)"
    assert last_line(_MLMD_DOWN).startswith("failed to execute component: failed to pre-publish Pod info to ML Metadata")
    assert last_line("") == "" and last_line("Error: exit status 1\n") == ""

    def pod(name: str, phase: str, created: int) -> NS:
        return NS(metadata=NS(name=name, creation_timestamp=created), status=NS(phase=phase))

    class Core:
        def __init__(self):
            self.read = []

        def list_namespaced_pod(self, namespace, label_selector):
            assert label_selector == "workflows.argoproj.io/workflow=imgpipe-x"
            return NS(items=[pod("driver", "Succeeded", 0), pod("try-0", "Failed", 1), pod("try-1", "Failed", 2)])

        def read_namespaced_pod_log(self, name, namespace, container, tail_lines):
            self.read.append((name, namespace, container))
            return _MLMD_DOWN

    core = Core()
    assert "ML Metadata" in failed_pod_reason("team", "imgpipe-x", core) and core.read == [("try-1", "team", "main")]  # the newest

    class Refused:
        def list_namespaced_pod(self, namespace, label_selector):
            raise RuntimeError("403 pods is forbidden")

    assert failed_pod_reason("team", "imgpipe-x", Refused()) == ""  # unreadable: the caller says where the log is


def test_a_request_the_api_server_rejects_is_one_line_in_its_words():
    """KFP's API server answers an invalid run with HTTP 400 and grpc-gateway's JSON (tests/cluster/test_kfp.py checks the real one)."""
    from kfp_server_api.exceptions import ApiException

    from imgpipe.kfp.refusals import call

    message = "Failed to create a run: Invalid input error: parameter(s) provided are not required by pipeline: no_such_parameter"
    exc = ApiException(status=400, reason="Bad Request")
    exc.body = json.dumps({"error": message, "code": 3, "message": message, "details": []}).encode()

    def refuse(**_):
        raise exc

    with pytest.raises(RuntimeError) as caught:
        call("start a run of imgpipe-x", "create", "runs", "team-a", refuse)
    assert str(caught.value) == f"Kubeflow Pipelines rejected the request to start a run of imgpipe-x (HTTP 400): {message}"
    other = ApiException(status=500, reason="Internal")

    def fail(**_):
        raise other

    # Not a rejection: KFP unavailable, said on one line; a write is not tried again (it may have taken effect).
    with pytest.raises(RuntimeError, match=r"^Kubeflow Pipelines is unavailable: could not start a run \(HTTP 500: Internal\)$"):
        call("start a run", "create", "runs", "team-a", fail)


class _RecordingCore:
    """CoreV1Api's two calls pod_reason makes, recorded as the requests the API server authorizes."""

    def __init__(self, namespace: str) -> None:
        self.requests: list[rbac.Request] = []
        self.namespace = namespace

    def list_namespaced_pod(self, namespace, label_selector):
        self.requests.append(rbac.Request("list", "", "pods", namespace))
        failed = types.SimpleNamespace(
            metadata=types.SimpleNamespace(name="imgpipe-x-train-1", creation_timestamp=1), status=types.SimpleNamespace(phase="Failed")
        )
        return types.SimpleNamespace(items=[failed])

    def read_namespaced_pod_log(self, name, namespace, container, tail_lines):
        self.requests.append(rbac.Request("get", "", "pods", namespace, subresource="log", name=name))
        return "train: no images left after cleaning\n"


def test_the_retrain_role_lets_the_submitter_read_a_failed_steps_reason_and_no_more(team_a_rbac):
    """The CronWorkflow's log names why its run failed: the failed pod's last line, read as the retrain account."""
    from imgpipe.kfp.pod_reason import failed_pod_reason

    core = _RecordingCore("team-a")
    assert failed_pod_reason("team-a", "imgpipe-x", core=core) == "train: no images left after cleaning"
    authorizer = rbac.Authorizer(team_a_rbac)
    user = rbac.service_account("team-a", RETRAIN_ACCOUNT)
    assert all(authorizer.allows(user, r) for r in core.requests), core.requests
    (role,) = [d for d in team_a_rbac if d["kind"] == "Role" and d["metadata"]["name"] == RETRAIN_ACCOUNT]
    core_rules = {(res, v) for rule in role["rules"] if rule["apiGroups"] == [""] for res in rule["resources"] for v in rule["verbs"]}
    assert core_rules == {(r.combined, r.verb) for r in core.requests}
