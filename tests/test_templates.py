"""Training templates: identical text to the shipped template, loss on assistant tokens only."""

from __future__ import annotations

import pytest
from trl.chat_template_utils import has_generation_markers

from pipeline.chat_templates import check_training_template, training_template
from pipeline.common import PipelineError
from tests.conftest import MULTI_TURN


def trained_runs(ids: list[int], trained: list[bool]) -> list[list[int]]:
    """Contiguous runs of trained token ids."""
    runs: list[list[int]] = []
    for position, (token, on) in enumerate(zip(ids, trained, strict=True)):
        if on and (position == 0 or not trained[position - 1]):
            runs.append([])
        if on:
            runs[-1].append(token)
    return runs


@pytest.mark.parametrize(
    "tokenizer_fixture",
    [
        "tiny_tokenizer",
        "smollm2_tokenizer",
        "qwen2_tokenizer",
        "qwen3_tokenizer",
        "llama31_tokenizer",
        "phi3_tokenizer",
        "phi3_mini_tokenizer",
        "gemma2_tokenizer",
        "gemma3_tokenizer",
    ],
)
def test_training_template_renders_every_conversation_of_the_dataset_like_the_shipped_one(
    request, tokenizer_fixture, dataset_conversations
):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    training = training_template(tokenizer)
    assert has_generation_markers(training) and not has_generation_markers(tokenizer.chat_template)
    check_training_template(tokenizer, training, [*dataset_conversations, MULTI_TURN])


def test_parity_check_fails_loudly_on_a_template_that_drifts(tiny_tokenizer):
    drifted = training_template(tiny_tokenizer).replace("[/INST]", "[/INST]\n")
    with pytest.raises(PipelineError, match="renders conversation 0 differently"):
        check_training_template(tiny_tokenizer, drifted, [MULTI_TURN])


def test_an_unknown_template_without_a_training_variant_is_a_clear_error(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(PipelineError, match="add one with \\{% generation %\\} markers to TRAINING_TEMPLATES"):
        training_template(tokenizer)


@pytest.mark.parametrize(
    ("tokenizer_fixture", "before", "after"),
    [
        ("smollm2_tokenizer", "", ""),
        # TRL's Qwen2.5 variant trains the newline after the role and the one after <|im_end|> as well
        ("qwen2_tokenizer", "\n", "\n"),
    ],
)
def test_chatml_assistant_mask_covers_each_answer_and_its_im_end_exactly(request, tokenizer_fixture, before, after):
    # The same call TRL makes for assistant_only_loss, on SmolLM2's real tokenizer and the tiny Qwen2's.
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    encoded = tokenizer.apply_chat_template(
        MULTI_TURN,
        chat_template=training_template(tokenizer),
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    shipped = tokenizer.apply_chat_template(MULTI_TURN, return_dict=True)["input_ids"]
    assert encoded["input_ids"] == shipped
    runs = trained_runs(encoded["input_ids"], [bool(m) for m in encoded["assistant_masks"]])
    assert [tokenizer.decode(run) for run in runs] == [
        before + 'PROC main:\n  PRINT "Hello Chris"\nENDP<|im_end|>' + after,
        before + 'PROC main:\n  PRINT "Hello Chris"\n  GET\nENDP<|im_end|>' + after,
    ]
    # Each answer starts right after its (untrained) role header.
    for run in runs:
        start = next(i for i in range(len(shipped)) if shipped[i : i + len(run)] == run)
        assert tokenizer.decode(shipped[:start]).endswith("<|im_start|>assistant\n".removesuffix(before))


def test_qwen3_trains_the_last_answer_after_its_empty_think_block_and_earlier_ones_as_they_are(qwen3_tokenizer):
    """Qwen3's template writes <think></think> before the answer after the last question only; the training
    variant marks what the assistant writes, header excluded, and TRL's (a <think> block in every turn) is not used."""
    from trl.chat_template_utils import qwen3_training_chat_template

    training = training_template(qwen3_tokenizer)
    assert training != qwen3_training_chat_template
    encoded = qwen3_tokenizer.apply_chat_template(
        MULTI_TURN, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
    )
    assert encoded["input_ids"] == qwen3_tokenizer.apply_chat_template(MULTI_TURN, return_dict=True)["input_ids"]
    runs = trained_runs(encoded["input_ids"], [bool(m) for m in encoded["assistant_masks"]])
    assert [qwen3_tokenizer.decode(run) for run in runs] == [
        'PROC main:\n  PRINT "Hello Chris"\nENDP<|im_end|>',
        '<think>\n\n</think>\n\nPROC main:\n  PRINT "Hello Chris"\n  GET\nENDP<|im_end|>',
    ]


def test_llama31_trains_each_answer_and_its_eot_id_after_the_header(llama31_tokenizer):
    """TRL has no Llama-3.1 training variant: ours marks the trimmed content and <|eot_id|> of each answer."""
    training = training_template(llama31_tokenizer)
    encoded = llama31_tokenizer.apply_chat_template(
        MULTI_TURN, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
    )
    shipped = llama31_tokenizer.apply_chat_template(MULTI_TURN, return_dict=True)["input_ids"]
    assert encoded["input_ids"] == shipped
    runs = trained_runs(encoded["input_ids"], [bool(m) for m in encoded["assistant_masks"]])
    assert [llama31_tokenizer.decode(run) for run in runs] == [
        'PROC main:\n  PRINT "Hello Chris"\nENDP<|eot_id|>',
        'PROC main:\n  PRINT "Hello Chris"\n  GET\nENDP<|eot_id|>',
    ]
    for run in runs:  # each right after its untrained header
        start = next(i for i in range(len(shipped)) if shipped[i : i + len(run)] == run)
        assert llama31_tokenizer.decode(shipped[:start]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gemma_assistant_mask_covers_each_answer_and_its_end_of_turn_exactly(gemma3_tokenizer):
    # TRL's Gemma 3 variant: the "<start_of_turn>model\n" header is a prompt cue, outside the markers
    tokenizer = gemma3_tokenizer
    encoded = tokenizer.apply_chat_template(
        MULTI_TURN, chat_template=training_template(tokenizer), return_dict=True, return_assistant_tokens_mask=True
    )
    assert encoded["input_ids"] == tokenizer.apply_chat_template(MULTI_TURN, return_dict=True)["input_ids"]
    runs = trained_runs(encoded["input_ids"], [bool(m) for m in encoded["assistant_masks"]])
    assert [tokenizer.decode(run) for run in runs] == [
        'PROC main:\n  PRINT "Hello Chris"\nENDP<end_of_turn>\n',
        'PROC main:\n  PRINT "Hello Chris"\n  GET\nENDP<end_of_turn>\n',
    ]
