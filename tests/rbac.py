"""A small Kubernetes RBAC evaluator for the tests' fake APIs, over the rendered manifests.

The fakes of the Kubernetes API, KubeRay's custom objects and the KFP API server ask an
:class:`Authorizer` whether the account the code runs as may make each call, and answer
403 Forbidden when it may not, so a Role that lacks a call the code makes fails a test
(and a test that records the calls catches a Role granting more).

It evaluates as Kubernetes' RBAC authorizer does (kubernetes/kubernetes v1.32
``plugin/pkg/auth/authorizer/rbac/rbac.go`` ``RuleAllows``, and
``pkg/apis/rbac/v1/evaluation_helpers.go``): a request is allowed when one rule of one
role bound to the subject matches its verb, API group, ``resource/subresource`` and
name, each with ``*`` for "any" (``*/log`` for a subresource of any resource), and a rule
with ``resourceNames`` matches only requests naming one of them (never a create or a
list). A RoleBinding grants its Role's or ClusterRole's rules in its own namespace; a
ClusterRole with an ``aggregationRule`` holds the rules of every ClusterRole whose labels
its selectors match (what the aggregation controller keeps it at). Service accounts are
the users ``system:serviceaccount:<namespace>:<name>`` in the groups
``system:serviceaccounts``, ``system:serviceaccounts:<namespace>`` and
``system:authenticated``.

Multi-user Kubeflow Pipelines authorizes its own API the same way: each call is a
SubjectAccessReview on a ``pipelines.kubeflow.org`` resource (kubeflow/pipelines 2.15.0
to 2.17.0 ``backend/src/apiserver/resource/resource_manager.go`` ``IsAuthorized``).

:data:`KUBEFLOW_CLUSTER_ROLES` transcribes, from kubeflow/manifests 26.03, the rules of
Kubeflow's aggregated ClusterRoles that bear on imgpipe's objects; :data:`KUBERAY_EDIT`
is what Kubeflow's own KubeRay install adds to ``kubeflow-edit``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SA_PREFIX = "system:serviceaccount:"


def service_account(namespace: str, name: str) -> str:
    """The user name Kubernetes authenticates a service account's token as."""
    return f"{SA_PREFIX}{namespace}:{name}"


def service_account_token(namespace: str, name: str) -> str:
    """A token shaped like a projected service-account token (a JWT; the signature is not real).

    The fakes read the subject from it as a TokenReview would; the code under test may read
    it too, to name the account in an error.
    """

    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    claims = {"iss": "https://kubernetes.default.svc", "sub": service_account(namespace, name), "aud": ["pipelines.kubeflow.org"]}
    return f"{part({'alg': 'RS256', 'kid': 'test'})}.{part(claims)}.c2lnbmF0dXJl"


