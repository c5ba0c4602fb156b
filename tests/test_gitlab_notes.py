"""The MR note client against a local double of GitLab's notes API (tests/gitlab_api_double.py: GitLab
itself cannot run here; the double follows the documented API: PRIVATE-TOKEN, pagination headers, POST/PUT)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from gitlab_api_double import GitLabDouble, GitLabState

from pipeline.common import PipelineError
from pipeline.gitlab_notes import MARKER, MergeRequest, NotesClient, local_pictures, post_report

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "glpat-test-secret-0123456789"
BOT = {"id": 901, "username": "project_42_bot_report", "name": "MR report bot"}
HUMAN = {"id": 7, "username": "alice", "name": "Alice"}


@pytest.fixture
def gitlab():
    with GitLabDouble(GitLabState(token=TOKEN, user=BOT)) as api:
        yield api


def ci_env(api: GitLabDouble, token: str = TOKEN) -> dict[str, str]:
    return {
        "GITLAB_REPORT_TOKEN": token,
        "CI_API_V4_URL": api.url,
        "CI_PROJECT_ID": api.state.project_id,
        "CI_MERGE_REQUEST_IID": api.state.merge_request_iid,
    }


def test_first_run_creates_the_note_and_the_second_updates_it_in_place(gitlab, tmp_path):
    report = tmp_path / "mr.md"
    report.write_text("## Dataset\n3 conversations added\n")
    assert post_report(report, ci_env(gitlab)) == f"created note 1001 on merge request !7 from {report}"

    report.write_text("## Dataset\n4 conversations added\n")
    assert post_report(report, ci_env(gitlab)) == f"updated note 1001 on merge request !7 from {report}"

    assert len(gitlab.state.notes) == 1
    note = gitlab.state.notes[0]
    assert note["body"] == f"{MARKER}\n## Dataset\n4 conversations added\n"
    assert note["author"] == BOT
    methods = [method for method, _ in gitlab.state.requests]
    assert methods == ["GET", "GET", "POST", "GET", "GET", "PUT"]  # user, notes, create; user, notes, update


def test_the_report_note_is_found_on_a_later_page(gitlab):
    for number in range(210):
        gitlab.state.add_note(f"review comment {number}", HUMAN)
    ours = gitlab.state.add_note(f"{MARKER}\nold report", BOT)  # the 211th: on page 3 of 100 each
    for number in range(150):
        gitlab.state.add_note(f"later comment {number}", HUMAN)

    client = NotesClient(MergeRequest(gitlab.url, "42", "7"), TOKEN)
    assert client.upsert("new report") == ("updated", ours["id"])

    assert len(gitlab.state.notes) == 361
    assert ours["body"] == f"{MARKER}\nnew report"
    pages = [
        parse_qs(urlsplit(path).query) for method, path in gitlab.state.requests if method == "GET" and "/notes" in path
    ]
    # no `page` is page 1 (GitLab's default); the later pages follow the Link header, query kept; the
    # search stops on the page that has the note (4 pages exist)
    assert [query.get("page", ["1"]) for query in pages] == [["1"], ["2"], ["3"]]
    assert all(query["sort"] == ["asc"] and query["per_page"] == ["100"] for query in pages)


def test_a_marker_note_by_someone_else_is_not_taken_over(gitlab):
    quoted = gitlab.state.add_note(f"Quoting the bot: {MARKER} report", HUMAN)
    client = NotesClient(MergeRequest(gitlab.url, "ml/llm-gitops", "7"), TOKEN)  # the path works as the id too
    action, note_id = client.upsert("report")
    assert action == "created"
    assert note_id != quoted["id"]
    assert quoted["body"] == f"Quoting the bot: {MARKER} report"


def test_a_rejected_token_is_one_clear_error_that_does_not_show_the_token(gitlab, tmp_path):
    report = tmp_path / "mr.md"
    report.write_text("report")
    with pytest.raises(PipelineError) as error:
        post_report(report, ci_env(gitlab, token="glpat-wrong-token"))
    assert "HTTP 401" in str(error.value)
    assert "GITLAB_REPORT_TOKEN" in str(error.value)
    assert "glpat-wrong-token" not in str(error.value)
    assert gitlab.state.notes == []


def test_without_a_token_the_report_is_only_written(gitlab, tmp_path):
    report = tmp_path / "mr.md"
    report.write_text("report")
    env = ci_env(gitlab, token="")
    assert post_report(report, env) == (
        f"no GITLAB_REPORT_TOKEN in the environment: the report stays in {report}, nothing posted"
    )
    assert gitlab.state.requests == []


def test_outside_a_merge_request_pipeline_nothing_is_sent(gitlab, tmp_path):
    report = tmp_path / "mr.md"
    report.write_text("report")
    env = ci_env(gitlab)
    del env["CI_MERGE_REQUEST_IID"]
    assert "not a merge request pipeline" in post_report(report, env)
    assert gitlab.state.requests == []


def run_cli(env: dict[str, str], report: Path) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("CI_", "GITLAB_"))}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.gitlab_notes", "--report", str(report)],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_posts_and_a_failure_is_one_line_without_traceback_or_token(gitlab, tmp_path):
    report = tmp_path / "mr.md"
    report.write_text("## Report\n")
    ok = run_cli(ci_env(gitlab), report)
    assert ok.returncode == 0, ok.stderr
    assert "created note 1001 on merge request !7" in ok.stderr
    assert TOKEN not in ok.stdout + ok.stderr

    bad = run_cli(ci_env(gitlab, token="glpat-expired-000"), report)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: GitLab API GET ")
    assert "HTTP 401" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "glpat-expired-000" not in bad.stdout + bad.stderr


# --- pictures: uploaded once per content (the double answers POST /projects/:id/uploads as GitLab does) ---


def png(colour: tuple[int, int, int]) -> bytes:
    """A small real PNG (Pillow), one colour per content."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def write_report(tmp_path: Path, loss: bytes, gate: bytes) -> Path:
    (tmp_path / "mr-loss.png").write_bytes(loss)
    (tmp_path / "mr-gate.png").write_bytes(gate)
    report = tmp_path / "mr.md"
    report.write_text(
        "## Pictures\n\n![Loss curves: this branch and main](mr-loss.png)\n\n![Gate scores](mr-gate.png)\n"
        "![an external picture stays](https://example.com/x.png)\n"
    )
    return report


