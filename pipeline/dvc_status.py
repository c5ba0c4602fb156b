"""What DVC says about this workspace's stages: which would rerun because their inputs changed, and
what depends on them. Read by the merge request report (pipeline.report) and CI's decisions (pipeline.ci).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from pipeline.common import PipelineError


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A git or dvc command, its output captured; a missing program is one clear error."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise PipelineError(f"{command[0]}: not installed (or not on PATH)") from None


def stale_stages(cwd: Path) -> list[str]:
    """Stages whose own inputs (code, data, params, command) changed against dvc.lock, from `dvc status`.
    Missing outputs, and inputs missing because an upstream output is not checked out (a fresh clone), do
    not count: the results are in the DVC cache and remote (what `dvc repro --allow-missing` skips)."""
    result = run(["dvc", "status", "--json"], cwd)
    try:
        status = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        status = None
    if result.returncode != 0 or not isinstance(status, dict):
        raise PipelineError(f"dvc status failed: {(result.stderr or result.stdout).strip()[-500:]}")
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