def token_subject(token: str) -> str | None:
    """The ``sub`` claim of a JWT-shaped token, unverified (what the fakes authenticate as)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
    except (IndexError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Request:
    """The attributes a request is authorized on (a SubjectAccessReview's ``resourceAttributes``)."""

    verb: str
    group: str
    resource: str
    namespace: str
    subresource: str = ""
    name: str = ""

    @property
    def combined(self) -> str:
        """``resource/subresource`` as RBAC rules name it."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def rule_allows(rule: Mapping[str, Any], request: Request) -> bool:
    """Whether one PolicyRule matches ``request`` (``evaluation_helpers.go``)."""
    if "*" not in rule.get("verbs", []) and request.verb not in rule.get("verbs", []):
        return False
    if "*" not in rule.get("apiGroups", []) and request.group not in rule.get("apiGroups", []):
        return False
    resources = rule.get("resources", [])
    if not ("*" in resources or request.combined in resources or (request.subresource and f"*/{request.subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or request.name in names


def _groups(user: str) -> set[str]:
    if user.startswith(SA_PREFIX):
        namespace = user[len(SA_PREFIX) :].split(":")[0]
        return {"system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"}
    return {"system:authenticated"}


def _subject_matches(subject: Mapping[str, Any], user: str, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        # A RoleBinding's ServiceAccount subject without a namespace is invalid; kustomize
        # fills it in from `namespace:` for accounts it builds.
        return user == service_account(subject.get("namespace") or binding_namespace, subject["name"])
    if kind == "User":
        return user == subject["name"]
    if kind == "Group":
        return subject["name"] in _groups(user)
    return False


class Authorizer:
    """RBAC over a set of Role, ClusterRole, RoleBinding and ClusterRoleBinding objects.

    Args:
        docs: Kubernetes objects (anything that is not an RBAC object is ignored).
        cluster_roles: ClusterRoles the cluster has besides ``docs`` (e.g.
            :data:`KUBEFLOW_CLUSTER_ROLES`); a binding to a ClusterRole found in neither
            grants nothing.
    """

    def __init__(self, docs: Iterable[Mapping[str, Any]], cluster_roles: Iterable[Mapping[str, Any]] = ()) -> None:
        docs = [copy.deepcopy(dict(d)) for d in docs]
        self.roles = {(d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"}
        self.cluster_roles = {d["metadata"]["name"]: copy.deepcopy(dict(d)) for d in cluster_roles}
        self.cluster_roles.update({d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"})
        self.bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]

    def cluster_role_rules(self, name: str, _seen: frozenset[str] = frozenset()) -> list[dict]:
        """A ClusterRole's rules, its aggregation resolved (transitively, as it settles)."""
        role = self.cluster_roles.get(name)
        if role is None or name in _seen:
            return []
        selectors = (role.get("aggregationRule") or {}).get("clusterRoleSelectors")
        if not selectors:
            return list(role.get("rules") or [])
        rules = []
        for other, doc in sorted(self.cluster_roles.items()):
            labels = (doc.get("metadata") or {}).get("labels") or {}
            if other != name and any(all(labels.get(k) == v for k, v in (s.get("matchLabels") or {}).items()) for s in selectors):
                rules += self.cluster_role_rules(other, _seen | {name})
        return rules

    def _role_rules(self, ref: Mapping[str, Any], namespace: str) -> list[dict]:
        if ref["kind"] == "ClusterRole":
            return self.cluster_role_rules(ref["name"])
        role = self.roles.get((namespace, ref["name"]))
        return list(role.get("rules") or []) if role else []

    def rules_for(self, user: str, namespace: str) -> list[dict]:
        """Every rule that applies to ``user`` in ``namespace``."""
        rules = []
        for binding in self.bindings:
            where = binding["metadata"].get("namespace", "")
            if binding["kind"] == "RoleBinding" and where != namespace:
                continue
            if any(_subject_matches(s, user, where) for s in binding.get("subjects") or []):
                rules += self._role_rules(binding["roleRef"], where)
        return rules

    def allows(self, user: str, request: Request) -> bool:
        """Whether ``user`` may make ``request``."""
        return any(rule_allows(rule, request) for rule in self.rules_for(user, request.namespace))

    def uncovered(self, user: str, namespace: str, rules: Iterable[Mapping[str, Any]]) -> list[Request]:
        """The requests ``rules`` grant that ``user`` may not make in ``namespace``.

        What the API server's escalation check refuses a Role (or a binding to it) for,
        unless the user has ``escalate`` (``bind``) on it (kubernetes/kubernetes
        ``pkg/registry/rbac/validation/rule.go`` ``ConfirmNoEscalation``). Rules here name
        their groups, resources and verbs without wildcards.
        """
        missing = []
        for rule in rules:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    base, _, sub = resource.partition("/")
                    for verb in rule.get("verbs", []):
                        for name in rule.get("resourceNames") or [""]:
                            request = Request(verb, group, base, namespace, sub, name)
                            if not self.allows(user, request):
                                missing.append(request)
        return missing


def without_verb(docs: Iterable[Mapping[str, Any]], role: str, resource: str, verb: str) -> list[dict]:
    """``docs`` with ``verb`` on ``resource`` taken out of the Role ``role`` (rules left empty go)."""
    out = [copy.deepcopy(dict(d)) for d in docs]
    (target,) = [d for d in out if d["kind"] == "Role" and d["metadata"]["name"] == role]
    rules = []
    for rule in target["rules"]:
        if resource in rule.get("resources", []):
            rest = [r for r in rule["resources"] if r != resource]
            if rest:
                rules.append({**rule, "resources": rest})
            verbs = [v for v in rule["verbs"] if v != verb]
            if verbs:
                rules.append({**rule, "resources": [resource], "verbs": verbs})
        else:
            rules.append(rule)
    assert rules != target["rules"], f"Role {role} grants no {verb} on {resource}"
    target["rules"] = rules
    return out


def render(directory: Path, workdir: Path, namespace: str | None = None) -> list[dict]:
    """The objects ``kubectl kustomize`` renders for ``directory``, optionally into another namespace.

    With ``namespace`` the directory is wrapped in a kustomization (in ``workdir``) that
    sets it, as an overlay would. Without kubectl, tests/manifests.py's resolver builds
    it (which tests/test_manifests.py compares with ``kubectl kustomize`` wherever kubectl is).
    """
    target = directory
    if namespace is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "namespace": namespace,
                    "resources": [os.path.relpath(directory, workdir)],
                }
            )
        )
        target = workdir
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        from tests.manifests import _build

        return _build(target)[0]
    out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def forbidden_message(user: str, request: Request) -> str:
    """The API server's text for a refused namespaced request.

    ``staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go``
    ``forbiddenMessage``, inside ``errors.NewForbidden``'s ``<resource>[ "<name>"] is
    forbidden: ...`` (``staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go``).
    """
    qualified = f"{request.resource}.{request.group}" if request.group else request.resource
    named = f'{qualified} "{request.name}"' if request.name else qualified
    return (
        f'{named} is forbidden: User "{user}" cannot {request.verb} resource "{request.combined}" '
        f'in API group "{request.group}" in the namespace "{request.namespace}"'
    )


