"""Ollama's TEMPLATE for the chat families we serve, and the proof that it formats like training.

A fine-tune is trained on what the tokenizer's Jinja `chat_template` renders; Ollama serves it with
the Modelfile's Go TEMPLATE. `FAMILIES` holds, per chat family, the markers that recognise its
Jinja template, the Go TEMPLATE that renders the same prompt, and Ollama's stop list.
`check_parity` proves the two agree on given conversations, as text and as llama.cpp's token ids.

What Ollama (v0.11.4, `/api/chat`) does before rendering, and `render_prompt` does too
(server/routes.go ChatHandler, server/prompt.go chatPrompt, template/template.go):

- the Modelfile's SYSTEM becomes a first system message unless the conversation starts with one;
- consecutive messages of the same role are merged, joined by a blank line;
- the template sees `.Messages` (role, content), `.System` (every system message, joined by a blank
  line), `.Response` (empty) and `.Tools`/`.Think` (unset).

BOS: llama.cpp puts the BOS token first itself when the GGUF says `add_bos_token`, so a TEMPLATE
never writes it; a Jinja template that starts with the BOS text is compared without it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError


@dataclass(frozen=True)
class ChatFamily:
    name: str
    template: str  # Go text/template, as the Modelfile's TEMPLATE
    stop: tuple[str, ...]  # PARAMETER stop lines


SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML as SmolLM2 ships it: its Jinja adds a default system message when the conversation has none.
CHATML_SMOLLM2_TEMPLATE = (
    "{{- range $i, $m := .Messages }}\n"
    '{{- if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
    f"{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
    "{{ end }}<|im_start|>{{ $m.Role }}\n"
    "{{ $m.Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
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


@dataclass(frozen=True)
class _Row:
    markers: tuple[str, ...]  # all found in the Jinja chat_template -> this family
    family: ChatFamily


# First matching row wins, so a specific variant comes before its general form. Stop lists are
# Ollama's own (template/<name>.json).
FAMILIES: tuple[_Row, ...] = (
    _Row(
        ("<|im_start|>", SMOLLM2_DEFAULT_SYSTEM),
        ChatFamily("chatml-smollm2", CHATML_SMOLLM2_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    ),
    _Row(("<|im_start|>", "<|im_end|>"), ChatFamily("chatml", CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"))),
    _Row(
        ("[INST]", "<<SYS>>"),
        ChatFamily("llama2", LLAMA2_TEMPLATE, ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    ),
    _Row(
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ChatFamily("llama3", LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ),
)


def family_for(tokenizer) -> ChatFamily:
    """The chat family of the tokenizer's Jinja template, or an error saying what to add."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise PipelineError("the tokenizer has no chat template (or several named ones): no TEMPLATE can match it")
    for row in FAMILIES:
        if all(marker in template for marker in row.markers):
            return row.family
    known = ", ".join(row.family.name for row in FAMILIES)
    raise PipelineError(
        f"no Ollama TEMPLATE for this chat template (known families: {known}); add a row to FAMILIES in "
        f"pipeline/ollama_template.py with markers found in it, the Go TEMPLATE and the stop list. "
        f"Its start: {template[:160]!r}"
    )


# --- a small interpreter for the subset of Go's text/template our TEMPLATEs use ---

FUNCTIONS = ("eq", "ne", "and", "or", "not", "len")
UNSUPPORTED_KEYWORDS = ("with", "define", "template", "block", "break", "continue", "nil")
# Ollama v0.11.4's chat values (template.Execute, the .Messages path) and api.Message's fields.
MESSAGE_FIELDS = {"Role": "", "Content": "", "Thinking": "", "ToolName": "", "Images": None, "ToolCalls": None}
TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<close>-?}})
    | (?P<string>"(?:[^"\\\n]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<number>-?[0-9]+)
    | (?P<declare>:=)
    | (?P<assign>=)
    | (?P<punct>[(),|])
    | (?P<variable>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)
COMMENT = re.compile(r"\s*/\*.*?\*/\s*(-?)}}", re.DOTALL)  # {{/* ... */}}, the rest of an action
BLANKS = " \t\r\n"


def _unsupported(what: str) -> PipelineError:
    return PipelineError(
        f"TEMPLATE: {what} is not supported: this renderer covers only the text/template subset our "
        "TEMPLATEs use (text, {{- -}} trimming, comments, if/else if/else, range over .Messages with "
        f"$i/$m, variables := and =, $.System, string/number/bool literals, {'/'.join(FUNCTIONS)})"
    )