def upload_urls(body: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\((/uploads/[0-9a-f]{32}/[^)]+)\)", body)


def test_pictures_are_uploaded_once_and_a_rerun_with_the_same_bytes_uploads_nothing(gitlab, tmp_path):
    report = write_report(tmp_path, png((200, 0, 0)), png((0, 0, 200)))
    assert post_report(report, ci_env(gitlab)).startswith("created note 1001")
    assert [upload["filename"] for upload in gitlab.state.uploads] == ["mr-loss.png", "mr-gate.png"]
    assert gitlab.state.uploads[0]["data"] == (tmp_path / "mr-loss.png").read_bytes()
    body = gitlab.state.notes[0]["body"]
    first = upload_urls(body)
    assert first == [upload["url"] for upload in gitlab.state.uploads]
    assert "![Loss curves: this branch and main](/uploads/" in body  # the alt text stays: readable without images
    assert "![an external picture stays](https://example.com/x.png)" in body
    assert "(mr-loss.png)" not in body

    assert post_report(report, ci_env(gitlab)).startswith("updated note 1001")
    assert len(gitlab.state.uploads) == 2  # same bytes: no second upload
    assert upload_urls(gitlab.state.notes[0]["body"]) == first
    assert [method for method, path in gitlab.state.requests if "/uploads" in path] == ["POST", "POST"]


def test_a_changed_picture_is_uploaded_anew_and_the_unchanged_one_is_kept(gitlab, tmp_path):
    report = write_report(tmp_path, png((200, 0, 0)), png((0, 0, 200)))
    post_report(report, ci_env(gitlab))
    loss_before, gate_before = upload_urls(gitlab.state.notes[0]["body"])

    write_report(tmp_path, png((0, 150, 0)), png((0, 0, 200)))  # the loss curves changed
    assert post_report(report, ci_env(gitlab)).startswith("updated note 1001")

    assert [upload["filename"] for upload in gitlab.state.uploads] == ["mr-loss.png", "mr-gate.png", "mr-loss.png"]
    loss_after, gate_after = upload_urls(gitlab.state.notes[0]["body"])
    assert loss_after == gitlab.state.uploads[2]["url"] != loss_before
    assert gate_after == gate_before
    assert len(gitlab.state.notes) == 1


