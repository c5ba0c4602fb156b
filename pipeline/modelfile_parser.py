"""Ollama Modelfiles: parse, validate, write back, and turn into the fields of `POST /api/create`.

The grammar is Ollama's (`parser/parser.go` of v0.11.4, the version the tests run):

- one instruction per line, its name case-insensitive: FROM, TEMPLATE, SYSTEM, PARAMETER, MESSAGE,
  LICENSE, ADAPTER (v0.11.4 knows no others), then one space or tab, then the value;
- the value is the rest of the line without surrounding whitespace, unquoted once (three double
  quotes or one on each side), and a quoted value may span lines: it ends at the first line end
  where it is closed.
  Inside quotes whitespace and newlines are kept and nothing is escaped (`\\n` stays two characters);
- `#` starts a comment only as the first non-blank character of a line; later in a line it is text;
- `PARAMETER <name> <value>`: the name is case-sensitive and must be one of Ollama's options
  (`api.Options` JSON names), the value is typed like its Go field: int, float, bool, and `stop`
  a list that every repeated line appends to; for the others the last line wins;
- `MESSAGE <role> <text>` with role `system`, `user` or `assistant` (lower case);
- FROM is required.

Stricter than Ollama, so mistakes surface here rather than on the server: a second FROM is an
error (Ollama merges the files of several), and so are deprecated parameters (Ollama's CLI prints
a warning and drops them). Errors read `<source>:<line>: <reason>`.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError

INSTRUCTIONS = ("FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "MESSAGE", "LICENSE", "ADAPTER")
MESSAGE_ROLES = ("system", "user", "assistant")

# api.Options (with its embedded Runner) of Ollama v0.11.4: JSON name -> Go field type.
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
    "num_thread": int,
    "num_keep": int,
    "seed": int,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "repeat_last_n": int,
    "temperature": float,
    "repeat_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "stop": list,
}
# Accepted by older Ollama versions; v0.11.4's CLI warns and drops them.
DEPRECATED_PARAMETERS = (
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mlock", "mirostat", "mirostat_tau", "mirostat_eta",
)  # fmt: skip

# Go's strconv.ParseInt(s, 10, 64), ParseFloat(s, 32) (decimal notation) and ParseBool.
INT_TEXT = re.compile(r"[+-]?[0-9]+")
FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
BOOL_TEXT = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
INT64_RANGE = range(-(2**63), 2**63)
FLOAT32_MAX = 3.4028234663852886e38

WORD = re.compile(r"[^ \t\r\n]*")
NAME = re.compile(r"[A-Za-z]+")
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")
NEWLINE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Modelfile:
    from_: str  # FROM (path or model name), required
    template: str | None = None
    system: str | None = None
    # typed like Ollama: stop -> list[str] (repeatable); ints, floats, bools per api.Options
    parameters: dict[str, Any] = field(default_factory=dict)
    license: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    messages: tuple[dict, ...] = ()  # MESSAGE role content, as {"role": ..., "content": ...}

    def create_request(self) -> dict:
        """The fields of `POST /api/create` besides model/files/adapters, as Ollama's CLI sends them:
        only those set (Go's omitempty drops empty strings), `license` always a list."""
        request: dict[str, Any] = {}
        if self.template:
            request["template"] = self.template
        if self.system:
            request["system"] = self.system
        if self.parameters:
            request["parameters"] = {
                name: list(value) if isinstance(value, list) else value for name, value in self.parameters.items()
            }
        if self.license:
            request["license"] = list(self.license)
        if self.messages:
            request["messages"] = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return request


def _is_kept(char: str) -> bool:
    # Ollama drops runes that Go's strconv.IsPrint rejects, except the blanks and line ends it
    # keeps inside values (Python's isprintable draws the same line: letters, marks, numbers,
    # punctuation, symbols and the ASCII space).
    return char.isprintable() or char in "\t\r\n"


def _unquote(value: str) -> str | None:
    """The value inside its triple or single double quotes, the bare value, or None while a quote is open."""
    if value.startswith('"""'):
        return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value


class _Scanner:
    """Walks the text, tracking the line number for error messages."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1

    def error(self, reason: str, line: int | None = None) -> PipelineError:
        return PipelineError(f"{self.source}:{line or self.line}: {reason}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_newline(self) -> bool:
        newline = NEWLINE.match(self.text, self.pos)
        if newline:
            self.pos = newline.end()
            self.line += 1
        return newline is not None

    def word(self) -> str:
        match = WORD.match(self.text, self.pos)
        self.pos = match.end()
        return match.group()

    def skip_comment(self) -> None:
        end = NEWLINE.search(self.text, self.pos)
        self.pos = end.start() if end else len(self.text)

    def separator(self, after: str) -> None:
        """The one space or tab between the parts of an instruction."""
        if self.peek() not in (" ", "\t"):
            raise self.error(f"{after}: missing value")
        self.pos += 1

    def value(self, what: str) -> str:
        """The rest of the line, unquoted; a quoted value continues until a line ends it closed."""
        start_line = self.line
        collected = ""
        while True:
            end = NEWLINE.search(self.text, self.pos)
            chunk = self.text[self.pos : end.start() if end else len(self.text)]
            collected += "".join(char for char in chunk if _is_kept(char))
            self.pos += len(chunk)
            unquoted = _unquote(collected.strip())
            if unquoted is not None:
                self.skip_newline()
                return unquoted
            if end is None:
                quote = '"""' if collected.strip().startswith('"""') else '"'
                raise self.error(
                    f"{what}: unterminated {quote} (opened on line {start_line}; the closing {quote} must end a line)",
                    start_line,
                )
            collected += end.group()
            self.skip_newline()


def _typed_parameter(name: str, text: str) -> Any:
    kind = PARAMETER_TYPES[name]
    if kind is int:
        if INT_TEXT.fullmatch(text) and int(text) in INT64_RANGE:
            return int(text)
        raise ValueError(f"invalid int value {text!r}")
    if kind is float:
        if FLOAT_TEXT.fullmatch(text) and abs(float(text)) <= FLOAT32_MAX:
            return float(text)
        raise ValueError(f"invalid float value {text!r}")
    if kind is bool:
        if text in BOOL_TEXT:
            return BOOL_TEXT[text]
        raise ValueError(f"invalid bool value {text!r} (true or false)")
    return text  # stop: one string per line


def parse_modelfile(text: str, source: str = "Modelfile") -> Modelfile:
    """Parse and validate a Modelfile; any problem raises PipelineError("<source>:<line>: <reason>")."""
    scanner = _Scanner(text.removeprefix("\ufeff"), source)
    from_line = 0
    fields: dict[str, Any] = {"template": None, "system": None}
    parameters: dict[str, Any] = {}
    lists: dict[str, list] = {"license": [], "adapters": [], "messages": []}
    while not scanner.at_end():
        char = scanner.peek()
        if char in (" ", "\t"):
            scanner.pos += 1
            continue
        if scanner.skip_newline():
            continue
        if char == "#":
            scanner.skip_comment()
            continue
        line = scanner.line
        word = scanner.word()
        instruction = word.upper()
        if not NAME.fullmatch(word) or instruction not in INSTRUCTIONS:
            raise scanner.error(f"unknown instruction {word!r} (expected one of {', '.join(INSTRUCTIONS)})")
        scanner.separator(instruction)
        if instruction == "PARAMETER":
            name = scanner.word()
            if not PARAMETER_NAME.fullmatch(name):
                raise scanner.error(f"PARAMETER: invalid name {name!r} (letters, digits and _ after one space)")
            if name in DEPRECATED_PARAMETERS:
                raise scanner.error(f"PARAMETER {name}: deprecated, Ollama ignores it; remove the line")
            if name not in PARAMETER_TYPES:
                raise scanner.error(f"PARAMETER: unknown parameter {name!r} (known: {', '.join(PARAMETER_TYPES)})")
            scanner.separator(f"PARAMETER {name}")
            raw = scanner.value(f"PARAMETER {name}")
            try:
                value = _typed_parameter(name, raw)
            except ValueError as error:
                raise scanner.error(f"PARAMETER {name}: {error}", line) from None
            if name == "stop":
                parameters.setdefault("stop", []).append(value)
            else:
                parameters[name] = value
        elif instruction == "MESSAGE":
            role = scanner.word()
            if role not in MESSAGE_ROLES:
                raise scanner.error(f'MESSAGE: role must be one of "system", "user", or "assistant", got {role!r}')
            scanner.separator(f"MESSAGE {role}")
            lists["messages"].append({"role": role, "content": scanner.value(f"MESSAGE {role}")})
        else:
            value = scanner.value(instruction)
            if instruction == "FROM":
                if from_line:
                    raise scanner.error(f"FROM: a second FROM (the first is on line {from_line})", line)
                from_line = line
                fields["from_"] = value
            elif instruction in ("TEMPLATE", "SYSTEM"):
                fields[instruction.lower()] = value  # the last one wins, as in Ollama
            else:
                lists["license" if instruction == "LICENSE" else "adapters"].append(value)
    if not from_line:
        raise scanner.error("no FROM line (a Modelfile needs FROM <GGUF path or model name>)", 1)
    return Modelfile(
        **fields,
        parameters=parameters,
        license=tuple(lists["license"]),
        adapters=tuple(lists["adapters"]),
        messages=tuple(lists["messages"]),
    )


def load_modelfile(path: str | Path) -> Modelfile:
    """Read (UTF-8, or UTF-16 with a byte order mark, as Ollama does) and parse a Modelfile."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read the Modelfile: {error.strerror}") from None
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise PipelineError(f"{path}: not {encoding.removesuffix('-sig').upper()} text: {error.reason}") from None
    return parse_modelfile(text, str(path))


