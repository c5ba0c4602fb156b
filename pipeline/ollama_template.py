"""Ollama's TEMPLATE for the chat families we serve, and the proof that it formats like training.

A fine-tune is trained on what the tokenizer's Jinja `chat_template` renders; Ollama serves it with
the Modelfile's Go TEMPLATE. `FAMILIES` holds, per chat family, the markers that recognise its
Jinja template, the Go TEMPLATE that renders the same prompt, and Ollama's stop list. A family's
name is also what `base.chat_template` names (pipeline.chat_templates.CHAT_TEMPLATES holds the
Jinja a base without one is given).
`check_parity` proves the two agree on given conversations, as text and as llama.cpp's token ids.

The prompt Ollama builds from a TEMPLATE comes from `pipeline.go_template.render_prompt` (Ollama's
chat rules and a text/template interpreter); llama.cpp's tokens from `pipeline.llama_runtime`.

BOS: llama.cpp puts the BOS token first itself when the GGUF says `add_bos_token`, so a TEMPLATE
never writes it; a Jinja template that starts with the BOS text is compared without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.common import PipelineError
from pipeline.go_template import render_prompt
from pipeline.llama_runtime import LlamaVocab


@dataclass(frozen=True)
class ChatFamily:
    name: str
    template: str  # Go text/template, as the Modelfile's TEMPLATE
    stop: tuple[str, ...]  # PARAMETER stop lines


SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def chatml_with_default_system(system: str) -> str:
    """ChatML whose Jinja adds a default system message when the conversation has none (SmolLM2, Qwen2.5)."""
    return (
        "{{- range $i, $m := .Messages }}\n"
        '{{- if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
        f"{system}<|im_end|>\n"
        "{{ end }}<|im_start|>{{ $m.Role }}\n"
        "{{ $m.Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    )


CHATML_SMOLLM2_TEMPLATE = chatml_with_default_system(SMOLLM2_DEFAULT_SYSTEM)
# Qwen2.5-Instruct's template without tools (a request with tools is not served by this TEMPLATE).
CHATML_QWEN25_TEMPLATE = chatml_with_default_system(QWEN25_DEFAULT_SYSTEM)
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
# Qwen3, thinking off unless asked (pipeline.chat_templates.qwen3_thinking_off): the empty <think> block
# unless the request sets `think`; no default system message.
QWEN3_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    "{{ if not (and $.IsThinkSet $.Think) }}<think>\n\n</think>\n\n{{ end }}"
)
# Llama-2 chat as Hugging Face ships it: the system message inside the first [INST] only, every
# later turn opened by the BOS text (<s>, a special token to llama.cpp) and closed by </s>.
LLAMA2_TEMPLATE = (
    "{{- $first := true }}\n"
    "{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}\n'
    "{{- if not $first }}<s>{{ end }}[INST] {{ if and $first $.System }}<<SYS>>\n"
    "{{ $.System }}\n"
    "<</SYS>>\n"
    "\n"
    "{{ end }}{{ .Content }} [/INST]\n"
    "{{- $first = false }}\n"
    '{{- else if eq .Role "assistant" }} {{ .Content }} </s>\n'
    "{{- end }}\n"
    "{{- end }}"
)
# Llama-3 instruct: header ids around each role, <|eot_id|> after each turn.
LLAMA3_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n"
    "\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n"
    "\n"
)
# Gemma 3 (TRL's gemma3.jinja, as its checkpoints ship it): no system turn, the system message folded into
# the first user turn followed by a blank line; the assistant is "model".
GEMMA_TEMPLATE = (
    '{{- $system := "" }}\n'
    "{{- range .Messages }}\n"
    '{{- if eq .Role "system" }}{{ $system = .Content }}\n'
    '{{- else if eq .Role "user" }}<start_of_turn>user\n'
    "{{ if $system }}{{ $system }}\n"
    "\n"
    '{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
    "{{ else }}<start_of_turn>model\n"
    "{{ .Content }}<end_of_turn>\n"
    "{{ end }}\n"
    "{{- end }}<start_of_turn>model\n"
)

# Llama-3.1 instruct as Hugging Face ships it, without tools (a request with tools is not served by this
# TEMPLATE): a system turn always, with the date header of its template (date_string's default, 26 Jul
# 2024) and the conversation's first system message; every other message as Llama-3's turns.
LLAMA31_DATE_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n"
    "\n"
    f"{LLAMA31_DATE_HEADER}"
    '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $m.Content }}{{ end }}{{ end }}'
    "<|eot_id|>\n"
    "{{- range $i, $m := .Messages }}\n"
    '{{- if not (and (eq $i 0) (eq $m.Role "system")) }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n'
    "\n"
    "{{ $m.Content }}<|eot_id|>\n"
    "{{- end }}\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n"
    "\n"
)
# Phi-3 mini as Hugging Face ships it: system, user and assistant turns (other roles are not written), each
# closed by <|end|>; Phi-3.5's leaves out a system message without content.
PHI3_TEMPLATE = (
    "{{- range .Messages }}\n"
    '{{- if eq .Role "system" "user" "assistant" }}<|{{ .Role }}|>\n'
    "{{ .Content }}<|end|>\n"
    "{{ end }}\n"
    "{{- end }}<|assistant|>\n"
)
PHI35_TEMPLATE = PHI3_TEMPLATE.replace(
    '{{- if eq .Role "system" "user" "assistant" }}',
    '{{- if or (eq .Role "user" "assistant") (and (eq .Role "system") .Content) }}',
)


@dataclass(frozen=True)
class _Row:
    markers: tuple[str, ...]  # all found in the Jinja chat_template -> this family
    family: ChatFamily
    # none of these may be in it: what the family's TEMPLATE does not render (e.g. Qwen3's <think> block)
    excludes: tuple[str, ...] = ()


CHATML_STOP = ("<|im_start|>", "<|im_end|>")
PHI3_STOP = ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
# Ollama's for Llama-3 and 3.1 (<|eom_id|>, the end of an ipython turn, is end-of-generation in llama.cpp itself)
LLAMA3_STOP = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# First matching row wins, so a specific variant comes before its general form. Stop lists are
# Ollama's own (template/<name>.json).
FAMILIES: tuple[_Row, ...] = (
    _Row(("<|im_start|>", SMOLLM2_DEFAULT_SYSTEM), ChatFamily("chatml-smollm2", CHATML_SMOLLM2_TEMPLATE, CHATML_STOP)),
    _Row(("<|im_start|>", QWEN25_DEFAULT_SYSTEM), ChatFamily("qwen2.5", CHATML_QWEN25_TEMPLATE, CHATML_STOP)),
    _Row(
        ("<|im_start|>", "{%- if not (enable_thinking is defined and enable_thinking) %}"),
        ChatFamily("qwen3", QWEN3_TEMPLATE, CHATML_STOP),
    ),
    # not Qwen3's (as it ships it thinks by default): its <think> block is not plain ChatML
    _Row(("<|im_start|>", "<|im_end|>"), ChatFamily("chatml", CHATML_TEMPLATE, CHATML_STOP), excludes=("<think>",)),
    _Row(
        ("[INST]", "<<SYS>>"),
        ChatFamily("llama2", LLAMA2_TEMPLATE, ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    ),
    _Row(
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ChatFamily("llama3", LLAMA3_TEMPLATE, LLAMA3_STOP),
        excludes=("Cutting Knowledge Date",),  # not Llama-3.1+'s: its date header is not rendered here
    ),
    _Row(
        ("<|start_header_id|>", "<|eot_id|>", "Cutting Knowledge Date: December 2023", '"26 Jul 2024"'),
        ChatFamily("llama3.1", LLAMA31_TEMPLATE, LLAMA3_STOP),
        # not Llama-3.2's: it writes today's date (strftime_now), which no TEMPLATE can promise to match
        excludes=("strftime_now",),
    ),
    _Row(
        ("<|user|>", "<|assistant|>", "<|end|>", "message['role'] == 'system' and message['content']"),
        ChatFamily("phi3.5", PHI35_TEMPLATE, PHI3_STOP),
    ),
    _Row(("<|user|>", "<|assistant|>", "<|end|>"), ChatFamily("phi3", PHI3_TEMPLATE, PHI3_STOP)),
    # Gemma 3's (the system folded in); not Gemma/Gemma 2's, which refuses a system message
    _Row(
        ("<start_of_turn>", "first_user_prefix"),
        ChatFamily("gemma", GEMMA_TEMPLATE, ("<end_of_turn>", "<start_of_turn>", "<eos>")),
    ),
)


def family_for(tokenizer) -> ChatFamily:
    """The chat family of the tokenizer's Jinja template, or an error saying what to add."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise PipelineError("the tokenizer has no chat template (or several named ones): no TEMPLATE can match it")
    for row in FAMILIES:
        if all(marker in template for marker in row.markers) and not any(x in template for x in row.excludes):
            return row.family
    known = ", ".join(row.family.name for row in FAMILIES)
    raise PipelineError(
        f"no Ollama TEMPLATE for this chat template (known families: {known}); add a row to FAMILIES in "
        f"pipeline/ollama_template.py with markers found in it, the Go TEMPLATE and the stop list. "
        f"Its start: {template[:160]!r}"
    )


