"""k8s/ hardening and who applies what: Pod Security, API tokens, NetworkPolicy, RBAC, checked offline."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from imgpipe.kfp import client as kfp_client
from tests import rbac
from tests.helpers import deploy_guide
from tests.manifests import BUILDS, DEPLOYED, K8S, NAMESPACES, _key, build

# ----------------------------------------------------------------------------------------
# Hardening: Pod Security, securityContext, API tokens, NetworkPolicy, RBAC.

IMAGE_UID = 10001  # docker/Dockerfile: the images' user
PSS_LABELS = K8S / "profiles" / "pod-security-labels.yaml"
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# KubeRay labels every head and worker pod with its cluster's name; a template cannot
# override it (ray-project/kuberay v1.6.0 ray-operator/controllers/ray/common/pod.go labelPod).
RAY_CLUSTER_LABEL = "ray.io/cluster"
# The service accounts every pipeline of a namespace runs as (multi-user KFP: default-editor;
# standalone: pipeline-runner), and a namespace's default one.
SHARED_ACCOUNTS = {"default-editor", "pipeline-runner", "default"}
RUN_ACCOUNT = "imgpipe-pipeline"
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
_SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security Standard "restricted" (which includes "baseline") refuses in ``pod``.

    The controls of https://kubernetes.io/docs/concepts/security/pod-security-standards/
    that a pod spec's fields decide; init containers count like containers.
    """
    out = []
    psc = pod.get("securityContext") or {}
    out += [f"pod: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: type {sorted(set(volume) - {'name'})}")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    if psc.get("sysctls"):
        out.append("pod: sysctls")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in _SECCOMP_OK:
        out.append(f"pod: seccomp {pod_seccomp}")
    for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        sc, name = c.get("securityContext") or {}, c["name"]
        caps = sc.get("capabilities") or {}
        checks = {
            "privileged": sc.get("privileged") is True,
            "allowPrivilegeEscalation not false": sc.get("allowPrivilegeEscalation") is not False,
            "capabilities not dropping ALL": "ALL" not in caps.get("drop", []),
            "capabilities added": bool(set(caps.get("add", [])) - {"NET_BIND_SERVICE"}),
            "runAsNonRoot not true": sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True,
            "runAsUser 0": sc.get("runAsUser") == 0,
            "seccomp not RuntimeDefault/Localhost": ((sc.get("seccompProfile") or {}).get("type") or pod_seccomp) not in _SECCOMP_OK,
            "hostPort": any(port.get("hostPort") for port in c.get("ports", [])),
            "procMount": sc.get("procMount", "Default") != "Default",
        }
        out += [f"{name}: {what}" for what, failed in checks.items() if failed]
    return out


def _autoscaler(cluster: dict) -> list[dict]:
    """The container KubeRay adds to the head pod, with what the manifest sets on it.

    ray-project/kuberay v1.6.0 ray-operator/controllers/ray/common/pod.go:
    BuildAutoscalerContainer, then mergeAutoscalerOverrides (securityContext, volumeMounts).
    """
    if not cluster.get("enableInTreeAutoscaling"):
        return []
    options = cluster.get("autoscalerOptions") or {}
    return [{"name": "autoscaler", "securityContext": options.get("securityContext"), "volumeMounts": options.get("volumeMounts", [])}]


def _pods(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod ``doc`` brings, with what the operators add that matters here.

    Argo's own init and wait containers are not in a manifest: their securityContext is
    the workflow controller's `executor` setting (docs/deploy/permissions.md, "Pod Security").
    """
    spec = doc.get("spec") or {}
    if doc["kind"] in ("RayJob", "RayCluster"):
        cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
        head = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
        head["containers"] += _autoscaler(cluster)
        pods = [("head", head)] + [(f"worker {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        if doc["kind"] == "RayJob":
            pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return pods
    if doc["kind"] == "CronWorkflow":
        wf = spec["workflowSpec"]
        common = {k: wf[k] for k in ("securityContext", "volumes", "automountServiceAccountToken", "serviceAccountName") if k in wf}
        # A template's own securityContext replaces the workflow's (argo-workflows v3.5.15
        # workflow/controller/workflowpod.go createWorkflowPod).
        return [
            (t["name"], {**common, **({"securityContext": t["securityContext"]} if "securityContext" in t else {}), "containers": [t["container"]]})
            for t in wf["templates"]
            if "container" in t
        ]
    return []


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches ``labels``."""
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok &= {"Exists": key in labels, "DoesNotExist": key not in labels, "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[
            op
        ]
    return ok


def test_the_restricted_check_refuses_what_restricted_refuses():
    good = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    }
    assert restricted_violations(good) == []
    bad = {
        "no seccomp": lambda p: p["securityContext"].pop("seccompProfile"),
        "root allowed": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "unchecked init container": lambda p: p.setdefault("initContainers", []).append({"name": "i"}),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
    }
    for what, mutate in bad.items():
        pod = copy.deepcopy(good)
        mutate(pod)
        assert restricted_violations(pod), what


