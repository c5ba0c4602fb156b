"""The gate's evaluation cases: the committed file and each format error."""

from __future__ import annotations

import json

import pytest

from pipeline.cases import Case, load_cases
from tests.conftest import DATA


def test_the_committed_cases_cover_learn_and_keep():
    errors: list[str] = []
    cases = load_cases(DATA / "gate_cases.jsonl", errors)
    assert errors == []
    kinds = [case.kind for case in cases]
    assert kinds.count("learn") >= 5 and kinds.count("keep") >= 5
    hello = next(case for case in cases if "Hello Chris" in case.prompt)
    assert hello.kind == "learn" and "PROC" in hello.expect


def test_a_case_becomes_the_messages_sent_to_the_model():
    case = Case(
        id="x",
        kind="learn",
        prompt="And now?",
        expect=("GET",),
        system="Be brief.",
        history=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}),
    )
    assert case.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And now?"},
    ]


GOOD = {"id": "a", "kind": "keep", "prompt": "2+2?", "expect": ["4"]}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD, "kind": "teach"}, "kind: expected 'learn' or 'keep', got 'teach'"),
        ({**GOOD, "prompt": ""}, "prompt: required, a non-empty string"),
        ({k: v for k, v in GOOD.items() if k != "id"}, "id: required, a non-empty string"),
        ({**GOOD, "expect": []}, "expect: expected at least one keyword"),
        ({**GOOD, "expect": "4"}, "expect: expected a list of non-empty strings"),
        ({**GOOD, "forbid": [""]}, "forbid: expected a list of non-empty strings"),
        ({**GOOD, "match": "some"}, "match: expected 'all' or 'any', got 'some'"),
        ({**GOOD, "regex": "yes"}, "regex: expected true or false"),
        (
            {**GOOD, "regex": True, "expect": ["(unclosed"]},
            "expect: invalid regex '(unclosed': missing ), unterminated subpattern at position 0",
        ),
        ({**GOOD, "answer": "4"}, "answer: unknown key"),
        ({**GOOD, "reference": ""}, "reference: expected a non-empty string (an answer we would accept)"),
        ({**GOOD, "reference": ["4"]}, "reference: expected a non-empty string (an answer we would accept)"),
        ({**GOOD, "history": [{"role": "user", "content": "hi"}]}, "history: no assistant turn"),
        (
            {**GOOD, "history": [{"role": "system", "content": "s"}]},
            'history[0].role: put the system message in "system"',
        ),
    ],
)
def test_each_bad_case_names_its_line_and_field(tmp_path, row, message):
    path = tmp_path / "cases.jsonl"
    path.write_text(
        json.dumps(GOOD) + "\n" + json.dumps({**row, "id": row.get("id", "b") + "2"} if "id" in row else row) + "\n"
    )
    errors: list[str] = []
    load_cases(path, errors)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: {message}")


def test_duplicate_case_ids_are_rejected(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    errors: list[str] = []
    load_cases(path, errors)
    assert errors == [f"{path}:2: id: duplicate id 'a' (first on line 1)"]


def test_an_answer_scores_the_share_of_expected_keywords_and_zero_with_a_forbidden_one():
    case = Case(id="x", kind="learn", prompt="p", expect=("PROC", "ENDP"), forbid=("def ",))
    assert case.score("proc main:\nENDP").score == 1.0  # case-insensitive by default
    half = case.score("PROC main: PRINT 1")
    assert (half.score, half.found, half.missing, half.passed) == (0.5, ("PROC",), ("ENDP",), False)
    python = case.score("PROC ENDP def main():")
    assert (python.score, python.forbidden) == (0.0, ("def ",))


def test_any_match_regex_and_case_sensitive_scoring():
    any_case = Case(id="x", kind="keep", prompt="p", expect=("Paris", "paris"), match="any", case_sensitive=True)
    assert any_case.score("It is paris.").score == 1.0
    assert any_case.score("It is PARIS.").score == 0.0
    regex = Case(id="y", kind="keep", prompt="p", expect=(r"\b7\b|seven",), regex=True)
    assert regex.score("A week has 7 days").passed
    assert not regex.score("A week has 17 days").passed


def test_keywords_match_as_whole_words_not_glued_to_letters_or_digits():
    seven = Case(id="w", kind="keep", prompt="p", expect=("7",))
    assert seven.score("A week has 7 days.").passed and seven.score("7").passed and seven.score("(7)").passed
    assert not seven.score("A week has 17 days.").passed
    assert not seven.score("the 7th day").passed
    proc = Case(id="p", kind="learn", prompt="p", expect=("PROC",), case_sensitive=True)
    assert proc.score("PROC main:").passed and proc.score("x:PROC").passed
    assert not proc.score("PROCESS the list").passed
    # a keyword ending in a space or punctuation has no boundary on that side
    python = Case(id="d", kind="keep", prompt="p", expect=("def ",))
    assert python.score("def reverse(s):").passed and python.score("undef x").passed is False
    assert Case(id="f", kind="keep", prompt="p", expect=("x",), forbid=("5 days",)).score("x: 5 days").forbidden


def test_a_regex_keyword_is_used_as_written_without_word_edges():
    glued = Case(id="r", kind="keep", prompt="p", expect=("7",), regex=True)
    assert glued.score("17").passed


def test_the_committed_references_meet_their_own_cases():
    """A reference is an answer we would accept: it passes its case's keywords and forbid list."""
    errors: list[str] = []
    cases = load_cases(DATA / "gate_cases.jsonl", errors)
    assert errors == [] and all(case.reference for case in cases)
    assert [case.id for case in cases if not case.score(case.reference).passed] == []
