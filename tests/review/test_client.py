"""The Label Studio client (imgpipe.review.client) against the answers a real Label Studio 1.23.2 gave.

A server on loopback replays the recorded answers (``payloads/``) to the calls they answered, and
records what the client sent: a project found by title or made, the task list read page by page
until Label Studio's 404 past the last, only new images imported, the export and the users read,
a refused token and a server that does not answer said in one line.
"""

from __future__ import annotations

import http.server
import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from imgpipe.review.client import LabelStudio, LabelStudioError
from tests import serving

PAYLOADS = Path(__file__).parent / "payloads"


def _recorded(name: str) -> tuple[int, object]:
    body = json.loads((PAYLOADS / f"{name}.json").read_text())
    return body["status"], body["response_body"]


class _Replay(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    sent: list = []
    token = "0123456789abcdef0123456789abcdef01234567"

    def _answer(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).sent.append((self.command, url.path, query, body, self.headers.get("authorization")))
        if self.headers.get("authorization") not in (f"Token {self.token}", "Bearer access-from-refresh") and url.path != "/api/token/refresh/":
            status, payload = _recorded("02-auth-bad-token")
        else:
            status, payload = type(self).routes[(self.command, url.path, query.get("page", ""))](query, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def replay():
    _Replay.sent = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    thread = serving.start(server)
    yield f"http://127.0.0.1:{server.server_address[1]}", _Replay
    serving.stop(server, thread)


def _routes(titled: bool) -> dict:
    tasks = _recorded("23-tasks-list-default")
    return {
        ("GET", "/api/projects/", ""): lambda q, b: _recorded("17-project-list-filter-title" if titled else "18-project-list-filter-title-nomatch"),
        ("POST", "/api/projects/", ""): lambda q, b: _recorded("16-project-create"),
        ("GET", "/api/tasks/", "1"): lambda q, b: tasks,
        ("GET", "/api/tasks/", "2"): lambda q, b: _recorded("26-tasks-list-page3-size2-past-end"),
        ("POST", "/api/projects/1/import", ""): lambda q, b: _recorded("22-import-tasks-with-predictions"),
        ("GET", "/api/projects/1/export", ""): lambda q, b: _recorded("39-export-json-all-tasks"),
        ("GET", "/api/users/", ""): lambda q, b: _recorded("84-users-list"),
        ("POST", "/api/token/refresh/", ""): lambda q, b: (200, {"access": "access-from-refresh"}),
    }


def _config() -> str:
    return json.loads((PAYLOADS / "16-project-create.json").read_text())["response_body"]["label_config"]


def test_a_project_is_found_by_title_or_made_and_only_new_images_are_imported(replay):
    url, server = replay
    server.routes = _routes(titled=True)
    ls = LabelStudio(url, server.token)
    assert ls.project("research-imgcls-012719", _config()) == 1
    assert [s[:2] for s in server.sent] == [("GET", "/api/projects/")], "found: nothing made"
    new = {"data": {"image": "http://store/n.jpg", "path": "new/n.jpg"}, "predictions": []}
    old = {"data": {"image": "http://store/x1.jpg", "path": "a/x1.jpg"}, "predictions": []}  # the project has it
    assert ls.add_tasks(1, [old, new]) == 1
    imported = [s for s in server.sent if s[:2] == ("POST", "/api/projects/1/import")]
    assert [t["data"]["path"] for t in imported[0][3]] == ["new/n.jpg"], "a second audit keeps the reviewers' tasks"
    assert ls.add_tasks(1, [old]) == 0 and len([s for s in server.sent if s[0] == "POST"]) == 1

    server.routes = _routes(titled=False)
    assert ls.project("research-imgcls-012719", _config()) == 1
    assert server.sent[-1][:2] == ("POST", "/api/projects/") and server.sent[-1][3]["label_config"] == _config()


def test_a_project_whose_choices_are_not_the_classes_is_refused(replay):
    url, server = replay
    server.routes = _routes(titled=True)
    with pytest.raises(LabelStudioError, match="offers other choices than the dataset's classes"):
        LabelStudio(url, server.token).project("research-imgcls-012719", _config().replace("bird", "fish"))


def test_the_export_and_who_the_users_are(replay):
    url, server = replay
    server.routes = _routes(titled=True)
    ls = LabelStudio(url, server.token)
    export = ls.export(1)
    assert {t["data"]["path"] for t in export} == {"a/x1.jpg", "a/x2.jpg", "a/x3.jpg"}
    assert ls.users()[1] == "reviewer@example.com"


def test_a_personal_access_token_is_exchanged_for_a_bearer(replay):
    url, server = replay
    server.routes = _routes(titled=True)
    ls = LabelStudio(url, "header.payload.signature")
    assert ls.users()[1] == "reviewer@example.com"
    assert server.sent[0][:2] == ("POST", "/api/token/refresh/") and server.sent[0][3] == {"refresh": "header.payload.signature"}
    assert server.sent[1][4] == "Bearer access-from-refresh"


def test_a_refused_token_and_no_answer_are_one_line(replay):
    url, server = replay
    server.routes = _routes(titled=True)
    with pytest.raises(LabelStudioError) as refused:
        LabelStudio(url, "not-the-token").users()
    said = str(refused.value)
    assert "\n" not in said and said.startswith("Label Studio refused to list its users: HTTP 401 Invalid token.") and "LABEL_STUDIO_API_KEY" in said
    with pytest.raises(LabelStudioError, match="did not answer when asked to list its users"):
        LabelStudio("http://127.0.0.1:9", server.token, timeout_s=2).users()
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY"):
        LabelStudio(url, "")
