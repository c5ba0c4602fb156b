"""What a reviewer would miss in a dataset: gate prompts in the training data, secrets and personal data,
near-duplicates. Errors stop prepare (`file:line: field: reason`); near-duplicates are warnings.

- Gate contamination: a gate case's prompt copied into a training user turn (its words, in order,
  anywhere in the turn) or a near-duplicate of it (word 3-gram Jaccard >= data.near_duplicate_threshold)
  is an error naming the case and the line: a learn score would then measure copying, not learning.
  `data.allow_gate_cases: [id, ...]` allows it for the cases named.
- Secrets and personal data: pipeline.sensitive, with its allowlist file.
- Near-duplicates: two training conversations (every message) at or above the threshold, and an eval
  conversation whose user turns are that close to a training one's. A pair that differs only in its system
  message is the deliberate "with and without a system prompt" pattern and is not reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pipeline.cases import Case
from pipeline.dataset import Example, conversation_key, overlap_errors
from pipeline.near_duplicates import jaccard, shingles, similar_pairs, word_line, words
from pipeline.params import DataParams
from pipeline.sensitive import Allowlist, sensitive_errors


def message_field(example: Example, index: int) -> str:
    """The field a problem in message `index` is reported under: legacy rows have one `text`."""
    return "text" if example.legacy else f"messages[{index}].content"


@dataclass(frozen=True)
class NearDuplicate:
    first: str  # file:line
    second: str
    similarity: float  # Jaccard similarity of the word 3-grams, 0..1

    def as_dict(self) -> dict:
        return asdict(self)


def contamination_errors(
    train: Sequence[Example], cases: Sequence[Case], cases_source: str, threshold: float, allowed: Sequence[str]
) -> list[str]:
    errors = [
        f"params.yaml: data.allow_gate_cases: {case_id!r} is not a case in {cases_source}"
        for case_id in allowed
        if case_id not in {case.id for case in cases}
    ]
    # each training user turn normalised once: (example, message index, its words, its shingles)
    turns = [
        (example, index, word_line(message["content"]), shingles(message["content"]))
        for example in train
        for index, message in enumerate(example.messages)
        if message["role"] == "user"
    ]
    for case in cases:
        if case.id in allowed or not words(case.prompt):
            continue
        prompt_line, prompt = word_line(case.prompt), shingles(case.prompt)
        reported: set[int] = set()  # one error per case and conversation
        for example, index, line, items in turns:
            if id(example) in reported:
                continue
            if prompt_line in line:
                how = "contains"
            else:
                similarity = jaccard(prompt, items)
                if similarity < threshold:
                    continue
                how = f"is a near-duplicate (similarity {similarity:.2f}) of"
            reported.add(id(example))
            errors.append(
                f"{example.where}: {message_field(example, index)}: {how} the prompt of gate case {case.id!r} "
                f"({cases_source}:{case.line}): its learn/keep score would measure copying, not learning "
                f"(reword one of them, or allow it with data.allow_gate_cases: [{case.id}])"
            )
    return errors


def sensitive_data_errors(examples: Sequence[Example], allowlist: Allowlist, allowlist_path: str) -> list[str]:
    errors: list[str] = []
    for example in examples:
        for index, message in enumerate(example.messages):
            errors += sensitive_errors(
                example.where, message_field(example, index), message["content"], allowlist, allowlist_path
            )
    return errors


def _text(example: Example, roles: tuple[str, ...]) -> str:
    return "\n".join(m["content"] for m in example.messages if m["role"] in roles)


def _without_system(example: Example) -> str:
    return conversation_key([m for m in example.messages if m["role"] != "system"])


def near_duplicates(examples: Sequence[Example], threshold: float) -> list[NearDuplicate]:
    """Pairs of conversations (every message) at least `threshold` similar, the with/without-system pairs left out."""
    texts = [_text(example, ("system", "user", "assistant")) for example in examples]
    return [
        NearDuplicate(examples[pair.first].where, examples[pair.second].where, pair.similarity)
        for pair in similar_pairs(texts, None, threshold)
        if _without_system(examples[pair.first]) != _without_system(examples[pair.second])
    ]


def near_overlap(evaluation: Sequence[Example], train: Sequence[Example], threshold: float) -> list[NearDuplicate]:
    """Eval conversations whose user turns are near-duplicates of a training conversation's (exact: an error)."""
    pairs = similar_pairs([_text(e, ("user",)) for e in evaluation], [_text(t, ("user",)) for t in train], threshold)
    return [
        NearDuplicate(evaluation[pair.first].where, train[pair.second].where, pair.similarity)
        for pair in pairs
        if evaluation[pair.first].prompt_key() != train[pair.second].prompt_key()
    ]


@dataclass(frozen=True)
class Review:
    errors: list[str]  # `file:line: field: reason`: prepare stops
    near_duplicates: list[NearDuplicate]  # within the training conversations
    near_overlap: list[NearDuplicate]  # eval -> training

    def warnings(self) -> list[str]:
        lines = [f"{p.second}: near-duplicate of {p.first} (similarity {p.similarity})" for p in self.near_duplicates]
        return lines + [
            f"{p.first}: near-duplicate of the training conversation {p.second} (similarity {p.similarity})"
            for p in self.near_overlap
        ]


# What chat templates use as structure (besides a tokenizer's own special tokens): text that spells one
# of these inside a message would be read by the model as a turn boundary, not as content.
CHAT_MARKERS = (
    "<|im_start|>", "<|im_end|>",  # ChatML (SmolLM2, Qwen)
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",  # Llama 2 / Mistral
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
    "<start_of_turn>", "<end_of_turn>",  # Gemma
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",  # Phi-3
)  # fmt: skip


def control_token_errors(examples: Sequence[Example], special_tokens: Sequence[str]) -> list[str]:
    """`file:line: messages[i].content: ...` for each message that contains a control token."""
    markers = sorted({*CHAT_MARKERS, *(t for t in special_tokens if len(t) > 1)}, key=len, reverse=True)
    errors = []
    for example in examples:
        for index, message in enumerate(example.messages):
            found = next((marker for marker in markers if marker in message["content"]), None)
            if found:
                errors.append(
                    f"{example.where}: messages[{index}].content: contains {found!r}, a control token of the chat "
                    "template: the model would read it as a turn boundary, not as text (remove or reword it)"
                )
    return errors


def review(
    train: Sequence[Example],
    evaluation: Sequence[Example],
    cases: Sequence[Case],
    cases_source: str,
    data: DataParams,
    allowlist: Allowlist,
    allowlist_path: str,
) -> Review:
    """Every check across files (prepare and the MR report): train/eval overlap, gate contamination,
    secrets and personal data; near-duplicates as warnings. `train`: each conversation once."""
    threshold = data.near_duplicate_threshold
    errors = overlap_errors(list(train), list(evaluation))
    errors += contamination_errors(train, cases, cases_source, threshold, data.allow_gate_cases)
    errors += sensitive_data_errors([*train, *evaluation], allowlist, allowlist_path)
    return Review(errors, near_duplicates(train, threshold), near_overlap(evaluation, train, threshold))
