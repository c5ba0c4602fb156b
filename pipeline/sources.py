"""Data sources (`data.sources` in params.yaml): every supported format read into chat messages, then
mixed (weights, seeded) and split (`data.eval_fraction`, by a hash of the user turns).

Formats (a row problem is `file:line: field: reason`; CSV/TSV: the line the record starts on, the header
being line 1; JSON arrays, Parquet and saved datasets: `file:[index]`, the 0-based row index):
- messages / text: today's JSON Lines, `{"messages": [...]}` or legacy Llama-2 `{"text": "<s>[INST] ..."}`;
- alpaca: `instruction`, optional `input` (appended to the instruction after a blank line), `output`,
  optional `system` and `history` ([[user, assistant], ...] before it); JSON Lines or a JSON array;
- sharegpt: `conversations` (or `messages`) of `{"from": ..., "value": ...}`; `roles` maps the `from`
  values (default human/gpt/system -> user/assistant/system);
- openai: OpenAI chat fine-tuning rows `{"messages": [...]}`; text content parts are joined, tool calls
  and tool messages are errors (not supported);
- csv / tsv / parquet / hf_disk (`datasets.Dataset.save_to_disk`): `columns` maps prompt, response and
  system (or messages) to column names; without `columns`, a `messages` column (or prompt/response).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.dataset import (
    Example,
    conversations_of_rows,
    jsonl_rows,
    message_errors,
    parse_example,
    read_jsonl_with_lines,
    without_duplicates,
)
from pipeline.params import DataParams, SourceParams

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
TABLE_FIELDS = ("prompt", "response", "system", "messages")
JSONL_FORMATS = ("messages", "text", "alpaca", "sharegpt", "openai")


def default_sources(train: Path, evaluation: Path) -> list[SourceParams]:
    """Today's two-file layout: what prepare reads when data.sources is null."""
    return [SourceParams(path=str(train), role="train"), SourceParams(path=str(evaluation), role="eval")]


@dataclass(frozen=True)
class Position:
    """Where a row is: a line number, or a 0-based row index (JSON arrays, Parquet, saved datasets)."""

    number: int
    indexed: bool = False

    def where(self, source: str) -> str:
        return f"{source}:[{self.number}]" if self.indexed else f"{source}:{self.number}"


# --- reading rows ---


