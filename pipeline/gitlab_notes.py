"""Post the merge request report as ONE note on the MR, updated in place on every pipeline.

    python -m pipeline.gitlab_notes --report reports/mr.md

GitLab's REST API (v4) through `requests`:
- GET  /user                                              who the token is (only its own note is updated)
- GET  /projects/:id/merge_requests/:iid/notes            paged: per_page, page; x-next-page header
- POST /projects/:id/merge_requests/:iid/notes            body=...   (create)
- PUT  /projects/:id/merge_requests/:iid/notes/:note_id   body=...   (update)

The note carries a hidden HTML marker; the first note by the token's user with that marker is the one
updated. Inputs come from the CI job's environment: the token from the masked variable
GITLAB_REPORT_TOKEN (a project access token with `api` scope; GitLab's CI_JOB_TOKEN cannot write notes),
CI_API_V4_URL, CI_PROJECT_ID and CI_MERGE_REQUEST_IID. Without a token or outside a merge request
pipeline the report file is left as it is and nothing is sent. The token is never printed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

from pipeline.common import PipelineError, get_logger, run_cli

MARKER = "<!-- llm-gitops:mr-report -->"
TOKEN_VARIABLE = "GITLAB_REPORT_TOKEN"
# GitLab refuses note bodies over 1,000,000 characters; keep a margin for the marker and the notice.
MAX_BODY_CHARS = 999_000
PER_PAGE = 100
TIMEOUT_S = 30
# A page count no merge request reaches: stops a server that keeps sending x-next-page.
MAX_PAGES = 1000

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
    def notes_url(self) -> str:
        project = quote(self.project_id, safe="")
        return f"{self.api_url.rstrip('/')}/projects/{project}/merge_requests/{self.iid}/notes"


def with_marker(body: str) -> str:
    """The note text: the marker first (invisible in GitLab's rendering), cut to GitLab's size limit."""
    text = f"{MARKER}\n{body}"
    if len(text) > MAX_BODY_CHARS:
        notice = "\n\n*(report truncated: GitLab notes hold at most 1,000,000 characters; see the job artifacts)*"
        text = text[: MAX_BODY_CHARS - len(notice)] + notice
    return text


class NotesClient:
    def __init__(self, merge_request: MergeRequest, token: str, session: requests.Session | None = None):
        self.merge_request = merge_request
        self.session = session or requests.Session()
        self.session.headers["PRIVATE-TOKEN"] = token

    def _call(self, method: str, url: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, url, timeout=TIMEOUT_S, **kwargs)
        except requests.RequestException as error:
            raise PipelineError(f"GitLab API {method} {url}: {type(error).__name__}: {error}") from None
        if not response.ok:
            hint = STATUS_HINTS.get(response.status_code, response.text[:200])
            raise PipelineError(f"GitLab API {method} {url}: HTTP {response.status_code}: {hint}")
        return response

    def current_user_id(self) -> int:
        return self._call("GET", f"{self.merge_request.api_url.rstrip('/')}/user").json()["id"]

    def notes(self) -> list[dict]:
        """Every note of the merge request, oldest first, following GitLab's offset pagination."""
        notes: list[dict] = []
        page = "1"
        for _ in range(MAX_PAGES):
            params = {"per_page": PER_PAGE, "page": page, "sort": "asc", "order_by": "created_at"}
            response = self._call("GET", self.merge_request.notes_url, params=params)
            notes.extend(response.json())
            page = response.headers.get("x-next-page", "")
            if not page:
                return notes
        raise PipelineError(f"GitLab API: more than {MAX_PAGES} pages of notes on one merge request")

    def find_report_note(self) -> dict | None:
        user_id = self.current_user_id()
        for note in self.notes():
            if note.get("author", {}).get("id") == user_id and MARKER in note.get("body", ""):
                return note
        return None

    def upsert(self, body: str) -> tuple[str, int]:
        """Create the report note, or update the one this token wrote before: ("created"|"updated", note id)."""
        text = with_marker(body)
        existing = self.find_report_note()
        if existing is None:
            note = self._call("POST", self.merge_request.notes_url, data={"body": text}).json()
            return "created", note["id"]
        note = self._call("PUT", f"{self.merge_request.notes_url}/{existing['id']}", data={"body": text}).json()
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
    action, note_id = NotesClient(merge_request, token).upsert(body)
    return f"{action} note {note_id} on merge request !{merge_request.iid} from {report}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gitlab_notes", description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="the Markdown report to post")
    args = parser.parse_args(argv)
    log.info("%s", post_report(args.report, dict(os.environ)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
