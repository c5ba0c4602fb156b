"""`python -m pipeline.ci stale`: besides changed inputs, a hand-edited committed output and a dvc.lock entry
that no run of the pipeline wrote are stale (exit 3, with what and why). Real DVC and git on a small
pipeline shaped like the project's: train -> merge -> gate, the gate's verdict, metrics and report committed
to git (cache: false), as in dvc.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scratch_project import copy_project, git

from pipeline.dvc_status import DeclaredStage, declared_stages, edited_release_files, lock_problems, release_files

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

PIPELINE = """
stages:
  train: {cmd: "cp data.txt model.txt && echo ${train.epochs} >> model.txt", deps: [data.txt],
          params: [train.epochs], outs: [model.txt]}
  merge: {cmd: cp model.txt merged.txt, deps: [model.txt], outs: [merged.txt]}
  gate:
    cmd: >-
      mkdir -p models/gate metrics reports && echo '{"passed": false}' > models/gate/verdict.json
      && echo '{"score": 0.1}' > metrics/gate.json && echo 'failed' > reports/gate.md
    deps: [merged.txt]
    outs:
      - models/gate/verdict.json:
          cache: false
      - reports/gate.md:
          cache: false
    metrics:
      - metrics/gate.json:
          cache: false
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The pipeline reproduced for real and committed (dvc.lock and the gate's outputs in git)."""
    built = tmp_path_factory.mktemp("stale") / "built"
    built.mkdir()
    (built / "dvc.yaml").write_text(PIPELINE)
    (built / "params.yaml").write_text("train:\n  epochs: 3\n")
    (built / "data.txt").write_text("one conversation\n")
    git(built, "init", "-q", "-b", "main")
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=built, check=True)
    subprocess.run([BIN / "dvc", "repro", "-q"], cwd=built, check=True, capture_output=True)
    git(built, "add", "-A")
    git(built, "commit", "-q", "-m", "trained")
    return built


@pytest.fixture
def fresh(trained, tmp_path) -> Path:
    """What a CI job sees: a clone with dvc.lock and the committed gate outputs, no cached outputs."""
    clone = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(trained), str(clone))
    return clone


def ci_stale(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.ci", "stale"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def edit_lock(clone: Path, change) -> None:
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    change(lock["stages"])
    (clone / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def test_a_fresh_clone_of_a_reproduced_pipeline_is_current(fresh):
    result = ci_stale(fresh)
    assert (result.returncode, result.stdout) == (
        0,
        "dvc.lock is current: every stage's code, data, params and command match it\n",
    )


@pytest.mark.parametrize("path", ["models/gate/verdict.json", "metrics/gate.json", "reports/gate.md"])
def test_a_hand_edited_gate_output_is_stale(fresh, path):
    (fresh / path).write_text('{"passed": true}\n')
    result = ci_stale(fresh)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "dvc.lock is stale: not what a run of the pipeline wrote:",
        f"  gate: {path}: its content does not match its md5 in dvc.lock (edited by hand?)",
    ]


def test_a_hand_edited_verdict_of_this_project_is_stale(tmp_path):
    """The project itself (a scratch copy: its dvc.lock and committed gate outputs, no cached outputs)."""
    project = copy_project(tmp_path / "project")
    marker = "  gate: models/gate/verdict.json: its content does not match its md5 in dvc.lock (edited by hand?)"
    assert marker not in ci_stale(project).stdout
    verdict = project / "models" / "gate" / "verdict.json"
    edited = {**json.loads(verdict.read_text()), "gguf_sha256": "0" * 64}  # ship another GGUF than the gate's
    verdict.write_text(json.dumps(edited, indent=2))
    result = ci_stale(project)
    assert result.returncode == 3 and marker in result.stdout.splitlines()


def test_a_lock_stage_that_dvc_yaml_does_not_have_is_stale(fresh):
    edit_lock(
        fresh, lambda stages: stages.update(ghost={"cmd": "true", "outs": [{"path": "ghost.gguf", "md5": "0" * 32}]})
    )
    result = ci_stale(fresh)
    assert result.returncode == 3
    assert "  ghost: in dvc.lock but not a stage of dvc.yaml: no pipeline run wrote it" in result.stdout


def test_an_output_md5_that_its_consumers_did_not_read_is_stale(fresh):
    """Pointing train's output at another model in the DVC remote: merge's recorded input says otherwise."""
    original = yaml.safe_load((fresh / "dvc.lock").read_text())["stages"]["train"]["outs"][0]["md5"]
    edit_lock(fresh, lambda stages: stages["train"]["outs"][0].update(md5="1" * 32))
    result = ci_stale(fresh)
    assert result.returncode == 3
    assert (
        f"  merge: model.txt: its md5 here ({original}) is not the one stage train recorded ({'1' * 32}): "
        "the entries are not from one run of the pipeline"
    ) in result.stdout


def test_a_lock_entry_whose_command_or_params_differ_from_dvc_yaml_is_stale(fresh):
    edit_lock(fresh, lambda stages: stages["merge"].update(cmd="cp other.txt merged.txt"))
    assert ci_stale(fresh).stdout.startswith("dvc.lock is stale: inputs changed for merge; downstream: gate")
    edit_lock(fresh, lambda stages: stages["merge"].update(cmd="cp model.txt merged.txt"))
    edit_lock(fresh, lambda stages: stages["train"]["params"]["params.yaml"].update({"train.epochs": 30}))
    result = ci_stale(fresh)
    assert result.returncode == 3
    assert result.stdout.startswith("dvc.lock is stale: inputs changed for train; downstream: merge, gate")


# --- the pure checks, on dvc.lock as parsed ---

DECLARED = {
    "train": DeclaredStage("train", ("model.txt",)),
    "gate": DeclaredStage("gate", ("models/gate/verdict.json",)),
}


def lock(train_outs: list[dict], gate_deps: list[dict]) -> dict:
    return {"schema": "2.0", "stages": {"train": {"outs": train_outs}, "gate": {"deps": gate_deps, "outs": [
        {"path": "models/gate/verdict.json", "md5": "c" * 32}]}}}  # fmt: skip


def test_a_consistent_lock_has_no_problems():
    assert (
        lock_problems(
            lock([{"path": "model.txt", "md5": "a" * 32}], [{"path": "model.txt", "md5": "a" * 32}]), DECLARED
        )
        == []
    )


def test_outputs_the_stage_does_not_declare_or_lacks_are_problems():
    problems = lock_problems(lock([{"path": "other.bin", "md5": "a" * 32}], []), DECLARED)
    assert [str(p) for p in problems] == [
        "train: other.bin: recorded in dvc.lock but not an output of this stage in dvc.yaml",
        "train: model.txt: an output of this stage with no hash in dvc.lock",
    ]


def test_a_lock_that_is_not_a_mapping_is_one_problem_not_a_traceback():
    assert [str(p) for p in lock_problems(["stages"], DECLARED)] == ["dvc.lock: not a mapping of stages"]
    assert lock_problems({"stages": {"train": "garbage"}}, DECLARED)[0].reason == (
        "an output of this stage with no hash in dvc.lock"
    )


def test_the_release_files_are_dvc_lock_and_every_gate_output_of_the_project():
    release = release_files(declared_stages(ROOT))
    assert release == ["dvc.lock", "models/gate/verdict.json", "reports/gate.md", "metrics/gate.json"]
    diff = ["README.md", "data/train.jsonl", "metrics/gate.json", "dvc.lock"]
    assert edited_release_files(diff, release) == ["dvc.lock", "metrics/gate.json"]
    assert edited_release_files(["README.md", "metrics/data.json"], release) == []
