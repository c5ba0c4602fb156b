"""The gate's evaluation cases (data/gate_cases.jsonl): format and validation.

One JSON object per line:
  id              unique name (required)
  kind            "learn" (the fine-tune must teach it) or "keep" (the base already answers it;
                  the fine-tune must not break it: the overtraining check)
  prompt          the user message (required)
  system          optional system message
  history         optional earlier turns: user/assistant messages, alternating, starting with user
  expect          keywords the answer must contain (required, non-empty)
  match           "all" (default) or "any" of `expect`
  forbid          keywords the answer must not contain (default none)
  regex           keywords are regular expressions (default false)
  case_sensitive  default false
  reference       optional: an answer we would accept. The gate scores how likely each model finds it
                  (mean negative log-likelihood per token, teacher-forced after the prompt): learn cases'
                  must fall, keep cases' must not rise. Deterministic, so it does not flip with greedy noise.

Keywords match as words: a keyword that starts (ends) with a letter or digit does not match where
another letter or digit comes right before (after) it, so "7" does not match "17" or "7th" and "PROC"
does not match "PROCESS"; "def " still matches "def reverse(". With `regex: true` the pattern is used
as written (add \b yourself where you want a word boundary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common import PipelineError
from pipeline.dataset import message_errors, read_jsonl_with_lines

KINDS = ("learn", "keep")
CASE_KEYS = (
    "id", "kind", "prompt", "system", "history", "expect", "match", "forbid", "regex", "case_sensitive", "reference",
)  # fmt: skip
# Not glued to a letter or digit (\w less "_"): the edges of a keyword that starts/ends with one.
_NOT_AFTER_ALNUM, _NOT_BEFORE_ALNUM = r"(?<![^\W_])", r"(?![^\W_])"


def keyword_pattern(keyword: str, regex: bool) -> str:
    """The regular expression a keyword is searched with: as written (regex) or as a whole word."""
    if regex:
        return keyword
    pattern = re.escape(keyword)
    if keyword[:1].isalnum():
        pattern = _NOT_AFTER_ALNUM + pattern
    if keyword[-1:].isalnum():
        pattern += _NOT_BEFORE_ALNUM
    return pattern


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    prompt: str
    expect: tuple[str, ...]
    system: str | None = None
    history: tuple[dict, ...] = ()
    match: str = "all"
    forbid: tuple[str, ...] = ()
    regex: bool = False
    case_sensitive: bool = False
    reference: str | None = None
    line: int = field(default=0, compare=False)

    def messages(self) -> list[dict]:
        """The conversation to send: system, earlier turns, then the prompt."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": self.prompt}]

    def _found(self, keyword: str, answer: str) -> bool:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        return re.search(keyword_pattern(keyword, self.regex), answer, flags) is not None

    def score(self, answer: str) -> CaseScore:
        """How well `answer` meets this case: the share of expected keywords found ("all"), or 1/0
        ("any"); 0 when a forbidden keyword appears. Passed means a score of 1."""
        found = tuple(k for k in self.expect if self._found(k, answer))
        missing = tuple(k for k in self.expect if k not in found)
        forbidden = tuple(k for k in self.forbid if self._found(k, answer))
        if forbidden:
            value = 0.0
        elif self.match == "any":
            value = 1.0 if found else 0.0
        else:
            value = len(found) / len(self.expect)
        return CaseScore(score=value, found=found, missing=missing, forbidden=forbidden)


@dataclass(frozen=True)
class CaseScore:
    score: float  # 0..1
    found: tuple[str, ...]
    missing: tuple[str, ...]
    forbidden: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.score == 1.0


def _keyword_list_errors(value: object, key: str, regex: bool, required: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        return [f"{key}: expected a list of non-empty strings"]
    if required and not value:
        return [f"{key}: expected at least one keyword"]
    errors = []
    if regex:
        for keyword in value:
            try:
                re.compile(keyword)
            except re.error as error:
                errors.append(f"{key}: invalid regex {keyword!r}: {error}")
    return errors


def case_errors(row: object) -> list[str]:
    if not isinstance(row, dict):
        return ["expected a JSON object"]
    errors = [f"{key}: unknown key (known: {', '.join(CASE_KEYS)})" for key in row if key not in CASE_KEYS]
    for key in ("id", "prompt"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            errors.append(f"{key}: required, a non-empty string")
    if row.get("kind") not in KINDS:
        errors.append(f"kind: expected 'learn' or 'keep', got {row.get('kind')!r}")
    if "system" in row and (not isinstance(row["system"], str) or not row["system"].strip()):
        errors.append("system: expected a non-empty string")
    if "reference" in row and (not isinstance(row["reference"], str) or not row["reference"].strip()):
        errors.append("reference: expected a non-empty string (an answer we would accept)")
    if "history" in row:
        history = row["history"]
        if (
            isinstance(history, list)
            and history
            and isinstance(history[0], dict)
            and history[0].get("role") == "system"
        ):
            errors.append('history[0].role: put the system message in "system"')
        else:
            errors.extend(message_errors(history, "history", final_role="assistant"))
    if row.get("match", "all") not in ("all", "any"):
        errors.append(f"match: expected 'all' or 'any', got {row.get('match')!r}")
    for key in ("regex", "case_sensitive"):
        if not isinstance(row.get(key, False), bool):
            errors.append(f"{key}: expected true or false")
    regex = row.get("regex") is True
    errors.extend(_keyword_list_errors(row.get("expect"), "expect", regex, required=True))
    errors.extend(_keyword_list_errors(row.get("forbid", []), "forbid", regex, required=False))
    return errors


def load_cases(path: Path, errors: list[str]) -> list[Case]:
    """Every valid case of the file; each problem is appended to `errors` as `file:line: field: reason`."""
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for number, row in read_jsonl_with_lines(path, errors):
        problems = case_errors(row)
        errors.extend(f"{path}:{number}: {problem}" for problem in problems)
        if problems:
            continue
        if row["id"] in seen:
            errors.append(f"{path}:{number}: id: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
            continue
        seen[row["id"]] = number
        cases.append(
            Case(
                id=row["id"],
                kind=row["kind"],
                prompt=row["prompt"],
                expect=tuple(row["expect"]),
                system=row.get("system"),
                history=tuple(row.get("history", ())),
                match=row.get("match", "all"),
                forbid=tuple(row.get("forbid", ())),
                regex=row.get("regex", False),
                case_sensitive=row.get("case_sensitive", False),
                reference=row.get("reference"),
                line=number,
            )
        )
    if not cases and not errors:
        errors.append(f"{path}: no cases")
    return cases


# Stage prepare writes the learn cases alone here, in data/prepared/: training asks them (train.fit_learn),
# so editing a keep case rescores without retraining.
LEARN_CASES_FILE = "learn_cases.jsonl"


def learn_rows(path: Path) -> list[dict]:
    """The learn cases of a validated cases file, as written."""
    return [row for _, row in read_jsonl_with_lines(path, []) if row.get("kind") == "learn"]


def read_cases(path: Path) -> list[Case]:
    """The file's cases; any problem in it is one PipelineError listing every `file:line: field: reason`."""
    errors: list[str] = []
    cases = load_cases(path, errors)
    if errors:
        raise PipelineError("\n".join(errors))
    return cases
