""".gitlab-ci.yml: valid for GitLab, the right jobs per pipeline kind, and the CPU jobs really run.

Tools, installed once per machine into the tool cache (LLM_GITOPS_CACHE, default ~/.cache/llm-gitops):
- check-jsonschema (its own small virtualenv), validating against the GitLab CI schema it vendors;
- gitlab-ci-local from npm, pinned to a release that runs on Node 20 (4.74+ needs Node 22), plus rsync
  (Debian package) which it needs to run jobs.
gitlab-ci-local has no merge request or tag mode: each scenario sets GitLab's predefined variables the
way GitLab sets them for that pipeline (CI_PIPELINE_SOURCE, no CI_COMMIT_BRANCH in MR and tag pipelines,
CI_MERGE_REQUEST_*, CI_COMMIT_TAG). It ignores `tags`, `resource_group` and `timeout`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from gitlab_api_double import GitLabDouble, GitLabState
from scratch_project import copy_project, git

from pipeline.gitlab_notes import MARKER

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLM_GITOPS_CACHE", Path.home() / ".cache" / "llm-gitops"))
GITLAB_CI_LOCAL_VERSION = "4.73.0"
CHECK_JSONSCHEMA_VERSION = "0.39.0"
PROJECT_ID = "42"
# predefined variables the scenarios set on purpose (gitlab-ci-local would warn about each)
PREDEFINED = ",".join(
    (
        *("CI_PIPELINE_SOURCE", "CI_PROJECT_ID", "CI_COMMIT_BRANCH", "CI_COMMIT_TAG", "CI_COMMIT_REF_NAME"),
        *("CI_OPEN_MERGE_REQUESTS", "CI_API_V4_URL"),
    )
)
NEW_CONVERSATION = {
    "messages": [
        {"role": "user", "content": "How do I make the Psion beep in OPL?"},
        {"role": "assistant", "content": "Use BEEP with a duration and a pitch:\nPROC main:\n  BEEP 5,300\nENDP"},
    ]
}

MERGE_REQUEST = {
    "CI_PIPELINE_SOURCE": "merge_request_event",
    "CI_MERGE_REQUEST_IID": "7",
    "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main",
    "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME": "more-data",
    "CI_PROJECT_ID": PROJECT_ID,
    "CI_MERGE_REQUEST_SOURCE_PROJECT_ID": PROJECT_ID,
}
NEVER_IN_MR = {
    "retrain": "never",
    "commit-lock": "never",
    "deploy": "never",
    "deploy-tag": "never",
    "rollback": "never",
    "retention": "never",
}
CHECKS = {"lint": "on_success", "tests": "on_success", "validate-data": "on_success"}
NO_CANDIDATE = {"train-candidate": "never", "candidate-report": "never"}
# the sweep, on one rig or fanned out: manual, on the default branch only (the protected runner, it pushes)
SWEEPS = {"sweep": "manual", "sweep-fanout": "manual", "sweep-fanout-run": "manual"}
NO_SWEEPS = {job: "never" for job in SWEEPS}
CHILD = "sweep-child.yml"


# --- tools (installed once, cached) ---


def ensure_rsync() -> None:
    if shutil.which("rsync"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("gitlab-ci-local needs rsync (apt-get install rsync)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "rsync"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


@pytest.fixture(scope="session")
def gitlab_ci_local() -> Path:
    if not shutil.which("npm") or not shutil.which("node"):
        pytest.skip("gitlab-ci-local needs Node.js and npm")
    prefix = CACHE / "npm"
    package = prefix / "node_modules" / "gitlab-ci-local" / "package.json"
    if not package.is_file() or json.loads(package.read_text())["version"] != GITLAB_CI_LOCAL_VERSION:
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                f"gitlab-ci-local@{GITLAB_CI_LOCAL_VERSION}",
            ],
            check=True,
            capture_output=True,
        )
    ensure_rsync()
    return prefix / "node_modules" / ".bin" / "gitlab-ci-local"


@pytest.fixture(scope="session")
def check_jsonschema() -> Path:
    venv = CACHE / f"check-jsonschema-{CHECK_JSONSCHEMA_VERSION}"
    executable = venv / "bin" / "check-jsonschema"
    complete = venv / ".complete"  # written last: an interrupted install is redone, never half-used
    if not complete.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [venv / "bin" / "pip", "install", "-q", f"check-jsonschema=={CHECK_JSONSCHEMA_VERSION}"],
            check=True,
            capture_output=True,
        )
        complete.touch()
    return executable


def stamped_venv() -> Path | None:
    """A virtualenv `make setup` considers complete (its stamp for these requirements), for the jobs to reuse."""
    key = subprocess.run(
        "cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    candidates = [os.environ.get("VENV"), sys.prefix, str(CACHE / f"venv-{key}")]
    for candidate in filter(None, candidates):
        venv = (ROOT / candidate).resolve()
        if (venv / f".installed-{key}").is_file():
            return venv
    return None


# --- a scratch project: the working tree as `main` on a local origin, and an MR branch adding data ---


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's files (tracked and new, as `git ls-files` sees them) committed as `main`, pushed to a
    bare origin; then a branch `more-data` that adds one conversation. The base model is `tiny` so the
    prepare job takes seconds, not a SmolLM2 tokenizer load."""
    top = tmp_path_factory.mktemp("gitlab-ci")
    repo = copy_project(top / "repo")
    git(top, "init", "-q", "--bare", "origin.git")
    git(repo, "remote", "add", "origin", str(top / "origin.git"))
    git(repo, "push", "-q", "origin", "main")
    git(repo, "remote", "set-head", "origin", "main")
    git(repo, "checkout", "-q", "-b", "more-data")
    with open(repo / "data" / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(NEW_CONVERSATION) + "\n")
    git(repo, "commit", "-q", "-a", "-m", "One more OPL conversation")
    return repo