def forbidden_status(user: str, request: Request) -> str:
    """The JSON body (a ``Status``) of the API server's 403 for ``request``."""
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": forbidden_message(user, request),
            "reason": "Forbidden",
            "details": {"name": request.name, "group": request.group, "kind": request.resource},
            "code": 403,
        }
    )


# ----------------------------------------------------------------------------------------
# Kubeflow's ClusterRoles (kubeflow/manifests 26.03), the rules that bear on imgpipe's objects.
#
# The profile controller binds a profile's owner to kubeflow-admin and its default-editor
# service account (every pipeline's pods) to kubeflow-edit, in the profile's namespace
# (kubeflow/dashboard v2.0.0 components/profile-controller/controllers/profile_controller.go:
# RoleBindings namespaceAdmin and default-editor); contributors get kubeflow-edit or
# kubeflow-view. The roles aggregate by label:
#   common/kubeflow-roles/base/cluster-roles.yaml: kubeflow-admin, kubeflow-edit, kubeflow-view,
#     kubeflow-kubernetes-admin/-edit/-view (here only the rules on the kinds imgpipe applies);
#   applications/pipeline/upstream/base/installs/multi-user/view-edit-cluster-roles.yaml:
#     kubeflow-pipelines-edit/-view and their aggregate-to-* roles (complete);
#   experimental/ray/kuberay-operator/base/aggregated-roles.yaml: KUBERAY_EDIT.
# Nothing here grants `escalate` or `bind`, and nothing on ray.io without KUBERAY_EDIT.

_AGG = "rbac.authorization.kubeflow.org/aggregate-to-"


def _cluster_role(name: str, rules: list[dict] | None = None, *, aggregates: str | None = None, into: tuple[str, ...] = ()) -> dict:
    doc: dict[str, Any] = {"kind": "ClusterRole", "metadata": {"name": name, "labels": {_AGG + t: "true" for t in into}}}
    if aggregates:
        doc["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": {_AGG + aggregates: "true"}}]}
    doc["rules"] = rules or []
    return doc


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> dict:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


_CHANGE = ["create", "delete", "deletecollection", "patch", "update"]
_READ = ["get", "list", "watch"]