def test_profile_namespaces_get_pod_security_labels():
    """Item 1: enforce what KFP's own pods meet (baseline), warn and audit on restricted."""
    patch = yaml.safe_load(PSS_LABELS.read_text())
    assert patch == {"metadata": {"labels": patch["metadata"]["labels"]}}, (
        "a merge patch of labels only: it can neither create nor delete a namespace"
    )
    labels = patch["metadata"]["labels"]
    prefix = "pod-security.kubernetes.io/"
    assert {k.removeprefix(prefix): v for k, v in labels.items() if not k.endswith("-version")} == {
        "enforce": "baseline",
        "warn": "restricted",
        "audit": "restricted",
    }
    assert re.fullmatch(r"v1\.\d+", labels[prefix + "enforce-version"]), "enforce pinned to a Kubernetes minor version"
    assert {labels[prefix + m + "-version"] for m in ("warn", "audit")} == {"latest"}
    deploy = deploy_guide()
    assert "--type merge --patch-file k8s/profiles/pod-security-labels.yaml" in deploy


@pytest.mark.parametrize("name", DEPLOYED)
def test_every_pod_we_bring_meets_pod_security_restricted(name):
    """Item 2: uid 10001, no escalation, no capabilities, RuntimeDefault, a read-only root with /tmp."""
    pods = [(d["kind"], role, pod) for d in build(name) for role, pod in _pods(d)]
    expected = {"RayJob", "CronWorkflow"} | ({"RayCluster"} if name != "overlays/dev" else set())
    assert {kind for kind, _, _ in pods} == expected
    assert {role for kind, role, _ in pods if kind == "RayJob"} == {"head", "worker cpu", "submitter"}
    for kind, role, pod in pods:
        where = f"{name}: {kind} {role}"
        assert restricted_violations(pod) == [], where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == IMAGE_UID, where
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, f"{where} {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in scratch, f"{where} {c['name']}: a read-only root needs an emptyDir at /tmp (Ray: /tmp/ray)"


