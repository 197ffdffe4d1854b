"""The cluster tier: tests against the real cluster `make cluster-up` runs (cluster/), or one skip line.

`make test-cluster` runs them inside the cluster's network namespace, where the API server
listens on 127.0.0.1:6443; the admin kubeconfig and the binaries are the ones cluster/up.sh used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import rbac
from tests.manifests import DEPLOYED, NAMESPACES
from tests.test_manifests_security import CONTRIBUTOR, OWNER

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SETTINGS = (
    "CLUSTER_STATE",
    "CLUSTER_NODE_IP",
    "CLUSTER_CGROUP",
    "CLUSTER_MASKED_SYSCTLS",
    "KUBERNETES_VERSION",
    "ETCD_VERSION",
    "CONTAINERD_VERSION",
    "ARGO_VERSION",
    "KUBERAY_VERSION",
    "TRAINER_VERSION",
    "JOBSET_VERSION",
    "KFP_VERSION",
    "KFP_S3_PORT",
    "NODES",
    "CLUSTER_GPU_WORKER",
)


def _release() -> dict[str, str]:
    """The release profile asked for (``CLUSTER_RELEASE``); unset, cluster/versions.env reads the running cluster's."""
    return {"CLUSTER_RELEASE": os.environ["CLUSTER_RELEASE"]} if os.environ.get("CLUSTER_RELEASE") else {}


@cache
def settings() -> dict[str, str]:
    """The cluster's settings as cluster/lib.sh (and versions.env, the one place they are named) give them."""
    script = f". {CLUSTER / 'lib.sh'}; " + "; ".join(f'printf "%s=%s\\n" {n} "${n}"' for n in SETTINGS)
    script += '; printf "CONTROL_BIN=%s\\n" "$(bin_dir control)"; printf "HOLDER=%s\\n" "$(holder_pid)"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", **_release()}).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def lib(expr: str) -> str:
    """What a shell expression of cluster/lib.sh prints (``image_ref pause``, ``node_ip 1``, ``echo $KFP_OLD_PORT``)."""
    return subprocess.run(["bash", "-c", f". {CLUSTER / 'lib.sh'}; {expr}"], capture_output=True, text=True, check=True).stdout.strip()


def running() -> bool:
    """Whether cluster/up.sh's namespace holder is alive (the same test as cluster/lib.sh's)."""
    return subprocess.run(["bash", "-c", f". {CLUSTER / 'lib.sh'}; cluster_running"], check=False).returncode == 0


def in_cluster_netns() -> bool:
    holder = settings()["HOLDER"]
    try:
        return Path(f"/proc/{holder}/ns/net").readlink() == Path("/proc/self/ns/net").readlink()
    except OSError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reason = None
    if not running():
        reason = "the cluster is not up: make cluster-up, then make test-cluster"
    elif not in_cluster_netns():
        reason = "not inside the cluster's network namespace: run make test-cluster"
    for item in items:
        if reason and Path(item.fspath).is_relative_to(here):
            item.add_marker(pytest.mark.skip(reason=reason))


