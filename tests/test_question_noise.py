"""Noisy copies of the training questions (train.question_noise): which words go, what stays, and that it is seeded."""

import random

from pipeline.question_noise import drop_words, noisy_copy, with_noisy_copies

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are the help desk for Fennick, a city bike-share."},
        {"role": "user", "content": "What does error F-19 on a Fennick dock mean?"},
        {"role": "assistant", "content": "F-19 means the lock pin is stuck; push the bike in firmly and try again."},
        {"role": "user", "content": "Fix this OPL code:\nPROC main:\n  greet\nENDP"},
        {"role": "assistant", "content": "A procedure call needs a colon after the name."},
    ]
}


def test_a_noisy_copy_thins_only_the_first_line_of_each_user_turn():
    copy = noisy_copy(CONVERSATION, 0.5, seed=42)
    original = CONVERSATION["messages"]
    for before, after in zip(original, copy["messages"], strict=True):
        assert after["role"] == before["role"]
        if before["role"] != "user":
            assert after == before  # answers and the system message as they were
    question = copy["messages"][1]["content"].split()
    assert 0 < len(question) < len(original[1]["content"].split())
    assert all(word in original[1]["content"].split() for word in question)  # words dropped, none added or moved
    # the quoted code after the first line is kept verbatim
    assert copy["messages"][3]["content"].split("\n", 1)[1] == "PROC main:\n  greet\nENDP"


def test_the_copy_is_seeded_by_the_seed_and_the_conversation_alone():
    other = {"messages": [{"role": "user", "content": "How do I pause a Fennick ride?"}]}
    alone = with_noisy_copies([CONVERSATION], 0.3, seed=42)[1]
    among_others = with_noisy_copies([other, CONVERSATION], 0.3, seed=42)[3]
    assert alone == among_others
    assert any(noisy_copy(CONVERSATION, 0.3, seed) != alone for seed in range(1, 6))


def test_at_least_one_word_is_kept_and_zero_adds_no_copies():
    # every word drawn to go: the longest (the first of equals) stays
    assert drop_words("Where are the Fennick helmets kept?", 0.999999, random.Random(0)) == "Fennick"
    assert with_noisy_copies([CONVERSATION], 0.0, seed=42) == [CONVERSATION]
    assert len(with_noisy_copies([CONVERSATION, CONVERSATION], 0.2, seed=42)) == 4
