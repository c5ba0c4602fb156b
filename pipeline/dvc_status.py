"""What DVC says about this workspace's stages: which would rerun because their inputs changed, what
depends on them, and what in dvc.lock no run of the pipeline produced (a hand-edited output, a forged
entry). Read by the merge request report (pipeline.report) and CI's decisions (pipeline.ci).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.common import PipelineError

LOCK_FILE = "dvc.lock"
GATE_STAGE = "gate"  # its outputs (verdict, metrics, report) are committed to git and decide what deploys


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A git or dvc command, its output captured; a missing program is one clear error."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise PipelineError(f"{command[0]}: not installed (or not on PATH)") from None


def dvc_status(cwd: Path) -> dict:
    """`dvc status --json`: {stage: [change, ...]} for every stage that is not up to date."""
    result = run(["dvc", "status", "--json"], cwd)
    try:
        status = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        status = None
    if result.returncode != 0 or not isinstance(status, dict):
        raise PipelineError(f"dvc status failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return status


def stale_stages(cwd: Path, status: dict | None = None) -> list[str]:
    """Stages whose own inputs (code, data, params, command) changed against dvc.lock, from `dvc status`.
    Missing outputs, and inputs missing because an upstream output is not checked out (a fresh clone), do
    not count: the results are in the DVC cache and remote (what `dvc repro --allow-missing` skips)."""
    status = dvc_status(cwd) if status is None else status
    missing = missing_outputs(cwd)
    return [stage for stage, changes in status.items() if any(is_input_change(c, missing) for c in changes)]


def missing_outputs(cwd: Path) -> list[str]:
    """Outputs dvc.lock records that are not in the workspace (a fresh clone has none of the cached ones)."""
    import yaml

    lock_path = cwd / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else None
    stages = (lock or {}).get("stages", {})
    paths = [out["path"] for stage in stages.values() for out in stage.get("outs", [])]
    return [path for path in paths if not (cwd / path).exists()]


def is_input_change(change: str | dict, missing: list[str] = ()) -> bool:
    """One entry of `dvc status --json`: "always changed", {"changed deps": {path: "modified"|"deleted"|
    {param: ...}}}, {"changed outs": ...}, {"changed command": ...}; only lost outputs are not a change.
    A directory dependency that holds upstream outputs (the gate reads models/gguf/) reads "modified"
    when those outputs are missing but the directory is not (its .gitignore is in git): not a change."""
    if not isinstance(change, dict):
        return True
    for kind, detail in change.items():
        if kind == "changed outs":
            continue
        if kind != "changed deps":
            return True
        for path, state in detail.items():
            holds_missing = state == "modified" and any(m.startswith(path.rstrip("/") + "/") for m in missing)
            if state != "deleted" and not holds_missing:
                return True
    return False


def downstream_of(stages: list[str], cwd: Path) -> list[str]:
    """Stages that depend, directly or not, on `stages` (from `dvc dag --dot`), in the DAG's order."""
    result = run(["dvc", "dag", "--dot"], cwd)
    if result.returncode != 0:
        raise PipelineError(f"dvc dag failed: {result.stderr.strip()[-500:]}")
    order = re.findall(r'^"([^"]+)";$', result.stdout, flags=re.MULTILINE)
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', result.stdout, flags=re.MULTILINE)
    reached, frontier = set(), list(stages)
    while frontier:
        node = frontier.pop()
        for source, target in edges:
            if source == node and target not in reached:
                reached.add(target)
                frontier.append(target)
    return [stage for stage in order if stage in reached and stage not in stages]


# --- what in dvc.lock no run of the pipeline produced ---


@dataclass(frozen=True)
class DeclaredStage:
    """A stage as dvc.yaml declares it (matrix items resolved, e.g. quantize@q8_0), read through DVC."""

    name: str
    outs: tuple[str, ...]  # every output path: outs, metrics and plots, cached or committed


@dataclass(frozen=True)
class LockProblem:
    """One thing that makes dvc.lock untrustworthy, whatever the inputs say."""

    stage: str
    path: str | None  # the output or dependency concerned; None: the whole entry
    reason: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.path}: {self.reason}" if self.path else f"{self.stage}: {self.reason}"


