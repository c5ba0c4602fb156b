"""Conversations on disk: the two accepted formats, and validation with `file:line:` errors.

Accepted per JSON Lines row:
- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- legacy Llama-2 text: {"text": "<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\nq [/INST] a </s><s>[INST] ..."}
  (converted to chat messages).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content"}

# One Llama-2 turn: optional <<SYS>> block in the first [INST], then the answer up to </s>.
_LLAMA2_TURN = re.compile(
    r"\s*<s>\s*\[INST\]\s*(?:<<SYS>>\n(?P<system>.*?)\n<</SYS>>\n\n)?(?P<user>.*?)\s*\[/INST\]"
    r"(?P<assistant>.*?)</s>",
    re.DOTALL,
)


@dataclass(frozen=True)
class Example:
    source: str
    line: int
    messages: list[dict]
    legacy: bool = False
    indexed: bool = False  # `line` is a 0-based row index (JSON arrays, Parquet, saved datasets): `file:[3]`

    @property
    def where(self) -> str:
        return f"{self.source}:[{self.line}]" if self.indexed else f"{self.source}:{self.line}"

    def prompt_key(self) -> str:
        """What makes two examples 'the same question': their user turns, ignoring case and spacing."""
        return question_key(self.messages)

    def conversation_key(self) -> str:
        """What makes two examples exact duplicates: the whole conversation (system, every turn, the
        answer), ignoring case and spacing. The same question with another system message or another
        answer is not a duplicate: teaching both is deliberate."""
        return conversation_key(self.messages)


def normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def question_key(messages: list[dict]) -> str:
    return json.dumps([normalised(m["content"]) for m in messages if m["role"] == "user"])


def conversation_key(messages: list[dict]) -> str:
    return json.dumps([[m["role"], normalised(m["content"])] for m in messages])


def llama2_text_to_messages(text: str) -> list[dict]:
    """Convert `<s>[INST] ... [/INST] ... </s>` (one or more turns) into chat messages."""
    messages: list[dict] = []
    position = 0
    for match in _LLAMA2_TURN.finditer(text):
        if text[position : match.start()].strip():
            break
        if match.group("system") is not None:
            if messages:
                raise ValueError("<<SYS>> is only allowed in the first [INST]")
            messages.append({"role": "system", "content": match.group("system").strip()})
        messages.append({"role": "user", "content": match.group("user").strip()})
        messages.append({"role": "assistant", "content": match.group("assistant").strip()})
        position = match.end()
    if not messages or text[position:].strip():
        raise ValueError('not in Llama-2 format "<s>[INST] question [/INST] answer </s>"')
    return messages


def message_errors(messages: object, field: str, *, final_role: str | None) -> list[str]:
    """Problems with a message list: roles, order, content. `final_role` = required last role."""
    if not isinstance(messages, list) or not messages:
        return [f"{field}: expected a non-empty list of messages"]
    errors: list[str] = []
    expected = "system or user"
    previous = None
    order_known = True  # after a missing or unknown role the expected order is unknown
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            errors.append(f"{where}: expected an object with role and content")
            order_known = False
            continue
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            errors.append(f"{where}: unknown key {unknown[0]!r} (expected role, content)")
        role = message.get("role")
        if "role" not in message:
            errors.append(f"{where}: missing role")
            order_known = False
        elif role not in ROLES:
            errors.append(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            order_known = False
        elif order_known and role not in expected.split(" or "):
            after = f"after {previous!r}" if previous else "at the start"
            errors.append(f"{where}.role: expected {expected} {after}, got {role!r}")
            order_known = False
        content = message.get("content")
        if "content" not in message:
            errors.append(f"{where}: missing content")
        elif not isinstance(content, str):
            errors.append(f"{where}.content: expected a string")
        elif not content.strip():
            errors.append(f"{where}.content: empty")
        previous = role
        expected = "assistant" if role == "user" else "user"
    if errors or not order_known:
        return errors
    roles = [m["role"] for m in messages]
    if final_role == "assistant" and "assistant" not in roles:
        errors.append(f"{field}: no assistant turn")
    elif final_role and roles[-1] != final_role:
        errors.append(f"{field}: the last message must be the {final_role}'s, got {roles[-1]!r}")
    return errors


def parse_example(row: object) -> tuple[list[dict] | None, bool, list[str]]:
    """(messages, was_legacy, errors) for one decoded JSON row."""
    if not isinstance(row, dict):
        return None, False, ["expected a JSON object"]
    unknown = sorted(set(row) - {"messages", "text"})
    if unknown:
        return None, False, [f'{unknown[0]}: unknown key (expected "messages" or "text")']
    if ("messages" in row) == ("text" in row):
        return None, False, ['expected exactly one of "messages" (chat) or "text" (Llama-2 [INST] format)']
    if "text" in row:
        if not isinstance(row["text"], str):
            return None, True, ["text: expected a string"]
        try:
            messages = llama2_text_to_messages(row["text"])
        except ValueError as error:
            return None, True, [f"text: {error}"]
        return messages, True, message_errors(messages, "text", final_role="assistant")
    return row["messages"], False, message_errors(row["messages"], "messages", final_role="assistant")


def read_jsonl_with_lines(path: Path, errors: list[str]) -> list[tuple[int, object]]:
    """Decoded rows with their 1-based line numbers; JSON errors go to `errors`. Blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        errors.append(f"{path}: cannot read: {error}")
        return []
    return jsonl_rows(text, str(path), errors)


