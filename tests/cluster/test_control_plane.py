"""The control plane `make cluster-up` starts: the pinned versions, in its own namespaces, off the machine's settings."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.conftest import kubectl, kubectl_json, settings

pytestmark = pytest.mark.cluster


def _pids() -> dict[str, int]:
    run = Path(settings()["CLUSTER_STATE"]) / "run"
    return {p.stem: int(p.read_text()) for p in run.glob("*.pid")}


def test_the_servers_are_the_pinned_versions():
    s = settings()
    assert kubectl_json("version")["serverVersion"]["gitVersion"] == s["KUBERNETES_VERSION"]
    with urllib.request.urlopen("http://127.0.0.1:2379/version", timeout=5) as r:
        assert "v" + json.load(r)["etcdserver"] == s["ETCD_VERSION"]
    assert kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_every_daemon_runs_in_the_clusters_namespaces_and_cgroup():
    s = settings()
    pids = _pids()
    assert {"holder", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} <= set(pids)
    # cluster/in-netns read the machine's own before it entered the cluster's network namespace.
    host_net, host_mnt = os.environ["CLUSTER_HOST_NETNS"], os.environ["CLUSTER_HOST_MNTNS"]
    holder = pids["holder"]
    for name, pid in pids.items():
        net, mnt = os.readlink(f"/proc/{pid}/ns/net"), os.readlink(f"/proc/{pid}/ns/mnt")
        # A worker's daemons (run/<daemon>-worker-<i>.pid) are in its node's namespace (run/worker-<i>.pid).
        node = re.search(r"worker-\d+$", name)
        node_holder = pids[node.group()] if node else holder
        assert net == os.readlink(f"/proc/{node_holder}/ns/net") != host_net, f"{name} is not in its node's network namespace"
        assert mnt == os.readlink(f"/proc/{holder}/ns/mnt") != host_mnt, f"{name} is not in the cluster's mount namespace"
        groups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        pids_line = next(g for g in groups if g.split(":")[1] == "pids")
        assert pids_line.split(":")[2].startswith(f"/{s['CLUSTER_CGROUP']}/"), f"{name} is in {pids_line}, outside the cluster's cgroup"


def test_kubelets_sysctls_are_files_of_the_cluster_not_the_machines():
    # Read-only: what a write inside the namespace would reach is the inode the path resolves to there.
    s = settings()
    holder = _pids()["holder"]
    root = Path(f"/proc/{holder}/root")
    for name in s["CLUSTER_MASKED_SYSCTLS"].split():
        inside = os.stat(root / "proc/sys" / name)
        ours = os.stat(Path(s["CLUSTER_STATE"]) / "sysctl" / name.replace("/", "."))
        machine = os.stat(Path("/proc/sys") / name)
        assert (inside.st_dev, inside.st_ino) == (ours.st_dev, ours.st_ino), f"/proc/sys/{name} inside the cluster is not masked"
        assert (machine.st_dev, machine.st_ino) != (ours.st_dev, ours.st_ino)


def test_the_api_server_refuses_an_anonymous_caller():
    import ssl

    ctx = ssl.create_default_context(cafile=str(Path(settings()["CLUSTER_STATE"]) / "pki" / "ca.crt"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request("https://127.0.0.1:6443/api/v1/namespaces"), context=ctx, timeout=5)
    assert err.value.code in (401, 403)


def test_the_crds_of_the_pinned_versions_are_established():
    names = {c["metadata"]["name"]: c for c in kubectl_json("get", "crd")["items"]}
    for crd in (
        "workflows.argoproj.io",
        "cronworkflows.argoproj.io",
        "rayjobs.ray.io",
        "rayclusters.ray.io",
        "trainjobs.trainer.kubeflow.org",
        "jobsets.jobset.x-k8s.io",
    ):
        assert crd in names, f"{crd} is not installed"
        conditions = {c["type"]: c["status"] for c in names[crd]["status"]["conditions"]}
        assert conditions.get("Established") == "True", crd
