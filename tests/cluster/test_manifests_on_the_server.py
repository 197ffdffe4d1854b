"""k8s/ applied to a real API server as docs/deploy.md says, and the RBAC fake of tests/rbac.py held to its answers.

A profile namespace is set up as Kubeflow's profile controller leaves it (tests/rbac.py's
``profile_bindings`` and its transcription of Kubeflow's aggregated ClusterRoles, which the
real controller manager aggregates here). Then each overlay is applied in two parts, as
docs/deploy.md's "Who applies what" says: the labelled part by a cluster admin, the rest by
the profile's owner, impersonated. Every answer tests/rbac.py's Authorizer gives for the
profile's accounts is compared with the API server's own SubjectAccessReview.
"""

from __future__ import annotations

from itertools import product

import pytest
import yaml

from tests import rbac
from tests.cluster.conftest import apply_docs as _apply
from tests.cluster.conftest import kubectl, kubectl_json, server_allows
from tests.manifests import DEPLOYED, NAMESPACES, build
from tests.test_manifests_security import ADMIN_SELECTOR, CONTRIBUTOR, OWNER, OWNER_SELECTOR, _selected

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("name", DEPLOYED)
def test_the_admin_and_the_owner_each_apply_their_part(profiles, name):
    docs = list(build(name))
    admin = [d for d in docs if _selected(ADMIN_SELECTOR, d)]
    owner = [d for d in docs if _selected(OWNER_SELECTOR, d)]
    _apply(admin)  # a cluster admin: Roles, RoleBindings, the RayJob template, quota
    _apply(owner, f"--as={OWNER}")  # the profile's owner, through the real authorizer
    for doc in docs:
        got = kubectl_json("get", doc["kind"].lower(), doc["metadata"]["name"], "-n", NAMESPACES[name])
        assert got["metadata"]["name"] == doc["metadata"]["name"]


@pytest.mark.parametrize("name", DEPLOYED)
def test_the_owner_cannot_make_the_admins_part(profiles, name):
    roles = [d for d in build(name) if d["kind"] == "Role" and d["metadata"]["name"] == "imgpipe-rayjobs"]
    renamed = [{**r, "metadata": {**r["metadata"], "name": "owner-rayjobs"}} for r in roles]
    proc = kubectl(
        "apply",
        "--server-side",
        "--field-manager=owner",
        f"--as={OWNER}",
        "-f",
        "-",
        input=yaml.safe_dump_all(renamed),
        check=False,
    )
    # KUBERAY_EDIT gives the owner ray.io through kubeflow-edit, so this is allowed; without
    # it the escalation check refuses (tests/test_manifests_security.py). Either way the real answer
    # must be the fake's.
    fake = _authorizer(NAMESPACES[name]).uncovered(OWNER, NAMESPACES[name], roles[0]["rules"])
    assert (proc.returncode == 0) == (fake == []), proc.stderr


def _authorizer(namespace: str) -> rbac.Authorizer:
    docs = [d for b in DEPLOYED if NAMESPACES[b] == namespace for d in build(b)]
    roles = [*rbac.KUBEFLOW_CLUSTER_ROLES, *rbac.KUBERAY_EDIT]
    return rbac.Authorizer([*docs, *rbac.profile_bindings(namespace, OWNER, CONTRIBUTOR)], roles)


def _requests(namespace: str, docs: list[dict]) -> list[rbac.Request]:
    """Every request a rule of the rendered Roles or Kubeflow's roles names, and some none does."""
    seen: set[tuple[str, str, str]] = set()
    for role in [*docs, *rbac.KUBEFLOW_CLUSTER_ROLES, *rbac.KUBERAY_EDIT]:
        for rule in role.get("rules") or []:
            for group, resource, verb in product(rule.get("apiGroups", []), rule.get("resources", []), rule.get("verbs", [])):
                if "*" not in (group, resource, verb):
                    seen.add((group, resource, verb))
    seen |= {("", "secrets", "get"), ("", "pods/exec", "create"), ("ray.io", "rayclusters", "delete"), ("", "nodes", "list")}
    seen |= {("trainer.kubeflow.org", "trainjobs", "create"), ("argoproj.io", "workflows", "create"), ("batch", "jobs", "create")}
    out = []
    for group, resource, verb in sorted(seen):
        base, _, sub = resource.partition("/")
        out.append(rbac.Request(verb, group, base, namespace, sub))
    return out


@pytest.mark.parametrize("namespace", sorted(set(NAMESPACES[b] for b in DEPLOYED)))
def test_the_rbac_fake_answers_as_the_api_server_does(profiles, api_client, namespace):
    for name in DEPLOYED:  # the Roles and bindings under test are on the server
        if NAMESPACES[name] == namespace:
            _apply(list(build(name)))
    fake = _authorizer(namespace)
    docs = [d for b in DEPLOYED if NAMESPACES[b] == namespace for d in build(b)]
    accounts = sorted({rbac.service_account(namespace, d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"})
    users = [OWNER, CONTRIBUTOR, rbac.service_account(namespace, "default-editor"), *accounts]
    differ, answers = [], []
    for user, request in product(users, _requests(namespace, docs)):
        real, mine = server_allows(api_client, user, request), fake.allows(user, request)
        answers.append(real)
        if real != mine:
            differ.append(f"{user} {request.verb} {request.group}/{request.combined}: server {real}, fake {mine}")
    assert len(answers) > 100 and 0 < sum(answers) < len(answers), "a comparison with both answers in it"
    assert not differ, "\n".join(differ)
