"""`python -m pipeline.sweep` on a scratch copy of the project with the tiny model: real DVC experiments.

One 2x2 sweep: train.max_steps [1, 2] x gate.learn_min_score [0.0, 1.0]. tiny learns nothing the gate
cases ask, so the learn_min_score 1.0 points fail the gate: they must be recorded and ranked last. Only
two distinct trainings: the gate-only points reuse DVC's run-cache for every stage before the gate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from gitlab_api_double import GitLabDouble, GitLabState

pytestmark = pytest.mark.slow  # see pyproject.toml's markers

SWEEP = """\
name: tiny
max_points: 4
grid:
  train.max_steps: [1, 2]
  gate.learn_min_score: [0.0, 1.0]
"""


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        command, cwd=cwd, env={**os.environ, "PATH": path, **(env or {})}, capture_output=True, text=True
    )


def ok(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = run(command, cwd, env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def lighten(work: Path) -> None:
    """Keep four experiments cheap: 4 general prompts each, short answers, one quantized GGUF."""
    import re

    for name in ("probes", "replay"):
        path = work / "data" / "general" / f"{name}.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))
    params = work / "params.yaml"
    text = re.sub(r"^(  max_new_tokens:)\s*\d+", r"\1 16", params.read_text(), flags=re.MULTILINE)
    params.write_text(re.sub(r"^(  types:)\s*\[[^]]*\]", r"\1 [q8_0]", text, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The project on tiny (gate thresholds opened) with the sweep file, a bare `origin` and a local DVC remote."""
    from bench.pipeline import copy_repository

    top = tmp_path_factory.mktemp("sweep")
    work = top / "work"
    work.mkdir()
    copy_repository("tiny", work)
    (work / "sweeps" / "tiny.yaml").write_text(SWEEP)
    lighten(work)
    ok(["git", "add", "-A"], work)
    ok(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "sweep"], work)
    ok(["git", "init", "-q", "--bare", str(top / "origin.git")], work)
    ok(["git", "remote", "add", "origin", str(top / "origin.git")], work)
    ok(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], work)
    ok(["dvc", "remote", "add", "--local", "-d", "scratch", str(top / "dvc-remote")], work)
    return work


@pytest.fixture(scope="module")
def swept(scratch) -> str:
    return ok([sys.executable, "-m", "pipeline.sweep", "run", "sweeps/tiny.yaml"], scratch)


def show(scratch: Path) -> list[dict]:
    return json.loads(ok([sys.executable, "-m", "pipeline.sweep", "show", "sweeps/tiny.yaml", "--json"], scratch))


def test_a_2x2_sweep_runs_exactly_four_experiments_with_progress(scratch, swept):
    for index in range(1, 5):
        assert f"[{index}/4] tiny-{index}" in swept
    assert "ETA" in swept
    ranked = show(scratch)
    assert sorted(r["name"] for r in ranked) == ["tiny-1", "tiny-2", "tiny-3", "tiny-4"]
    assert {(r["params"]["train.max_steps"], r["params"]["gate.learn_min_score"]) for r in ranked} == {
        (1, 0.0),
        (1, 1.0),
        (2, 0.0),
        (2, 1.0),
    }
    assert all(r["steps"] == r["params"]["train.max_steps"] for r in ranked)


