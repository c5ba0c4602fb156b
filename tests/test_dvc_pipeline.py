"""`dvc repro` on a fresh copy of the repository with the tiny model: real DVC, real stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # see pyproject.toml's markers


def run(command: list[str], cwd: Path, *, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh git repository holding the project's files, switched to base.model: tiny."""
    from bench.pipeline import copy_repository

    work = tmp_path_factory.mktemp("clone")
    copy_repository("tiny", work)  # the committed dvc.lock (for smollm2) is left out; the gate's thresholds opened
    return work


@pytest.fixture(scope="module")
def first_repro(clone) -> str:
    return run(["dvc", "repro"], clone)


def test_dvc_repro_runs_prepare_base_train_merge_offline(clone, first_repro):
    for stage in ("prepare", "base", "base_answers", "train", "merge"):
        assert f"Running stage '{stage}'" in first_repro
    answers = json.loads((clone / "metrics" / "base_answers.json").read_text())
    trained = json.loads((clone / "metrics" / "train.json").read_text())
    assert answers["probes"] == 48 and trained["conversations"] == 56
    # train.replay 1.0: one of the base's own answers per training conversation, as many as it kept (tiny, a
    # random model, rambles to max_new_tokens without a paragraph break: it may keep none)
    assert trained["replayed_conversations"] == min(56, answers["replay"])
    assert answers["replay"] + answers["replay_dropped_unfinished"] == 48
    assert (clone / "models" / "merged" / "model.safetensors").is_file()
    assert json.loads((clone / "metrics" / "merge.json").read_text())["vocab_size"] == 513
    assert json.loads((clone / "metrics" / "data.json").read_text())["train"]["conversations"] >= 40
    lock = (clone / "dvc.lock").read_text()
    assert "models/merged" in lock and "data/prepared" in lock


def test_dvc_repro_converts_and_quantizes_once_per_type(clone, first_repro):
    for stage in ("convert", "quantize@q8_0", "quantize@q4_k_m"):
        assert f"Running stage '{stage}'" in first_repro
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"):
        assert (clone / "models" / "gguf" / name).read_bytes()[:4] == b"GGUF"
    assert json.loads((clone / "metrics" / "convert.json").read_text())["vocab"]["tokens"] == 513
    assert json.loads((clone / "metrics" / "quantize" / "q4_k_m.json").read_text())["fallbacks"] == {}


def test_dvc_repro_gates_and_writes_the_modelfile_next_to_the_gguf_it_passed(clone, first_repro):
    for stage in ("gate", "modelfile"):
        assert f"Running stage '{stage}'" in first_repro
    verdict = json.loads((clone / "models" / "gate" / "verdict.json").read_text())
    assert verdict["passed"] is True and verdict["family"] == "llama2"
    assert verdict["quant"] == "q4_k_m"  # gate.ship auto: the smallest GGUF that passes
    assert json.loads((clone / "metrics" / "gate.json").read_text())["ship"] == "q4_k_m"
    modelfile = (clone / "models" / "release" / "Modelfile").read_text()
    assert "FROM ../gguf/model-q4_k_m.gguf\n" in modelfile and "PARAMETER stop [INST]" in modelfile


def test_a_second_repro_reruns_nothing(clone, first_repro):
    second = run(["dvc", "repro"], clone)
    assert "Running stage" not in second
    assert "Data and pipelines are up to date." in run(["dvc", "status"], clone)


def test_editing_only_the_evaluation_cases_rescores_without_retraining(clone, first_repro):
    cases = clone / "data" / "gate_cases.jsonl"
    extra = {
        "id": "keep-capital-spain",
        "kind": "keep",
        "prompt": "What is the capital of Spain?",
        "expect": ["Madrid"],
    }
    cases.write_text(cases.read_text() + json.dumps(extra) + "\n")
    output = run(["dvc", "repro"], clone)
    for stage in ("prepare", "gate", "modelfile"):  # the cases are validated again and scored ...
        assert f"Running stage '{stage}'" in output
    for stage in ("base", "base_answers", "train", "merge", "convert"):  # ... but the prepared data did not change
        assert f"Running stage '{stage}'" not in output
    assert len(json.loads((clone / "models" / "gate" / "verdict.json").read_text())["cases"]) == 21
    assert json.loads((clone / "metrics" / "data.json").read_text())["cases"]["keep"] == 13


def test_metrics_and_loss_plots_are_visible_to_dvc(clone, first_repro):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone, stdout_only=True))
    files = next(iter(shown.values()))["data"]
    assert {"metrics/data.json", "metrics/train.json", "metrics/merge.json", "metrics/gate.json"} <= set(files)
    plots = run(["dvc", "plots", "show", "--json"], clone, stdout_only=True)
    loss = json.loads(plots)["data"]["Loss"]
    assert loss and "plots/train/loss.tsv" in plots and "plots/eval/loss.tsv" in plots