def job_env() -> dict[str, str]:
    """The test's environment without GitLab's variables (CI itself may run under GitLab)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "GITLAB_", "PYTEST_"))}


def gcl(binary: Path, repo: Path, *args: str, variables: dict[str, str] | None = None, unset: tuple[str, ...] = ()):
    command = [str(binary), "--ignore-predefined-vars", PREDEFINED, "--no-color", *args]
    for name, value in (variables or {}).items():
        command += ["--variable", f"{name}={value}"]
    for name in unset:
        command += ["--unset-variable", name]
    return subprocess.run(command, cwd=repo, env=job_env(), capture_output=True, text=True, timeout=900)


def jobs(
    binary: Path, repo: Path, branch: str, variables: dict[str, str], unset: tuple[str, ...] = (), file: str = ""
) -> dict:
    """{job: when} of the pipeline gitlab-ci-local builds for `branch` with these variables (from `file`)."""
    git(repo, "checkout", "-q", branch)
    result = gcl(binary, repo, *(("--file", file) if file else ()), "--list-json", variables=variables, unset=unset)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()  # log lines (warnings) may come before the JSON array
    listed = json.loads("\n".join(lines[lines.index("[") :]))
    return {job["name"]: job["when"] for job in listed}


# --- schema ---


def test_ci_file_validates_against_gitlabs_schema_and_a_typo_does_not(check_jsonschema, tmp_path):
    command = [str(check_jsonschema), "--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci"]
    ok = subprocess.run([*command, str(ROOT / ".gitlab-ci.yml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok -- validation done" in ok.stdout

    typo = tmp_path / ".gitlab-ci.yml"
    typo.write_text((ROOT / ".gitlab-ci.yml").read_text().replace("when: manual", "when: manuel"))
    bad = subprocess.run([*command, str(typo)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "'manuel' is not one of" in bad.stdout


# --- which jobs run ---


def test_merge_request_pipeline_checks_and_reports_without_gpu_or_deploy(gitlab_ci_local, project):
    listed = jobs(gitlab_ci_local, project, "more-data", MERGE_REQUEST, unset=("CI_COMMIT_BRANCH",))
    assert listed == {**CHECKS, "mr-report": "on_success", **NO_CANDIDATE, **NEVER_IN_MR, **NO_SWEEPS}


def test_train_candidate_label_adds_the_gpu_candidate_and_its_report(gitlab_ci_local, project):
    labelled = {**MERGE_REQUEST, "CI_MERGE_REQUEST_LABELS": "dataset,train-candidate"}
    listed = jobs(gitlab_ci_local, project, "more-data", labelled, unset=("CI_COMMIT_BRANCH",))
    assert listed == {
        **CHECKS,
        "mr-report": "on_success",
        "train-candidate": "on_success",
        "candidate-report": "always",  # reports the gate table even when the candidate failed it
        **NEVER_IN_MR,
        **NO_SWEEPS,
    }
    by_variable = jobs(
        gitlab_ci_local, project, "more-data", {**MERGE_REQUEST, "TRAIN_CANDIDATE": "true"}, ("CI_COMMIT_BRANCH",)
    )
    assert by_variable["train-candidate"] == "on_success"
    similar_label = {**MERGE_REQUEST, "CI_MERGE_REQUEST_LABELS": "no-train-candidate-please"}
    assert (
        jobs(gitlab_ci_local, project, "more-data", similar_label, ("CI_COMMIT_BRANCH",))["train-candidate"] == "never"
    )


def test_fork_merge_request_never_reaches_the_gpu_runner_even_with_the_label(gitlab_ci_local, project):
    fork = {
        **MERGE_REQUEST,
        "CI_MERGE_REQUEST_SOURCE_PROJECT_ID": "4242",
        "CI_MERGE_REQUEST_LABELS": "train-candidate",
        "TRAIN_CANDIDATE": "true",
    }
    listed = jobs(gitlab_ci_local, project, "more-data", fork, unset=("CI_COMMIT_BRANCH",))
    assert listed == {**CHECKS, "mr-report": "on_success", **NO_CANDIDATE, **NEVER_IN_MR, **NO_SWEEPS}


def test_default_branch_push_checks_retrains_deploys_and_offers_a_manual_rollback(gitlab_ci_local, project):
    listed = jobs(gitlab_ci_local, project, "main", {"CI_PROJECT_ID": PROJECT_ID})
    assert listed == {
        **CHECKS,
        "mr-report": "never",
        **NO_CANDIDATE,
        "retrain": "on_success",
        "commit-lock": "on_success",
        "deploy": "on_success",
        "deploy-tag": "never",
        "rollback": "manual",
        "retention": "never",  # scheduled pipelines only
        **SWEEPS,
    }


def test_model_tag_pipeline_deploys_that_tag_only(gitlab_ci_local, project):
    tag = {"CI_COMMIT_TAG": "model-v3", "CI_COMMIT_REF_NAME": "model-v3", "CI_PROJECT_ID": PROJECT_ID}
    listed = jobs(gitlab_ci_local, project, "main", tag, unset=("CI_COMMIT_BRANCH",))
    assert {job: when for job, when in listed.items() if when != "never"} == {
        "deploy-tag": "on_success",
        "rollback": "manual",
    }
    other_tag = {**tag, "CI_COMMIT_TAG": "v1.0", "CI_COMMIT_REF_NAME": "v1.0"}
    assert set(jobs(gitlab_ci_local, project, "main", other_tag, unset=("CI_COMMIT_BRANCH",)).values()) == {"never"}


SCHEDULE = {"CI_PIPELINE_SOURCE": "schedule", "CI_PROJECT_ID": PROJECT_ID}


def test_a_scheduled_pipeline_runs_retention_alone(gitlab_ci_local, project):
    """A schedule on the default branch (CI/CD > Schedules) would otherwise start every default-branch job."""
    listed = jobs(gitlab_ci_local, project, "main", SCHEDULE)
    assert {job: when for job, when in listed.items() if when != "never"} == {"retention": "on_success"}


def test_the_retention_job_runs_on_the_protected_runner_with_the_deploy_variables_and_keeps_its_plan():
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    job = resolved(ci, "retention")
    assert job["tags"] == ["gpu"]
    assert job["rules"] == [{"if": '$CI_PIPELINE_SOURCE == "schedule"'}]
    assert job["environment"] == {"name": "production", "action": "access"}  # scoped variables, no deployment
    assert job["resource_group"] == "production"  # never while deploy or rollback moves latest
    assert job["artifacts"]["paths"] == ["retention/"] and job["artifacts"]["when"] == "always"


def test_branch_pushes_start_no_pipeline_of_their_own(gitlab_ci_local, project):
    """A feature branch is covered by its MR pipeline; with an open MR a branch pipeline would be a duplicate."""
    plain = jobs(gitlab_ci_local, project, "more-data", {"CI_PROJECT_ID": PROJECT_ID})
    with_open_mr = jobs(
        gitlab_ci_local, project, "more-data", {"CI_PROJECT_ID": PROJECT_ID, "CI_OPEN_MERGE_REQUESTS": "ml/llm!7"}
    )
    assert set(plain.values()) == set(with_open_mr.values()) == {"never"}


def test_the_sweep_jobs_are_manual_only_on_the_default_branch(gitlab_ci_local, project):
    fork = {**MERGE_REQUEST, "CI_MERGE_REQUEST_SOURCE_PROJECT_ID": "4242"}
    pipelines = {
        "merge-request": jobs(gitlab_ci_local, project, "more-data", MERGE_REQUEST, ("CI_COMMIT_BRANCH",)),
        "fork": jobs(gitlab_ci_local, project, "more-data", fork, ("CI_COMMIT_BRANCH",)),
        "default-branch": jobs(gitlab_ci_local, project, "main", {"CI_PROJECT_ID": PROJECT_ID}),
        "branch": jobs(gitlab_ci_local, project, "more-data", {"CI_PROJECT_ID": PROJECT_ID}),
        "tag": jobs(
            gitlab_ci_local,
            project,
            "main",
            {"CI_COMMIT_TAG": "model-v3", "CI_PROJECT_ID": PROJECT_ID},
            ("CI_COMMIT_BRANCH",),
        ),
    }
    whens = {kind: {job: listed[job] for job in SWEEPS} for kind, listed in pipelines.items()}
    assert whens == {
        "merge-request": NO_SWEEPS,
        "fork": NO_SWEEPS,
        "default-branch": SWEEPS,
        "branch": NO_SWEEPS,
        "tag": NO_SWEEPS,
    }
    # gitlab-ci-local ignores tags and resource_group: read them from the file GitLab reads
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    job, rig = ci["sweep"], ci[".rig"]
    assert job["extends"] == [".rig", ".sweep-rules"] and rig["tags"] == ["gpu"] and job["resource_group"] == "gpu-rig"
    assert job["variables"]["SWEEP"] == "sweeps/recipe.yaml" and job["artifacts"]["paths"] == ["reports/sweep/"]
    assert 'python -m pipeline.sweep run "$SWEEP" $push' in job["script"]
    # fanned out: the generator needs the push token, so it runs where the token is (the protected runner)
    fanout, run = ci["sweep-fanout"], ci["sweep-fanout-run"]
    assert fanout["tags"] == ["gpu"] and fanout["artifacts"]["paths"] == [CHILD]
    assert 'python -m pipeline.sweep fanout "$SWEEP" --out sweep-child.yml' in fanout["script"]
    # after it by stage, as GitLab's own include:artifact example (gitlab-ci-local 4.73 refuses `needs` on a
    # manual job, even from another manual job)
    assert "needs" not in run and ci["stages"].index(fanout["stage"]) < ci["stages"].index(run["stage"])
    assert run["trigger"] == {"include": [{"artifact": CHILD, "job": "sweep-fanout"}], "strategy": "depend"}


def test_the_fanned_out_sweep_is_a_valid_child_pipeline_of_one_job_per_point_and_the_collecting_job(
    gitlab_ci_local, check_jsonschema, project
):
    """What sweep-fanout-run starts: the generated file, as GitLab's schema and gitlab-ci-local read it."""
    git(project, "checkout", "-q", "main")
    child = project / CHILD
    generate = [sys.executable, "-m", "pipeline.sweep", "fanout", "sweeps/recipe.yaml", "--out", CHILD]
    try:
        subprocess.run(generate, cwd=project, env=job_env(), capture_output=True, text=True, check=True)
        command = [str(check_jsonschema), "--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci"]
        ok = subprocess.run([*command, str(child)], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr

        # GitLab starts the child pipeline with CI_PIPELINE_SOURCE=parent_pipeline, as gitlab-ci-local does
        parent = {"CI_PIPELINE_SOURCE": "parent_pipeline", "CI_PROJECT_ID": PROJECT_ID}
        listed = jobs(gitlab_ci_local, project, "main", parent, file=CHILD)
        points = {f"recipe-{i}": "on_success" for i in range(1, 5)}
        assert listed == {**points, "sweep-collect": "always"}
        chain = gcl(gitlab_ci_local, project, "--file", CHILD, "--validate-dependency-chain", variables=parent)
        assert chain.returncode == 0 and "All job dependencies are valid" in chain.stdout, chain.stdout + chain.stderr
        generated = yaml.safe_load(child.read_text())
        assert {name: generated[name]["tags"] for name in listed} == {name: ["gpu"] for name in listed}
        assert generated["sweep-collect"]["needs"] == list(points)
    finally:
        child.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("branch", "variables", "unset"),
    [
        ("more-data", MERGE_REQUEST, ("CI_COMMIT_BRANCH",)),
        ("more-data", {**MERGE_REQUEST, "CI_MERGE_REQUEST_LABELS": "train-candidate"}, ("CI_COMMIT_BRANCH",)),
        ("main", {"CI_PROJECT_ID": PROJECT_ID}, ()),
        ("main", {"CI_COMMIT_TAG": "model-v3", "CI_PROJECT_ID": PROJECT_ID}, ("CI_COMMIT_BRANCH",)),
    ],
    ids=["merge-request", "merge-request-candidate", "default-branch", "tag"],
)
def test_every_needed_job_exists_in_its_pipeline(gitlab_ci_local, project, branch, variables, unset):
    git(project, "checkout", "-q", branch)
    result = gcl(gitlab_ci_local, project, "--validate-dependency-chain", variables=variables, unset=unset)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All job dependencies are valid" in result.stdout


