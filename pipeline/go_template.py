"""A small interpreter for the subset of Go's text/template that our Ollama TEMPLATEs use.

`render_prompt` builds the prompt Ollama (v0.11.4, `/api/chat`) builds from a Modelfile's TEMPLATE
(server/routes.go ChatHandler, server/prompt.go chatPrompt, template/template.go): the Modelfile's
SYSTEM as a first system message unless the conversation starts with one, consecutive messages of the
same role merged (joined by a blank line), and the template executed on `.Messages`, `.System`,
`.Response` (empty) and `.Tools`/`.Think` (unset). Pure: no project state, no model, no llama.cpp.
Lexer (`_lex`) -> parser (`_Parser`, a tree of tuples) -> machine (`_Machine`, the output text).
"""

from __future__ import annotations

import ast
import re
from typing import Any

from pipeline.common import PipelineError

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
