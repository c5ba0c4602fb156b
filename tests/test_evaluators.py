"""The models the gate scores: reference likelihoods agree between transformers and llama.cpp, answers
say whether they finished."""

from __future__ import annotations

import pytest

from pipeline.cases import load_cases
from pipeline.evaluators import GGUFModel
from pipeline.hf_evaluator import HFModel, continuation
from tests.conftest import DATA

# The f16 GGUF vs the HF model it was converted from, llama.cpp's kernels vs torch's: measured at most
# 0.0018 nats/token (SmolLM2, 20 references) and 0.0001 (tiny) here; the bound leaves room for other CPUs.
NLL_TOLERANCE = 0.01


def committed_cases():
    errors: list[str] = []
    cases = load_cases(DATA / "gate_cases.jsonl", errors)
    assert errors == []
    return cases


def test_the_reference_continues_the_prompt_tokens_or_is_tokenized_alone():
    assert continuation([1, 2], [1, 2, 3, 4], lambda: [9]) == [3, 4]
    assert continuation([1, 2], [1, 5, 3], lambda: [9]) == [9]  # the boundary merged: tokenize it alone
    assert continuation([1, 2], [1, 2, 3, 4, 5], lambda: [9], max_tokens=2) == [3, 4]  # the probes' cut
    assert continuation([1, 2], [1, 5, 3], lambda: [9, 8, 7], max_tokens=2) == [9, 8]


def test_hf_references_scored_in_length_sorted_batches_give_what_each_gives_alone(tiny_merged):
    """HFModel sorts references by length, pads each batch and takes logits only where a reference token is
    predicted: the result must not depend on the other rows of the batch, nor on the order given."""
    cases = [case for case in committed_cases() if case.reference]
    conversations, references = [c.messages() for c in cases], [c.reference for c in cases]
    hf = HFModel(tiny_merged, seed=42, name="hf")
    together = hf.nll(conversations, references, id)
    alone = [
        hf.nll([conversation], [reference], id)[0]
        for conversation, reference in zip(conversations, references, strict=True)
    ]
    assert len({round(value, 3) for value in together}) > 1
    assert max(abs(a - b) for a, b in zip(together, alone, strict=True)) < 1e-4


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_transformers_and_llama_cpp_give_the_same_reference_nll_for_the_f16_gguf(
    model, request, tiny_merged, tiny_gguf
):
    from transformers import AutoTokenizer

    from pipeline.ollama_template import family_for

    hf_dir, gguf = (
        (tiny_merged, tiny_gguf.out)
        if model == "tiny"
        else (request.getfixturevalue("smollm2_base"), request.getfixturevalue("smollm2_gguf").out)
    )
    family = family_for(AutoTokenizer.from_pretrained(hf_dir))
    cases = [case for case in committed_cases() if case.reference]
    conversations, references = [c.messages() for c in cases], [c.reference for c in cases]
    hf = HFModel(hf_dir, seed=42, name="hf")
    llama = GGUFModel(gguf, "f16", 2048, 42, family.template, family.stop, None)
    try:
        ticks: list[int] = []
        from_hf = hf.nll(conversations, references, ticks.append)
        from_llama = llama.nll(conversations, references, ticks.append)
        # the probes' cut (gate.probe_max_tokens): the first 4 tokens of each reference, the same in both
        cut_hf, cut_llama = hf.nll(conversations, references, id, 4), llama.nll(conversations, references, id, 4)
    finally:
        llama.close()
    assert sum(ticks) == 2 * len(cases)  # progress: one tick per reference scored
    assert max(abs(a - b) for a, b in zip(cut_hf, cut_llama, strict=True)) <= NLL_TOLERANCE
    assert max(abs(a - b) for a, b in zip(cut_hf, from_hf, strict=True)) > 0.05  # the cut scored fewer tokens
    gaps = {case.id: round(abs(a - b), 4) for case, a, b in zip(cases, from_hf, from_llama, strict=True)}
    print(f"{model}: largest |NLL_hf - NLL_llama.cpp| {max(gaps.values()):.4f} nats/token; {gaps}")
    assert max(gaps.values()) <= NLL_TOLERANCE
    if model == "smollm2":
        # a real model finds a correct plain answer far likelier than OPL it never saw
        by_id = dict(zip((c.id for c in cases), from_hf, strict=True))
        assert by_id["keep-capital-france"] < 1.0 < by_id["learn-hello-chris"]


def test_an_answer_cut_at_max_new_tokens_is_not_finished(smollm2_base):
    model = HFModel(smollm2_base, seed=42, name="base")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    short, full = model.answers([question], 3, id), model.answers([question], 64, id)
    assert short[0].finished is False and full[0].finished is True and "Paris" in full[0].text


def test_a_gguf_reusing_the_shared_prompt_prefix_scores_and_answers_as_a_fresh_model_does(tiny_merged, tiny_gguf):
    """GGUFModel keeps the KV cache of the prefix consecutive prompts share (the chat template's preamble):
    each reference's NLL and each answer must be what a model that saw only that conversation gives."""
    from transformers import AutoTokenizer

    from pipeline.ollama_template import family_for

    family = family_for(AutoTokenizer.from_pretrained(tiny_merged))
    cases = [case for case in committed_cases() if case.reference][:6]

    def load() -> GGUFModel:
        return GGUFModel(tiny_gguf.out, "f16", 2048, 42, family.template, family.stop, None)

    together = load()
    try:
        nll = together.nll([c.messages() for c in cases], [c.reference for c in cases], id)
        answers = together.answers([c.messages() for c in cases], 16, id)
        # the gate's order: each case's answer, then its reference on the KV cache of the same prompt
        both = together.cases([c.messages() for c in cases], [c.reference for c in cases], 16, id)
    finally:
        together.close()
    assert [a.text for a in both[0]] == [a.text for a in answers]
    assert both[1] == pytest.approx(nll, abs=1e-4)
    for case, value, answer in zip(cases, nll, answers, strict=True):
        alone = load()
        try:
            assert alone.nll([case.messages()], [case.reference], id) == pytest.approx([value], abs=1e-4), case.id
            assert alone.answers([case.messages()], 16, id)[0].text == answer.text, case.id
        finally:
            alone.close()