def kubectl(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """The pinned kubectl as the cluster's admin."""
    s = settings()
    cmd = [f"{s['CONTROL_BIN']}/kubectl", f"--kubeconfig={s['CLUSTER_STATE']}/admin.kubeconfig", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, check=False, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def kubectl_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def api_client():
    """A Kubernetes client (the library imgpipe's remote steps use) as the cluster's admin."""
    from kubernetes import config

    return config.new_client_from_config(config_file=f"{settings()['CLUSTER_STATE']}/admin.kubeconfig")


# The profile namespaces, as Kubeflow's profile controller leaves them (tests/rbac.py).
RBAC_API = "rbac.authorization.k8s.io/v1"


def apply_docs(docs: list[dict], *extra: str) -> None:
    text = yaml.safe_dump_all(docs)
    kubectl("apply", "--server-side", "--force-conflicts", "--validate=strict", "--field-manager=imgpipe-tests", *extra, "-f", "-", input=text)


def _with_api_version(doc: dict) -> dict:
    return {"apiVersion": RBAC_API, **doc}


@pytest.fixture(scope="session")
def profiles():
    """The profile namespaces, as Kubeflow's profile controller makes them, and Kubeflow's ClusterRoles."""
    apply_docs([_with_api_version(r) for r in (*rbac.KUBEFLOW_CLUSTER_ROLES, *rbac.KUBERAY_EDIT)])
    for namespace in sorted(set(NAMESPACES[b] for b in DEPLOYED)):
        apply_docs([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}])
        kubectl("patch", "namespace", namespace, "--type", "merge", "--patch-file", "k8s/profiles/pod-security-labels.yaml")
        account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default-editor", "namespace": namespace}}
        apply_docs([account, *(_with_api_version(b) for b in rbac.profile_bindings(namespace, OWNER, CONTRIBUTOR))])
    _wait_aggregated("kubeflow-edit")
    return DEPLOYED


def _wait_aggregated(role: str) -> None:
    """Until the controller manager's aggregation controller has filled ``role``'s rules."""
    for _ in range(100):
        if kubectl_json("get", "clusterrole", role).get("rules"):
            return
        time.sleep(0.2)
    raise AssertionError(f"ClusterRole {role} was not aggregated")


def _podman() -> bool:
    return subprocess.run(["bash", "-c", "command -v podman"], capture_output=True, check=False).returncode == 0


def step_image(kind: str) -> str:
    """imgpipe's ``kind`` step image, from podman's store (where make images leaves it) into the cluster's containerd."""
    from imgpipe.containers import catalog

    ref = catalog.image(kind)
    if not _podman() or subprocess.run(["podman", "image", "exists", ref], check=False).returncode != 0:
        pytest.skip(f"no {ref} in podman's store: make images IMAGE_KINDS={kind}, then make test-cluster")
    _current(ref)
    s = settings()
    ctr = subprocess.run(
        ["bash", "-c", f". {CLUSTER / 'lib.sh'}; echo $(bin_dir runtime)/ctr"], capture_output=True, text=True, check=True
    ).stdout.strip()
    address = ["--address", f"{s['CLUSTER_STATE']}/containerd/containerd.sock", "-n", "k8s.io"]
    if subprocess.run([ctr, *address, "images", "check", f"name=={ref}"], capture_output=True, text=True, check=False).stdout.count(ref):
        _share(ref, int(s["NODES"]))
        return ref
    _room_for(ref, s["CLUSTER_STATE"])
    # podman save writes the whole archive to its TMPDIR first (6 GB for the gpu image): a directory of
    # this call's own, removed after the import, so a failed import leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="imgpipe-podman-save-", dir="/var/tmp") as spool:
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], stdout=subprocess.PIPE, env={**os.environ, "TMPDIR": spool})
        pinned = ["--label", "io.cri-containerd.pinned=pinned"]  # never garbage-collected under disk pressure mid-run
        # Read by ctr itself (--local), as cluster/images.sh share does: containerd 2.2.9's transfer service breaks off imports.
        cmd = [ctr, *address, "images", "import", "--local", *pinned, "-"]
        imported = subprocess.run(cmd, stdin=save.stdout, capture_output=True, text=True, check=False)
        saved = save.wait()
    assert imported.returncode == 0, f"ctr images import of {ref} failed: {imported.stderr.strip()[-500:]}"
    assert saved == 0
    _share(ref, int(s["NODES"]))
    return ref


# What a step image carries from this checkout: an image built before their last commit runs older code.
IMAGE_SOURCES = ("src", "components", "pipelines", "pyproject.toml", "docker")


def _inspect(ref: str, field: str) -> str:
    """One field of podman's record of ``ref`` (a Go template, as ``podman image inspect --format`` takes)."""
    return subprocess.run(["podman", "image", "inspect", "--format", field, ref], capture_output=True, text=True, check=True).stdout.strip()


