"""`sdpa_packed` (pipeline/packed_attention.py): a padding-free row attended one conversation at a time gives
what transformers' `sdpa` gives with its block-diagonal mask over the whole row, and what each conversation
gives alone, forward and backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import packed_attention
from pipeline.packed_attention import segments

LENGTHS = (5, 9, 3)


def test_segments_are_the_conversations_of_a_packed_row_and_none_otherwise():
    assert segments(torch.tensor([0, 3, 5], dtype=torch.int32), 5) == [(0, 3), (3, 5)]
    assert segments(torch.tensor([0, 5], dtype=torch.int32), 5) is None  # one conversation: nothing to split
    assert segments(torch.tensor([0, 3, 4], dtype=torch.int32), 5) is None  # does not cover the row
    assert segments(None, 5) is None


def tiny_llama(attention: str, sliding_window: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    if sliding_window:
        for layer in model.model.layers:
            layer.self_attn.sliding_window = sliding_window
    return model


def packed_row() -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS), "use_cache": False}  # fmt: skip


def logits_and_grads(model, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    logits = model(**row).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


def test_a_packed_row_gives_what_the_masked_dense_sdpa_gives_forward_and_backward():
    packed_attention.register()
    row = packed_row()
    dense_logits, dense_grad = logits_and_grads(tiny_llama("sdpa"), row)
    packed_logits, packed_grad = logits_and_grads(tiny_llama(packed_attention.NAME), row)
    torch.testing.assert_close(packed_logits, dense_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_grad, dense_grad, atol=1e-5, rtol=1e-4)


def test_each_conversation_of_a_packed_row_reads_as_it_does_alone():
    packed_attention.register()
    model, row = tiny_llama(packed_attention.NAME), packed_row()
    with torch.no_grad():
        packed = model(**row).logits[0]
        start = 0
        for length in LENGTHS:
            alone = model(input_ids=row["input_ids"][:, start : start + length]).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-5)
            start += length


@pytest.mark.parametrize("window", [4, 100])
def test_a_sliding_window_shorter_than_a_conversation_keeps_the_masked_path(window, monkeypatch):
    """The mask carries the window; splitting would drop it. A window that every conversation fits in is no limit."""
    packed_attention.register()
    calls: list[bool] = []
    from transformers.integrations import sdpa_attention

    real = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask is None)
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    with torch.no_grad():
        tiny_llama(packed_attention.NAME, sliding_window=window)(**packed_row())
    assert calls == ([False] * 2 if window == 4 else [True] * 2 * len(LENGTHS))