def declared_stages(cwd: Path) -> dict[str, DeclaredStage]:
    """dvc.yaml's stages, as DVC resolves them (templating, matrix)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    try:
        with Repo(str(cwd)) as repo:
            # the project's own dvc.yaml, wherever this process runs (DVC's relpath is relative to the cwd)
            top = (Path(cwd) / "dvc.yaml").resolve()
            stages = [
                s for s in repo.index.stages if isinstance(s, PipelineStage) and Path(s.dvcfile.path).resolve() == top
            ]
            return {s.name: DeclaredStage(s.name, tuple(o.def_path for o in s.outs)) for s in stages}
    except DvcException as error:
        raise PipelineError(f"dvc.yaml: {error}") from None


def _entries(items: object) -> list[dict]:
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def lock_problems(lock: object, declared: dict[str, DeclaredStage]) -> list[LockProblem]:
    """What no `dvc repro` of dvc.yaml would have written into dvc.lock: a stage dvc.yaml does not have, an
    output the stage does not declare (or a declared one without its hash), and a dependency whose hash is
    not the one its producing stage recorded for it (the two entries come from different runs, or one was
    edited). `dvc status` sees none of these in a fresh clone, where the outputs are not checked out."""
    if not isinstance(lock, dict) or not isinstance(lock.get("stages", {}), dict):
        return [LockProblem(LOCK_FILE, None, "not a mapping of stages")]
    stages = {name: entry if isinstance(entry, dict) else {} for name, entry in lock.get("stages", {}).items()}
    problems: list[LockProblem] = []
    produced: dict[str, tuple[str, object]] = {}  # output path -> (stage, its md5 in the lock)
    for name, entry in stages.items():
        if name not in declared:
            problems.append(
                LockProblem(name, None, "in dvc.lock but not a stage of dvc.yaml: no pipeline run wrote it")
            )
            continue
        outs = {out.get("path"): out.get("md5") for out in _entries(entry.get("outs"))}
        for path in sorted(set(outs) - set(declared[name].outs), key=str):
            problems.append(LockProblem(name, path, "recorded in dvc.lock but not an output of this stage in dvc.yaml"))
        for path in sorted(set(declared[name].outs) - set(outs)):
            problems.append(LockProblem(name, path, "an output of this stage with no hash in dvc.lock"))
        produced.update({path: (name, md5) for path, md5 in outs.items() if path in declared[name].outs})
    for name, entry in stages.items():
        for dep in _entries(entry.get("deps")):
            producer = produced.get(dep.get("path"))
            if name in declared and producer and producer[1] != dep.get("md5"):
                problems.append(
                    LockProblem(
                        name,
                        dep.get("path"),
                        f"its md5 here ({dep.get('md5')}) is not the one stage {producer[0]} recorded "
                        f"({producer[1]}): the entries are not from one run of the pipeline",
                    )
                )
    return problems


def edited_outputs(status: dict) -> list[LockProblem]:
    """Outputs in the workspace whose content is not what dvc.lock records (`dvc status`: "modified"): a hand
    edit of a committed output (the gate's verdict, metrics, report) or of a checked-out one. A missing
    output ("deleted", "not in cache": a fresh clone) is not one."""
    problems = []
    for stage, changes in status.items():
        for change in changes:
            outs = change.get("changed outs", {}) if isinstance(change, dict) else {}
            for path, state in outs.items():
                if state == "modified":
                    problems.append(
                        LockProblem(stage, path, "its content does not match its md5 in dvc.lock (edited by hand?)")
                    )
    return problems


def untrusted_lock(cwd: Path, status: dict | None = None) -> list[LockProblem]:
    """Everything in this workspace's dvc.lock and committed outputs that no run of the pipeline produced."""
    import yaml

    status = dvc_status(cwd) if status is None else status
    lock_path = cwd / LOCK_FILE
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
    except yaml.YAMLError as error:
        return [LockProblem(LOCK_FILE, None, f"invalid YAML: {error}")]
    return lock_problems(lock or {}, declared_stages(cwd)) + edited_outputs(status)


def release_files(declared: dict[str, DeclaredStage]) -> list[str]:
    """The committed files only the pipeline may write: dvc.lock and the gate's outputs (what deploys)."""
    gate = declared.get(GATE_STAGE)
    return [LOCK_FILE, *(gate.outs if gate else ())]


def edited_release_files(changed: Iterable[str], release: Iterable[str]) -> list[str]:
    """The files of a merge request's diff (`git diff --name-only`) that only the pipeline may write, in
    `release` order: the MR report flags them (a retrain commits them on the default branch, never an MR)."""
    changed = {path.strip().removeprefix("./") for path in changed}
    return [path for path in release if path in changed]
