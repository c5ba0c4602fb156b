"""Ollama TEMPLATEs per chat family: our renderer is Ollama's, and what it renders is what training saw.

Three references, all real: Ollama v0.11.4's own `template` package (a small Go program in
tests/go/ollama_prompt, built once with the Go toolchain and cached), the tokenizers' Jinja chat
templates (transformers), and llama.cpp's tokenizer on GGUF files (llama-cpp-python).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.cases import load_cases
from pipeline.chat_templates import CHAT_TEMPLATES, CHATML_CHAT_TEMPLATE
from pipeline.common import PipelineError
from pipeline.go_template import render_prompt
from pipeline.ollama_template import (
    CHATML_TEMPLATE,
    FAMILIES,
    LLAMA2_TEMPLATE,
    ChatFamily,
    check_parity,
    family_for,
)
from tests.conftest import CACHE, DATA, MULTI_TURN, ROOT

GO_RENDERER = ROOT / "tests" / "go" / "ollama_prompt"

# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json; also Ollama's
# template/index.json entry for llama3-instruct).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_JINJA = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MODELFILE_SYSTEM = "You answer questions about Psion OPL."


# --- the conversations: every gate case, and every prompt point of the training data ---


@pytest.fixture(scope="module")
def conversations(dataset_conversations) -> list[list[dict]]:
    """Each gate case as the gate sends it, and every training/eval conversation cut after each
    user turn (what a chat sends to be answered), plus MULTI_TURN."""
    errors: list[str] = []
    cases = load_cases(DATA / "gate_cases.jsonl", errors)
    assert errors == []
    prompts = [case.messages() for case in cases]
    for messages in [*dataset_conversations, MULTI_TURN]:
        prompts += [messages[: i + 1] for i, m in enumerate(messages) if m["role"] == "user"]
    # the real details are in there: history, system messages, multi-turn, code with indentation
    assert any(case.history for case in cases) and any(case.system for case in cases)
    assert sum(1 for p in prompts if p[0]["role"] == "system") >= 5 and max(len(p) for p in prompts) >= 4
    return prompts


# --- tokenizers of each family ---


def with_template(tokenizer, jinja: str):
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = jinja
    return copied


@pytest.fixture(scope="module")
def llama3_model(smollm2_tokenizer, tmp_path_factory, monkeypatch_module) -> tuple[object, Path]:
    """A Llama-3-style tokenizer and GGUF: SmolLM2's BPE plus Llama-3's special tokens, BOS added by
    the tokenizer (add_bos_token, as Llama-3's post-processor does) and Llama-3's Jinja template;
    the GGUF is a 1-layer random model with that vocabulary through stage convert."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline import gguf_vocab
    from pipeline.convert import convert
    from pipeline.params import ConvertParams

    out = tmp_path_factory.mktemp("llama3-like")
    smollm2_tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"], special_tokens=True)
    tokenizer.add_bos_token = True
    tokenizer.chat_template = LLAMA3_JINJA
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(out)
    # SmolLM2's pre-tokenizer; the BOS now in front of llama.cpp's check text changes its hash
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(gguf_vocab.CHKTXT).ids
    monkeypatch_module.setitem(gguf_vocab.PRE_TOKENIZERS, hashlib.sha256(str(ids).encode()).hexdigest(), "smollm")
    gguf = out / "model-f16.gguf"
    convert(out, gguf, ConvertParams(outtype="f16"))
    return tokenizer, gguf


@pytest.fixture(scope="module")
def first_style_tiny(tiny_merged):
    """tiny's tokenizer with Metaspace prepend_scheme "first" (what legacy=False gives): no "▁" after
    a special token, unlike SentencePiece itself, Meta's Llama-2 tokenizer.json, llama.cpp and tiny's
    own tokenizer (legacy=True)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_merged)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return tokenizer


@pytest.fixture(scope="module")
def family_tokenizers(
    tiny_tokenizer,
    smollm2_tokenizer,
    llama3_model,
    qwen2_tokenizer,
    qwen3_tokenizer,
    llama31_tokenizer,
    phi3_tokenizer,
    phi3_mini_tokenizer,
    gemma3_tokenizer,
) -> dict:
    return {
        "llama2": tiny_tokenizer,
        "chatml-smollm2": smollm2_tokenizer,
        "qwen2.5": qwen2_tokenizer,
        "qwen3": qwen3_tokenizer,
        "chatml": with_template(smollm2_tokenizer, CHATML_CHAT_TEMPLATE),
        "llama3": llama3_model[0],
        "llama3.1": llama31_tokenizer,
        "phi3.5": phi3_tokenizer,
        "phi3": phi3_mini_tokenizer,
        "gemma": gemma3_tokenizer,
    }


FAMILY_NAMES = [row.family.name for row in FAMILIES]


def family(name: str) -> ChatFamily:
    return next(row.family for row in FAMILIES if row.family.name == name)


# --- detection ---


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_is_recognised_from_its_jinja_template(name, family_tokenizers):
    assert family_for(family_tokenizers[name]).name == name


def test_the_families_cover_chatml_qwen25_llama2_and_llama3_with_ollamas_stop_lists():
    assert {f: family(f).stop for f in FAMILY_NAMES} == {
        "chatml-smollm2": ("<|im_start|>", "<|im_end|>"),
        "qwen2.5": ("<|im_start|>", "<|im_end|>"),
        "qwen3": ("<|im_start|>", "<|im_end|>"),
        "chatml": ("<|im_start|>", "<|im_end|>"),
        "llama2": ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
        "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "llama3.1": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "phi3.5": ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
        "phi3": ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
        "gemma": ("<end_of_turn>", "<start_of_turn>", "<eos>"),
    }


def test_an_unknown_chat_template_is_an_error_naming_the_row_to_add(smollm2_tokenizer):
    with pytest.raises(PipelineError) as error:
        family_for(with_template(smollm2_tokenizer, GEMMA_JINJA))
    assert str(error.value).startswith(
        "no Ollama TEMPLATE for this chat template (known families: chatml-smollm2, qwen2.5, qwen3, chatml, llama2, "
        "llama3, llama3.1, phi3.5, phi3, gemma); add a row to FAMILIES in pipeline/ollama_template.py with markers "
        "found in it, the Go TEMPLATE and the stop list. Its start: "
        '"{{ bos_token }}{% for message in messages %}<start_of_turn>'
    )
    with pytest.raises(PipelineError, match="the tokenizer has no chat template"):
        family_for(with_template(smollm2_tokenizer, None))


@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_each_base_chat_template_choice_is_recognised_as_the_family_it_names(name, smollm2_tokenizer):
    assert family_for(with_template(smollm2_tokenizer, CHAT_TEMPLATES[name]())).name == name


@pytest.mark.parametrize(
    ("trl_name", "what"),
    [
        ("qwen3", "Qwen3's <think> block"),
        ("llama3_2", "Llama-3.2's date of today"),
        ("gemma", "Gemma 2's template, which refuses a system message"),
    ],
)
def test_a_template_a_family_only_resembles_is_refused_not_served_with_the_wrong_template(
    trl_name, what, smollm2_tokenizer
):
    from trl import chat_template_utils

    jinja = getattr(chat_template_utils, f"{trl_name}_chat_template")
    with pytest.raises(PipelineError, match="no Ollama TEMPLATE for this chat template"):
        family_for(with_template(smollm2_tokenizer, jinja))


# --- the renderer is Ollama's ---


@pytest.fixture(scope="session")
def ollama_render() -> callable:
    """Render with Ollama v0.11.4's template package: the Go program in tests/go/ollama_prompt, built
    once (Go module proxy, then Go's caches) into CACHE, keyed by its sources."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs the Go toolchain (go) to build Ollama's template package")
    sources = sorted(p for p in GO_RENDERER.iterdir() if p.suffix in (".go", ".mod", ".sum"))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    binary = CACHE / f"ollama-prompt-{key}"
    if not binary.is_file():
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        build = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=GO_RENDERER, capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        tmp.replace(binary)

    def render(requests: list[dict]) -> list[dict]:
        result = subprocess.run([binary], input=json.dumps(requests), capture_output=True, text=True, check=True)
        return json.loads(result.stdout)

    return render


# Go text/template semantics the renderer must get right, beyond our TEMPLATEs.
SNIPPETS = [
    "{{ range $i, $m := .Messages }}{{ if $i }},{{ end }}{{ $i }}={{ $m.Role }}{{ end }}",
    "{{- range .Messages -}}\n  [{{ .Content }}]  \n{{- end }}\n  tail",
    '{{ range .Messages }}{{ if eq .Role "user" "system" }}U{{ else if ne .Role "assistant" }}?'
    "{{ else }}A{{ end }}{{ end }}",
    "{{ $n := 0 }}{{ range .Messages }}{{ $n = len .Content }}{{ end }}{{ $n }} {{ len .Messages }}",
    '{{ and .System "yes" }}|{{ or .Response "empty" }}|{{ not .Messages }}|{{ and .Response "never" }}|',
    "{{/* a comment */}}{{- range .Messages }}{{ else }}none{{ end }}{{ .Think }}{{ .IsThinkSet }}",
    '{{ if (and (ne (len .Messages) 0) .System) }}S={{ $.System }}{{ end }}{{ `raw\\n` }}{{ "q\\tq" }}',
    "{{ range .Messages }}{{ $x := .Role }}{{ $x }}{{ end }}",
]


def test_render_prompt_equals_ollamas_template_package(conversations, ollama_render):
    requests = [
        {"template": template, "system": system, "messages": messages}
        for template in [row.family.template for row in FAMILIES] + SNIPPETS
        for system in ("", MODELFILE_SYSTEM)
        for messages in [*conversations, [], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]
    ]
    expected = ollama_render(requests)
    assert all("prompt" in r for r in expected), [r for r in expected if "error" in r][:3]
    got = [render_prompt(r["template"], r["messages"], r["system"] or None) for r in requests]
    assert len(requests) == len(expected) == 2 * (len(FAMILIES) + len(SNIPPETS)) * (len(conversations) + 2)
    compared = zip(requests, got, expected, strict=True)
    assert [(r["template"][:40], r["messages"][:1], g, e["prompt"]) for r, g, e in compared if g != e["prompt"]] == []


def test_render_prompt_follows_ollamas_chat_rules():
    conversation = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}]
    # SYSTEM becomes the first message; consecutive same-role messages are merged
    assert render_prompt(CHATML_TEMPLATE, conversation, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\n\nthere<|im_end|>\n<|im_start|>assistant\n"
    )
    # a conversation with its own system message keeps it, and the Modelfile's SYSTEM is not used
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(CHATML_TEMPLATE, own, system="Be brief.") == (
        "<|im_start|>system\nMine.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_llama2_template_writes_the_system_once_and_bos_between_turns_only():
    assert render_prompt(LLAMA2_TEMPLATE, MULTI_TURN[:4]) == (
        "[INST] <<SYS>>\nYou are an OPL expert.\n<</SYS>>\n\nPrint Hello Chris in OPL. [/INST] "
        'PROC main:\n  PRINT "Hello Chris"\nENDP </s><s>[INST] Now wait for a key. [/INST]'
    )


UNSUPPORTED = {
    "pipe": ("{{ range .Messages }}{{ .Content | printf }}{{ end }}", "a pipe '|' is not supported"),
    "printf": ('{{ range .Messages }}{{ printf "%s" .Content }}{{ end }}', "the function or keyword 'printf'"),
    "index": ("{{ (index .Messages 0).Role }}", "the function or keyword 'index'"),
    "with": ("{{ with .Messages }}x{{ end }}", "{{ with }} is not supported"),
    "legacy template": ("{{ .System }} {{ .Prompt }}", "a TEMPLATE without .Messages"),
    "field Ollama's chat leaves unset": (
        "{{ .Prompt }}{{ .Messages }}",
        r"\.Prompt is not set in Ollama's chat \(known: System, Messages, Tools, Response, Think, ThinkLevel, "
        r"IsThinkSet\)",
    ),
    "unclosed if": ("{{ range .Messages }}{{ if .Role }}x{{ end }}", r"\{\{ range \}\} without \{\{ end \}\}"),
    "undefined variable": ("{{ range .Messages }}{{ $x }}{{ end }}", "undefined variable \\$x"),
}


@pytest.mark.parametrize(("template", "message"), UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_the_renderer_refuses_what_it_does_not_cover(template, message):
    with pytest.raises(PipelineError, match=message):
        render_prompt(template, [{"role": "user", "content": "Hi"}])


def test_the_renderer_says_which_subset_it_covers():
    with pytest.raises(PipelineError) as error:
        render_prompt("{{ template `x` }}{{ .Messages }}", [])
    assert "this renderer covers only the text/template subset our TEMPLATEs use" in str(error.value)


# --- parity with training: text, then llama.cpp's token ids ---


@pytest.mark.parametrize("system", [None, MODELFILE_SYSTEM], ids=["no-SYSTEM", "SYSTEM"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_familys_template_renders_what_its_chat_template_renders(name, system, family_tokenizers, conversations):
    check_parity(family_tokenizers[name], family(name), conversations, system, gguf=None)


def test_chatml_token_ids_match_llama_cpp_on_smollm2s_gguf(smollm2_tokenizer, conversations):
    from pipeline.models import smollm2_gguf

    check_parity(smollm2_tokenizer, family("chatml-smollm2"), conversations, None, smollm2_gguf())
    check_parity(smollm2_tokenizer, family("chatml-smollm2"), conversations, MODELFILE_SYSTEM, smollm2_gguf())


def test_llama3_token_ids_match_llama_cpp_with_bos_added_by_llama_cpp(llama3_model, conversations):
    from llama_cpp import Llama

    tokenizer, gguf = llama3_model
    vocabulary = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    assert vocabulary.metadata["tokenizer.ggml.add_bos_token"] == "true"
    vocabulary.close()
    assert tokenizer.apply_chat_template(conversations[0], tokenize=False).startswith("<|begin_of_text|>")
    assert render_prompt(family("llama3").template, conversations[0]).startswith("<|start_header_id|>")
    check_parity(tokenizer, family("llama3"), conversations, MODELFILE_SYSTEM, gguf)


@pytest.mark.parametrize("system", [None, MODELFILE_SYSTEM], ids=["no-SYSTEM", "SYSTEM"])
@pytest.mark.parametrize(("name", "model"), [("qwen2.5", "qwen2"), ("qwen3", "qwen3")])
def test_qwen_token_ids_match_llama_cpp_on_the_tiny_qwen_ggufs(
    name, model, system, family_tokenizers, family_gguf, conversations
):
    from pipeline.llama_runtime import LlamaVocab

    gguf = family_gguf(model).out
    vocabulary = LlamaVocab(gguf)
    assert vocabulary.add_bos is False and family_tokenizers[name].bos_token is None  # Qwen has no BOS
    vocabulary.close()
    check_parity(family_tokenizers[name], family(name), conversations, system, gguf)


@pytest.mark.parametrize("system", [None, MODELFILE_SYSTEM], ids=["no-SYSTEM", "SYSTEM"])
def test_llama31_token_ids_match_llama_cpp_on_the_tiny_llama3_gguf(
    system, llama31_tokenizer, family_gguf, conversations
):
    from pipeline.llama_runtime import LlamaVocab

    gguf = family_gguf("llama3").out
    vocabulary = LlamaVocab(gguf)
    assert vocabulary.add_bos is True  # llama.cpp writes <|begin_of_text|>, the TEMPLATE does not
    vocabulary.close()
    check_parity(llama31_tokenizer, family("llama3.1"), conversations, system, gguf)


@pytest.mark.parametrize("system", [None, MODELFILE_SYSTEM], ids=["no-SYSTEM", "SYSTEM"])
@pytest.mark.parametrize("name", ["phi3.5", "phi3"])
def test_phi3_token_ids_match_llama_cpp_on_the_tiny_phi3_gguf(
    name, system, family_tokenizers, family_gguf, conversations
):
    from pipeline.llama_runtime import LlamaVocab

    gguf = family_gguf("phi3").out
    vocabulary = LlamaVocab(gguf)
    assert vocabulary.add_bos is False  # as the tokenizer (convert writes the flag; see test_families)
    vocabulary.close()
    check_parity(family_tokenizers[name], family(name), conversations, system, gguf)


def test_phi35_leaves_out_a_system_message_without_content_and_phi3_writes_it():
    from pipeline.go_template import render_prompt

    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert render_prompt(family("phi3.5").template, empty) == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert render_prompt(family("phi3").template, empty) == "<|system|>\n<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_the_llama31_template_writes_the_date_header_with_the_first_system_message_and_later_ones_as_turns():
    from pipeline.go_template import render_prompt

    header = (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    )
    assert render_prompt(family("llama3.1").template, MULTI_TURN[1:2]) == (
        f"{header}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nPrint Hello Chris in OPL.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    later = [*MULTI_TURN[1:2], {"role": "system", "content": "Be brief."}, *MULTI_TURN[3:4]]
    assert render_prompt(family("llama3.1").template, later, system="From the Modelfile.").startswith(
        f"{header}From the Modelfile.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nPrint Hello Chris in OPL.<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    )


@pytest.mark.parametrize("system", [None, MODELFILE_SYSTEM], ids=["no-SYSTEM", "SYSTEM"])
@pytest.mark.parametrize("model", ["gemma2", "gemma3"])
def test_gemma_token_ids_match_llama_cpp_on_the_tiny_gemma_ggufs(model, system, family_gguf, conversations, request):
    from pipeline.llama_runtime import LlamaVocab

    tokenizer, gguf = request.getfixturevalue(f"{model}_tokenizer"), family_gguf(model).out
    vocabulary = LlamaVocab(gguf)
    assert vocabulary.add_bos is True  # llama.cpp writes <bos>, the TEMPLATE does not
    vocabulary.close()
    assert tokenizer.apply_chat_template(conversations[0], tokenize=False).startswith("<bos><start_of_turn>user\n")
    check_parity(tokenizer, family("gemma"), conversations, system, gguf)


def test_gemma_folds_the_system_message_into_the_first_user_turn():
    assert render_prompt(family("gemma").template, MULTI_TURN[:4]) == (
        "<start_of_turn>user\nYou are an OPL expert.\n\nPrint Hello Chris in OPL.<end_of_turn>\n"
        '<start_of_turn>model\nPROC main:\n  PRINT "Hello Chris"\nENDP<end_of_turn>\n'
        "<start_of_turn>user\nNow wait for a key.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_qwen3_is_served_thinking_off_unless_the_request_asks(qwen3_tokenizer):
    from pipeline.go_template import render_prompt

    asked = [{"role": "user", "content": "Hi"}]
    assert render_prompt(family("qwen3").template, asked).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = qwen3_tokenizer.apply_chat_template(
        asked, add_generation_prompt=True, tokenize=False, enable_thinking=True
    )
    assert thinking.endswith("<|im_start|>assistant\n")  # asked: Qwen3 thinks, as it ships


def test_llama2_token_ids_match_llama_cpp_with_tinys_sentencepiece_style_tokenizer(
    tiny_merged, tiny_gguf, conversations
):
    from transformers import AutoTokenizer

    check_parity(AutoTokenizer.from_pretrained(tiny_merged), family("llama2"), conversations, None, tiny_gguf.out)


def test_a_tokenizer_without_a_space_after_special_tokens_differs_from_llama_cpp_and_parity_says_where(
    first_style_tiny, tiny_gguf, conversations
):
    with pytest.raises(PipelineError) as error:
        check_parity(first_style_tiny, family("llama2"), conversations, None, tiny_gguf.out)
    assert str(error.value) == (
        "conversation 0 (1 messages, last 'Write a Hello Chris program in Psion OPL.'): llama.cpp tokenizes the "
        "prompt differently from the tokenizer (add_bos true), first at token 1:\n"
        "  tokenizer: [1, 94, 427, 472, 445] ['<s>', '<0x5B>', 'IN', 'S', 'T']\n"
        "  llama.cpp: [1, 430, 94, 427, 472] ['<s>', ' ', '[', 'IN', 'S']\n"
        "  llama.cpp puts '▁' after a special token where this tokenizer does not (its Metaspace prepend_scheme is "
        "'first', legacy=False): the served model would see tokens it was not trained on"
    )


def test_a_wrong_template_fails_parity_showing_the_first_difference(smollm2_tokenizer, conversations):
    # plain ChatML misses the default system message SmolLM2's Jinja adds
    with pytest.raises(PipelineError) as error:
        check_parity(smollm2_tokenizer, family("chatml"), conversations, None, None)
    assert str(error.value) == (
        "conversation 0 (1 messages, last 'Write a Hello Chris program in Psion OPL.'): the chatml TEMPLATE renders "
        "a different prompt from the tokenizer's chat template, first at character 12:\n"
        "  chat template: '<|im_start|>system\\nYou are a helpful AI assistant na'\n"
        "  TEMPLATE:      '<|im_start|>user\\nWrite a Hello Chris program in Psio'"
    )


def test_a_template_that_writes_the_bos_itself_is_refused(tiny_merged, tiny_gguf, conversations):
    from transformers import AutoTokenizer

    doubled = ChatFamily("llama2-with-bos", "<s>" + LLAMA2_TEMPLATE, family("llama2").stop)
    with pytest.raises(PipelineError, match=r"TEMPLATE starts with the BOS text '<s>'; llama.cpp adds BOS itself"):
        check_parity(AutoTokenizer.from_pretrained(tiny_merged), doubled, conversations, None, tiny_gguf.out)


def test_a_conversation_the_chat_template_refuses_is_a_clear_error(tiny_tokenizer):
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(PipelineError, match=r"conversation 0 .*: the tokenizer's chat template refuses it: "):
        check_parity(tiny_tokenizer, family("llama2"), [two_users], None, None)