# --- jobs that really run (shell executor, this machine) ---

RECORDER = '''"""Test double of `python -m pipeline.NAME`: records its arguments."""

import json
import sys

with open("NAME-calls.jsonl", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
'''


@contextlib.contextmanager
def recorded(project: Path, name: str) -> Iterator[Callable[[], list[list[str]]]]:
    """pipeline/<name>.py replaced, in the scratch copy, by a recorder (the job's wiring is under test); yields
    `calls()`: the argument lists recorded since the last call."""
    recorder = project / "pipeline" / f"{name}.py"
    original = recorder.read_text() if recorder.is_file() else None
    log = project / f"{name}-calls.jsonl"
    recorder.write_text(RECORDER.replace("NAME", name))

    def calls() -> list[list[str]]:
        found = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        log.unlink(missing_ok=True)
        return found

    try:
        yield calls
    finally:
        log.unlink(missing_ok=True)
        if original is None:
            recorder.unlink()
        else:
            recorder.write_text(original)


@pytest.fixture
def venv_for_jobs() -> Path:
    venv = stamped_venv()
    if venv is None:
        pytest.skip("no virtualenv that `make setup` considers complete (run the tests through `make test`)")
    return venv


def test_manual_rollback_job_lists_then_rolls_back_to_the_given_tag(gitlab_ci_local, project, venv_for_jobs):
    """pipeline/rollback.py is replaced, in the scratch copy, by a recorder: the job's wiring is under test."""
    git(project, "checkout", "-q", "main")
    with recorded(project, "rollback") as calls:
        variables = {"VENV": str(venv_for_jobs), "CI_PROJECT_ID": PROJECT_ID}
        ran = gcl(
            gitlab_ci_local,
            project,
            "--manual",
            "rollback",
            "rollback",
            variables={**variables, "ROLLBACK_TO": "model-v2"},
        )
        assert ran.returncode == 0, ran.stdout[-3000:]
        assert calls() == [["--list"], ["--to", "model-v2"]]

        refused = gcl(gitlab_ci_local, project, "--manual", "rollback", "rollback", variables=variables)
        assert "set ROLLBACK_TO=<tag>" in refused.stdout
        assert calls() == [["--list"]]