# --- parity: what Ollama feeds llama.cpp == what training tokenized ---


def _first_difference(expected: list | str, got: list | str) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got))
    )


def _excerpt(text: str, at: int) -> str:
    return repr(text[max(0, at - 40) : at + 40])


def _describe(index: int, messages: list[dict]) -> str:
    last = messages[-1]["content"] if messages else ""
    return f"conversation {index} ({len(messages)} messages, last {last[:50]!r})"


def _hf_conversation(messages: list[dict], system: str | None) -> list[dict]:
    """What the model sees under Ollama, as a conversation for the tokenizer's Jinja template."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def _tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _space_after_special_hint(tokenizer, vocab: LlamaVocab, expected: list[int], got: list[int], at: int) -> str:
    """The known SentencePiece case: llama.cpp writes "▁" after every special token (add_space_prefix),
    a tokenizer with Metaspace prepend_scheme "first" (legacy=False) does not."""
    extra_space = at < len(got) and vocab.piece(got[at]) == " " and got[at + 1 : at + 4] == expected[at : at + 3]
    if extra_space and at > 0 and got[at - 1] in tokenizer.all_special_ids:
        return (
            "\n  llama.cpp puts '▁' after a special token where this tokenizer does not (its Metaspace "
            "prepend_scheme is 'first', legacy=False): the served model would see tokens it was not trained on"
        )
    return ""


def check_parity(
    tokenizer, family: ChatFamily, conversations: list[list[dict]], system: str | None, gguf: Path | None
) -> None:
    """Fail unless, for every conversation, the TEMPLATE renders what the tokenizer's chat template
    renders with add_generation_prompt=True (less a leading BOS text, which llama.cpp adds itself)
    and, with a GGUF, llama.cpp's tokens of that prompt (BOS per the GGUF's add_bos flag, special
    tokens parsed, as Ollama runs it) equal the tokenizer's. Raises PipelineError showing the first
    differing position of the first mismatching conversation."""
    from jinja2 import TemplateError

    vocab = LlamaVocab(gguf) if gguf is not None else None
    # BOS is llama.cpp's to add when the GGUF says so (without a GGUF: when the tokenizer adds it)
    adds_bos = vocab.add_bos if vocab is not None else _tokenizer_adds_bos(tokenizer)
    bos = (tokenizer.bos_token or "") if adds_bos else ""
    try:
        for index, messages in enumerate(conversations):
            where = _describe(index, messages)
            hf_messages = _hf_conversation(messages, system)
            try:
                expected = tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as error:
                raise PipelineError(f"{where}: the tokenizer's chat template refuses it: {error}") from None
            prompt = render_prompt(family.template, messages, system)
            if bos and prompt.startswith(bos):
                raise PipelineError(
                    f"{where}: the {family.name} TEMPLATE starts with the BOS text {bos!r}; llama.cpp adds BOS "
                    "itself (add_bos), so the model would see it twice"
                )
            expected_prompt = expected.removeprefix(bos) if bos else expected
            if prompt != expected_prompt:
                at = _first_difference(expected_prompt, prompt)
                raise PipelineError(
                    f"{where}: the {family.name} TEMPLATE renders a different prompt from the tokenizer's chat "
                    f"template, first at character {at}:\n  chat template: {_excerpt(expected_prompt, at)}\n"
                    f"  TEMPLATE:      {_excerpt(prompt, at)}"
                )
            if vocab is None:
                continue
            expected_ids = list(
                tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
            ids = vocab.tokenize(prompt)
            if ids != expected_ids:
                at = _first_difference(expected_ids, ids)
                window = slice(max(0, at - 3), at + 4)
                raise PipelineError(
                    f"{where}: llama.cpp tokenizes the prompt differently from the tokenizer "
                    f"(add_bos {str(vocab.add_bos).lower()}), first at token {at}:\n"
                    f"  tokenizer: {expected_ids[window]} {tokenizer.convert_ids_to_tokens(expected_ids[window])}\n"
                    f"  llama.cpp: {ids[window]} {[vocab.piece(t) for t in ids[window]]}"
                    + _space_after_special_hint(tokenizer, vocab, expected_ids, ids, at)
                )
    finally:
        if vocab is not None:
            vocab.close()