def _lex(template: str) -> list[tuple[str, Any]]:
    """Text and actions; an action is its tokens. Trim markers are applied here."""
    items: list[tuple[str, Any]] = []
    pos = 0
    trim_next = False
    while True:
        start = template.find("{{", pos)
        text = template[pos : len(template) if start < 0 else start]
        if trim_next:
            text = text.lstrip(BLANKS)
        if start < 0:
            items.append(("text", text))
            return items
        pos = start + 2
        if template[pos : pos + 1] == "-" and template[pos + 1 : pos + 2] in tuple(BLANKS):  # "{{- "
            text = text.rstrip(BLANKS)
            pos += 1
        items.append(("text", text))
        comment = COMMENT.match(template, pos)
        if comment:
            pos, trim_next = comment.end(), comment.group(1) == "-"
            continue
        tokens: list[tuple[str, str]] = []
        while True:
            match = TOKEN.match(template, pos)
            if not match:
                raise PipelineError(f"TEMPLATE: cannot read the action at {template[start : start + 40]!r}")
            pos = match.end()
            kind = match.lastgroup
            if kind == "close":
                trim_next = match.group().startswith("-")
                if trim_next and template[match.start() - 1] not in BLANKS:
                    raise PipelineError(f"TEMPLATE: '-}}}}' needs a blank before it in {template[start:pos]!r}")
                break
            if kind != "space":
                tokens.append((kind, match.group()))
        items.append(("action", tokens))


class _Parser:
    """Actions and text -> a tree of ("text", s), ("print", pipe), ("if", pipe, then, else),
    ("range", names, pipe, body, else), ("set", name, pipe, declare)."""

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items
        self.index = 0

    def parse(self) -> list:
        nodes, end = self.block()
        if end is not None:
            raise PipelineError(f"TEMPLATE: unexpected {{{{ {' '.join(t for _, t in end)} }}}}")
        return nodes

    def block(self) -> tuple[list, list | None]:
        """Nodes up to an {{ else ... }} or {{ end }} (returned) or the end of the template (None)."""
        nodes: list = []
        while self.index < len(self.items):
            kind, value = self.items[self.index]
            self.index += 1
            if kind == "text":
                if value:
                    nodes.append(("text", value))
                continue
            if not value:
                raise PipelineError("TEMPLATE: empty action {{ }}")
            first = value[0][1] if value[0][0] == "word" else None
            if first in ("else", "end"):
                return nodes, value
            if first == "if":
                nodes.append(self.if_node(value[1:]))
            elif first == "range":
                nodes.append(self.range_node(value[1:]))
            elif first in UNSUPPORTED_KEYWORDS:
                raise _unsupported(f"{{{{ {first} }}}}")
            else:
                nodes.append(self.statement(value))
        return nodes, None

    def if_node(self, condition: list) -> tuple:
        then, end = self.block()
        if end is None:
            raise PipelineError("TEMPLATE: {{ if }} without {{ end }}")
        otherwise: list = []
        if end[0][1] == "else":
            if len(end) > 1:
                if end[1] != ("word", "if"):
                    raise _unsupported(f"{{{{ else {end[1][1]} }}}}")
                otherwise = [self.if_node(end[2:])]  # else if: shares the {{ end }}
            else:
                otherwise, end = self.block()
                if end is None or end[0][1] != "end" or len(end) > 1:
                    raise PipelineError("TEMPLATE: {{ if }} ... {{ else }} without {{ end }}")
        elif len(end) > 1:
            raise PipelineError(f"TEMPLATE: unexpected words after {{{{ end }}}}: {end}")
        return ("if", _expression(condition), then, otherwise)

    def range_node(self, tokens: list) -> tuple:
        names: list[str] = []
        declared = [i for i, (kind, _) in enumerate(tokens) if kind == "declare"]
        if declared:
            head, tokens = tokens[: declared[0]], tokens[declared[0] + 1 :]
            names = [text for kind, text in head if kind == "variable"]
            if len(names) not in (1, 2) or len(head) != 2 * len(names) - 1:
                raise _unsupported(f"range declaration {' '.join(t for _, t in head)}")
        body, end = self.block()
        otherwise: list = []
        if end is not None and end == [("word", "else")]:
            otherwise, end = self.block()
        if end != [("word", "end")]:
            raise PipelineError("TEMPLATE: {{ range }} without {{ end }}")
        return ("range", names, _expression(tokens), body, otherwise)

    def statement(self, tokens: list) -> tuple:
        if len(tokens) > 2 and tokens[0][0] == "variable" and tokens[1][0] in ("declare", "assign"):
            if "." in tokens[0][1]:
                raise _unsupported(f"assigning to {tokens[0][1]}")
            return ("set", tokens[0][1], _expression(tokens[2:]), tokens[1][0] == "declare")
        return ("print", _expression(tokens))