@pytest.mark.parametrize("name", BUILDS)
def test_only_the_autoscaler_and_the_retraining_pod_get_an_api_token(name):
    """Item 3: Ray pods never call the Kubernetes API; KubeRay's autoscaler and Argo's executor do."""
    for doc in build(name):
        for role, pod in _pods(doc):
            where = f"{name}: {doc['kind']} {role}"
            token_volumes = {
                v["name"]
                for v in pod.get("volumes", [])
                if any("serviceAccountToken" in source for source in (v.get("projected") or {}).get("sources", []))
            }
            holders = {c["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in token_volumes}
            if doc["kind"] == "CronWorkflow":
                # Argo's wait container reports results with the pod's token (role-retrain.yaml).
                assert pod.get("automountServiceAccountToken", True) is True and pod["serviceAccountName"] == "imgpipe-retrain", where
                continue
            assert pod.get("automountServiceAccountToken") is False, where
            assert holders == ({"autoscaler"} if role == "head" else set()), where
            if role == "head":
                (autoscaler,) = [c for c in pod["containers"] if c["name"] == "autoscaler"]
                (mount,) = [m for m in autoscaler["volumeMounts"] if m["name"] in token_volumes]
                assert mount["mountPath"] == TOKEN_MOUNT and mount["readOnly"] is True, where
                (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
                paths = {
                    item["path"] for s in volume["projected"]["sources"] for item in (next(iter(s.values())).get("items") or [{"path": "token"}])
                }
                assert paths == {"token", "ca.crt", "namespace"}, f"{where}: what in-cluster clients read from {TOKEN_MOUNT}"


@pytest.mark.parametrize("name", BUILDS)
def test_networkpolicy_lets_only_this_namespace_reach_the_ray_pods(name):
    """Item 4: Ray pods (as KubeRay labels them) take connections from this namespace and the operator only."""
    docs = build(name)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]
    for doc in (d for d in docs if d["kind"] in ("RayJob", "RayCluster")):
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
            labels = {**template["metadata"]["labels"], RAY_CLUSTER_LABEL: "any-cluster", "ray.io/is-ray-node": "yes"}
            assert _selects(selector, labels), f"{doc['kind']}: a Ray pod left out"
        if doc["kind"] == "RayJob":
            assert not _selects(selector, doc["spec"]["submitterPodTemplate"]["metadata"]["labels"])
    ray_peer = namespace_peer = operator_peer = None
    for rule in spec["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges"
            if "namespaceSelector" in peer:
                assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}, "only the operator from elsewhere"
                operator_peer = rule
            elif peer["podSelector"] == {}:
                namespace_peer = rule
            else:
                assert peer["podSelector"] == selector, "Ray pods of this namespace"
                ray_peer = rule
    assert ray_peer is not None and "ports" not in ray_peer, "Ray's own ports are mostly random: every port, Ray pods only"
    assert namespace_peer is not None and {(p["protocol"], p["port"]) for p in namespace_peer["ports"]} == {("TCP", 8265), ("TCP", 10001)}
    assert operator_peer is not None and operator_peer["ports"] == [{"protocol": "TCP", "port": 8265}]


@pytest.mark.parametrize("name", BUILDS)
def test_the_rayjob_role_is_bound_to_imgpipes_own_account_only(name, monkeypatch):
    """Item 5: no binding names an account every pipeline of the namespace runs as."""
    from tests.remote.test_kuberay import CALL_VERBS

    docs = build(name)
    names = {_key(d) for d in docs}
    namespace = NAMESPACES[name]
    assert ("ServiceAccount", RUN_ACCOUNT) in names
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    for binding in bindings.values():
        assert not {s["name"] for s in binding["subjects"]} & SHARED_ACCOUNTS, binding["metadata"]["name"]
    run_account = [{"kind": "ServiceAccount", "name": RUN_ACCOUNT, "namespace": namespace}]
    assert bindings["imgpipe-rayjobs"]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "imgpipe-rayjobs"}
    assert bindings["imgpipe-rayjobs"]["subjects"] == run_account
    # The account must still run a KFP pipeline: what default-editor is bound to in a profile.
    assert bindings["imgpipe-pipeline-kubeflow-edit"]["roleRef"]["name"] == "kubeflow-edit"
    assert bindings["imgpipe-pipeline-kubeflow-edit"]["subjects"] == run_account
    # The scheduled retraining's runs run as it (imgpipe submit reads the variable).
    retrain = next(d for d in docs if _key(d) == ("ConfigMap", "imgpipe-retrain"))["data"]
    monkeypatch.setenv(kfp_client.SERVICE_ACCOUNT_ENV, retrain[kfp_client.SERVICE_ACCOUNT_ENV])
    assert kfp_client.Target().resolved().service_account == RUN_ACCOUNT
    role = next(d for d in docs if _key(d) == ("Role", "imgpipe-rayjobs"))
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == set(CALL_VERBS.values()), "exactly the calls tests/remote/test_kuberay.py records"
    deploy = deploy_guide()
    assert f"--as=system:serviceaccount:{NAMESPACES['overlays/dev']}:{RUN_ACCOUNT}" in deploy


# ----------------------------------------------------------------------------------------
# Who applies what: a cluster admin the objects labelled so, a profile's owner the rest.

APPLIED_BY = "imgpipe.dev/applied-by"
# The two commands of docs/deploy/permissions.md, "Who applies what" (kubectl filters the rendered
# objects by the selector before it sends any: kubernetes/kubernetes
# staging/src/k8s.io/cli-runtime/pkg/resource/builder.go, visitByPaths, FilterByLabelSelector).
ADMIN_SELECTOR = f"{APPLIED_BY}=cluster-admin"
OWNER_SELECTOR = f"{APPLIED_BY}!=cluster-admin"
# (API group, resource) of each kind an overlay renders.
RESOURCES = {
    "Secret": ("", "secrets"),
    "ConfigMap": ("", "configmaps"),
    "ServiceAccount": ("", "serviceaccounts"),
    "ResourceQuota": ("", "resourcequotas"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "CronWorkflow": ("argoproj.io", "cronworkflows"),
    "RayJob": ("ray.io", "rayjobs"),
    "RayCluster": ("ray.io", "rayclusters"),
}
OWNER, CONTRIBUTOR = "owner@example.com", "contributor@example.com"


def _selected(selector: str, doc: dict) -> bool:
    """Whether ``doc`` matches a one-term equality selector (``k=v``; ``k!=v`` also matches docs without ``k``)."""
    labels = doc["metadata"].get("labels") or {}
    if "!=" in selector:
        key, value = selector.split("!=")
        return labels.get(key) != value
    key, value = selector.split("=")
    return labels.get(key) == value


def _profile(namespace: str, *extra: list[dict]) -> rbac.Authorizer:
    """The rights Kubeflow gives in a profile namespace (tests/rbac.py), plus ``extra`` ClusterRoles."""
    roles = [r for group in (rbac.KUBEFLOW_CLUSTER_ROLES, *extra) for r in group]
    return rbac.Authorizer(rbac.profile_bindings(namespace, OWNER, CONTRIBUTOR), roles)


@pytest.mark.parametrize("name", DEPLOYED)
def test_a_profile_member_applies_the_rest_and_only_the_admin_applies_the_labelled(name):
    """The split follows what kubeflow-edit (a profile's contributors; its owner has it too) allows."""
    docs, namespace = build(name), NAMESPACES[name]
    admin = [d for d in docs if _selected(ADMIN_SELECTOR, d)]
    owner = [d for d in docs if _selected(OWNER_SELECTOR, d)]
    assert sorted(map(_key, admin + owner)) == sorted(map(_key, docs)) and not set(map(_key, admin)) & set(map(_key, owner))
    expected = {"Role", "RoleBinding", "RayJob"} | ({"RayCluster", "ResourceQuota"} if name == "overlays/gpu" else set())
    assert {d["kind"] for d in admin} == expected
    assert {d["kind"] for d in owner} == {"Secret", "ConfigMap", "ServiceAccount", "NetworkPolicy", "CronWorkflow"}
    kubeflow = _profile(namespace)
    for doc in owner:
        group, resource = RESOURCES[doc["kind"]]
        for verb in ("get", "create", "patch"):  # what `kubectl apply` sends (get first, then create or patch)
            request = rbac.Request(verb, group, resource, namespace, name="" if verb == "create" else doc["metadata"]["name"])
            assert kubeflow.allows(CONTRIBUTOR, request), f"{name}: kubeflow-edit cannot {verb} {_key(doc)}"
    for doc in admin:
        group, resource = RESOURCES[doc["kind"]]
        assert not kubeflow.allows(CONTRIBUTOR, rbac.Request("create", group, resource, namespace)), f"{_key(doc)} needs no admin"


@pytest.mark.parametrize("name", DEPLOYED)
def test_the_owner_cannot_grant_the_rayjob_role_without_kuberays_aggregation(name):
    """RBAC escalation prevention: a Role (or a binding to it) only with rights one holds.

    The owner (kubeflow-admin: kubeflow-edit plus roles/rolebindings) could make the retrain
    Role, but not the RayJob Role: nothing on ray.io. Kubeflow's own KubeRay install
    aggregates ray.io into kubeflow-edit, and then default-editor, which every pipeline
    runs as, may create RayJobs too (docs/deploy/permissions.md, "RBAC").
    """
    docs, namespace = build(name), NAMESPACES[name]
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "Role"}
    kubeflow = _profile(namespace)
    assert kubeflow.allows(OWNER, rbac.Request("create", "rbac.authorization.k8s.io", "roles", namespace))
    assert not kubeflow.allows(CONTRIBUTOR, rbac.Request("create", "rbac.authorization.k8s.io", "roles", namespace))
    missing = kubeflow.uncovered(OWNER, namespace, roles["imgpipe-rayjobs"])
    assert {(r.group, r.resource) for r in missing} == {("ray.io", "rayjobs")}
    assert kubeflow.uncovered(OWNER, namespace, roles["imgpipe-retrain"]) == []
    default_editor = rbac.service_account(namespace, "default-editor")
    create_rayjob = rbac.Request("create", "ray.io", "rayjobs", namespace)
    assert not kubeflow.allows(default_editor, create_rayjob)
    with_kuberay = _profile(namespace, rbac.KUBERAY_EDIT)
    assert with_kuberay.uncovered(OWNER, namespace, roles["imgpipe-rayjobs"]) == []
    assert with_kuberay.allows(default_editor, create_rayjob), "the binding to imgpipe-pipeline does not keep others out"
    # The pods rules of the RayJob Role are kubeflow-edit's already (imgpipe-pipeline is bound to it).
    pods = [
        rbac.Request(verb, "", resource.partition("/")[0], namespace, resource.partition("/")[2])
        for rule in roles["imgpipe-rayjobs"]
        if rule["apiGroups"] == [""]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    assert pods and all(kubeflow.allows(default_editor, r) for r in pods)


def test_deploy_md_says_who_applies_what_with_these_selectors():
    deploy = deploy_guide()
    assert "## Who applies what" in deploy
    for overlay in ("dev", "gpu"):
        assert f"kubectl apply -k k8s/overlays/{overlay} -l {ADMIN_SELECTOR}" in deploy
        assert f"kubectl apply -k k8s/overlays/{overlay} -l '{OWNER_SELECTOR}'" in deploy
    assert "KubeRay 1.3.2" in deploy and "aggregated-roles.yaml" in deploy, "Kubeflow's KubeRay aggregates ray.io into kubeflow-edit"
    assert "pipelines/versions" not in (K8S / "base" / "role-retrain.yaml").read_text().split("rules:")[1]
