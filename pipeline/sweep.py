"""Parameter sweeps as DVC experiments, ranked by the gate; the winner promoted by merge request.

    python -m pipeline.sweep run sweeps/recipe.yaml     queue one experiment per point, run them one at a time
    python -m pipeline.sweep show sweeps/recipe.yaml    the experiments ranked by the gate (--md, --json)
    python -m pipeline.sweep promote recipe-3           branch + push the winner; a merge request with a token
    python -m pipeline.sweep fanout sweeps/recipe.yaml --out sweep-child.yml   a GitLab child pipeline instead

`run` queues `dvc exp run --queue gate -n <sweep>-<i> -S key=value ...` per point (sweep files:
pipeline/sweep_spec.py), then `dvc queue start -j 1`: one worker, because DVC's queue races with more
(treeverse/dvc#10562, #10673). The experiments stop at the gate: the modelfile stage refuses a failed
verdict, and a sweep wants every point's gate numbers. The worker runs each experiment in a temporary
copy of the repository and inherits `dvc queue start`'s environment, so LLM_GITOPS_GATE_NO_FAIL=1 (set
here) reaches the gate: a failing gate writes its verdict and metrics and exits 0, and DVC records the
point. The first point fills DVC's run-cache for the stages no point changes (prepare, base, base_answers).

`fanout` writes the sweep as a GitLab child pipeline for a lab with several rigs, GitLab the scheduler:
one job per point on any free `gpu` runner (`dvc exp run --pull gate -n <sweep>-<i> -S ...` with
LLM_GITOPS_GATE_NO_FAIL=1, then `dvc exp push origin <sweep>-<i>`), and `sweep-collect`, after them all,
which `dvc exp pull`s each and runs `show`. With one rig its runner (limit 1) takes the points one by one.

`promote` is `dvc exp branch` + `git push` + `dvc exp push`; with GITLAB_TOKEN (a project access token,
`api` scope; GitLab's CI_JOB_TOKEN may not create merge requests), CI_API_V4_URL and CI_PROJECT_ID in the
environment it opens the merge request through python-gitlab, the sweep's table as its description.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.common import PipelineError, get_logger, run_cli, write_bytes_atomic, write_json_atomic, write_text_atomic
from pipeline.gitlab_api import TOKEN_VARIABLES, GitLabSettings, gitlab_settings
from pipeline.plots import sweep_png
from pipeline.sweep_spec import Outcome, Sweep, as_json, load_sweep, markdown_table, outcome, rank, sweep_experiments

log = get_logger("sweep")

# read by pipeline/gate.py main (an entry point: not importable from here)
GATE_NO_FAIL = "LLM_GITOPS_GATE_NO_FAIL"
REPORTS = Path("reports/sweep")
# each poll starts a `dvc queue status` process (≈1 s of CPU): on a 2-core rig every 5 s took a tenth of the
# training. So polls back off: 1 s after something changed, then 1.5x longer each time up to 15 s; a point
# that runs for minutes costs a poll per 15 s, a short one (a gate-only point: seconds) is seen seconds late
POLL_FIRST_S = 1.0
POLL_MAX_S = 15.0
POLL_GROWTH = 1.5
# tasks waiting, none running and no worker: gone if one was seen since it was started (two polls in a row),
# else once this long has passed (a worker takes seconds to start and show in `dvc queue status`)
WORKERLESS_S = 20.0
UNFINISHED = ("Queued", "Running")
TASK_LINE = re.compile(r"^(?P<task>[0-9a-f]{7,})\s+(?P<name>\S+)\s+.*\s(?P<status>\w+)$")
WORKER_LINE = re.compile(r"^Worker status: (?P<active>\d+) active, (?P<idle>\d+) idle$", re.MULTILINE)
WORKER_STOP_S = 120.0


def dvc(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed:\n{(result.stdout + result.stderr).strip()[-3000:]}")
    return result.stdout


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed:\n{result.stderr.strip()[-2000:]}")
    return result.stdout


@dataclass(frozen=True)
class Task:
    """A line of `dvc queue status` (it has no JSON output)."""

    task: str
    name: str
    status: str  # Queued | Running | Success | Failed


def queue_tasks() -> list[Task]:
    tasks = []
    for line in dvc("queue", "status").splitlines():
        match = TASK_LINE.match(line.strip())
        if match:
            tasks.append(Task(match["task"], match["name"], match["status"]))
    return tasks


def queue_workers() -> int:
    """How many queue workers are alive, busy or idle (`dvc queue status`'s last line)."""
    match = WORKER_LINE.search(dvc("queue", "status"))
    return int(match["active"]) + int(match["idle"]) if match else 0


def start_worker() -> None:
    """`dvc queue start -j 1`: one worker, which inherits this environment (see the module docstring) with
    LLM_GITOPS_GATE_NO_FAIL=1, and also the output streams: a pipe would keep this call waiting until the
    worker exits, so they go to a file."""
    log_file = Path(".dvc/tmp/sweep-queue-start.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as out:
        command = ["dvc", "queue", "start", "-j", "1"]
        env = {**os.environ, GATE_NO_FAIL: "1"}
        if subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env).returncode != 0:
            raise PipelineError(f"dvc queue start failed:\n{log_file.read_text()[-3000:]}")


def stop_workers() -> None:
    """Stop the queue's worker and wait until it is gone. DVC's worker lingers (10 s and more) after the
    queue empties: an experiment someone queues meanwhile would be run silently, outside any sweep."""
    dvc("queue", "stop")
    deadline = time.monotonic() + WORKER_STOP_S
    while queue_workers():
        if time.monotonic() > deadline:
            raise PipelineError(f"the experiment queue's worker did not stop within {WORKER_STOP_S:.0f} s")
        time.sleep(1.0)


def shown(rev: str = "HEAD") -> list[dict]:
    # the commit, not the name: DVC resolves `--rev HEAD` to the refs/exps/exec/EXEC_* commit an earlier
    # queue run left behind, and then shows another commit's experiments
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    return json.loads(dvc("exp", "show", "--json", "--rev", commit) or "[]")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def next_poll(interval: float, changed: bool) -> float:
    """Seconds until the next queue poll: POLL_FIRST_S after a change, else growing to POLL_MAX_S."""
    return POLL_FIRST_S if changed else min(interval * POLL_GROWTH, POLL_MAX_S)


def run_sweep(sweep: Sweep, replace: bool) -> list[Task]:
    """Queue every point, run them one at a time, report progress; the finished tasks of this sweep."""
    leftover = [t for t in queue_tasks() if t.status in UNFINISHED]
    if leftover:
        names = ", ".join(t.name for t in leftover)
        raise PipelineError(
            f"the experiment queue already holds {len(leftover)} unfinished task(s) ({names}) from an earlier run; "
            "they are not run silently: finish them (dvc queue start -j 1) or drop them "
            "(dvc queue remove --queued; dvc queue kill <name>), then run the sweep again"
        )
    names = [sweep.experiment(point) for point in sweep.points]
    existing = sorted({name for name, _ in sweep_experiments(shown(), sweep.name)} & set(names))
    if existing and not replace:
        raise PipelineError(
            f"experiments {', '.join(existing)} already exist on this commit: "
            "`python -m pipeline.sweep show` ranks them; --replace removes them and runs the sweep again"
        )
    if existing:
        dvc("exp", "remove", *existing)
    before = {t.task for t in queue_tasks()}
    for point in sweep.points:
        dvc("exp", "run", "--queue", "gate", "-n", sweep.experiment(point), *point.set_args())
        log.info("queued %s: %s", sweep.experiment(point), point.label())
    labels = {sweep.experiment(p): p.label() for p in sweep.points}
    start_worker()
    started = time.monotonic()
    seen: dict[str, str] = {}
    durations: list[float] = []
    running_since: dict[str, float] = {}  # task -> when it was first seen running
    workerless_since: float | None = None
    worker_seen = False  # since the last start_worker()
    workerless_polls = 0
    vanished_polls = 0
    interval = POLL_FIRST_S
    while True:
        ours = [t for t in queue_tasks() if t.task not in before]
        # DVC's filesystem broker can keep a shutdown for the worker's name (measured: after an earlier sweep's
        # `dvc queue stop`, the next worker logged "Got shutdown from remote" on start, ran its first task and
        # left the others queued): with tasks waiting and nothing running, a worker that is gone is replaced
        running = any(t.status == "Running" for t in ours)
        waiting = any(t.status == "Queued" for t in ours) and not running
        workers = queue_workers() if waiting else 0  # another `dvc queue status`: only when it matters
        worker_seen = worker_seen or running or workers > 0
        if waiting and not workers:
            workerless_since = workerless_since or time.monotonic()
            workerless_polls += 1
        else:
            workerless_since, workerless_polls = None, 0
        gone = (
            workerless_polls >= 2
            if worker_seen
            else workerless_polls and time.monotonic() - workerless_since >= WORKERLESS_S
        )
        if gone:
            queued = sum(t.status == "Queued" for t in ours)
            log.warning("the queue's worker stopped with %d task(s) of this sweep queued; starting another", queued)
            start_worker()
            workerless_since, workerless_polls, worker_seen = None, 0, False
        changed = False
        # a point that finished is reported before the next one that started in the same poll
        for task in sorted(ours, key=lambda t: t.status in UNFINISHED):
            if seen.get(task.task) == task.status:
                continue
            seen[task.task] = task.status
            changed = True
            done = sum(t.status not in UNFINISHED for t in ours)
            if task.status == "Running":
                running_since[task.task] = time.monotonic()
                log.info("[%d/%d] %s running (%s)", done + 1, len(names), task.name, labels.get(task.name, ""))
            elif task.status not in UNFINISHED:
                durations.append(time.monotonic() - running_since.get(task.task, started))
                left = len(names) - done
                eta = f", ETA {_minutes(left * sum(durations) / len(durations))}" if left else ""
                log.info(
                    "[%d/%d] %s: %s after %s%s", done, len(names), task.name, task.status, _minutes(durations[-1]), eta
                )
        if all(t.status not in UNFINISHED for t in ours):
            if len(ours) >= len(names):
                break
            # a point taken off the queue (`dvc queue remove`) never finishes: stop waiting for it
            vanished_polls += 1
            if vanished_polls >= 2:
                missing = sorted(set(names) - {t.name for t in ours})
                log.warning("%d point(s) left the queue without running (removed?): %s", len(missing),
                            ", ".join(missing))  # fmt: skip
                break
        interval = next_poll(interval, changed)
        time.sleep(interval)
    stop_workers()
    log.info("sweep %s: %d experiments in %s", sweep.name, len(names), _minutes(time.monotonic() - started))
    return ours


COLLECT_JOB = "sweep-collect"
# a point job trains a whole pipeline (as the `retrain` job does); the collecting job only ranks
POINT_TIMEOUT = "12h"
PUSH_ENVIRONMENT = "git-push"  # .gitlab-ci.yml's environment for jobs that push with GITLAB_PUSH_TOKEN


def child_pipeline(sweep: Sweep) -> dict:
    """The sweep as a self-contained GitLab child pipeline: one job per point on the `gpu` tag, each
    pushing its experiment to this project, and a collecting job that pulls them all and ranks them."""
    names = [sweep.experiment(point) for point in sweep.points]
    pipeline: dict = {
        "stages": ["train", "report"],
        # the parent's `default:` and variables do not reach a child pipeline: what the rig jobs need
        "default": {"before_script": ["source .ci/env"]},
        "variables": {"GIT_DEPTH": "0", "GIT_CLEAN_FLAGS": "-ffdx -e .dvc/cache -e .cache/"},
    }
    no_token = f"no GITLAB_PUSH_TOKEN: a fanned-out point reaches {COLLECT_JOB} only as an experiment pushed to origin"
    for point, name in zip(sweep.points, names, strict=True):
        run = ["dvc", "exp", "run", "--pull", "gate", "-n", name, *point.set_args()]
        pipeline[name] = {
            "stage": "train",
            "tags": ["gpu"],
            "interruptible": False,
            "timeout": POINT_TIMEOUT,
            # it pushes its experiment: GITLAB_PUSH_TOKEN is scoped to this environment (as for the parent's
            # sweep jobs), so a point without it would get no token
            "environment": {"name": PUSH_ENVIRONMENT, "action": "prepare"},
            "variables": {GATE_NO_FAIL: "1"},
            "script": [
                f'.ci/push-auth || {{ echo "{no_token}" >&2; exit 1; }}',
                shlex.join(run),
                shlex.join(["dvc", "exp", "push", "origin", name]),
            ],
        }
    pull = " ".join(shlex.quote(name) for name in names)
    pipeline[COLLECT_JOB] = {
        "stage": "report",
        # a rig: its shared DVC cache already holds what it trained, and it reaches the DVC remote
        "tags": ["gpu"],
        "interruptible": False,
        "needs": names,
        # the points that finished are ranked even when one failed; the job fails after, naming it
        "when": "always",
        "script": [
            f'missing=""; for name in {pull}; do dvc exp pull origin "$name" || missing="$missing $name"; done',
            shlex.join(["python", "-m", "pipeline.sweep", "show", sweep.name]),
            'test -z "$missing" || { echo "experiments that were not pushed:$missing (see their jobs)" >&2; exit 1; }',
        ],
        "artifacts": {"when": "always", "expire_in": "90 days", "paths": [f"{REPORTS}/"]},
    }
    return pipeline


def write_child_pipeline(sweep: Sweep, source: str, out: Path) -> None:
    header = (
        f"# Generated by `python -m pipeline.sweep fanout {source}` (CI job sweep-fanout): sweep {sweep.name},\n"
        f"# one job per point ({len(sweep.points)}) on any free gpu runner, then {COLLECT_JOB}.\n"
        f"# Edit {source}, not this file.\n"
    )
    body = yaml.safe_dump(child_pipeline(sweep), sort_keys=False, width=1000, allow_unicode=True)
    write_text_atomic(out, header + body)


def reasons_of(rev: str) -> list[str]:
    """Why the gate failed, from the experiment commit's models/gate/verdict.json (git-tracked)."""
    try:
        verdict = json.loads(git("show", f"{rev}:models/gate/verdict.json"))
    except (PipelineError, json.JSONDecodeError):
        return ["no gate verdict: the experiment failed before the gate"]
    return list(verdict.get("reasons") or [])


def ranked_outcomes(sweep_name: str, rev: str = "HEAD") -> list[Outcome]:
    found = sweep_experiments(shown(rev), sweep_name)
    if not found:
        raise PipelineError(
            f"no experiments named {sweep_name}-<n> on commit {rev} (dvc exp show --rev {rev}; "
            "`dvc exp list --all-commits` lists every commit's)"
        )
    outcomes = []
    for name, data in found:
        gate = ((data.get("metrics") or {}).get("metrics/gate.json") or {}).get("data") or {}
        outcomes.append(outcome(name, data, [] if gate.get("passed") else reasons_of(data.get("rev", ""))))
    return rank(outcomes)


def sweep_name_of(argument: str) -> str:
    """A sweep file's name (its `name:` or stem), or the argument itself when it is not a file."""
    path = Path(argument)
    return load_sweep(path).name if path.is_file() else argument


def write_reports(ranked: list[Outcome], sweep_name: str) -> str:
    table = markdown_table(ranked, sweep_name)
    write_text_atomic(REPORTS / f"{sweep_name}.md", table)
    write_json_atomic(REPORTS / f"{sweep_name}.json", as_json(ranked))
    write_bytes_atomic(REPORTS / f"{sweep_name}.png", sweep_png(ranked, sweep_name))
    return table


def open_merge_request(settings: GitLabSettings, branch: str, target: str, title: str, body: str) -> str:
    import gitlab

    url, project_id, token = settings
    client = gitlab.Gitlab(url, private_token=token, timeout=30)
    try:
        project = client.projects.get(project_id, lazy=True)
        created = project.mergerequests.create(
            {"source_branch": branch, "target_branch": target, "title": title, "description": body}
        )
    except gitlab.GitlabError as error:
        message = f"GitLab refused the merge request: HTTP {error.response_code}: {error.error_message}"
        raise PipelineError(message) from None
    return created.web_url


def default_branch(remote: str) -> str:
    try:
        return git("symbolic-ref", "--short", f"refs/remotes/{remote}/HEAD").strip().split("/", 1)[1]
    except PipelineError:
        return "main"


def promote(experiment: str, branch: str | None, remote: str, target: str | None, push: bool) -> str:
    match = re.match(r"^(?P<sweep>.+)-\d+$", experiment)
    branch = branch or f"sweep/{experiment}"
    dvc("exp", "branch", experiment, branch)
    log.info("branch %s: params.yaml and dvc.lock of %s", branch, experiment)
    if not push:
        return branch
    git("push", remote, f"refs/heads/{branch}:refs/heads/{branch}")
    dvc("exp", "push", remote, experiment)  # the experiment (and its cached outputs) outlive this machine
    log.info("pushed %s and experiment %s to %s", branch, experiment, remote)
    settings = gitlab_settings(dict(os.environ))
    if settings is None:
        log.info("no %s (or CI_API_V4_URL, CI_PROJECT_ID): no merge request opened", "/".join(TOKEN_VARIABLES))
        return branch
    table = write_reports(ranked_outcomes(match["sweep"]), match["sweep"]) if match else ""
    body = f"Promotes experiment `{experiment}` of a parameter sweep (`python -m pipeline.sweep`).\n\n{table}"
    url = open_merge_request(settings, branch, target or default_branch(remote), f"Sweep: {experiment}", body)
    log.info("merge request: %s", url)
    return branch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="queue one experiment per point and run them one at a time")
    run.add_argument("sweep", type=Path, help="a sweep file, e.g. sweeps/recipe.yaml")
    run.add_argument("--replace", action="store_true", help="remove this sweep's experiments on this commit first")
    run.add_argument("--check", action="store_true", help="only validate the sweep file and list its points")
    run.add_argument("--push", metavar="REMOTE", help="then `dvc exp push` the experiments to this git remote")
    show = commands.add_parser("show", help="the sweep's experiments ranked by the gate")
    show.add_argument("sweep", help="a sweep file or a sweep name")
    show.add_argument("--rev", default="HEAD", help="the commit the sweep ran on (default: %(default)s)")
    form = show.add_mutually_exclusive_group()
    form.add_argument("--md", action="store_true", help="Markdown table on stdout (default)")
    form.add_argument("--json", action="store_true", help="JSON on stdout")
    up = commands.add_parser("promote", help="branch and push an experiment; open a merge request with a token")
    up.add_argument("experiment", help="the experiment's name, e.g. recipe-3")
    up.add_argument("--branch", help="the git branch (default: sweep/<experiment>)")
    up.add_argument("--remote", default="origin", help="git remote for the branch and the experiment (default: origin)")
    up.add_argument("--target", help="the merge request's target branch (default: the remote's HEAD, else main)")
    up.add_argument("--no-push", action="store_true", help="only create the branch")
    fan = commands.add_parser("fanout", help="write the sweep as a GitLab child pipeline: one job per point")
    fan.add_argument("sweep", type=Path, help="a sweep file, e.g. sweeps/recipe.yaml")
    fan.add_argument("--out", type=Path, default=Path("sweep-child.yml"), help="default: sweep-child.yml")
    args = parser.parse_args(argv)

    if args.command == "run":
        sweep = load_sweep(args.sweep)
        for point in sweep.points:
            log.info("%s: %s", sweep.experiment(point), point.label())
        if args.check:
            return
        tasks = run_sweep(sweep, args.replace)
        table = write_reports(ranked_outcomes(sweep.name), sweep.name)
        print(table)
        finished = [t.name for t in tasks if t.status == "Success"]
        if args.push and finished:
            dvc("exp", "push", args.push, *finished)  # git refs and the DVC-cached outputs (default remote)
            log.info("pushed %d experiments to %s", len(finished), args.push)
        failed = [t.name for t in tasks if t.status != "Success"]
        if failed:
            raise PipelineError(f"experiments that did not finish: {', '.join(failed)} (dvc queue logs <name>)")
    elif args.command == "show":
        name = sweep_name_of(args.sweep)
        ranked = ranked_outcomes(name, args.rev)
        table = write_reports(ranked, name)
        print(json.dumps(as_json(ranked), indent=2) if args.json else table)
    elif args.command == "fanout":
        sweep = load_sweep(args.sweep)
        write_child_pipeline(sweep, str(args.sweep), args.out)
        for point in sweep.points:
            log.info("job %s: %s", sweep.experiment(point), point.label())
        log.info("%s: %d point jobs and %s", args.out, len(sweep.points), COLLECT_JOB)
    else:
        promote(args.experiment, args.branch, args.remote, args.target, not args.no_push)


if __name__ == "__main__":
    sys.exit(run_cli(main))
