"""An interrupted train stage resumes from its last checkpoint; changed inputs start fresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

STEPS = 35  # 5 epochs x 7 batches of the committed dataset


def params_file(tmp_path: Path, tiny_params_file: Path, **train: object) -> Path:
    """tiny params with resumable settings: a checkpoint every 5 steps, no early stop."""
    text = tiny_params_file.read_text()
    settings = {"epochs": 5, "checkpoint_steps": 5, "early_stopping_patience": 0, **train}
    for key, value in settings.items():
        lines = [line for line in text.splitlines() if line.startswith(f"  {key}:")]
        text = text.replace(lines[0], f"  {key}: {value}")
    path = tmp_path / f"params-{len(list(tmp_path.glob('params-*')))}.yaml"
    path.write_text(text)
    return path


def train_command(params: Path, base: Path, prepared: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.train",
        "--params",
        str(params),
        "--base",
        str(base),
        "--data",
        str(prepared),
        "--out",
        str(out / "adapter"),
        "--metrics",
        str(out / "train.json"),
        "--plots",
        str(out / "plots"),
    ]


def kill_after_checkpoint(command: list[str], env: dict, checkpoints: Path, step: int) -> None:
    """Start training and kill it (SIGKILL, like a runner dying) once checkpoint-`step` is complete."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob(f"train-*/checkpoint-{step}/keep_best.json")):
        assert process.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.kill()
    process.wait()


@pytest.fixture()
def env(tmp_path) -> dict:
    return {**os.environ, "LLM_GITOPS_CHECKPOINTS": str(tmp_path / "checkpoints")}


def test_a_killed_training_resumes_and_continues_its_step_count_and_loss_curve(
    tmp_path, env, tiny_base, tiny_prepared, tiny_params_file
):
    command = train_command(params_file(tmp_path, tiny_params_file), tiny_base, tiny_prepared, tmp_path)
    kill_after_checkpoint(command, env, tmp_path / "checkpoints", step=10)
    assert not (tmp_path / "adapter").exists()  # nothing half-written

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((tmp_path / "train.json").read_text())["resumed_from_step"]
    assert resumed >= 10 and f"resuming from checkpoint-{resumed}" in rerun.stderr
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["steps"] == STEPS and metrics["epochs_run"] == 5
    # one loss value per step, 1..35, the first run's steps kept and the rest appended
    steps = [int(line.split("\t")[0]) for line in (tmp_path / "plots/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))
    assert len((tmp_path / "plots/eval/loss.tsv").read_text().splitlines()) == 1 + 5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "checkpoints").glob("train-*"))  # cleaned when the stage completed


def test_changed_inputs_start_fresh_instead_of_resuming(tmp_path, env, tiny_base, tiny_prepared, tiny_params_file):
    first = train_command(params_file(tmp_path, tiny_params_file), tiny_base, tiny_prepared, tmp_path)
    kill_after_checkpoint(first, env, tmp_path / "checkpoints", step=5)

    changed = params_file(tmp_path, tiny_params_file, learning_rate="5.0e-4", epochs=1)
    rerun = subprocess.run(
        train_command(changed, tiny_base, tiny_prepared, tmp_path), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" not in rerun.stderr
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 7
    assert not list((tmp_path / "checkpoints").glob("train-*"))  # the stale run's checkpoints too
