"""train.num_processes: 2 runs the same stage under torchrun (DDP, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT
from tests.test_resume import params_file, train_command


@pytest.mark.slow
def test_two_processes_take_the_same_optimizer_steps_and_write_outputs_once(
    tmp_path, tiny_base, tiny_prepared, tiny_params_file
):
    env = {**os.environ, "LLM_GITOPS_CHECKPOINTS": str(tmp_path / "checkpoints")}
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"np{processes}"
        params = params_file(tmp_path, tiny_params_file, epochs=1, num_processes=processes, checkpoint_steps=0)
        run = subprocess.run(
            train_command(params, tiny_base, tiny_prepared, out), cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-3000:]
        results[processes] = (json.loads((out / "train.json").read_text()), run.stderr)

    single, (double, log) = results[1][0], results[2]
    assert double["world_size"] == 2 and single["world_size"] == 1
    # batch_size 8 is split 4 + 4: one optimizer step still sees 8 conversations
    assert double["steps"] == single["steps"] == 7
    assert log.count("train: done:") == 1 and log.count("train: training") == 1  # rank 0 only
    assert (tmp_path / "np2" / "adapter" / "adapter_model.safetensors").is_file()
    assert abs(double["first_eval_loss"] - single["first_eval_loss"]) < 0.05


def test_num_processes_must_divide_the_batch(tmp_path, tiny_base, tiny_prepared, tiny_params_file):
    params = params_file(tmp_path, tiny_params_file, num_processes=3)
    run = subprocess.run(
        train_command(params, tiny_base, tiny_prepared, tmp_path), cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 1
    assert "error: train.batch_size 8 must be divisible by train.num_processes 3" in run.stderr
