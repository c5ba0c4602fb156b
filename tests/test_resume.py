"""An interrupted train stage resumes from its last checkpoint; changed inputs start fresh; a checkpoint the
stage did not write for these inputs (planted, or edited after its save) is ignored with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import train
from pipeline.params import load_params
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # see pyproject.toml's markers

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
    """Start training and kill it (SIGKILL, like a runner dying) once checkpoint-`step` is complete (its record,
    the last file the stage writes into it, is there)."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob(f"train-*/checkpoint-{step}/{train.RECORD_FILE}")):
        assert process.poll() is None, "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.kill()
    process.wait()


@pytest.fixture()
def env(tmp_path) -> dict:
    """As on the protected runner: its own checkpoint folder and the key its records are signed with."""
    return {**os.environ, "LLM_GITOPS_CHECKPOINTS": str(tmp_path / "checkpoints"), train.RECORD_KEY_ENV: "rig-key"}


def test_a_killed_training_resumes_and_continues_its_step_count_and_loss_curve(
    tmp_path, env, tiny_base, tiny_prepared, tiny_params_file
):
    command = train_command(params_file(tmp_path, tiny_params_file), tiny_base, tiny_prepared, tmp_path)
    kill_after_checkpoint(command, env, tmp_path / "checkpoints", step=10)
    assert not (tmp_path / "adapter").exists()  # nothing half-written

    records = list((tmp_path / "checkpoints").glob(f"train-*/checkpoint-*/{train.RECORD_FILE}"))
    assert records and all(len(json.loads(r.read_text())["signature"]) == 64 for r in records)  # signed

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


# --- the checkpoint's record: only what this stage saved for these inputs is resumed from ---


def saved_checkpoint(folder: Path, fingerprint: str = "f" * 64, key: str | None = None) -> Path:
    """A checkpoint folder as the Trainer and the keeper leave it, and its record as this stage writes it."""
    checkpoint = folder / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    for name, content in {
        "adapter_model.safetensors": b"lora weights",
        "optimizer.pt": b"adam moments",
        "trainer_state.json": b'{"global_step": 10}',
        "keep_best.json": b'{"best_loss": 2.5}',
    }.items():
        (checkpoint / name).write_bytes(content)
    train.write_record(checkpoint, fingerprint, key)
    return checkpoint


def test_a_recorded_checkpoint_is_trusted_for_its_own_inputs_only(tmp_path):
    checkpoint = saved_checkpoint(tmp_path)
    record = json.loads((checkpoint / train.RECORD_FILE).read_text())
    assert record["step"] == 10 and sorted(record["files"]) == sorted(
        ["adapter_model.safetensors", "keep_best.json", "optimizer.pt", "trainer_state.json"]
    )
    assert train.record_problem(checkpoint, "f" * 64) is None
    assert train.record_problem(checkpoint, "e" * 64) == (
        "train_record.json was written for other inputs (params, data or base)"
    )


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda c: (c / "keep_best.json").write_text('{"best_loss": -1}'), "keep_best.json differs from its record"),
        (lambda c: (c / "optimizer.pt").write_bytes(b"other"), "optimizer.pt differs from its record"),
        (lambda c: (c / "best_adapter.safetensors").write_bytes(b"x"), "best_adapter.safetensors not in its record"),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "adapter_model.safetensors missing"),
        (lambda c: (c / train.RECORD_FILE).unlink(), "no train_record.json (not saved by this stage"),
        (lambda c: (c / train.RECORD_FILE).write_text("[1, 2]"), "train_record.json is not a record of this stage"),
        (lambda c: (c / train.RECORD_FILE).write_text("{"), "train_record.json is unreadable (JSONDecodeError)"),
        (lambda c: c.rename(c.with_name("checkpoint-30")), "train_record.json is for step 10, not this checkpoint's"),
    ],
)
def test_an_edited_or_planted_checkpoint_is_refused_with_the_reason(tmp_path, tamper, problem):
    tamper(saved_checkpoint(tmp_path))
    choice = train.resumable_checkpoint(tmp_path, "f" * 64)
    assert choice.resume is None
    [(refused, why)] = choice.refused
    assert refused.parent == tmp_path and why.startswith(problem)