def test_the_retention_job_is_a_dry_run_unless_retention_apply_is_true(gitlab_ci_local, project, venv_for_jobs):
    """pipeline/retention.py is replaced, in the scratch copy, by a recorder: the job's wiring is under test."""
    git(project, "checkout", "-q", "main")
    hosts = ["hosts", "--plan-out", "retention/hosts-plan.json"]
    registry = ["registry", "--plan-out", "retention/registry-plan.json"]
    with recorded(project, "retention") as calls:
        variables = {**SCHEDULE, "VENV": str(venv_for_jobs)}
        dry = gcl(gitlab_ci_local, project, "retention", variables=variables)
        assert dry.returncode == 0, dry.stdout[-3000:]
        assert "dry run (RETENTION_APPLY is not true)" in dry.stdout
        assert calls() == [hosts, registry]

        applied = gcl(gitlab_ci_local, project, "retention", variables={**variables, "RETENTION_APPLY": "true"})
        assert applied.returncode == 0, applied.stdout[-3000:]
        assert calls() == [[hosts[0], "--apply", *hosts[1:]], [registry[0], "--apply", *registry[1:]]]


def test_the_manual_sweep_fanout_job_writes_the_child_pipeline_and_refuses_without_a_push_token(
    gitlab_ci_local, project, venv_for_jobs
):
    git(project, "checkout", "-q", "main")
    artifact = project / ".gitlab-ci-local" / "artifacts" / "sweep-fanout" / CHILD  # what the trigger includes
    variables = {"VENV": str(venv_for_jobs), "CI_PROJECT_ID": PROJECT_ID}
    try:
        refused = gcl(gitlab_ci_local, project, "--manual", "sweep-fanout", "sweep-fanout", variables=variables)
        # the job fails (gitlab-ci-local exits 0: a manual job is allow_failure) before writing anything
        assert "no GITLAB_PUSH_TOKEN (protected: default branch only)" in refused.stdout, refused.stdout[-3000:]
        assert not (project / CHILD).exists() and not artifact.exists()

        token = {**variables, "GITLAB_PUSH_TOKEN": "glpat-sweep-test"}
        ran = gcl(gitlab_ci_local, project, "--manual", "sweep-fanout", "sweep-fanout", variables=token)
        assert ran.returncode == 0, ran.stdout[-3000:]
        generated = yaml.safe_load(artifact.read_text())
        assert [name for name in generated if name.startswith("recipe-")] == [f"recipe-{i}" for i in range(1, 5)]
        assert "sweep-collect" in generated
    finally:
        (project / CHILD).unlink(missing_ok=True)
        artifact.unlink(missing_ok=True)


