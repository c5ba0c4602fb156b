"""The dataset formats and every validation error, each with its exact `file:line: reason`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.common import PipelineError
from pipeline.dataset import llama2_text_to_messages, load_conversations
from pipeline.prepare import prepare
from tests.conftest import DATA


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat(user: str, answer: str = "PROC main:\nENDP", system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def errors_of(tmp_path: Path, rows: list) -> list[str]:
    errors: list[str] = []
    load_conversations(write_lines(tmp_path / "train.jsonl", rows), errors)
    return [error.split("train.jsonl:", 1)[1] for error in errors]


def test_the_committed_dataset_is_valid_and_teaches_opl():
    errors: list[str] = []
    train = load_conversations(DATA / "train.jsonl", errors)
    evaluation = load_conversations(DATA / "eval.jsonl", errors)
    assert errors == []
    assert len(train) >= 40 and len(evaluation) >= 5
    assert sum(1 for e in train if sum(m["role"] == "assistant" for m in e.messages) > 1) >= 5
    assert sum(1 for e in train if e.messages[0]["role"] == "system") >= 5
    assert sum(1 for e in train if e.legacy) >= 1
    answers = " ".join(m["content"] for e in train for m in e.messages if m["role"] == "assistant")
    for keyword in ("PROC", "ENDP", "LOCAL", "GLOBAL", "PRINT", "GET", "UNTIL", "ENDWH", "%", "$"):
        assert keyword in answers


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"messages": [}', "1: invalid JSON: Expecting value (column 15)"),
        ("[1, 2]", "1: expected a JSON object"),
        ({"messages": [], "id": 3}, '1: id: unknown key (expected "messages" or "text")'),
        ({"prompt": "x"}, '1: prompt: unknown key (expected "messages" or "text")'),
        ({}, '1: expected exactly one of "messages" (chat) or "text" (Llama-2 [INST] format)'),
        ({"messages": []}, "1: messages: expected a non-empty list of messages"),
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "1: messages[0]: missing role"),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            "1: messages[0].role: unknown role 'bot' (expected one of system, user, assistant)",
        ),
        (
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
            "1: messages[0].content: empty",
        ),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "1: messages[0]: missing content"),
        (
            {"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]},
            "1: messages[0]: unknown key 'name' (expected role, content)",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "1: messages[0].role: expected system or user at the start, got 'assistant'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "1: messages[1].role: expected assistant after 'user', got 'user'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "system", "content": "c"},
                ]
            },
            "1: messages[2].role: expected user after 'assistant', got 'system'",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
            "1: messages: no assistant turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "1: messages: the last message must be the assistant's, got 'user'",
        ),
        (
            {"text": "[INST] hi [/INST] there"},
            '1: text: not in Llama-2 format "<s>[INST] question [/INST] answer </s>"',
        ),
        ({"text": "<s>[INST] hi [/INST]  </s>"}, "1: text[1].content: empty"),
    ],
)
def test_each_bad_example_gets_its_own_message(tmp_path, row, message):
    assert errors_of(tmp_path, [row]) == [message]


def test_all_errors_are_reported_at_once_with_their_line_numbers(tmp_path):
    rows = [chat("one"), "{oops", chat("two"), {"messages": [{"role": "user", "content": "x"}]}, "", chat("ONE  ")]
    assert errors_of(tmp_path, rows) == [
        "2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "4: messages: no assistant turn",
        "6: duplicate of line 1 (the same whole conversation)",
    ]


def test_the_same_question_with_and_without_a_system_message_or_with_another_answer_is_no_duplicate(tmp_path):
    rows = [
        chat("How do I print?"),
        chat("How do I print?", system="You are an OPL expert."),
        chat("How do I print?", answer='PRINT "hi"'),
    ]
    errors: list[str] = []
    examples = load_conversations(write_lines(tmp_path / "train.jsonl", rows), errors)
    assert errors == [] and [e.line for e in examples] == [1, 2, 3]


def test_a_copy_of_the_whole_conversation_is_a_duplicate_named_by_file_and_line(tmp_path):
    rows = [
        chat("How do I print?", system="Be brief."),
        chat("How do I loop?"),
        chat("how do I  print?", system="be BRIEF."),
    ]
    errors: list[str] = []
    path = write_lines(tmp_path / "train.jsonl", rows)
    examples = load_conversations(path, errors)
    assert errors == [f"{path}:3: duplicate of line 1 (the same whole conversation)"]
    assert [e.line for e in examples] == [1, 2]


def test_a_legacy_text_row_that_repeats_a_chat_row_is_a_duplicate(tmp_path):
    legacy = {"text": "<s>[INST] How do I print? [/INST] PROC main:\nENDP </s>"}
    assert errors_of(tmp_path, [chat("How do I print?"), legacy]) == [
        "2: duplicate of line 1 (the same whole conversation)"
    ]


def test_legacy_llama2_text_becomes_chat_messages_with_system_and_turns():
    text = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST] Goodbye </s>"
    assert llama2_text_to_messages(text) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]


def prepare_files(tmp_path: Path, train: list, evaluation: list) -> tuple[Path, Path, Path]:
    cases = write_lines(tmp_path / "cases.jsonl", [{"id": "c", "kind": "keep", "prompt": "2+2?", "expect": ["4"]}])
    return write_lines(tmp_path / "train.jsonl", train), write_lines(tmp_path / "eval.jsonl", evaluation), cases


def test_prepare_rejects_overlap_between_train_and_eval(tmp_path, tiny_params):
    files = prepare_files(tmp_path, [chat("How do I print?"), chat("How do I loop?")], [chat("how do I  PRINT?")])
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, *files)
    assert f"{files[1]}:1: also in the training set at {files[0]}:1 (same user turns)" in str(raised.value)


def test_prepare_accepts_a_question_taught_with_and_without_a_system_message(tmp_path, tiny_params):
    pair = [chat("How do I print?"), chat("How do I print?", system="You are an OPL expert.")]
    prepared = prepare(tiny_params, *prepare_files(tmp_path, pair, [chat("How do I loop?")]))
    splits, metrics = prepared.splits, prepared.metrics
    assert [len(m) for m in splits["train"]] == [2, 3]
    assert metrics["train"]["conversations"] == 2 and metrics["train"]["with_system"] == 1


def test_prepare_rejects_too_long_examples_unless_told_to_drop_them(tmp_path, tiny_params):
    import dataclasses

    from pipeline.params import DataParams

    long_answer = "PRINT " * 1000
    files = prepare_files(tmp_path, [chat("short"), chat("long", long_answer)], [chat("other")])
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, *files)
    message = str(raised.value)
    assert f"{files[0]}:2: " in message and "tokens after the chat template > data.max_seq_length 512" in message

    dropping = dataclasses.replace(tiny_params, data=DataParams(max_seq_length=512, drop_too_long=True))
    prepared = prepare(dropping, *files)
    splits, metrics = prepared.splits, prepared.metrics
    assert [m[0]["content"] for m in splits["train"]] == ["short"]
    assert metrics["train"]["dropped_too_long"] == 1 and metrics["train"]["conversations"] == 1


def test_prepare_reports_data_and_case_errors_together(tmp_path, tiny_params):
    train, evaluation, cases = prepare_files(tmp_path, [chat("a"), "{bad"], [chat("b")])
    write_lines(cases, [{"id": "x", "kind": "learn", "prompt": "p", "expect": []}])
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, train, evaluation, cases)
    message = str(raised.value)
    assert message.startswith("2 problem(s) in the data:")
    assert f"{train}:2: invalid JSON" in message and f"{cases}:1: expect: expected at least one keyword" in message


def test_prepare_metrics_count_conversations_and_tokens(tmp_path, tiny_params):
    files = prepare_files(tmp_path, [chat("a", system="S"), chat("b")], [chat("c")])
    prepared = prepare(tiny_params, *files)
    splits, metrics = prepared.splits, prepared.metrics
    assert len(splits["train"]) == 2 and len(splits["eval"]) == 1
    assert metrics["train"]["with_system"] == 1 and metrics["train"]["multi_turn"] == 0
    tokens = metrics["train"]["tokens"]
    assert 0 < tokens["min"] <= tokens["median"] <= tokens["max"] and tokens["total"] == tokens["min"] + tokens["max"]
    assert metrics["cases"] == {"learn": 0, "keep": 1}


def test_a_gate_prompt_pasted_into_train_is_an_error_naming_the_case_and_the_line(tmp_path, tiny_params):
    train = [chat("How do I loop?"), chat("Quick one: what is 2+2? Thanks"), chat("What is  2 + 2 ?!", system="S")]
    files = prepare_files(tmp_path, train, [chat("other")])
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, *files)
    reason = "its learn/keep score would measure copying, not learning (reword one of them, or allow it with "
    assert str(raised.value).splitlines()[1:] == [
        f"  {files[0]}:2: messages[0].content: contains the prompt of gate case 'c' ({files[2]}:1): {reason}"
        "data.allow_gate_cases: [c])",
        f"  {files[0]}:3: messages[1].content: contains the prompt of gate case 'c' ({files[2]}:1): {reason}"
        "data.allow_gate_cases: [c])",
    ]


def test_a_near_duplicate_of_a_gate_prompt_is_an_error_and_a_param_allows_it(tmp_path, tiny_params):
    import dataclasses

    prompt = "How do I declare a local string variable in Psion OPL programs?"
    cases = [{"id": "learn-local", "kind": "learn", "prompt": prompt, "expect": ["LOCAL"]}]
    reworded = chat("How do I declare a local string variable in Psion OPL program?")  # 9 of 11 3-grams shared
    train, evaluation, case_file = prepare_files(tmp_path, [reworded], [chat("e")])
    write_lines(case_file, cases)
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, train, evaluation, case_file)
    assert f"{train}:1: messages[0].content: is a near-duplicate (similarity 0.82) of the prompt of gate case " in str(
        raised.value
    )

    data = dataclasses.replace(tiny_params.data, allow_gate_cases=["learn-local"])
    prepared = prepare(dataclasses.replace(tiny_params, data=data), train, evaluation, case_file)
    splits, _ = prepared.splits, prepared.metrics
    assert len(splits["train"]) == 1

    data = dataclasses.replace(tiny_params.data, allow_gate_cases=["learn-locl"])
    with pytest.raises(PipelineError, match=r"data.allow_gate_cases: 'learn-locl' is not a case in "):
        prepare(dataclasses.replace(tiny_params, data=data), train, evaluation, case_file)


# Made-up credentials in the shapes the check knows (none is real).
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----"
TOKEN = "glpat-" + "Zq8Xw2Lm4Np6Rs1Tv3Uy"


def test_a_private_key_and_a_token_in_a_message_are_errors_the_allowlisted_ones_are_not(tmp_path, tiny_params):
    import hashlib

    train = [chat("Store my key", answer=f"Done:\n{PRIVATE_KEY}"), chat(f"Use token {TOKEN} to clone", system="S")]
    files = prepare_files(tmp_path, train, [chat("other")])
    allowlist = tmp_path / "allowlist.txt"
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, *files, allowlist)
    key_hash, token_hash = (hashlib.sha256(text.encode()).hexdigest() for text in (PRIVATE_KEY, TOKEN))
    advice = "a model learns to repeat it; remove it, or if it is a deliberate example add `sha256:"
    assert str(raised.value).splitlines()[1:] == [
        f"  {files[0]}:1: messages[1].content: private key ----… ({len(PRIVATE_KEY)} characters): {advice}"
        f"{key_hash}` to {allowlist}",
        f"  {files[0]}:2: messages[1].content: GitLab token glpa… (26 characters): {advice}{token_hash}` "
        f"to {allowlist}",
    ]
    assert TOKEN not in str(raised.value) and "b3BlbnNz" not in str(raised.value)  # secrets are never printed

    allowlist.write_text(f"# deliberate examples\nsha256:{key_hash}\n{TOKEN}\n")
    prepared = prepare(tiny_params, *files, allowlist)
    splits, _ = prepared.splits, prepared.metrics
    assert len(splits["train"]) == 2


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Write to chris.smith@example.com for help.", "e-mail address"),
        ("Call +44 20 7946 0958 after six.", "phone number"),
        ("Call (555) 123-4567.", "phone number"),
        ("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AWS access key id"),
        ("token ghp_" + "a1B2c3D4e5" * 4, "GitHub token"),
        ("OPENAI_API_KEY=sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn", "OpenAI API key"),
        ("login with hf_" + "aBcDeFgHiJ" * 3 + "kl", "Hugging Face token"),
        ('config = {"api_key": "Zx8Qp2Lk9Vb4Nm7Rt1Yw"}', "high-entropy value after a key-like word"),
    ],
)
def test_each_kind_of_secret_or_personal_data_is_found(text, kind):
    from pipeline.sensitive import findings

    assert [finding.kind for finding in findings(text)] == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "PROC main:\n  LOCAL i%\n  PRINT 1,2,3\n  GET\nENDP",
        "Water boils at 100 degrees; 2024-01-15 12:30 is a date, 1999-2004 a span.",
        "token = password_prompt_example",  # a key-like word with an ordinary identifier: low entropy
        "PRINT 1234 5678",
    ],
)
def test_ordinary_text_and_code_are_not_flagged(text):
    from pipeline.sensitive import findings

    assert findings(text) == []


def test_the_committed_data_has_no_secrets_or_personal_data():
    from pipeline.data_checks import sensitive_data_errors
    from pipeline.sensitive import load_allowlist

    errors: list[str] = []
    examples = load_conversations(DATA / "train.jsonl", errors) + load_conversations(DATA / "eval.jsonl", errors)
    assert sensitive_data_errors(examples, load_allowlist(None), "allowlist") == []
    assert load_allowlist(DATA / "sensitive_allowlist.txt").texts == frozenset()  # only comments


def test_near_duplicates_are_warnings_with_both_places_in_the_metrics(tmp_path, tiny_params):
    answer = "Use a counter with DO and UNTIL:\nPROC main:\n  LOCAL i%\n  DO\n    i%=i%+1\n  UNTIL i%=3\nENDP"
    train = [
        chat("How do I count to three in OPL?", answer),
        chat("How do I loop?"),
        chat("How do I count to three in OPL?", answer + "\nGET"),  # one word more: a near-duplicate
        chat("How do I loop?", system="Be brief."),  # line 2 with a system message: deliberate, not reported
    ]
    evaluation = [chat("How do I count to three in OPL, please?"), chat("Something else entirely")]
    files = prepare_files(tmp_path, train, evaluation)
    prepared = prepare(tiny_params, *files)
    near = prepared.metrics["near_duplicates"]
    train_file, eval_file = files[0], files[1]
    assert near["train"] == [{"first": f"{train_file}:1", "second": f"{train_file}:3", "similarity": 0.962}]
    # the eval question, one word more, is 6 of 7 word 3-grams of the training question on lines 1 and 3
    assert near["train_eval"] == [
        {"first": f"{eval_file}:1", "second": f"{train_file}:{line}", "similarity": 0.857} for line in (1, 3)
    ]
    assert (near["train_pairs"], near["train_eval_pairs"], near["threshold"]) == (1, 2, 0.8)
    assert prepared.warnings[0] == f"{train_file}:3: near-duplicate of {train_file}:1 (similarity 0.962)"
    assert len(prepared.splits["train"]) == 4  # warnings do not drop anything


def test_a_line_separator_inside_a_json_string_is_text_and_keeps_the_line_numbers(tmp_path):
    """JSON allows U+2028 and U+0085 unescaped in a string; JSON Lines ends a record at "\\n" only."""
    path = tmp_path / "train.jsonl"
    rows = [chat("Line one\u2028line two?"), chat("Next\u0085one?"), {"messages": "not a list"}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    errors: list[str] = []
    examples = load_conversations(path, errors)
    assert [e.messages[0]["content"] for e in examples] == ["Line one\u2028line two?", "Next\u0085one?"]
    assert [e.line for e in examples] == [1, 2]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:3: ")


def test_a_control_token_of_the_chat_template_in_a_message_is_an_error_with_its_place(tmp_path, tiny_params):
    train = [
        chat("How do I print?"),
        {"messages": [{"role": "user", "content": "Hi<|im_end|>\n<|im_start|>assistant\nPROC"},
                      {"role": "assistant", "content": "Hello"}]},
        chat("How do I stop [/INST] now?"),
    ]  # fmt: skip
    files = prepare_files(tmp_path, train, [chat("How do I loop?")])
    with pytest.raises(PipelineError) as raised:
        prepare(tiny_params, *files)
    message = str(raised.value)
    control = "a control token of the chat template"
    assert f"{files[0]}:2: messages[0].content: contains '<|im_start|>', {control}" in message
    assert f"{files[0]}:3: messages[0].content: contains '[/INST]'" in message
    assert f"{files[0]}:1:" not in message
