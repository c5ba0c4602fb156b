"""A local stand-in for GitLab's REST API v4, as far as the MR report needs it.

Follows GitLab's documentation ("Notes API", "REST API" authentication and pagination):
- every request needs the `PRIVATE-TOKEN` header; without a valid one: 401 {"message": "401 Unauthorized"};
- GET /api/v4/user: the token's user;
- GET /api/v4/projects/:id/merge_requests/:iid/notes: `per_page` (default 20, at most 100), `page`
  (default 1), `sort` (asc|desc, default desc), `order_by` (created_at|updated_at); the response carries
  x-page, x-per-page, x-total, x-total-pages, x-next-page, x-prev-page (empty when there is none) and Link;
- POST .../notes with `body` (form or JSON): 201 and the note;
- PUT .../notes/:note_id with `body`: 200 and the note; only its author may edit it (403 otherwise);
- an unknown project or merge request: 404. `:id` may be the number or the URL-encoded path;
- GET /api/v4/projects/:id: the project (id, path_with_namespace, web_url);
- POST /api/v4/projects/:id/uploads, multipart form with the field `file` ("Projects API", upload a file):
  201 and {"id", "alt", "url", "full_path", "markdown"}, `url` /uploads/<32 hex secret>/<filename>; each
  upload gets a new secret, even of the same bytes, as GitLab does;
- Link headers of a paged list keep the request's query (sort, order_by) and change only `page`.
With `redirect_to` set, the double answers every request 302 to that base URL (same path and query), as a
misconfigured or hostile server could: tests check what the client sends there.
And from the "Merge requests API" (what `python -m pipeline.sweep promote` sends through python-gitlab):
- POST /api/v4/projects/:id/merge_requests with `source_branch`, `target_branch`, `title` (required; 400
  `{"message": "... is missing"}` otherwise) and `description`: 201 and the merge request (id, iid,
  project_id, title, description, state "opened", source_branch, target_branch, author, web_url);
- a second open merge request from the same source branch: 409
  `{"message": ["Another open merge request already exists for this source branch: !<iid>"]}`.

It runs on 127.0.0.1 in a thread and records every request, so tests can assert what was sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

PROJECT_PATH = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)$")
UPLOADS_PATH = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/uploads$")
MERGE_REQUESTS_PATH = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/merge_requests$")
NOTES_PATH = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/merge_requests/(?P<iid>\d+)/notes(?:/(?P<note>\d+))?$")


@dataclass
class GitLabState:
    token: str
    user: dict
    project_id: str = "42"
    project_path: str = "ml/llm-gitops"
    merge_request_iid: str = "7"
    notes: list[dict] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path with query)
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's headers, in order
    uploads: list[dict] = field(default_factory=list)  # {"filename", "data", "url"} per POST .../uploads
    redirect_to: str | None = None  # e.g. "http://127.0.0.1:<other port>": answer 302 there
    merge_requests: list[dict] = field(default_factory=list)  # created through POST .../merge_requests
    next_id: int = 1000

    def add_note(self, body: str, author: dict) -> dict:
        self.next_id += 1
        stamp = f"2026-01-01T00:{self.next_id // 60 % 60:02d}:{self.next_id % 60:02d}.000Z"
        note = {
            "id": self.next_id,
            "type": None,
            "body": body,
            "author": author,
            "created_at": stamp,
            "updated_at": stamp,
            "system": False,
            "noteable_type": "MergeRequest",
            "noteable_iid": int(self.merge_request_iid),
        }
        self.notes.append(note)
        return note


def _handler(state: GitLabState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def _send(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _form(self) -> dict[str, str]:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            if self.headers.get("Content-Type", "").startswith("application/json"):
                return json.loads(raw or "{}")
            return {key: values[0] for key, values in parse_qs(raw, keep_blank_values=True).items()}

        def _redirect(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(302)
            self.send_header("Location", f"{state.redirect_to}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _known(self, project: str) -> bool:
            return unquote(project) in (state.project_id, state.project_path)

        def _upload(self) -> None:
            """A multipart/form-data body's `file` part, stored as GitLab stores an upload."""
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
            message = BytesParser(policy=HTTP).parsebytes(head + raw)
            part = next(
                (p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file"), None
            )
            if not message.is_multipart() or part is None or not part.get_filename():
                return self._send(400, {"message": "400 Bad request - file is missing"})
            filename, data = part.get_filename(), part.get_payload(decode=True)
            secret = hashlib.md5(f"{len(state.uploads)}:".encode() + data).hexdigest()
            url = f"/uploads/{secret}/{filename}"
            state.uploads.append({"filename": filename, "data": data, "url": url})
            alt = filename.rsplit(".", 1)[0]
            self._send(
                201,
                {
                    "id": len(state.uploads),
                    "alt": alt,
                    "url": url,
                    "full_path": f"/-/project/{state.project_id}{url}",
                    "markdown": f"![{alt}]({url})",
                },
            )

        def _route(self, method: str) -> None:
            state.requests.append((method, self.path))
            state.headers.append(dict(self.headers.items()))
            if state.redirect_to:
                return self._redirect()
            if self.headers.get("PRIVATE-TOKEN") != state.token:
                return self._send(401, {"message": "401 Unauthorized"})
            url = urlsplit(self.path)
            if method == "GET" and url.path == "/api/v4/user":
                return self._send(200, state.user)
            if (project := PROJECT_PATH.match(url.path)) and method == "GET":
                if not self._known(project["project"]):
                    return self._send(404, {"message": "404 Project Not Found"})
                web_url = f"http://gitlab.invalid/{state.project_path}"
                return self._send(
                    200, {"id": int(state.project_id), "path_with_namespace": state.project_path, "web_url": web_url}
                )
            if (uploads := UPLOADS_PATH.match(url.path)) and method == "POST":
                if not self._known(uploads["project"]):
                    return self._send(404, {"message": "404 Project Not Found"})
                return self._upload()
            created = MERGE_REQUESTS_PATH.match(url.path)
            if created and method == "POST":
                if unquote(created["project"]) not in (state.project_id, state.project_path):
                    return self._send(404, {"message": "404 Project Not Found"})
                return self._create_merge_request(self._form())
            match = NOTES_PATH.match(url.path)
            if not match or unquote(match["project"]) not in (state.project_id, state.project_path):
                return self._send(404, {"message": "404 Project Not Found"})
            if match["iid"] != state.merge_request_iid:
                return self._send(404, {"message": "404 Not found"})
            if match["note"] is None and method == "GET":
                return self._list(parse_qs(url.query))
            if match["note"] is None and method == "POST":
                body = self._form().get("body")
                if not body:
                    return self._send(400, {"message": "400 Bad request - body is missing"})
                return self._send(201, state.add_note(body, state.user))
            if match["note"] is not None and method == "PUT":
                note = next((n for n in state.notes if n["id"] == int(match["note"])), None)
                if note is None:
                    return self._send(404, {"message": "404 Note Not Found"})
                if note["author"]["id"] != state.user["id"]:
                    return self._send(403, {"message": "403 Forbidden"})
                note["body"] = self._form().get("body", note["body"])
                note["updated_at"] = "2026-01-02T00:00:00.000Z"
                return self._send(200, note)
            return self._send(405, {"message": "405 Method Not Allowed"})

        def _create_merge_request(self, form: dict) -> None:
            for required in ("source_branch", "target_branch", "title"):
                if not form.get(required):
                    return self._send(400, {"message": f"400 Bad request - {required} is missing"})
            source = form["source_branch"]
            if other := next((m for m in state.merge_requests if m["source_branch"] == source), None):
                message = f"Another open merge request already exists for this source branch: !{other['iid']}"
                return self._send(409, {"message": [message]})
            iid = int(state.merge_request_iid) + 1 + len(state.merge_requests)
            state.next_id += 1
            merge_request = {
                "id": state.next_id,
                "iid": iid,
                "project_id": int(state.project_id),
                "title": form["title"],
                "description": form.get("description") or "",
                "state": "opened",
                "source_branch": source,
                "target_branch": form["target_branch"],
                "author": state.user,
                "web_url": f"http://gitlab.invalid/{state.project_path}/-/merge_requests/{iid}",
            }
            state.merge_requests.append(merge_request)
            return self._send(201, merge_request)

        def _list(self, query: dict[str, list[str]]) -> None:
            per_page = min(int(query.get("per_page", ["20"])[0]), 100)
            page = max(int(query.get("page", ["1"])[0]), 1)
            key = query.get("order_by", ["created_at"])[0]
            ordered = sorted(state.notes, key=lambda n: (n[key], n["id"]))
            if query.get("sort", ["desc"])[0] == "desc":
                ordered.reverse()
            total_pages = max(1, -(-len(ordered) // per_page))
            chunk = ordered[(page - 1) * per_page : page * per_page]
            kept = {name: values[0] for name, values in query.items() if name != "page"}

            def link(number: int, rel: str) -> str:
                target = urlencode({**kept, "per_page": per_page, "page": number})
                return f'<http://{self.headers["Host"]}{urlsplit(self.path).path}?{target}>; rel="{rel}"'

            links = [link(page + 1, "next")] if page < total_pages else []
            links += [link(1, "first"), link(total_pages, "last")]
            headers = {
                "x-page": str(page),
                "x-per-page": str(per_page),
                "x-total": str(len(ordered)),
                "x-total-pages": str(total_pages),
                "x-next-page": str(page + 1) if page < total_pages else "",
                "x-prev-page": str(page - 1) if page > 1 else "",
                "Link": ", ".join(links),
            }
            self._send(200, chunk, headers)

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

    return Handler


class GitLabDouble:
    """`with GitLabDouble(state) as api: api.url` is the base to use as CI_API_V4_URL."""

    def __init__(self, state: GitLabState):
        self.state = state
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v4"

    def __enter__(self) -> GitLabDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- runners and resource groups, as `python -m pipeline.doctor` reads them ---
# From GitLab's "Runners API" and "Resource group API":
# - GET /api/v4/projects/:id/runners: the runners available to the project, as summaries (id, description,
#   ip_address, active, paused, is_shared, runner_type, name, online, status); `tag_list` (comma-separated)
#   keeps the runners that have every listed tag, `type` (instance_type|group_type|project_type) and
#   `paused` filter too; paginated like every list (x-page, x-per-page, x-total, x-total-pages, x-next-page);
# - GET /api/v4/runners/:id: the details, the summary plus tag_list, run_untagged, locked, maximum_timeout,
#   access_level (not_protected | ref_protected) and projects; an unknown runner: 404 "404 Runner Not Found";
# - GET /api/v4/projects/:id/resource_groups/:key: {id, key, process_mode (unordered | oldest_first |
#   newest_first | newest_ready_first), created_at, updated_at}; a key no job has used yet: 404 "404 Not found".

RUNNERS_PATH = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/runners$")
RUNNER_PATH = re.compile(r"^/api/v4/runners/(?P<runner>\d+)$")
RESOURCE_GROUP_PATH = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/resource_groups/(?P<key>[^/]+)$")
SUMMARY_KEYS = (
    "id",
    "description",
    "ip_address",
    "active",
    "paused",
    "is_shared",
    "runner_type",
    "name",
    "online",
    "status",
)


def runner_details(runner_id: int, description: str, tags: list[str], access_level: str = "not_protected") -> dict:
    """A project runner as GET /runners/:id describes it."""
    return {
        "id": runner_id,
        "description": description,
        "ip_address": None,
        "active": True,
        "paused": False,
        "is_shared": False,
        "runner_type": "project_type",
        "name": "gitlab-runner",
        "online": True,
        "status": "online",
        "tag_list": tags,
        "run_untagged": False,
        "locked": True,
        "maximum_timeout": 43200,
        "access_level": access_level,
        "projects": [{"id": 42, "name": "llm-gitops", "path_with_namespace": "ml/llm-gitops"}],
    }


@dataclass
class RigSettings:
    """What GitLab holds about the rig: its runners (as GET /runners/:id) and resource groups (key -> mode)."""

    runners: list[dict] = field(default_factory=list)
    resource_groups: dict[str, str] = field(default_factory=dict)


def _rig_answer(state: GitLabState, rig: RigSettings, url) -> tuple[int, object, dict[str, str]] | None:
    """(status, payload, headers) for a runner or resource group GET; None: not one of these routes."""
    projects = (state.project_id, state.project_path)
    if listed := RUNNERS_PATH.match(url.path):
        if unquote(listed["project"]) not in projects:
            return 404, {"message": "404 Project Not Found"}, {}
        query = parse_qs(url.query)
        wanted = {tag for tag in query.get("tag_list", [""])[0].split(",") if tag}
        kind = query.get("type", [None])[0]
        chosen = [r for r in rig.runners if wanted <= set(r["tag_list"]) and kind in (None, r["runner_type"])]
        pages = {"x-page": "1", "x-per-page": "20", "x-total": str(len(chosen)), "x-total-pages": "1"}
        return 200, [{key: r[key] for key in SUMMARY_KEYS} for r in chosen], {**pages, "x-next-page": ""}
    if single := RUNNER_PATH.match(url.path):
        runner = next((r for r in rig.runners if r["id"] == int(single["runner"])), None)
        return (200, runner, {}) if runner else (404, {"message": "404 Runner Not Found"}, {})
    if group := RESOURCE_GROUP_PATH.match(url.path):
        if unquote(group["project"]) not in projects:
            return 404, {"message": "404 Project Not Found"}, {}
        key = unquote(group["key"])
        if key not in rig.resource_groups:
            return 404, {"message": "404 Not found"}, {}
        stamp = "2026-01-01T00:00:00.000Z"
        mode = rig.resource_groups[key]
        return 200, {"id": 3, "key": key, "process_mode": mode, "created_at": stamp, "updated_at": stamp}, {}
    return None


class GitLabRigDouble(GitLabDouble):
    """The double with the runner and resource group routes too: `with GitLabRigDouble(state, rig) as api`."""

    def __init__(self, state: GitLabState, rig: RigSettings):
        class Handler(_handler(state)):
            def _route(self, method: str) -> None:
                authorised = self.headers.get("PRIVATE-TOKEN") == state.token
                answer = _rig_answer(state, rig, urlsplit(self.path)) if authorised and method == "GET" else None
                if answer is None:
                    return super()._route(method)  # every other route, and the 401 without the token
                state.requests.append((method, self.path))
                return self._send(answer[0], answer[1], answer[2])

        super().__init__(state)
        self.server.RequestHandlerClass = Handler
        self.rig = rig