@pytest.mark.slow
def test_merge_request_cpu_jobs_run_and_post_the_report_note(gitlab_ci_local, project, venv_for_jobs):
    """The whole MR pipeline through gitlab-ci-local: lint, a quick test selection (PYTEST_ARGS, so the suite
    does not recurse into this test), dataset validation with `dvc repro prepare`, and the report posted to
    a local double of GitLab's notes API (tests/gitlab_api_double.py)."""
    git(project, "checkout", "-q", "more-data")
    state = GitLabState(token="glpat-ci-test", user={"id": 5, "username": "report-bot"}, project_id=PROJECT_ID)
    with GitLabDouble(state) as api:
        variables = {
            **MERGE_REQUEST,
            "VENV": str(venv_for_jobs),
            "PYTEST_ARGS": "tests/test_gitlab_notes.py -q",
            "GITLAB_REPORT_TOKEN": "glpat-ci-test",
            "CI_API_V4_URL": api.url,
        }
        ran = gcl(gitlab_ci_local, project, "--concurrency", "1", variables=variables, unset=("CI_COMMIT_BRANCH",))
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-6000:]
    for job in ("lint", "tests", "validate-data", "mr-report"):
        assert f"PASS  {job}" in output
    assert "14 passed" in output  # the selected tests really ran
    assert "glpat-ci-test" not in output

    assert len(state.notes) == 1
    note = state.notes[0]["body"]
    assert note.startswith(MARKER)
    assert "| `data/train.jsonl` | 56 → 57 | 1 | 0 | 0 |" in note
    assert "| added | 57 | How do I make the Psion beep in OPL? |" in note
    assert "Lengths are **tokens** of `tiny` after its chat template." in note
    assert "Inputs changed for: `prepare`, `base`." in note
    # the note is the report: the token-length histogram uploaded once, its link pointing at the upload
    assert [upload["filename"] for upload in state.uploads] == ["mr-data-lengths.png"]
    url = state.uploads[0]["url"]
    marker, body = note.split("\n", 2)[1], note.split("\n", 2)[2]
    assert marker.startswith("<!-- llm-gitops:uploads ") and url in marker
    report = (project / "reports" / "mr.md").read_text()
    assert "](mr-data-lengths.png)" in report and body == report.replace("](mr-data-lengths.png)", f"]({url})")
    prepared = json.loads((project / "metrics" / "data.json").read_text())
    assert prepared["train"]["conversations"] == 57