def quote_value(value: str, what: str) -> str:
    """`value` written as a Modelfile value that parses back to exactly `value`: bare when it can be,
    else in triple quotes, else in plain quotes; `what` (e.g. "SYSTEM") names it in errors."""
    if not all(_is_kept(char) for char in value):
        raise PipelineError(f"{what}: a non-printable character cannot be written in a Modelfile: {value!r}")
    if value and value == value.strip() and not value.startswith('"') and not NEWLINE.search(value):
        return value
    if '"""' not in value:
        return f'"""{value}"""'
    # Plain quotes end at the first line end after a '"' and cannot start with '""' (read as '"""').
    closes_early = any(value[: newline.start()].rstrip().endswith('"') for newline in NEWLINE.finditer(value))
    if not value.startswith('""') and not closes_early:
        return f'"{value}"'
    raise PipelineError(f"{what}: this value cannot be written in a Modelfile (Ollama's quotes have no escapes)")


def _has_type(value: Any, kind: type) -> bool:
    # bool is an int in Python, not in Go; an int is a fine float
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _format_parameter(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def render_modelfile(modelfile: Modelfile) -> str:
    """The Modelfile as text; parse_modelfile(render_modelfile(m)) == m."""
    lines = [f"FROM {quote_value(modelfile.from_, 'FROM')}"]
    lines += [f"ADAPTER {quote_value(adapter, 'ADAPTER')}" for adapter in modelfile.adapters]
    if modelfile.template is not None:
        lines.append(f"TEMPLATE {quote_value(modelfile.template, 'TEMPLATE')}")
    if modelfile.system is not None:
        lines.append(f"SYSTEM {quote_value(modelfile.system, 'SYSTEM')}")
    for name, value in modelfile.parameters.items():
        what = f"PARAMETER {name}"
        kind = PARAMETER_TYPES.get(name)
        if kind is None:
            raise PipelineError(f"PARAMETER: unknown parameter {name!r} (known: {', '.join(PARAMETER_TYPES)})")
        values = value if kind is list else [value]
        item_kind = str if kind is list else kind
        if (kind is list and not isinstance(value, list)) or not all(_has_type(item, item_kind) for item in values):
            raise PipelineError(f"{what}: expected {kind.__name__} values, got {value!r}")
        lines += [f"{what} {quote_value(_format_parameter(item), what)}" for item in values]
    for message in modelfile.messages:
        role = message["role"]
        if role not in MESSAGE_ROLES:
            raise PipelineError(f'MESSAGE: role must be one of "system", "user", or "assistant", got {role!r}')
        lines.append(f"MESSAGE {role} {quote_value(message['content'], 'MESSAGE ' + role)}")
    lines += [f"LICENSE {quote_value(text, 'LICENSE')}" for text in modelfile.license]
    return "\n".join(lines) + "\n"