def _expression(tokens: list) -> tuple:
    """A command: one operand, or a function applied to operands; no pipes."""
    if not tokens:
        raise PipelineError("TEMPLATE: missing value in an action")
    if any(token == ("punct", "|") for token in tokens):
        raise _unsupported("a pipe '|'")
    operands, rest = _operands(tokens)
    if rest:
        raise PipelineError(f"TEMPLATE: unexpected {rest[0][1]!r}")
    if operands[0][0] == "function":
        return ("call", operands[0][1], operands[1:])
    if len(operands) > 1:
        raise PipelineError(f"TEMPLATE: {len(operands)} values in one action without a function")
    return operands[0]


def _operands(tokens: list) -> tuple[list, list]:
    operands: list = []
    while tokens:
        kind, text = tokens[0]
        if (kind, text) == ("punct", ")"):
            break
        tokens = tokens[1:]
        if (kind, text) == ("punct", "("):
            inner, tokens = _operands(tokens)
            if not tokens or tokens[0] != ("punct", ")"):
                raise PipelineError("TEMPLATE: '(' without ')'")
            tokens = tokens[1:]
            if not inner or (len(inner) > 1 and inner[0][0] != "function"):
                raise PipelineError("TEMPLATE: a (...) must hold one value or one function call")
            operands.append(("call", inner[0][1], inner[1:]) if inner[0][0] == "function" else inner[0])
        elif kind in ("string", "raw"):
            operands.append(("literal", ast.literal_eval(text) if kind == "string" else text[1:-1]))
        elif kind == "number":
            operands.append(("literal", int(text)))
        elif kind == "word" and text in ("true", "false"):
            operands.append(("literal", text == "true"))
        elif kind == "word" and text in FUNCTIONS:
            operands.append(("function", text))
        elif kind == "word":
            raise _unsupported(f"the function or keyword {text!r}")
        elif kind == "variable":
            name, *fields = text.split(".")
            operands.append(("variable", name, tuple(fields)))
        elif kind == "field":
            operands.append(("field", tuple(text.split(".")[1:]) if text != "." else ()))
        else:
            raise PipelineError(f"TEMPLATE: unexpected {text!r}")
    return operands, tokens


def _truth(value: Any) -> bool:
    # Go templates: false, 0, nil and empty strings/lists/maps are false
    return value is not None and value is not False and value != 0 and value != "" and value != [] and value != {}