# --- the trust boundary, read from the file GitLab reads (gitlab-ci-local ignores tags and environments) ---

PROTECTED_ONLY = ("retrain", "commit-lock", "deploy", "deploy-tag", "rollback", "retention", "sweep", "sweep-fanout")
PUSH_TOKEN_USES = ("GITLAB_PUSH_TOKEN", ".ci/push-auth", ".ci/commit-lock")


def resolved(ci: dict, name: str) -> dict:
    """A job with its `extends` merged in, as GitLab merges them (later wins, mappings merged deeply)."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    job = ci[name]
    parents = job.get("extends", [])
    result: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        result = merge(result, resolved(ci, parent))
    return merge(result, {k: v for k, v in job.items() if k != "extends"})


def script_text(job: dict) -> str:
    """The job's script lines and the text of every .ci/ script they run (recursively)."""
    lines = [*job.get("before_script", []), *job.get("script", [])]
    text, seen = "\n".join(lines), set()
    while found := set(re.findall(r"\.ci/[\w-]+", text)) - seen:
        seen |= found
        text += "".join("\n" + (ROOT / path).read_text() for path in sorted(found) if (ROOT / path).is_file())
    return text


def test_no_merge_request_job_shares_a_runner_tag_with_retrain_deploy_or_rollback(gitlab_ci_local, project):
    """MR code (even with the label, even this project's own) runs on the candidate runner, never on the
    protected one that has the NAS write path, the push token and the deploy variables."""
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    protected_tags = {tag for name in PROTECTED_ONLY for tag in resolved(ci, name)["tags"]}
    labelled = {**MERGE_REQUEST, "CI_MERGE_REQUEST_LABELS": "train-candidate", "TRAIN_CANDIDATE": "true"}
    in_mr = jobs(gitlab_ci_local, project, "more-data", labelled, ("CI_COMMIT_BRANCH",))
    running = sorted(name for name, when in in_mr.items() if when != "never")

    assert protected_tags == {"gpu"}
    assert {"train-candidate", "candidate-report", "mr-report"} <= set(running)
    assert {
        name: resolved(ci, name)["tags"] for name in running if protected_tags & set(resolved(ci, name)["tags"])
    } == {}
    assert resolved(ci, "train-candidate")["tags"] == ["gpu-candidate"]


