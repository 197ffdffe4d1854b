"""Which Kubeflow Pipelines imgpipe runs on (imgpipe.kfp.releases): the server's version read first, and a release
below the floor refused in one line before anything is made on it.

The fake answers healthz as the API server's handler writes it at each release (``backend/src/apiserver/main.go``:
2.5.0 writes ``commit_sha``, ``tag_name`` and ``multi_user``; 2.15.0 adds ``pipeline_store``), checked against
that release's contract (tests/kfp/contract.py).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from imgpipe.cli import main
from imgpipe.kfp import client as kfp_client
from imgpipe.kfp import package as kfp_package
from imgpipe.kfp.client import Target
from imgpipe.kfp.releases import KFP_FLOOR, KUBEFLOW_RELEASES, check_release
from tests.kfp.fake_kfp import serve
from tests.kfp.test_client import PARAMS, _clean_kfp_env  # noqa: F401 - the environment cleared as there

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kfp_package.compile_package(tmp_path_factory.mktemp("pkg") / "imgpipe.yaml", caching=False, gpu=False)


def test_kubeflow_v1_10s_kfp_is_refused_before_anything_is_made(package):
    with serve("2.5.0") as (host, fake):
        with pytest.raises(RuntimeError) as raised:
            kfp_client.submit(PARAMS, target=Target(host=host), package=package)
        with pytest.raises(RuntimeError) as scheduled:
            kfp_client.schedule("0 0 3 * * *", PARAMS, target=Target(host=host), package=package)
    said = str(raised.value)
    assert "\n" not in said and said == str(scheduled.value)
    assert said.startswith("Kubeflow Pipelines 2.5.0 (Kubeflow v1.10's) cannot run imgpipe: it lacks optional Secret and ConfigMap")
    assert "kubeflow/pipelines#12216" in said and "upgrade to Kubeflow v1.11 (KFP 2.15.0) or later" in said
    assert {r.path for r in fake.requests} == {"/apis/v2beta1/healthz"}, "nothing but the version was asked for"
    assert not (fake.pipelines or fake.experiments or fake.runs or fake.recurring)


@pytest.mark.parametrize("version", ["2.15.0", "2.16.0"])
def test_the_releases_kubeflow_ships_at_or_above_the_floor_are_let_through(version, package):
    with serve(version) as (host, fake):
        done = kfp_client.submit(PARAMS, target=Target(host=host), package=package)
    assert done.run_id and fake.runs


def test_the_command_line_says_it_in_one_line_with_a_non_zero_exit(package, capsys):
    with serve("2.5.0") as (host, _):
        code = main(["submit", "--host", host, "--package", str(package), "--param", "data_root=s3://bucket/imgpipe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("imgpipe submit: error: Kubeflow Pipelines 2.5.0 (Kubeflow v1.10's) cannot run imgpipe")


@pytest.mark.parametrize(
    ("tag", "passes", "named"),
    [
        ("2.15.0", True, None),
        ("2.17.0", True, None),
        ("v2.16.0", True, None),
        ("2.15.0-rc.1", True, None),
        ("2.14.3", False, "Kubeflow Pipelines 2.14.3 cannot run imgpipe"),  # no Kubeflow release ships it: no release named
        ("2.4.1", False, "Kubeflow Pipelines 2.4.1 cannot run imgpipe"),
        ("dev", True, None),  # a build from a branch: cannot be told, let through with a warning
        ("", True, None),
    ],
)
def test_a_servers_tag_is_read_as_kfp_writes_it(tag, passes, named, caplog):
    if passes:
        assert check_release({"tag_name": tag}) == tag
        if _is_release(tag) is None:
            assert f"needs {KFP_FLOOR} or later and cannot check this one" in caplog.text
    else:
        with pytest.raises(RuntimeError, match=re.escape(named)):
            check_release({"tag_name": tag})


def _is_release(tag: str):
    return re.fullmatch(r"v?\d+\.\d+\.\d+(-.*)?", tag)


def test_the_kubeflow_releases_named_are_the_cluster_profiles_kfp_versions():
    """The release names in the refusal agree with the cluster's profiles (cluster/versions.env), the one place
    the cluster pins what each Kubeflow release ships."""
    profiles = {}
    for release in ("kubeflow-1.11", "kubeflow-26.03"):
        out = subprocess.run(
            ["bash", "-c", f'CLUSTER_RELEASE={release}; . {ROOT}/cluster/versions.env && echo "$KFP_VERSION"'],
            capture_output=True,
            text=True,
            check=True,
        )
        profiles[release] = tuple(int(p) for p in out.stdout.strip().split("."))
    assert KUBEFLOW_RELEASES[profiles["kubeflow-1.11"]] == "Kubeflow v1.11"
    assert KUBEFLOW_RELEASES[profiles["kubeflow-26.03"]] == "Kubeflow 26.03"
    old = subprocess.run(["bash", "-c", f'. {ROOT}/cluster/versions.env && echo "$KFP_OLD_VERSION"'], capture_output=True, text=True, check=True)
    assert KUBEFLOW_RELEASES[tuple(int(p) for p in old.stdout.strip().split("."))] == "Kubeflow v1.10", "the server cluster/kfp-old.sh runs"
