"""Tier 2, the node: kubelet on containerd runs pods; Services reach them through kube-proxy and CoreDNS."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import kubectl, kubectl_json, lib, settings

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", autouse=True)
def node_up():
    nodes = kubectl_json("get", "nodes")["items"]
    if not nodes:
        pytest.skip("the cluster runs its control plane only: make cluster-build builds the node, then make cluster-up")
    return nodes[0]


def _ready(node: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_the_node_runs_the_pinned_kubelet_and_containerd(node_up):
    s = settings()
    info = node_up["status"]["nodeInfo"]
    assert _ready(node_up)
    assert info["kubeletVersion"] == s["KUBERNETES_VERSION"]
    assert info["containerRuntimeVersion"] == "containerd://" + s["CONTAINERD_VERSION"].lstrip("v")
    assert node_up["spec"]["podCIDR"] == "10.244.0.0/24", "the controller manager allocated the node's pod range"


def _run_pod(name: str, namespace: str, image: str, args: list[str], timeout_s: float = 120) -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent", "args": args}],
        },
    }
    kubectl("delete", "pod", name, "-n", namespace, "--ignore-not-found", "--wait=true")
    kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = kubectl_json("get", "pod", name, "-n", namespace)
        if got["status"].get("phase") in ("Succeeded", "Failed"):
            return got
        time.sleep(0.5)
    raise AssertionError(f"pod {namespace}/{name} did not finish in {timeout_s} s: {json.dumps(got['status'])[:800]}")


def test_a_pod_runs_to_completion_and_its_log_comes_back_through_the_api_server():
    image = lib("image_ref argoexec")
    pod = _run_pod("imgpipe-node-check", "default", image, ["version"])
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    log = kubectl("logs", "imgpipe-node-check", "-n", "default").stdout
    assert settings()["ARGO_VERSION"] in log, log
    kubectl("delete", "pod", "imgpipe-node-check", "-n", "default", "--wait=false")


def _dns_query(server: str, name: str) -> list[str]:
    """The A records ``server`` answers for ``name`` (RFC 1035: one question, no compression in the question)."""
    ident = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(packet, (server, 53))
        reply, _ = s.recvfrom(4096)
    assert struct.unpack(">H", reply[:2])[0] == ident
    answers = struct.unpack(">H", reply[6:8])[0]
    at, out = 12 + len(question), []
    for _ in range(answers):
        at += 2 if reply[at] & 0xC0 == 0xC0 else reply.index(b"\0", at) + 1 - at  # the name: a pointer here
        rtype, _, _, length = struct.unpack(">HHIH", reply[at : at + 10])
        at += 10
        if rtype == 1:
            out.append(socket.inet_ntoa(reply[at : at + length]))
        at += length
    return out


def test_coredns_answers_for_a_service_through_kube_proxys_service_address():
    # From the node's network namespace: 10.96.0.10 is kube-proxy's rule, the answer CoreDNS's.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert _dns_query("10.96.0.10", "kubernetes.default.svc.cluster.local") == ["10.96.0.1"]
            return
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_kubelet_wrote_its_sysctls_into_the_clusters_files_and_the_machine_kept_its_own():
    s = settings()
    state = Path(s["CLUSTER_STATE"])
    # kubelet's setupKernelTunables: vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1.
    wanted = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
    for name, value in wanted.items():
        assert (state / "sysctl" / name.replace("/", ".")).read_text().strip() == value, f"kubelet did not set {name} in the namespace"
        before = (state / "sysctl-machine" / name.replace("/", ".")).read_text().strip()
        assert Path("/proc/sys", name).read_text().strip() == before, f"the machine's {name} changed"
    assert os.path.isdir(state / "kubelet")


def test_pod_security_baseline_refuses_a_privileged_pod_in_a_profile_namespace():
    kubectl("create", "namespace", "imgpipe-pss-check", check=False)
    kubectl("patch", "namespace", "imgpipe-pss-check", "--type", "merge", "--patch-file", "k8s/profiles/pod-security-labels.yaml")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": "imgpipe-pss-check"},
        "spec": {"containers": [{"name": "c", "image": lib("image_ref pause"), "securityContext": {"privileged": True}}]},
    }
    proc = kubectl("apply", "-f", "-", input=yaml.safe_dump(pod), check=False)
    assert proc.returncode != 0 and 'violates PodSecurity "baseline' in proc.stderr, proc.stderr