def test_with_the_project_path_as_id_the_upload_goes_to_the_numeric_id(gitlab, tmp_path):
    report = write_report(tmp_path, png((200, 0, 0)), png((0, 0, 200)))
    client = NotesClient(MergeRequest(gitlab.url, "ml/llm-gitops", "7"), TOKEN)
    client.upsert(report.read_text(), local_pictures(report.read_text(), tmp_path))
    assert ("GET", "/api/v4/projects/ml%2Fllm-gitops") in gitlab.state.requests
    assert [path for method, path in gitlab.state.requests if method == "POST"] == [
        "/api/v4/projects/42/uploads",
        "/api/v4/projects/42/uploads",
        "/api/v4/projects/ml%2Fllm-gitops/merge_requests/7/notes",
    ]


def test_only_pngs_beside_the_report_are_uploaded_and_other_links_stay(gitlab, tmp_path):
    """The report quotes dataset text: a link it quotes must not publish a file of the runner."""
    (tmp_path / "secret.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "fake.png").write_text("GITLAB_REPORT_TOKEN=glpat-not-a-picture")
    report = tmp_path / "report" / "mr.md"
    links = "![a](mr-loss.png) ![b](../secret.png) ![c](sub/x.png) ![d](/etc/passwd) ![e](fake.png) ![f](.ci/env)\n"
    report.write_text(links)
    post_report(report, ci_env(gitlab))
    assert gitlab.state.uploads == []
    assert gitlab.state.notes[0]["body"] == f"{MARKER}\n{links}"


def test_an_uploads_marker_quoted_in_the_report_is_not_trusted(gitlab, tmp_path):
    """Only the marker line this client writes after MARKER counts: one in the report's text (say, quoted
    from a dataset row) must not make the note link a picture it did not upload."""
    report = write_report(tmp_path, png((200, 0, 0)), png((0, 0, 200)))
    with_pictures = report.read_text()
    loss = hashlib.sha256((tmp_path / "mr-loss.png").read_bytes()).hexdigest()
    planted = f'<!-- llm-gitops:uploads {{"{loss}": "/uploads/{"e" * 32}/evil.png"}} -->\n'
    report.write_text(f"no pictures yet\n{planted}")
    post_report(report, ci_env(gitlab))
    report.write_text(with_pictures + planted)
    post_report(report, ci_env(gitlab))
    body = gitlab.state.notes[0]["body"]
    assert len(gitlab.state.uploads) == 2
    assert upload_urls(body)[:2] == [upload["url"] for upload in gitlab.state.uploads]


# --- trust boundary ---


def test_a_line_starting_with_a_slash_is_escaped_so_gitlab_runs_no_quick_action(gitlab, tmp_path):
    report = tmp_path / "mr.md"
    report.write_text("Gate cases: added `x`\n/label ~train-candidate\n  /merge\nkeep a/b and `/approve` inline\n")
    post_report(report, ci_env(gitlab))
    body = gitlab.state.notes[0]["body"]
    assert body == (
        f"{MARKER}\nGate cases: added `x`\n\\/label ~train-candidate\n  \\/merge\nkeep a/b and `/approve` inline\n"
    )
    assert not [line for line in body.splitlines() if line.lstrip().startswith("/")]


def test_a_redirect_to_another_host_is_refused_and_the_token_never_reaches_it(tmp_path):
    """GitLab (the double) answers 302 to a second server on another port: requests would resend the
    PRIVATE-TOKEN header there; the client refuses instead."""
    other_state = GitLabState(token="glpat-other-host", user=HUMAN)
    with GitLabDouble(other_state) as other, GitLabDouble(GitLabState(token=TOKEN, user=BOT)) as api:
        api.state.redirect_to = other.url.removesuffix("/api/v4")
        report = tmp_path / "mr.md"
        report.write_text("report")
        with pytest.raises(PipelineError) as error:
            post_report(report, ci_env(api))
    assert str(error.value) == (
        f"GitLab API GET /api/v4/user: HTTP 302 redirect to another host ({other.url.removesuffix('/api/v4')}), "
        "not followed so the token is not sent there: check CI_API_V4_URL"
    )
    assert api.state.headers[0]["PRIVATE-TOKEN"] == TOKEN  # it was sent to the configured host only
    assert other_state.requests == [] and not any("PRIVATE-TOKEN" in h for h in other_state.headers)
