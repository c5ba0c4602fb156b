"""Every stage has a --help, and a bad input is one clear error line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

STAGES = [
    "pipeline.prepare",
    "pipeline.base",
    "pipeline.train",
    "pipeline.merge",
    "pipeline.convert",
    "pipeline.quantize",
]


def python_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("module", STAGES)
def test_every_stage_has_help(module):
    result = python_module(module, "--help")
    assert result.returncode == 0
    assert f"usage: python -m {module}" in result.stdout and "--params" in result.stdout


def test_bad_params_stop_a_stage_with_one_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lora:\n    r: 0\n")
    result = python_module(
        "pipeline.base", "--params", str(params), "--corpus", "data/train.jsonl", "--out", str(tmp_path / "base")
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-2:] == [
        "error: invalid params:",
        f"  {params}:3: train.lora.r: must be > 0, got 0",
    ]
    assert "Traceback" not in result.stderr and not (tmp_path / "base").exists()


def prepare_with(tmp_path, train: str, params: str | None) -> subprocess.CompletedProcess:
    bad = tmp_path / "train.jsonl"
    bad.write_text(train)
    params_file = tmp_path / "params.yaml"
    if params is not None:
        params_file.write_text(params)
    return python_module(
        "pipeline.prepare",
        "--train",
        str(bad),
        "--eval",
        "data/eval.jsonl",
        "--cases",
        "data/gate_cases.jsonl",
        "--out",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "data.json"),
        "--params",
        str(params_file),
    )


def test_bad_data_stops_prepare_with_file_and_line_and_writes_nothing(tmp_path):
    result = prepare_with(tmp_path, '{"messages": [{"role": "user", "content": "hi"}]}\n', "base:\n  model: tiny\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    train = tmp_path / "train.jsonl"
    assert (
        f"error: 2 problem(s) in the data:\n  {train}:1: messages: no assistant turn\n  {train}: no valid conversations"
        in result.stderr
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "data.json").exists()


def test_a_missing_params_file_is_one_clear_error(tmp_path):
    result = prepare_with(tmp_path, "", None)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'params.yaml'}: cannot read params: No such file or directory" in result.stderr


def test_unknown_base_model_names_the_param(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("base:\n  model: not a model\n")
    result = python_module(
        "pipeline.base", "--params", str(params), "--corpus", "data/train.jsonl", "--out", str(tmp_path / "base")
    )
    assert result.returncode == 1
    assert (
        "error: base.model: 'not a model' is neither smollm2, gemma3-270m, tiny, a local directory nor a hub id"
        in result.stderr
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("qlora: true", "error: train.qlora: true needs a CUDA GPU (bitsandbytes 4-bit) and none was found"),
        ("optimizer: paged_adamw_8bit", "error: train.optimizer: paged_adamw_8bit needs a CUDA GPU"),
        ("liger: true", "error: train.liger: true needs a CUDA GPU and the liger-kernel package"),
    ],
)
def test_cuda_only_settings_stop_training_with_one_line_on_a_cpu_machine(
    tmp_path, tiny_base, tiny_prepared, setting, message
):
    params = tmp_path / "params.yaml"
    params.write_text(f"base:\n  model: tiny\ntrain:\n  {setting}\n")
    result = python_module(
        "pipeline.train",
        "--params",
        str(params),
        "--base",
        str(tiny_base),
        "--data",
        str(tiny_prepared),
        "--out",
        str(tmp_path / "adapter"),
        "--metrics",
        str(tmp_path / "train.json"),
        "--plots",
        str(tmp_path / "plots"),
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "adapter").exists()