def _current(ref: str) -> None:
    """Fails where ``ref`` was built before the last commit of what it carries: its pods would run older code than this checkout's."""
    from datetime import datetime

    created = _inspect(ref, "{{.Created.Unix}}")
    root = Path(__file__).resolve().parents[2]
    log = ["git", "log", "-1", "--format=%ct %h", "--", *IMAGE_SOURCES]
    last = subprocess.run(log, cwd=root, capture_output=True, text=True, check=False).stdout.split()
    if last and int(created) < int(last[0]):
        built = datetime.fromtimestamp(int(created)).isoformat(timespec="minutes")
        pytest.fail(f"{ref} was built {built}, before commit {last[1]} changed what it carries: make images, then make test-cluster")


# Beside an image's three copies on the way in: what SeaweedFS keeps free (it stops taking writes below
# 1 % of the disk) and the runs' own objects.
DISK_MARGIN = 4 << 30


def _room_for(ref: str, state: str) -> None:
    """Fails at once where the import would fill the disk: its archive, containerd's blobs and their
    unpacked layers each take about the image's size, and a full disk stops the object store mid-run."""
    size = int(_inspect(ref, "{{.Size}}"))
    free = min(shutil.disk_usage(d).free for d in ("/var/tmp", state))
    need = 3 * size + DISK_MARGIN
    if free < need:
        pytest.fail(f"{ref} needs {need / 2**30:.0f} GiB free to import, {free / 2**30:.0f} GiB are: prune podman's images or the cluster cache")


def _share(ref: str, nodes: int) -> None:
    """``ref`` on every worker too (cluster/images.sh share: hard links of its blobs, no second copy)."""
    if nodes > 1:
        shared = subprocess.run(["bash", str(CLUSTER / "images.sh"), "share", ref], capture_output=True, text=True, check=False)
        assert shared.returncode == 0, f"cluster/images.sh share {ref} failed: {shared.stderr.strip()[-500:]}"


def server_allows(api_client, user: str, request: rbac.Request) -> bool:
    """The API server's own answer: a SubjectAccessReview (what `kubectl auth can-i --as` sends)."""
    from kubernetes import client

    groups = sorted(rbac._groups(user)) if user.startswith(rbac.SA_PREFIX) else ["system:authenticated"]
    attributes = client.V1ResourceAttributes(
        namespace=request.namespace,
        verb=request.verb,
        group=request.group,
        resource=request.resource,
        subresource=request.subresource or None,
        name=request.name or None,
    )
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(user=user, groups=groups, resource_attributes=attributes))
    return bool(client.AuthorizationV1Api(api_client).create_subject_access_review(review).status.allowed)


def node_service(name: str, port: int, target_port: int, namespace: str = "kubeflow") -> list[dict]:
    """A Service ``name.namespace:port`` whose one endpoint is ``target_port`` on the node's address (a server of the test's)."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "main", "port": port, "targetPort": target_port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-node", "namespace": namespace, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [settings()["CLUSTER_NODE_IP"]]}],
            "ports": [{"name": "main", "port": target_port, "protocol": "TCP"}],
        },
    ]


def kfp_store_keys() -> dict[str, str] | None:
    """Tier 3's object store keys (cluster/kfp.sh), where it runs."""
    env = Path(settings()["CLUSTER_STATE"]) / "kfp" / "s3.env"
    if not env.is_file():
        return None
    return dict(line.split("=", 1) for line in env.read_text().split())


