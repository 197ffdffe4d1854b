"""More than one node (`make cluster-up NODES=3`): workers with their own kubelet, containerd and
network namespace, pod traffic routed between nodes, a GPU node's taint, a drain.

Each check asks the real servers: the scheduler places, kubelets run, kube-proxy and CoreDNS on
the control node answer pods on the workers. One node (the default) skips them, in one line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import kubectl, kubectl_json, lib, settings

pytestmark = pytest.mark.cluster

NAMESPACE = "imgpipe-nodes-check"


def _nodes() -> int:
    return int(settings()["NODES"])


@pytest.fixture(scope="module", autouse=True)
def workers():
    if _nodes() < 2:
        pytest.skip("one node: make cluster-down, then make cluster-up NODES=3")
    kubectl("create", "namespace", NAMESPACE, check=False)
    yield [f"imgpipe-worker-{i}" for i in range(1, _nodes())]
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _image(name: str) -> str:
    return lib(f"image_ref {name}")


def _pod(name: str, args: list[str], *, node: str | None = None, labels: dict | None = None, spec: dict | None = None) -> dict:
    body = {
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": _image("debian"), "imagePullPolicy": "IfNotPresent", "args": args}],
        **({"nodeName": node} if node else {}),
        **(spec or {}),
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels or {}}, "spec": body}


def _apply(*docs: dict) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def _wait_phase(name: str, phases: tuple[str, ...], timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    got: dict = {}
    while time.monotonic() < deadline:
        got = kubectl_json("get", "pod", name, "-n", NAMESPACE)
        if got["status"].get("phase") in phases:
            return got
        time.sleep(0.5)
    raise AssertionError(f"pod {name} not {phases} in {timeout_s:.0f} s: {json.dumps(got.get('status', {}))[:800]}")


def _ready(node: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_every_node_is_ready_with_its_own_pod_range_and_the_pinned_kubelet(workers):
    nodes = {n["metadata"]["name"]: n for n in kubectl_json("get", "nodes")["items"]}
    assert sorted(nodes) == sorted(["imgpipe-node", *workers])
    assert all(_ready(n) for n in nodes.values())
    assert {n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes.values()} == {settings()["KUBERNETES_VERSION"]}
    ranges = [n["spec"]["podCIDR"] for n in nodes.values()]
    assert len(set(ranges)) == len(ranges), ranges
    state = Path(settings()["CLUSTER_STATE"])
    for i, name in enumerate(workers, start=1):
        # The worker's bridge hands out the range the controller manager gave its Node.
        conf = json.loads((state / "workers" / name / "cni" / "10-imgpipe.conflist").read_text())
        assert conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"] == nodes[name]["spec"]["podCIDR"]
        assert nodes[name]["metadata"]["labels"].get("node-role.kubernetes.io/worker") == ""
        addresses = {a["type"]: a["address"] for a in nodes[name]["status"]["addresses"]}
        assert addresses["InternalIP"] == lib(f"node_ip {i}")


def test_each_worker_runs_its_daemons_in_a_network_namespace_of_its_own(workers):
    state = Path(settings()["CLUSTER_STATE"])
    control = os.readlink(f"/proc/{settings()['HOLDER']}/ns/net")
    machine = os.environ["CLUSTER_HOST_NETNS"]  # cluster/in-netns read it before it entered the cluster's
    seen = set()
    for i in range(1, len(workers) + 1):
        holder = int((state / "run" / f"worker-{i}.pid").read_text())
        ns = os.readlink(f"/proc/{holder}/ns/net")
        assert ns not in (control, machine), f"worker {i} shares a network namespace"
        seen.add(ns)
        for daemon in ("containerd", "kubelet", "kube-proxy"):
            pid = int((state / "run" / f"{daemon}-worker-{i}.pid").read_text())
            assert os.readlink(f"/proc/{pid}/ns/net") == ns, f"{daemon} of worker {i} is not in its node's namespace"
            assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{settings()['HOLDER']}/ns/mnt")
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
            assert f"/{settings()['CLUSTER_CGROUP']}/" in cgroup, f"{daemon} of worker {i} is outside the cluster's cgroup"
    assert len(seen) == len(workers)


def test_pods_on_different_nodes_talk_directly_through_services_and_by_name(workers):
    """A server on a worker; clients on the control node and on the last worker reach it by pod
    address (routed between nodes), by Service address (kube-proxy on the client's node) and by
    name (CoreDNS, which runs on the control node)."""
    server_node = workers[0]
    server = _pod("server", ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"], node=server_node, labels={"app": "imgpipe-server"})
    server["spec"]["restartPolicy"] = "Always"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "imgpipe-server", "namespace": NAMESPACE},
        "spec": {"selector": {"app": "imgpipe-server"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    kubectl("delete", "pod", "server", "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    _apply(server, service)
    got = _wait_phase("server", ("Running",))
    pod_ip = got["status"]["podIP"]
    assert got["spec"]["nodeName"] == server_node
    fetch = (
        "import sys, time, urllib.request\n"
        "for url in sys.argv[1:]:\n"
        "    for attempt in range(30):\n"
        "        try:\n"
        "            urllib.request.urlopen(url, timeout=3).read(); print('ok', url); break\n"
        "        except OSError as e:\n"
        "            time.sleep(1)\n"
        "    else:\n"
        "        sys.exit(f'no answer from {url}')\n"
    )
    urls = [f"http://{pod_ip}:8080/", "http://imgpipe-server/", f"http://imgpipe-server.{NAMESPACE}.svc.cluster.local/"]
    for client_node in ("imgpipe-node", workers[-1]):
        name = f"client-{client_node}"
        kubectl("delete", "pod", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
        _apply(_pod(name, ["python3", "-c", fetch, *urls], node=client_node))
        done = _wait_phase(name, ("Succeeded", "Failed"))
        log = kubectl("logs", name, "-n", NAMESPACE).stdout
        assert done["status"]["phase"] == "Succeeded", f"from {client_node}: {log[-500:]}"
        assert log.count("ok ") == len(urls)


def test_the_scheduler_spreads_pods_and_keeps_untolerating_ones_off_the_gpu_node(workers):
    gpu = int(settings()["CLUSTER_GPU_WORKER"])
    replicas = 2 * _nodes()
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "spread", "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "spread"}},
            "template": {
                "metadata": {"labels": {"app": "spread"}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    # One per node in turn, over the nodes it may run on (a tainted or cordoned one is not).
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "DoNotSchedule",
                            "nodeTaintsPolicy": "Honor",
                            "labelSelector": {"matchLabels": {"app": "spread"}},
                        }
                    ],
                    "containers": [{"name": "main", "image": _image("pause"), "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}}}],
                },
            },
        },
    }
    _apply(deployment)
    kubectl("-n", NAMESPACE, "rollout", "status", "deployment/spread", "--timeout=180s")
    pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=spread")["items"]
    placed = [p["spec"]["nodeName"] for p in pods if p["metadata"].get("deletionTimestamp") is None]
    untainted = {"imgpipe-node", *(w for i, w in enumerate(workers, start=1) if i != gpu)}
    assert set(placed) == untainted, f"the scheduler placed {placed}"
    if _nodes() > gpu:
        assert f"imgpipe-worker-{gpu}" not in placed


def test_a_pod_asking_for_a_gpu_lands_on_the_gpu_node(workers):
    gpu = int(settings()["CLUSTER_GPU_WORKER"])
    if _nodes() <= gpu:
        pytest.skip(f"no GPU node: it is worker {gpu} (make cluster-up NODES={gpu + 1})")
    node = kubectl_json("get", "node", f"imgpipe-worker-{gpu}")
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    # What pipelines/options.py gives train's task on the gpu overlay: the toleration, the selector, the limit.
    spec = {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
    }
    pod = _pod("wants-gpu", ["true"], spec=spec)
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    kubectl("delete", "pod", "wants-gpu", "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    _apply(pod)
    done = _wait_phase("wants-gpu", ("Succeeded", "Failed"))
    assert done["spec"]["nodeName"] == f"imgpipe-worker-{gpu}"
    assert done["status"]["phase"] == "Succeeded"


def test_a_drained_worker_hands_its_pods_to_the_other_nodes_and_comes_back(workers):
    test_the_scheduler_spreads_pods_and_keeps_untolerating_ones_off_the_gpu_node(workers)
    worker = workers[0]
    try:
        kubectl("drain", worker, "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--grace-period=1", "--timeout=120s")
        kubectl("-n", NAMESPACE, "rollout", "status", "deployment/spread", "--timeout=180s")
        pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", "app=spread")["items"]
        live = [p for p in pods if p["metadata"].get("deletionTimestamp") is None]
        assert len(live) == 2 * _nodes()
        assert worker not in {p["spec"]["nodeName"] for p in live}
        assert kubectl_json("get", "node", worker)["spec"].get("unschedulable") is True
    finally:
        kubectl("uncordon", worker)
    assert not kubectl_json("get", "node", worker)["spec"].get("unschedulable")