def test_every_job_that_can_see_the_push_token_has_an_environment_and_retrain_has_none():
    """GITLAB_PUSH_TOKEN is scoped to the `git-push` environment: only jobs naming it receive it, and the
    12-hour `dvc repro` is not one of them (the push is its own job after retrain)."""
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    names = [name for name, job in ci.items() if isinstance(job, dict) and not name.startswith(".") and "script" in job]
    pushing = {name for name in names if any(use in script_text(resolved(ci, name)) for use in PUSH_TOKEN_USES)}

    assert pushing == {"commit-lock", "sweep", "sweep-fanout"}
    assert {name: resolved(ci, name).get("environment", {}).get("name") for name in pushing} == dict.fromkeys(
        pushing, "git-push"
    )
    retrain = resolved(ci, "retrain")
    assert "environment" not in retrain and "dvc repro" in script_text(retrain)
    assert resolved(ci, "commit-lock")["needs"] == [{"job": "retrain", "artifacts": True}]
    assert "dvc.lock" in retrain["artifacts"]["paths"]


def test_deploy_jobs_have_a_timeout_of_at_most_two_hours_and_pull_what_ships():
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())
    for name in ("deploy", "deploy-tag", "rollback"):
        job = resolved(ci, name)
        amount, unit = re.fullmatch(r"(\d+)\s*(m|h)", job["timeout"]).groups()
        assert int(amount) * (60 if unit == "h" else 1) <= 120, name
        assert job["environment"]["name"] == "production" and job["resource_group"] == "production"
    for name in ("deploy", "deploy-tag"):
        assert any("pipeline.deploy --pull" in line for line in ci[name]["script"])
        assert not any("dvc pull modelfile quantize" in line for line in ci[name]["script"])