class _Machine:
    def __init__(self, data: dict) -> None:
        self.scopes: list[dict[str, Any]] = [{"$": data}]
        self.out: list[str] = []

    def run(self, nodes: list, dot: Any) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                self.out.append(node[1])
            elif kind == "print":
                self.out.append(_show(self.value(node[1], dot)))
            elif kind == "set":
                self.set(node[1], self.value(node[2], dot), declare=node[3])
            elif kind == "if":
                self.scoped(node[2] if _truth(self.value(node[1], dot)) else node[3], dot)
            elif kind == "range":
                self.range(node, dot)

    def scoped(self, nodes: list, dot: Any, variables: dict | None = None) -> None:
        self.scopes.append(dict(variables or {}))
        try:
            self.run(nodes, dot)
        finally:
            self.scopes.pop()

    def range(self, node: tuple, dot: Any) -> None:
        _, names, expression, body, otherwise = node
        items = self.value(expression, dot)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise _unsupported(f"range over {type(items).__name__}")
        for index, item in enumerate(items):
            bound = dict(zip(names, [index, item] if len(names) == 2 else [item][: len(names)], strict=True))
            self.scoped(body, item, bound)
        if not items:
            self.scoped(otherwise, dot)

    def set(self, name: str, value: Any, declare: bool) -> None:
        if declare:
            self.scopes[-1][name] = value
            return
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise PipelineError(f"TEMPLATE: undefined variable {name}")

    def variable(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise PipelineError(f"TEMPLATE: undefined variable {name}")

    def value(self, node: tuple, dot: Any) -> Any:
        kind = node[0]
        if kind == "literal":
            return node[1]
        if kind == "variable":
            return _fields(self.variable(node[1]), node[2])
        if kind == "field":
            return _fields(dot, node[1])
        if kind == "call":
            return self.call(node[1], node[2], dot)
        raise PipelineError(f"TEMPLATE: {node[1]!r} used as a value")

    def call(self, name: str, args: list, dot: Any) -> Any:
        arity = {"not": 1, "len": 1, "ne": 2}.get(name)
        if (arity and len(args) != arity) or len(args) < (arity or 2):
            raise PipelineError(f"TEMPLATE: {name} takes {arity or 'at least 2'} arguments, got {len(args)}")
        if name in ("and", "or"):  # Go evaluates these lazily and returns an operand
            for arg in args[:-1]:
                value = self.value(arg, dot)
                if _truth(value) == (name == "or"):
                    return value
            return self.value(args[-1], dot)
        values = [self.value(arg, dot) for arg in args]
        if name == "not":
            return not _truth(values[0])
        if name == "len":
            if not isinstance(values[0], (str, list, dict)):
                raise PipelineError(f"TEMPLATE: len of {type(values[0]).__name__}")
            return len(values[0])
        first, others = values[0], values[1:]
        for other in others:
            if type(other) is not type(first):
                raise PipelineError(f"TEMPLATE: {name}: incompatible types for comparison: {first!r}, {other!r}")
        return any(first == other for other in others) if name == "eq" else first != others[0]


def _fields(value: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        if not isinstance(value, dict):
            raise PipelineError(f"TEMPLATE: .{name} of a {type(value).__name__}")
        if name not in value:
            raise PipelineError(f"TEMPLATE: .{name} is not set in Ollama's chat (known: {', '.join(value)})")
        value = value[name]
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise PipelineError(f"TEMPLATE: printing a {type(value).__name__} is not supported")


def _collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's collate: all system contents joined, consecutive same-role messages merged."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["Role"] == message["role"] and message["role"] != "tool":
            merged[-1]["Content"] += "\n\n" + message["content"]
        else:
            merged.append({**MESSAGE_FIELDS, "Role": message["role"], "Content": message["content"]})
    return "\n\n".join(system), merged


def render_prompt(template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt Ollama v0.11.4's /api/chat builds from this Go TEMPLATE for these messages and the
    Modelfile's SYSTEM, ending where the model's answer starts.

    A small interpreter that covers only the text/template subset our TEMPLATEs use: text,
    `{{-`/`-}}` trimming, comments, `if`/`else if`/`else`, `range` over `.Messages` (optionally
    `$i, $m :=`) with `else`, variables declared with `:=` and assigned with `=`, `$` and `$.System`,
    fields of the chat values (`.Messages`, `.System`, `.Response`, `.Tools`, `.Think`...) and of
    messages (`.Role`, `.Content`...), string/number/bool literals, parentheses and the functions
    eq, ne, and, or, not, len. Anything else (pipes, printf, index, with, define, template...) is an
    error rather than a guess. Context-length truncation (num_ctx) is not modelled.
    """
    if not re.search(r"\bMessages\b", template, re.IGNORECASE):
        raise _unsupported("a TEMPLATE without .Messages (Ollama renders it turn by turn: .Prompt/.Response)")
    conversation = list(messages)
    if system and (not conversation or conversation[0]["role"] != "system"):
        conversation.insert(0, {"role": "system", "content": system})
    joined_system, collated = _collate(conversation)
    data = {
        "System": joined_system,
        "Messages": collated,
        "Tools": None,
        "Response": "",
        "Think": False,
        "ThinkLevel": "",
        "IsThinkSet": False,
    }
    machine = _Machine(data)
    machine.run(_Parser(_lex(template)).parse(), data)
    return "".join(machine.out)


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


def gguf_adds_bos(llama) -> bool:
    """Whether llama.cpp adds BOS to a prompt of this loaded GGUF (its tokenizer.ggml.add_bos_token)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llama.model)))


class _LlamaVocab:
    """llama.cpp's tokenizer of a GGUF (vocabulary only, no weights)."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp

        from pipeline.quantize import llama_log

        if not Path(gguf).is_file():
            raise PipelineError(f"{gguf}: GGUF not found")
        with llama_log() as log:  # llama.cpp warns about the context it makes even for a vocabulary
            try:
                self.llama = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
            except ValueError as error:
                raise PipelineError(f"{gguf}: llama.cpp cannot load it ({error}): {''.join(log)[-500:]}") from None
        self.add_bos = gguf_adds_bos(self.llama)

    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def piece(self, token: int) -> str:
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llama.close()


def _space_after_special_hint(tokenizer, vocab: _LlamaVocab, expected: list[int], got: list[int], at: int) -> str:
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

    vocab = _LlamaVocab(gguf) if gguf is not None else None
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