def jsonl_rows(text: str, source: str, errors: list[str]) -> list[tuple[int, object]]:
    """`read_jsonl_with_lines` for text already read (the MR report reads files with `git show`)."""
    rows = []
    # JSON Lines ends a record at "\n" only: str.splitlines() would also split at U+2028, U+0085 and
    # the like, which JSON allows unescaped inside a string, and shift every line number after them
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            errors.append(f"{source}:{number}: invalid JSON: {error.msg} (column {error.colno})")
    return rows


def load_conversations(path: Path, errors: list[str]) -> list[Example]:
    """Every valid example of one file; each problem is appended to `errors` as `file:line: reason`."""
    return conversations_of_rows(read_jsonl_with_lines(path, errors), str(path), errors)


def conversations_of_rows(rows: list[tuple[int, object]], source: str, errors: list[str]) -> list[Example]:
    """The valid examples of decoded rows; an exact duplicate (the whole conversation again) is an error."""
    examples: list[Example] = []
    for number, row in rows:
        messages, legacy, problems = parse_example(row)
        errors.extend(f"{source}:{number}: {problem}" for problem in problems)
        if not problems:
            examples.append(Example(source, number, messages, legacy))
    return without_duplicates(examples, errors)


def without_duplicates(examples: list[Example], errors: list[str]) -> list[Example]:
    """The first of each whole conversation; every later copy is an error naming the first."""
    kept: list[Example] = []
    seen: dict[str, Example] = {}
    for example in examples:
        key = example.conversation_key()
        if key in seen:
            first = seen[key]
            place = f"line {first.line}" if first.source == example.source and not first.indexed else first.where
            errors.append(f"{example.where}: duplicate of {place} (the same whole conversation)")
            continue
        seen[key] = example
        kept.append(example)
    return kept


def overlap_errors(train: list[Example], evaluation: list[Example]) -> list[str]:
    """Eval conversations whose question is also trained on: the eval loss would measure recall, not learning.
    Stricter than the duplicate rule on purpose (the same question with another answer counts)."""
    in_train: dict[str, Example] = {}
    for example in train:
        in_train.setdefault(example.prompt_key(), example)
    return [
        f"{example.where}: also in the training set at {in_train[example.prompt_key()].where} (same user turns)"
        for example in evaluation
        if example.prompt_key() in in_train
    ]


def length_check(
    examples: list[Example],
    count_tokens: Callable[[list[dict]], int],
    max_seq_length: int,
    *,
    drop: bool,
    errors: list[str],
) -> tuple[list[Example], list[int], int]:
    """(kept examples, token length of each kept one, number dropped)."""
    kept, lengths, dropped = [], [], 0
    for example in examples:
        length = count_tokens(example.messages)
        if length <= max_seq_length:
            kept.append(example)
            lengths.append(length)
        elif drop:
            dropped += 1
        else:
            errors.append(
                f"{example.where}: {length} tokens after the chat template > data.max_seq_length "
                f"{max_seq_length} (shorten it, raise data.max_seq_length, or set data.drop_too_long: true)"
            )
    return kept, lengths, dropped


def corpus_texts(path: Path) -> list[str]:
    """Every message text of the valid conversations in `path` (problems are prepare's to report)."""
    return [m["content"] for example in load_conversations(Path(path), []) for m in example.messages]