def _json_rows(path: Path, errors: list[str]) -> Iterator[tuple[Position, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        errors.append(f"{path}: cannot read: {error}")
        return
    if text.lstrip().startswith("["):  # one JSON array (Alpaca's usual file)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            errors.append(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})")
            return
        yield from ((Position(index, indexed=True), item) for index, item in enumerate(items))
        return
    yield from ((Position(number), row) for number, row in jsonl_rows(text, str(path), errors))


def _table_rows(path: Path, delimiter: str, errors: list[str]) -> Iterator[tuple[Position, object]]:
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as error:
        errors.append(f"{path}: cannot read: {error}")
        return
    with handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for record in reader:
                if any(cell.strip() for cell in record):
                    if len(record) != len(header):
                        fields = f"expected {len(header)} fields (the header's), got {len(record)}"
                        errors.append(f"{path}:{start}: {fields}")
                    else:
                        yield Position(start), dict(zip(header, record, strict=True))
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as error:
            errors.append(f"{path}:{start}: cannot read: {error}")


def _parquet_rows(path: Path, errors: list[str]) -> Iterator[tuple[Position, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:
        errors.append(f"{path}: cannot read Parquet: {error}")
        return
    yield from ((Position(index, indexed=True), row) for index, row in enumerate(table.to_pylist()))


def _dataset_rows(path: Path, errors: list[str]) -> Iterator[tuple[Position, object]]:
    """A `datasets` dataset saved with save_to_disk (a DatasetDict must hold exactly one split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, FileNotFoundError, ValueError) as error:
        errors.append(f"{path}: cannot load a saved dataset: {error}")
        return
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            errors.append(f"{path}: a DatasetDict with splits {', '.join(loaded)}: save the one split to use")
            return
        loaded = next(iter(loaded.values()))
    yield from ((Position(index, indexed=True), row) for index, row in enumerate(loaded))


def read_rows(source: SourceParams, errors: list[str]) -> Iterator[tuple[Position, object]]:
    path = Path(source.path)
    if not path.exists():
        errors.append(f"{path}: no such file or directory (data.sources path)")
        return
    if source.format in JSONL_FORMATS:  # messages and text are read by dataset.read_jsonl_with_lines
        yield from _json_rows(path, errors)
    elif source.format in ("csv", "tsv"):
        yield from _table_rows(path, "," if source.format == "csv" else "\t", errors)
    elif source.format == "parquet":
        yield from _parquet_rows(path, errors)
    else:
        yield from _dataset_rows(path, errors)


# --- one row to messages: (messages, legacy, problems) ---


def _text(value: object, field: str, problems: list[str], *, required: bool = True) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            problems.append(f"{field}: required")
        return None
    if not isinstance(value, str):
        problems.append(f"{field}: expected a string")
        return None
    return value


def alpaca_messages(row: object) -> tuple[list[dict] | None, list[str]]:
    if not isinstance(row, dict):
        return None, ["expected a JSON object"]
    unknown = sorted(set(row) - {"instruction", "input", "output", "system", "history"})
    if unknown:
        return None, [f"{unknown[0]}: unknown key (expected instruction, input, output, system, history)"]
    problems: list[str] = []
    instruction = _text(row.get("instruction"), "instruction", problems)
    extra = _text(row.get("input"), "input", problems, required=False)
    output = _text(row.get("output"), "output", problems)
    system = _text(row.get("system"), "system", problems, required=False)
    history = row.get("history") or []
    turns: list[dict] = []
    if not isinstance(history, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in history
    ):
        problems.append("history: expected a list of [user, assistant] pairs of strings")
    else:
        for user, assistant in history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if problems:
        return None, problems
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    messages += [*turns, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages, message_errors(messages, "conversation", final_role="assistant")


def sharegpt_messages(row: object, roles: dict[str, str]) -> tuple[list[dict] | None, list[str]]:
    mapping = {**SHAREGPT_ROLES, **roles}
    if not isinstance(row, dict):
        return None, ["expected a JSON object"]
    key = "conversations" if "conversations" in row else "messages"
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        return None, ["conversations: expected a non-empty list of {from, value} turns"]
    messages, problems = [], []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"{where}: expected an object with from and value")
            continue
        if turn["from"] not in mapping:
            problems.append(f"{where}.from: unknown speaker {turn['from']!r} (map it in the source's roles)")
            continue
        messages.append({"role": mapping[turn["from"]], "content": turn["value"]})
    if problems:
        return None, problems
    return messages, message_errors(messages, key, final_role="assistant")


def openai_messages(row: object) -> tuple[list[dict] | None, list[str]]:
    if not isinstance(row, dict):
        return None, ["expected a JSON object"]
    if "tools" in row or "functions" in row:
        return None, ["tools: tool definitions are not supported (plain chat only)"]
    unknown = sorted(set(row) - {"messages"})
    if unknown:
        return None, [f'{unknown[0]}: unknown key (expected "messages")']
    raw = row.get("messages")
    if not isinstance(raw, list) or not raw:
        return None, ["messages: expected a non-empty list of messages"]
    messages, problems = [], []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f"{where}: expected an object with role and content")
            continue
        if message.get("role") in ("tool", "function") or "tool_calls" in message or "function_call" in message:
            problems.append(f"{where}: tool calls and tool results are not supported (plain chat only)")
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                problems.append(f"{where}.content: only text parts are supported")
                continue
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": message.get("role"), "content": content})
    if problems:
        return None, problems
    return messages, message_errors(messages, "messages", final_role="assistant")


def table_messages(row: dict, columns: dict[str, str]) -> tuple[list[dict] | None, list[str]]:
    mapping = columns or {name: name for name in TABLE_FIELDS if name in row}
    unknown = sorted(set(mapping) - set(TABLE_FIELDS))
    if unknown:
        return None, [f"columns.{unknown[0]}: unknown field (expected {', '.join(TABLE_FIELDS)})"]
    missing = sorted(column for column in mapping.values() if column not in row)
    if missing:
        return None, [f"{missing[0]}: no such column (columns: {', '.join(row)})"]
    if "messages" in mapping:
        value = row[mapping["messages"]]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                return None, [f"{mapping['messages']}: invalid JSON: {error.msg} (column {error.colno})"]
        return parse_example({"messages": value})[0::2]
    if "prompt" not in mapping or "response" not in mapping:
        return None, ["columns: map prompt and response (and optionally system), or messages"]
    problems: list[str] = []
    prompt = _text(row[mapping["prompt"]], mapping["prompt"], problems)
    response = _text(row[mapping["response"]], mapping["response"], problems)
    system = _text(row[mapping["system"]], mapping["system"], problems, required=False) if "system" in mapping else None
    if problems:
        return None, problems
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return messages, message_errors(messages, "conversation", final_role="assistant")


def row_messages(source: SourceParams, row: object) -> tuple[list[dict] | None, bool, list[str]]:
    if source.format in ("messages", "text"):
        return parse_example(row)
    if source.format == "alpaca":
        messages, problems = alpaca_messages(row)
    elif source.format == "sharegpt":
        messages, problems = sharegpt_messages(row, source.roles)
    elif source.format == "openai":
        messages, problems = openai_messages(row)
    elif not isinstance(row, dict):
        messages, problems = None, ["expected a row of named columns"]
    else:
        messages, problems = table_messages(row, source.columns)
    return messages, False, problems


# --- a source's conversations, mixing, split ---


@dataclass
class SourceRows:
    """One source after reading: its valid conversations and what mixing and the split did with them."""

    source: SourceParams
    examples: list[Example]
    rows_in: int = 0
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)


def load_source(source: SourceParams, errors: list[str]) -> SourceRows:
    """Every valid conversation of one source, exact duplicates left out; each problem goes to `errors`."""
    if not source.path.strip():
        errors.append("params.yaml: data.sources: path: required (a file or directory in data/)")
        return SourceRows(source, [])
    if source.format in ("messages", "text"):  # today's reader, unchanged
        rows = read_jsonl_with_lines(Path(source.path), errors)
        examples = conversations_of_rows(rows, source.path, errors)
        return SourceRows(source, examples[: source.max_rows] if source.max_rows else examples, len(rows))
    examples, rows_in = [], 0
    for position, row in read_rows(source, errors):
        rows_in += 1
        messages, legacy, problems = row_messages(source, row)
        errors.extend(f"{position.where(source.path)}: {problem}" for problem in problems)
        if not problems and messages is not None:
            examples.append(Example(source.path, position.number, messages, legacy, position.indexed))
    examples = without_duplicates(examples, errors)
    if source.max_rows is not None:
        examples = examples[: source.max_rows]
    return SourceRows(source, examples, rows_in)


def held_out(example: Example, fraction: float) -> bool:
    """In the eval share: a hash of the user turns (not the position), so appending rows moves none and
    the variants of one question (with and without a system message) stay on one side."""
    digest = hashlib.sha256(example.prompt_key().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def weighted(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """Each conversation int(weight) times, then a seeded sample of the fractional part, in file order."""
    whole, part = int(weight), weight - int(weight)
    mixed = [example for _ in range(whole) for example in examples]
    if part > 0 and examples:
        picked = set(rng.sample(range(len(examples)), round(len(examples) * part)))
        mixed += [example for index, example in enumerate(examples) if index in picked]
    return mixed


def mix_and_split(loaded: list[SourceRows], data: DataParams) -> None:
    """Fill each source's train and eval lists (in place): eval sources are held out whole; without any,
    data.eval_fraction of each train source is; train conversations are then weighted."""
    has_eval = any(rows.source.role == "eval" for rows in loaded)
    for rows in loaded:
        if rows.source.role == "eval":
            rows.eval = list(rows.examples)
            continue
        fraction = 0.0 if has_eval else data.eval_fraction
        kept = [example for example in rows.examples if not held_out(example, fraction)]
        rows.eval = [example for example in rows.examples if held_out(example, fraction)]
        rows.train = weighted(kept, rows.source.weight, random.Random(f"{data.seed}:{rows.source.path}"))
