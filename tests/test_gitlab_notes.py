"""The MR note client against a local double of GitLab's notes API (tests/gitlab_api_double.py: GitLab
itself cannot run here; the double follows the documented API: PRIVATE-TOKEN, pagination headers, POST/PUT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gitlab_api_double import GitLabDouble, GitLabState

from pipeline.common import PipelineError
from pipeline.gitlab_notes import MARKER, MergeRequest, NotesClient, post_report

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
    for number in range(150):
        gitlab.state.add_note(f"review comment {number}", HUMAN)
    ours = gitlab.state.add_note(f"{MARKER}\nold report", BOT)
    for number in range(60):
        gitlab.state.add_note(f"later comment {number}", HUMAN)

    client = NotesClient(MergeRequest(gitlab.url, "42", "7"), TOKEN)
    assert client.upsert("new report") == ("updated", ours["id"])

    assert len(gitlab.state.notes) == 211
    assert ours["body"] == f"{MARKER}\nnew report"
    pages = [path for method, path in gitlab.state.requests if method == "GET" and "/notes" in path]
    assert [path.split("page=")[-1].split("&")[0] for path in pages] == ["1", "2", "3"]


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
