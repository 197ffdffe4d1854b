"""Label Studio over HTTP: a project found or made by title, tasks imported once, the export and the users read back.

    ls = LabelStudio("http://127.0.0.1:8080", token)        # $LABEL_STUDIO_API_KEY: a legacy token or a personal one
    project = ls.project("imgpipe review: pets", label_config(classes))   # ls.find_project(title): only an existing one
    added = ls.add_tasks(project, tasks)                      # tasks whose path the project has already are left alone
    export, users = ls.export(project), ls.users()

Label Studio 1.23's API (payloads recorded from a real server: ``tests/review/payloads/``). Its
import makes a new task every time, so :meth:`LabelStudio.add_tasks` reads the project's tasks first
and imports only images it does not have: a second audit adds the new suspects and keeps the
reviewers' work on the others. A refusal, a 5xx or no answer is one line naming the call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import requests

from imgpipe import storage

__all__ = ["SECRET", "SECRET_TOKEN_KEY", "SECRET_URL_KEY", "TOKEN_ENV", "URL_ENV", "LabelStudio", "LabelStudioError", "operator_url"]

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
URL_ENV = "LABEL_STUDIO_URL"
# The Secret the review Component (k8s/label-studio) makes, and its key that holds the API token:
# what the audit pipeline's publish task reads into TOKEN_ENV.
SECRET = "imgpipe-label-studio"
SECRET_TOKEN_KEY = "token"
# Its key naming the one Label Studio a pipeline run may send that token to (read into URL_ENV).
SECRET_URL_KEY = "url"
_PAGE = 100


def operator_url(given: str, environ: Mapping[str, str] | None = None) -> str:
    """``given`` (a run parameter: untrusted), once it is the Label Studio the operator named (``$LABEL_STUDIO_URL``).

    The token goes with every call, so a run may not choose where: only to the URL in the Secret.

    Raises:
        ValueError: If the operator named none, or ``given`` is another.
    """
    environ = os.environ if environ is None else environ
    allowed = environ.get(URL_ENV, "").strip().rstrip("/")
    if not allowed:
        raise ValueError(f"no Label Studio named by the operator: set {SECRET_URL_KEY} in the Secret {SECRET} (it becomes ${URL_ENV})")
    if given.strip().rstrip("/") != allowed:
        raise ValueError(
            f"review_url {storage.redact_uri(given)!r} is not the Label Studio the operator named ({storage.redact_uri(allowed)}, "
            f"the Secret {SECRET}'s {SECRET_URL_KEY}): the API token goes only there"
        )
    return allowed


class LabelStudioError(RuntimeError):
    """Label Studio refused a call or did not answer: one line saying which and why."""


class LabelStudio:
    """A Label Studio server at ``url`` with ``token``: a legacy API token (``Token``), or a personal
    access token (a JWT, exchanged at ``/api/token/refresh/`` for a short-lived ``Bearer``)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0, session: requests.Session | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Label Studio URL {storage.redact_uri(url)!r}: give http(s)://host:port")
        if not token:
            raise ValueError(f"no Label Studio token: set ${TOKEN_ENV} (Account & Settings > Personal Access Token, or the legacy token)")
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self.http = session or requests.Session()
        self._auth: str | None = None

    def _header(self) -> str:
        if self._auth is None:
            if self.token.count(".") == 2:  # a JWT: a personal access token, itself a refresh token
                access = self._call("POST", "/api/token/refresh/", "exchange the personal access token", json={"refresh": self.token}, auth=False)
                self._auth = f"Bearer {access['access']}"
            else:
                self._auth = f"Token {self.token}"
        return self._auth

    def _call(self, method: str, path: str, doing: str, *, auth: bool = True, ok: Sequence[int] = (200, 201, 204), **kwargs: Any) -> Any:
        headers = {"Authorization": self._header()} if auth else {}
        try:
            response = self.http.request(method, self.url + path, headers=headers, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(
                f"Label Studio at {storage.redact_uri(self.url)} did not answer when asked to {doing}: {type(exc).__name__}"
            ) from None
        if response.status_code not in ok:
            raise LabelStudioError(f"Label Studio refused to {doing}: HTTP {response.status_code} {_detail(response)}{_hint(response.status_code)}")
        return response.json() if response.content else None

    def project(self, title: str, label_config: str) -> int:
        """The id of the project titled ``title``, made with ``label_config`` when there is none.

        Raises:
            LabelStudioError: If the existing project's interface is not ``label_config`` (its classes changed).
        """
        found = self._call("GET", "/api/projects/", f"look for project {title!r}", params={"title": title, "page_size": _PAGE})
        same = [p for p in (found.get("results", []) if isinstance(found, Mapping) else found) if p.get("title") == title]
        if same:
            if same[0].get("label_config") != label_config:
                raise LabelStudioError(
                    f"Label Studio project {title!r} ({same[0]['id']}) offers other choices than the dataset's classes: review in a new project"
                )
            return int(same[0]["id"])
        made = self._call("POST", "/api/projects/", f"create project {title!r}", json={"title": title, "label_config": label_config})
        return int(made["id"])

    def find_project(self, title: str) -> int:
        """The id of the project titled ``title``.

        Raises:
            LabelStudioError: If there is none (nothing was published to it).
        """
        found = self._call("GET", "/api/projects/", f"look for project {title!r}", params={"title": title, "page_size": _PAGE})
        same = [p for p in (found.get("results", []) if isinstance(found, Mapping) else found) if p.get("title") == title]
        if not same:
            raise LabelStudioError(f"Label Studio has no project {title!r}: imgpipe review publish makes it")
        return int(same[0]["id"])

    def update_task_data(self, task: int, data: Mapping[str, Any]) -> None:
        """Replaces task ``task``'s data (its annotations stay): a renewed picture link."""
        self._call("PATCH", f"/api/tasks/{task}/", f"update task {task}", json={"data": dict(data)})

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """Every task of ``project`` with its annotations (the task list's pages, until Label Studio answers 404 past the last)."""
        out: list[dict[str, Any]] = []
        for page in range(1, 1_000_000):
            body = self._call(
                "GET",
                "/api/tasks/",
                f"list the tasks of project {project}",
                ok=(200, 404),
                params={"project": project, "page": page, "page_size": _PAGE, "fields": "all"},
            )
            got = (body or {}).get("tasks", []) if isinstance(body, Mapping) else []
            out += got
            if not got or len(got) < _PAGE:
                return out
        raise AssertionError("unreachable")

    def add_tasks(self, project: int, tasks: Iterable[Mapping[str, Any]]) -> int:
        """Imports the ``tasks`` whose ``data.path`` the project has no task for; returns how many."""
        have = {str(t.get("data", {}).get("path")) for t in self.tasks(project)}
        new = [dict(t) for t in tasks if str(t["data"]["path"]) not in have]
        if new:
            self._call("POST", f"/api/projects/{project}/import", f"import {len(new)} task(s) into project {project}", json=new)
        return len(new)

    def export(self, project: int) -> list[dict[str, Any]]:
        """The project's JSON export: every task, with its annotations (skipped ones too)."""
        body = self._call(
            "GET", f"/api/projects/{project}/export", f"export project {project}", params={"exportType": "JSON", "download_all_tasks": "true"}
        )
        if not isinstance(body, list):
            raise LabelStudioError(f"Label Studio's export of project {project} is not a list of tasks")
        return body

    def users(self) -> dict[int, str]:
        """User id -> email: who a task's ``completed_by`` is."""
        return {int(u["id"]): str(u.get("email") or u["id"]) for u in self._call("GET", "/api/users/", "list its users") or []}


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason or ""
    said = body.get("detail") or body.get("validation_errors") or body if isinstance(body, Mapping) else body
    return storage.redact_text(" ".join(str(said).split()))[:300]


def _hint(status: int) -> str:
    if status == 401:
        return f" (the token in ${TOKEN_ENV} is not accepted: a legacy token needs the organization's legacy tokens on)"
    if status == 403:
        return " (the token's user may not do this in that project: add it to the project's workspace)"
    return ""