def test_the_newest_trusted_checkpoint_is_resumed_and_the_planted_newer_one_refused(tmp_path):
    ours = saved_checkpoint(tmp_path)
    planted = tmp_path / "checkpoint-30"
    planted.mkdir()
    (planted / "trainer_state.json").write_text('{"global_step": 30}')
    choice = train.resumable_checkpoint(tmp_path, "f" * 64)
    assert choice.resume == ours and choice.superseded == []
    assert choice.refused == [(planted, "no train_record.json (not saved by this stage, or its save was cut)")]


def test_with_the_runner_key_only_a_record_signed_with_it_is_trusted(tmp_path):
    """Whoever can write the folder can compute digests and a fingerprint, not the protected runner's HMAC."""
    signed = saved_checkpoint(tmp_path / "signed", key="runner-secret")
    assert train.record_problem(signed, "f" * 64, key="runner-secret") is None
    assert train.record_problem(signed, "f" * 64, key="another-runner") == (
        "train_record.json is not signed with this runner's key (LLM_GITOPS_CHECKPOINT_KEY)"
    )
    forged = json.loads((signed / train.RECORD_FILE).read_text())
    (signed / train.RECORD_FILE).write_text(json.dumps({**forged, "signature": "é" * 64}))
    assert train.record_problem(signed, "f" * 64, key="runner-secret").startswith("train_record.json is not signed")
    unsigned = saved_checkpoint(tmp_path / "unsigned")  # a record computed without the key: planted
    assert train.record_problem(unsigned, "f" * 64) is None
    assert train.record_problem(unsigned, "f" * 64, key="runner-secret") == (
        "train_record.json is not signed with this runner's key (LLM_GITOPS_CHECKPOINT_KEY)"
    )


PLANTED_KEEPER = {"best_loss": -1.0, "best_epoch": 9.0, "worse_evals": 0, "stopped_early": False, "patience": 0}


def test_a_planted_checkpoint_is_ignored_with_a_warning_and_training_starts_fresh(
    tmp_path, env, tiny_base, tiny_prepared, tiny_params_file
):
    """What someone who can write the checkpoint folder could leave there for the next retrain: a newer
    checkpoint (trainer state far ahead, a keeper whose best loss nothing beats) in the folder of these inputs."""
    params = params_file(tmp_path, tiny_params_file, epochs=1)
    loaded = load_params(params)
    fingerprint = train.inputs_fingerprint(tiny_base, tiny_prepared, loaded.train, loaded.data)
    planted = tmp_path / "checkpoints" / f"train-{fingerprint[:16]}" / "checkpoint-30"
    planted.mkdir(parents=True)
    (planted / "trainer_state.json").write_text(json.dumps({"global_step": 30, "epoch": 5.0, "log_history": []}))
    (planted / "keep_best.json").write_text(json.dumps(PLANTED_KEEPER))

    rerun = subprocess.run(
        train_command(params, tiny_base, tiny_prepared, tmp_path), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"ignoring checkpoint {planted}: no train_record.json" in rerun.stderr
    assert "training starts fresh" in rerun.stderr and "resuming" not in rerun.stderr
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 7
    assert metrics["best_eval_loss"] > 0 and metrics["best_epoch"] == 1.0  # the planted keeper's -1 is not used


def test_a_checkpoint_edited_after_its_save_is_ignored_and_training_starts_fresh(
    tmp_path, env, tiny_base, tiny_prepared, tiny_params_file
):
    command = train_command(params_file(tmp_path, tiny_params_file), tiny_base, tiny_prepared, tmp_path)
    kill_after_checkpoint(command, env, tmp_path / "checkpoints", step=10)
    [checkpoint] = (tmp_path / "checkpoints").glob("train-*/checkpoint-10")
    (checkpoint / "keep_best.json").write_text(json.dumps(PLANTED_KEEPER))

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"ignoring checkpoint {checkpoint}: keep_best.json differs from its record" in rerun.stderr
    assert "resuming" not in rerun.stderr
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == STEPS
    assert metrics["best_eval_loss"] > 0