@contextlib.contextmanager
def object_store(tmp_path: Path, namespace: str) -> Iterator[str]:
    """The store behind ``seaweedfs.kubeflow``: tier 3's (cluster/kfp.sh) where it runs, else SeaweedFS on the
    node's address started here; this process pointed at it, its keys in ``namespace``'s
    ``imgpipe-s3-credentials``; the ``mlpipeline`` bucket made. Yields the endpoint."""
    from imgpipe import storage
    from imgpipe.local.s3 import S3Identity, pointed_at, seaweedfs_server

    keys = kfp_store_keys()
    with contextlib.ExitStack() as stack:
        if keys is not None:
            endpoint = f"http://{settings()['CLUSTER_NODE_IP']}:{settings()['KFP_S3_PORT']}"
            stack.enter_context(pointed_at(endpoint, S3Identity("admin", keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"])))
        else:
            endpoint = stack.enter_context(seaweedfs_server(tmp_path / "store", host=settings()["CLUSTER_NODE_IP"]))
            apply_docs(node_service("seaweedfs", 8333, int(endpoint.rsplit(":", 1)[1])))
        keys = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        secret = {"name": "imgpipe-s3-credentials", "namespace": namespace}
        apply_docs([{"apiVersion": "v1", "kind": "Secret", "metadata": secret, "stringData": keys}])
        client = storage.s3_client()
        if "mlpipeline" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket="mlpipeline")
        yield endpoint


@contextlib.contextmanager
def cleaned_data(tmp_path: Path, namespace: str, name: str, synth: Any) -> Iterator[tuple[str, Any]]:
    """A clean output of ``synth`` below the profile's prefix in the store behind ``seaweedfs.kubeflow``
    (:func:`object_store`): yields ``(root, clean report)``."""
    from imgpipe.clean.config import CleanConfig
    from imgpipe.steps.clean import clean
    from imgpipe.steps.download import DownloadConfig, download

    with object_store(tmp_path, namespace):
        root = f"s3://mlpipeline/private/{namespace}/{name}-{os.urandom(3).hex()}"
        from imgpipe.data.synth import generate

        generate(f"{root}/synth", synth, progress=False)
        dl = download([f"{root}/synth/images.tar.gz"], f"{root}/download", DownloadConfig())
        yield root, clean(dl.dest, f"{root}/clean", CleanConfig(workers=1))


@contextlib.contextmanager
def placements(namespace: str, poll_s: float = 2.0) -> Iterator[dict[str, dict]]:
    """Every pod seen in ``namespace`` while the block runs: name -> its labels and ``nodeName``.

    Polled from the API server (the pods of a RayJob or TrainJob are gone once it ends), for the
    multi-node tests' "on another node" assertions.
    """
    import threading

    seen: dict[str, dict] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            proc = kubectl("get", "pods", "-n", namespace, "-o", "json", check=False)
            if proc.returncode == 0:
                for pod in json.loads(proc.stdout)["items"]:
                    if pod["spec"].get("nodeName"):
                        seen[pod["metadata"]["name"]] = {"labels": pod["metadata"].get("labels", {}), "node": pod["spec"]["nodeName"]}
            stop.wait(poll_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def ray_nodes(pods: dict[str, dict]) -> dict[str, dict[str, set[str]]]:
    """Per Ray cluster (KubeRay's ``ray.io/cluster`` label), the nodes its head and its workers ran on, from :func:`placements`.

    By cluster: the namespace may still hold an earlier test's Ray pods, ending.
    """
    clusters: dict[str, dict[str, set[str]]] = {}
    for p in pods.values():
        kind = p["labels"].get("ray.io/node-type")
        if kind in ("head", "worker"):
            clusters.setdefault(p["labels"].get("ray.io/cluster", ""), {"head": set(), "worker": set()})[kind].add(p["node"])
    return clusters


def rank_nodes(pods: dict[str, dict]) -> dict[str, str]:
    """The node each TrainJob rank ran on (its Job's completion index), from :func:`placements`."""
    node_pods = [p for p in pods.values() if "jobset.sigs.k8s.io/jobset-name" in p["labels"]]
    return {p["labels"].get("batch.kubernetes.io/job-completion-index"): p["node"] for p in node_pods}


def assert_ray_crossed_nodes(pods: dict[str, dict]) -> None:
    """Ray's worker ran on another node than its head (on a cluster of more than one node)."""
    clusters = {name: kinds for name, kinds in ray_nodes(pods).items() if kinds["head"] and kinds["worker"]}
    assert clusters and all(not k["head"] & k["worker"] for k in clusters.values()), f"Ray's pods were placed {clusters}"


def assert_ranks_crossed_nodes(pods: dict[str, dict]) -> None:
    """The TrainJob's rank 1 trained on another node than rank 0."""
    ranks = rank_nodes(pods)
    assert ranks.get("0") and ranks.get("1") and ranks["0"] != ranks["1"], f"the TrainJob's ranks were placed {ranks}"
