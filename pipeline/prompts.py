"""General prompts (data/general/*.jsonl) and the base model's own answers to them.

A prompts file holds one JSON object per line: {"id": "probe-capital-peru", "prompt": "What is ..."}.
Stage base_answers answers each prompt greedily with the base model; those answers are
- probes.jsonl: references for the gate's forgetting measure (how much less likely the fine-tuned
  model finds what the base itself would have said), and
- replay.jsonl: conversations mixed into training (`train.replay`) so the fine-tune keeps them.
Neither needs an external corpus, and both work for any base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.common import PipelineError, read_jsonl
from pipeline.dataset import read_jsonl_with_lines

PROMPT_KEYS = ("id", "prompt")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class BaseAnswer:
    id: str
    prompt: str
    answer: str
    finished: bool  # the base ended its turn; false: cut at base_answers.max_new_tokens

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def conversation(self) -> dict:
        return {"messages": [*self.messages(), {"role": "assistant", "content": self.answer}]}


def load_prompts(path: Path, errors: list[str]) -> list[Prompt]:
    """Every valid prompt of the file; each problem is appended to `errors` as `file:line: field: reason`."""
    prompts: list[Prompt] = []
    seen_ids: dict[str, int] = {}
    seen_prompts: dict[str, int] = {}
    for number, row in read_jsonl_with_lines(path, errors):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            errors.append(f"{where}: expected a JSON object")
            continue
        problems = [f"{key}: unknown key (known: {', '.join(PROMPT_KEYS)})" for key in row if key not in PROMPT_KEYS]
        problems += [
            f"{key}: required, a non-empty string"
            for key in PROMPT_KEYS
            if not isinstance(row.get(key), str) or not row[key].strip()
        ]
        if not problems and row["id"] in seen_ids:
            problems.append(f"id: duplicate id {row['id']!r} (first on line {seen_ids[row['id']]})")
        if not problems and row["prompt"].strip() in seen_prompts:
            problems.append(f"prompt: same prompt as line {seen_prompts[row['prompt'].strip()]}")
        errors.extend(f"{where}: {problem}" for problem in problems)
        if problems:
            continue
        seen_ids[row["id"]], seen_prompts[row["prompt"].strip()] = number, number
        prompts.append(Prompt(row["id"], row["prompt"]))
    if not prompts and not errors:
        errors.append(f"{path}: no prompts")
    return prompts


def prompts_or_raise(path: Path) -> list[Prompt]:
    errors: list[str] = []
    prompts = load_prompts(path, errors)
    if errors:
        raise PipelineError("invalid prompts:\n  " + "\n  ".join(errors))
    return prompts


def base_answer_rows(answers: list[BaseAnswer]) -> list[dict]:
    return [asdict(answer) for answer in answers]


def read_base_answers(path: Path) -> list[BaseAnswer]:
    """The rows stage base_answers wrote (a PipelineError when missing: run that stage first)."""
    try:
        return [BaseAnswer(**row) for row in read_jsonl(path)]
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the base_answers stage first (dvc repro base_answers)") from None
    except (TypeError, ValueError) as error:
        raise PipelineError(f"{path}: not written by the base_answers stage: {error}") from None