@pytest.mark.parametrize("script", [".ci/env", ".ci/run"])
def test_merge_request_and_protected_jobs_never_share_a_writable_cache(script, tmp_path):
    """The venv, npm, Go builds (the Ollama binary), check-jsonschema and the converter copy all live under
    LLM_GITOPS_CACHE, which .ci/cache-env keys by CI_COMMIT_REF_PROTECTED; both entry points source it
    before they pick the venv."""
    report = "echo $LLM_GITOPS_CACHE; echo $GOBIN; echo $GOCACHE; echo $npm_config_cache"

    def caches(protected: str) -> list[str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CI_COMMIT_REF_PROTECTED": protected}
        env["LLM_GITOPS_CACHE"] = str(tmp_path / "runner-cache")  # what the runner's config sets
        result = subprocess.run(
            ["bash", "-c", f". .ci/cache-env; . .ci/cache-env; {report}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    protected, merge_request = caches("true"), caches("false")

    assert protected[0] == str(tmp_path / "runner-cache" / "protected")
    assert merge_request[0] == str(tmp_path / "runner-cache" / "unprotected")
    for root, paths in ((protected[0], protected), (merge_request[0], merge_request)):
        assert all(path.startswith(root + "/") for path in paths[1:])
    text = (ROOT / script).read_text()
    assert text.index(". .ci/cache-env") < text.index("export VENV=")
    assert "venv-$key" in text and "$LLM_GITOPS_CACHE/venv-$key" in text


def loss_tsv(losses: list[float]) -> str:
    return "step\tepoch\tloss\n" + "".join(f"{i * 7 + 1}\t{i / 6:.4f}\t{v:.6f}\n" for i, v in enumerate(losses))


@pytest.mark.slow
def test_candidate_report_job_posts_the_note_with_its_pictures_uploaded_once(gitlab_ci_local, project, venv_for_jobs):
    """`candidate-report` (the `mr-report` job after a candidate) on the artifacts `train-candidate` leaves:
    the candidate's gate and loss curves, and the target's curves it exported. The rig cannot run here, so
    the test writes those artifacts where gitlab-ci-local keeps a job's artifacts. The note goes to the local
    double of GitLab's API (tests/gitlab_api_double.py: notes and project uploads as GitLab documents them)."""
    git(project, "checkout", "-q", "more-data")
    artifacts = project / ".gitlab-ci-local" / "artifacts" / "train-candidate"
    gate = json.loads((project / "metrics" / "gate.json").read_text())
    candidate = {**gate, "learn": {**gate["learn"], "q4_k_m": 1.0}, "keep": {**gate["keep"], "q4_k_m": 0.9167}}
    files = {
        "metrics/gate.json": json.dumps(candidate, indent=2),
        "reports/gate.md": "# Gate report\n\n**PASSED**: ships `q4_k_m`\n",
        "plots/train/loss.tsv": loss_tsv([3.2, 2.1, 1.4, 1.0, 0.8, 0.7]),
        "plots/eval/loss.tsv": loss_tsv([3.0, 2.0, 1.5, 1.3, 1.2, 1.2]),
        "reports/target-plots/train/loss.tsv": loss_tsv([3.2, 2.3, 1.7, 1.3, 1.1, 1.0]),
        "reports/target-plots/eval/loss.tsv": loss_tsv([3.0, 2.2, 1.8, 1.6, 1.5, 1.5]),
    }
    for path, text in files.items():
        (artifacts / path).parent.mkdir(parents=True, exist_ok=True)
        (artifacts / path).write_text(text)
    state = GitLabState(token="glpat-ci-test", user={"id": 5, "username": "report-bot"}, project_id=PROJECT_ID)
    variables = {
        **MERGE_REQUEST,
        "CI_MERGE_REQUEST_LABELS": "train-candidate",
        "VENV": str(venv_for_jobs),
        "GITLAB_REPORT_TOKEN": "glpat-ci-test",
    }
    try:
        with GitLabDouble(state) as api:
            runs = [
                gcl(
                    gitlab_ci_local,
                    project,
                    "--shell-isolation",  # a build directory of its own, the needed job's artifacts copied in
                    "candidate-report",
                    variables={**variables, "CI_API_V4_URL": api.url},
                    unset=("CI_COMMIT_BRANCH",),
                )
                for _ in range(2)
            ]
        for ran in runs:
            output = ran.stdout + ran.stderr
            assert ran.returncode == 0 and "PASS  candidate-report" in output, output[-6000:]
            assert "glpat-ci-test" not in output

        assert len(state.notes) == 1  # created, then updated in place
        note = state.notes[0]["body"]
        assert note.startswith(MARKER)
        assert "| `data/train.jsonl` | 56 → 57 | 1 | 0 | 0 |" in note
        assert "**Verdict: passed.**" in note
        assert [upload["filename"] for upload in state.uploads] == ["mr-data-lengths.png", "mr-loss.png", "mr-gate.png"]
        for upload in state.uploads:
            assert f"]({upload['url']})" in note
            assert upload["data"] == (project / "reports" / upload["filename"]).read_bytes()  # the job's artifact
            assert upload["data"][:8] == b"\x89PNG\r\n\x1a\n" and len(upload["data"]) <= 150_000
        assert "![Loss curves: train and eval loss per step" in note and "![Gate chart:" in note
        report = (project / "reports" / "mr.md").read_text()
        assert "](mr-loss.png)" in report and "](mr-gate.png)" in report  # the artifact links the files beside it
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
        for leftover in (project / "reports").glob("mr*"):
            leftover.unlink()