KUBEFLOW_CLUSTER_ROLES = [
    _cluster_role("kubeflow-admin", aggregates="kubeflow-admin"),
    _cluster_role("kubeflow-edit", aggregates="kubeflow-edit", into=("kubeflow-admin",)),
    _cluster_role("kubeflow-view", aggregates="kubeflow-view", into=("kubeflow-edit",)),
    _cluster_role(
        "kubeflow-kubernetes-admin",
        [
            _rule(["authorization.k8s.io"], ["localsubjectaccessreviews"], ["create"]),
            _rule(["rbac.authorization.k8s.io"], ["rolebindings", "roles"], [*_CHANGE, "get", "list", "watch"]),
        ],
        into=("kubeflow-admin",),
    ),
    _cluster_role(
        "kubeflow-kubernetes-edit",
        [
            _rule([""], ["pods/attach", "pods/exec", "pods/portforward", "pods/proxy", "secrets", "services/proxy"], _READ),
            _rule([""], ["pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy"], _CHANGE),
            _rule(
                [""],
                [
                    "configmaps",
                    "endpoints",
                    "persistentvolumeclaims",
                    "replicationcontrollers",
                    "replicationcontrollers/scale",
                    "secrets",
                    "serviceaccounts",
                    "services",
                    "services/proxy",
                ],
                _CHANGE,
            ),
            _rule(["batch"], ["cronjobs", "jobs"], _CHANGE),
            _rule(["networking.k8s.io"], ["ingresses", "networkpolicies"], _CHANGE),
        ],
        into=("kubeflow-edit",),
    ),
    _cluster_role(
        "kubeflow-kubernetes-view",
        [
            _rule(
                [""],
                [
                    "configmaps",
                    "endpoints",
                    "persistentvolumeclaims",
                    "persistentvolumeclaims/status",
                    "pods",
                    "replicationcontrollers",
                    "replicationcontrollers/scale",
                    "serviceaccounts",
                    "services",
                    "services/status",
                ],
                _READ,
            ),
            _rule(
                [""],
                [
                    "bindings",
                    "events",
                    "limitranges",
                    "namespaces/status",
                    "pods/log",
                    "pods/status",
                    "replicationcontrollers/status",
                    "resourcequotas",
                    "resourcequotas/status",
                ],
                _READ,
            ),
            _rule(["batch"], ["cronjobs", "cronjobs/status", "jobs", "jobs/status"], _READ),
            _rule(["networking.k8s.io"], ["ingresses", "ingresses/status", "networkpolicies"], _READ),
        ],
        into=("kubeflow-view",),
    ),
    _cluster_role("kubeflow-pipelines-edit", aggregates="kubeflow-pipelines-edit", into=("kubeflow-edit",)),
    _cluster_role("kubeflow-pipelines-view", aggregates="kubeflow-pipelines-view", into=("kubeflow-pipelines-edit", "kubeflow-view")),
    _cluster_role(
        "aggregate-to-kubeflow-pipelines-edit",
        [
            _rule(["pipelines.kubeflow.org"], ["pipelines", "pipelineversions"], ["create", "delete", "update"]),
            _rule(["pipelines.kubeflow.org"], ["experiments"], ["archive", "create", "delete", "unarchive"]),
            _rule(
                ["pipelines.kubeflow.org"],
                ["runs"],
                ["archive", "create", "delete", "retry", "terminate", "unarchive", "reportMetrics", "readArtifact"],
            ),
            _rule(["pipelines.kubeflow.org"], ["jobs"], ["create", "delete", "disable", "enable"]),
            _rule(["kubeflow.org"], ["scheduledworkflows"], ["*"]),
            _rule(
                ["argoproj.io"],
                [
                    "cronworkflows",
                    "cronworkflows/finalizers",
                    "workflows",
                    "workflows/finalizers",
                    "workfloweventbindings",
                    "workflowtemplates",
                    "workflowtaskresults",
                ],
                ["*"],
            ),
        ],
        into=("kubeflow-pipelines-edit",),
    ),
    _cluster_role(
        "aggregate-to-kubeflow-pipelines-view",
        [
            _rule(["pipelines.kubeflow.org"], ["pipelines", "pipelineversions", "experiments", "jobs"], ["get", "list"]),
            _rule(["pipelines.kubeflow.org"], ["runs"], ["get", "list", "readArtifact"]),
            _rule(["kubeflow.org"], ["viewers"], ["create", "get", "delete"]),
            _rule(["pipelines.kubeflow.org"], ["visualizations"], ["create"]),
        ],
        into=("kubeflow-pipelines-view",),
    ),
]

# Kubeflow's KubeRay install (kubeflow/manifests 26.03 experimental/ray/kuberay-operator,
# KubeRay 1.3.2) aggregates every ray.io right into kubeflow-edit, and so to default-editor:
# with it installed, any pipeline of a profile may create RayJobs.
KUBERAY_EDIT = [
    _cluster_role(
        "kubeflow-kuberay-edit",
        [
            _rule(["ray.io"], ["*"], ["get", "list", "watch", "create", "update", "patch", "delete"]),
        ],
        into=("kubeflow-edit", "kubeflow-admin"),
    ),
]


def profile_bindings(namespace: str, owner: str, contributor: str | None = None) -> list[dict]:
    """The RoleBindings a Profile's controller makes in ``namespace``, plus a contributor's.

    The owner (a user) gets kubeflow-admin, ``default-editor`` kubeflow-edit; a contributor
    added through the dashboard gets kubeflow-edit.
    """

    def binding(name: str, role: str, subject: dict) -> dict:
        return {
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject],
        }

    out = [
        binding("namespaceAdmin", "kubeflow-admin", {"kind": "User", "name": owner}),
        binding("default-editor", "kubeflow-edit", {"kind": "ServiceAccount", "name": "default-editor", "namespace": namespace}),
    ]
    if contributor:
        out.append(binding("user-contributor", "kubeflow-edit", {"kind": "User", "name": contributor}))
    return out
