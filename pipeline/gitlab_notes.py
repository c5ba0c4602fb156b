"""Post the merge request report as ONE note on the MR, updated in place on every pipeline, with its pictures.

    python -m pipeline.gitlab_notes --report reports/mr.md

GitLab's REST API (v4) through python-gitlab:
- GET  /user                                              who the token is (only its own note is updated)
- GET  /projects/:id/merge_requests/:iid/notes            paged (per_page, sort, order_by; the Link header)
- POST /projects/:id/uploads                              file=<png>: each picture the report links
- POST /projects/:id/merge_requests/:iid/notes            body=...   (create)
- PUT  /projects/:id/merge_requests/:iid/notes/:note_id   body=...   (update)

The note carries a hidden HTML marker; the first note by the token's user with that marker is the one
updated. The report links its pictures by relative path (PNGs beside it, so any Markdown viewer shows
them); each is uploaded and its link replaced by the upload's URL. A second hidden marker keeps each
picture's sha256 and URL, so a re-run with the same bytes uploads nothing and changed bytes upload anew.
A line starting with `/` would run as a GitLab quick action: it is escaped (`\\/`), whatever wrote it.

Inputs come from the CI job's environment: the token from the masked variable GITLAB_REPORT_TOKEN (a
project access token with `api` scope; GitLab's CI_JOB_TOKEN cannot write notes), CI_API_V4_URL,
CI_PROJECT_ID and CI_MERGE_REQUEST_IID. Without a token or outside a merge request pipeline the report
file is left as it is and nothing is sent. The token is never printed, and never sent to another host:
a redirect away from CI_API_V4_URL's host is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import gitlab
import requests
from gitlab.v4.objects import ProjectMergeRequest

from pipeline.common import PipelineError, get_logger, run_cli

MARKER = "<!-- llm-gitops:mr-report -->"
UPLOADS_MARKER = re.compile(r"<!-- llm-gitops:uploads (?P<json>\{.*\}) -->")  # the note's second line only
TOKEN_VARIABLE = "GITLAB_REPORT_TOKEN"
# GitLab refuses note bodies over 1,000,000 characters; keep a margin for the marker and the notice.
MAX_BODY_CHARS = 999_000
PER_PAGE = 100
TIMEOUT_S = 30
# A page count no merge request reaches: stops a server that keeps sending a next link.
MAX_PAGES = 1000
# ![alt](name.png): a PNG beside the report. Nothing else is uploaded (the report quotes dataset text, and
# a link to ../../some/file must not publish that file); http:, /uploads/ and other links stay as they are.
LOCAL_IMAGE = re.compile(r"!\[(?P<alt>[^\]\n]*)\]\((?P<target>[A-Za-z0-9_-][A-Za-z0-9_.-]*\.png)\)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# GitLab runs a line that starts with `/` as a quick action (/label, /merge, /approve ...)
QUICK_ACTION = re.compile(r"^([ \t]*)/", re.MULTILINE)

log = get_logger("gitlab_notes")

# What a failed call means for the person reading the job log, by HTTP status.
STATUS_HINTS = {
    401: f"GitLab rejected the token: check that {TOKEN_VARIABLE} is a valid, unexpired project access token",
    403: f"the token may not do this: {TOKEN_VARIABLE} needs the `api` scope and at least the Reporter role",
    404: "no such project or merge request: check CI_API_V4_URL, CI_PROJECT_ID and CI_MERGE_REQUEST_IID",
}


@dataclass(frozen=True)
class MergeRequest:
    api_url: str  # e.g. https://gitlab.example.com/api/v4
    project_id: str  # numeric id or "group/project" path
    iid: str

    @property
    def server_url(self) -> str:
        """What python-gitlab takes: the server without /api/v4 (GitLab may live under a relative path)."""
        url = self.api_url.rstrip("/")
        if not url.endswith("/api/v4"):
            raise PipelineError(f"CI_API_V4_URL {url!r} does not end with /api/v4")
        return url.removesuffix("/api/v4")

    @property
    def notes_path(self) -> str:
        return f"/projects/{self.project_id}/merge_requests/{self.iid}/notes"


@dataclass(frozen=True)
class LocalImage:
    """A picture the report links by a relative path, read from beside the report."""

    target: str  # the link target as written, e.g. mr-loss.png
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def filename(self) -> str:
        return Path(self.target).name


def local_pictures(body: str, base: Path) -> list[LocalImage]:
    """The PNGs `body` links that exist beside it (in `base`), each once."""
    pictures: dict[str, LocalImage] = {}
    for target in dict.fromkeys(match["target"] for match in LOCAL_IMAGE.finditer(body)):
        path = base / target
        data = path.read_bytes() if path.is_file() else b""
        if not data.startswith(PNG_SIGNATURE):
            log.warning("%s: not a PNG beside the report; the link stays as it is", path)
            continue
        pictures[target] = LocalImage(target, data)
    return list(pictures.values())


def uploads_of(note_body: str) -> dict[str, str]:
    """sha256 -> upload URL this client remembered on the note's second line, right after MARKER (report
    text further down cannot plant one); {} when there is none or it does not read."""
    lines = note_body.split("\n", 2)
    found = UPLOADS_MARKER.fullmatch(lines[1]) if len(lines) > 1 and lines[0] == MARKER else None
    try:
        uploads = json.loads(found["json"]) if found else {}
    except json.JSONDecodeError:
        return {}
    if not isinstance(uploads, dict):
        return {}
    return {sha: url for sha, url in uploads.items() if isinstance(url, str)}


def uploads_marker(uploads: dict[str, str]) -> str:
    # "--" may not appear inside an HTML comment; \u002d is the same character to JSON
    encoded = json.dumps(uploads, sort_keys=True).replace("--", "-\\u002d")
    return f"<!-- llm-gitops:uploads {encoded} -->"


def no_quick_actions(text: str) -> str:
    """Every line that starts with `/` escaped as `\\/`: shown the same, never run as a quick action."""
    return QUICK_ACTION.sub(lambda match: f"{match[1]}\\/", text)


def with_marker(body: str, uploads: dict[str, str] | None = None) -> str:
    """The note text: the markers first (invisible in GitLab's rendering), cut to GitLab's size limit."""
    head = MARKER + (f"\n{uploads_marker(uploads)}" if uploads else "")
    text = f"{head}\n{no_quick_actions(body)}"
    if len(text) > MAX_BODY_CHARS:
        notice = "\n\n*(report truncated: GitLab notes hold at most 1,000,000 characters; see the job artifacts)*"
        text = text[: MAX_BODY_CHARS - len(notice)] + notice
    return text


class SameHostSession(requests.Session):
    """requests drops `Authorization` on a redirect to another host but keeps other headers, PRIVATE-TOKEN
    among them: such a redirect is refused, so the token only ever goes to CI_API_V4_URL's host."""

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        if self.should_strip_auth(response.request.url, prepared_request.url):
            source, target = urlsplit(response.request.url), urlsplit(prepared_request.url)
            raise PipelineError(
                f"GitLab API {response.request.method} {source.path}: HTTP {response.status_code} redirect to "
                f"another host ({target.scheme}://{target.netloc}), not followed so the token is not sent there: "
                "check CI_API_V4_URL"
            )
        super().rebuild_auth(prepared_request, response)


class NotesClient:
    def __init__(self, merge_request: MergeRequest, token: str):
        self.merge_request = merge_request
        self.gl = gitlab.Gitlab(
            merge_request.server_url,
            private_token=token,
            timeout=TIMEOUT_S,
            keep_base_url=True,  # follow page links on the configured host, whatever GitLab's external_url says
            session=SameHostSession(),
        )
        self.project = self.gl.projects.get(merge_request.project_id, lazy=True)
        self.mr: ProjectMergeRequest = self.project.mergerequests.get(merge_request.iid, lazy=True)

    def _call(self, what: str, call):
        try:
            return call()
        except gitlab.exceptions.GitlabError as error:
            hint = STATUS_HINTS.get(error.response_code, str(error.error_message)[:200])
            raise PipelineError(f"GitLab API {what}: HTTP {error.response_code}: {hint}") from None
        except requests.RequestException as error:
            raise PipelineError(f"GitLab API {what}: {type(error).__name__}: {error}") from None

    def current_user_id(self) -> int:
        self._call("GET /user", self.gl.auth)
        return self.gl.user.id

    def notes(self) -> Iterator[dict]:
        """Every note of the merge request, oldest first, fetched page by page (python-gitlab follows the
        Link header) as the search goes."""
        what = f"GET {self.merge_request.notes_path}"
        pages = self._call(
            what, lambda: self.mr.notes.list(iterator=True, per_page=PER_PAGE, sort="asc", order_by="created_at")
        )
        for _ in range(MAX_PAGES * PER_PAGE):
            note = self._call(what, lambda: next(pages, None))  # the next page's request happens here
            if note is None:
                return
            yield note.attributes
        raise PipelineError(f"GitLab API: more than {MAX_PAGES} pages of notes on one merge request")

    def find_report_note(self) -> dict | None:
        user_id = self.current_user_id()
        for note in self.notes():
            if note.get("author", {}).get("id") == user_id and MARKER in note.get("body", ""):
                return note
        return None

    def upload(self, picture: LocalImage) -> str:
        """The picture as a project upload; its URL (/uploads/<secret>/<file>), what notes link to."""
        what = f"POST /projects/{self.merge_request.project_id}/uploads"
        project = self.project
        if not str(self.merge_request.project_id).isdigit():
            # python-gitlab puts the id into the upload path unencoded: ask GitLab for the number first
            path = f"GET /projects/{self.merge_request.project_id}"
            project = self._call(path, lambda: self.gl.projects.get(self.merge_request.project_id))
        uploaded = self._call(what, lambda: project.upload(picture.filename, filedata=picture.data))
        return uploaded["url"]

    def upsert(self, body: str, pictures: list[LocalImage] = ()) -> tuple[str, int]:
        """Create the report note, or update the one this token wrote before: ("created"|"updated", note id).
        Pictures whose bytes the note already shows are not uploaded again."""
        existing = self.find_report_note()
        known = uploads_of(existing["body"]) if existing else {}
        urls: dict[str, str] = {}
        for picture in pictures:
            if picture.sha256 not in known:
                known[picture.sha256] = self.upload(picture)
                log.info("uploaded %s (%d bytes)", picture.target, len(picture.data))
            urls[picture.target] = known[picture.sha256]
        linked = LOCAL_IMAGE.sub(lambda m: f"![{m['alt']}]({urls[m['target']]})" if m["target"] in urls else m[0], body)
        text = with_marker(linked, {picture.sha256: urls[picture.target] for picture in pictures})
        if existing is None:
            note = self._call(f"POST {self.merge_request.notes_path}", lambda: self.mr.notes.create({"body": text}))
            return "created", note.id
        path = f"{self.merge_request.notes_path}/{existing['id']}"
        note = self._call(f"PUT {path}", lambda: self.mr.notes.update(existing["id"], {"body": text}))
        return "updated", note["id"]


def merge_request_from_env(env: dict[str, str]) -> MergeRequest | None:
    """The pipeline's merge request, or None outside a merge request pipeline."""
    names = ("CI_API_V4_URL", "CI_PROJECT_ID", "CI_MERGE_REQUEST_IID")
    if not all(env.get(name) for name in names):
        return None
    return MergeRequest(*(env[name] for name in names))


def post_report(report: Path, env: dict[str, str]) -> str:
    """Post or update the note; returns what happened, in one line for the job log."""
    try:
        body = report.read_text(encoding="utf-8")
    except OSError as error:
        raise PipelineError(f"{report}: cannot read the report: {error.strerror}") from None
    token = env.get(TOKEN_VARIABLE, "")
    if not token:
        return f"no {TOKEN_VARIABLE} in the environment: the report stays in {report}, nothing posted"
    merge_request = merge_request_from_env(env)
    if merge_request is None:
        return f"not a merge request pipeline (no CI_MERGE_REQUEST_IID): the report stays in {report}"
    pictures = local_pictures(body, report.parent)
    action, note_id = NotesClient(merge_request, token).upsert(body, pictures)
    return f"{action} note {note_id} on merge request !{merge_request.iid} from {report}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gitlab_notes", description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="the Markdown report to post (pictures beside it)")
    args = parser.parse_args(argv)
    log.info("%s", post_report(args.report, dict(os.environ)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