def test_failing_gate_points_are_recorded_and_ranked_last_with_their_reason(scratch, swept):
    ranked = show(scratch)
    assert [r["passed"] for r in ranked] == [True, True, False, False]
    assert [r["params"]["gate.learn_min_score"] for r in ranked] == [0.0, 0.0, 1.0, 1.0]
    for failed in ranked[2:]:
        assert failed["ship"] is None and any("learn" in reason for reason in failed["reasons"])
    table = (scratch / "reports" / "sweep" / "tiny.md").read_text()
    assert "| 4 | `" in table and "failed: " in table
    assert (scratch / "reports" / "sweep" / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ranking_is_deterministic_and_follows_the_gate_numbers(scratch, swept):
    first, second = show(scratch), show(scratch)
    assert [r["name"] for r in first] == [r["name"] for r in second]
    passed = first[:2]
    # same learn score on tiny: lower forgetting first, then keep, then size, then the name
    keys = [(-r["learn"], r["forgetting"], -r["keep"], r["gguf_bytes"], r["name"]) for r in passed]
    assert keys == sorted(keys)


def test_show_ranks_this_commits_sweep_whatever_commit_dvc_left_in_its_exec_refs(scratch, swept):
    """DVC resolves `dvc exp show --rev HEAD` to refs/exps/exec/EXEC_BASELINE when an earlier queue run
    left that ref on another commit; the sweep asks for HEAD's commit by its hash."""
    other = ok(["git", "commit-tree", "HEAD^{tree}", "-m", "another commit"], scratch).strip()
    ok(["git", "update-ref", "refs/exps/exec/EXEC_BASELINE", other], scratch)
    try:
        assert len(show(scratch)) == 4
    finally:
        ok(["git", "update-ref", "-d", "refs/exps/exec/EXEC_BASELINE"], scratch)


def test_a_leftover_queue_is_refused_not_run_silently(scratch, swept):
    # the sweep stopped its worker: nothing picks up an experiment queued after it
    assert "Worker status: 0 active, 0 idle" in ok(["dvc", "queue", "status"], scratch)
    ok(["dvc", "exp", "run", "--queue", "gate", "-n", "stray", "-S", "train.seed=7"], scratch)
    try:
        time.sleep(3)
        [stray] = [line for line in ok(["dvc", "queue", "status"], scratch).splitlines() if " stray " in line]
        assert stray.endswith("Queued")
        refused = run([sys.executable, "-m", "pipeline.sweep", "run", "sweeps/tiny.yaml"], scratch)
        assert refused.returncode == 1
        assert "the experiment queue already holds 1 unfinished task(s) (stray)" in refused.stderr
    finally:
        ok(["dvc", "queue", "remove", "--queued"], scratch)
    again = run([sys.executable, "-m", "pipeline.sweep", "run", "sweeps/tiny.yaml"], scratch)
    assert again.returncode == 1 and "already exist on this commit" in again.stderr


def test_a_second_sweep_in_the_same_repository_runs_every_point(scratch, swept):
    """The first sweep ended with `dvc queue stop`. The next one's worker has the same name, and DVC's
    filesystem broker can still hold a shutdown for it (measured here: the worker logged "Got shutdown from
    remote" on start, ran one task and left the rest queued): the sweep starts another worker then."""
    (scratch / "sweeps" / "again.yaml").write_text(
        # train.max_steps 1 as in the first sweep: DVC's run-cache restores its training, only the gate runs
        "name: again\nmax_points: 2\npoints:\n"
        "  - {train.max_steps: 1, gate.keep_max_drop: 0.5}\n  - {train.max_steps: 1, gate.keep_max_drop: 0.25}\n"
    )
    output = ok([sys.executable, "-m", "pipeline.sweep", "run", "sweeps/again.yaml"], scratch)

    assert "[2/2] again-2: Success" in output or "[2/2] again-1: Success" in output, output
    statuses = {line.split()[1]: line.split()[-1] for line in ok(["dvc", "queue", "status"], scratch).splitlines()
                if " again-" in line}  # fmt: skip
    assert statuses == {"again-1": "Success", "again-2": "Success"}
    assert "Worker status: 0 active, 0 idle" in ok(["dvc", "queue", "status"], scratch)


def test_promote_branches_pushes_and_opens_the_merge_request(scratch, swept):
    winner = show(scratch)[0]
    state = GitLabState(token="glpat-sweep", user={"id": 9, "username": "sweep-bot"}, project_id="42")
    with GitLabDouble(state) as api:
        env = {"GITLAB_TOKEN": "glpat-sweep", "CI_API_V4_URL": api.url, "CI_PROJECT_ID": "42"}
        output = ok([sys.executable, "-m", "pipeline.sweep", "promote", winner["name"]], scratch, env)
    branch = f"sweep/{winner['name']}"
    for name in ("params.yaml", "dvc.lock"):
        assert ok(["git", "show", f"{branch}:{name}"], scratch) == ok(
            ["git", "show", f"{winner['rev']}:{name}"], scratch
        )
    promoted = yaml.safe_load(ok(["git", "show", f"{branch}:params.yaml"], scratch))
    assert promoted["train"]["max_steps"] == winner["params"]["train.max_steps"]
    assert promoted["gate"]["learn_min_score"] == 0.0
    remote = ok(["git", "ls-remote", "origin"], scratch)
    assert f"refs/heads/{branch}" in remote and winner["name"] in remote  # refs/exps/... pushed by dvc exp push
    assert "glpat-sweep" not in output
    [merge_request] = state.merge_requests
    assert merge_request["source_branch"] == branch and merge_request["target_branch"] == "main"
    assert merge_request["title"] == f"Sweep: {winner['name']}"
    assert f"| 1 | `{winner['name']}` |" in merge_request["description"]
